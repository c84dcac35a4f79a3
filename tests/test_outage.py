"""Database outages with real processes: orders are refused, never acknowledged, and service resumes."""

from __future__ import annotations

import sqlite3
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.databases import fresh_database_url, query
from tests.pgcluster import PrivatePostgreSQL
from tests.processes import RunningDeployment

PASSWORD = "correct horse battery"


class OutageTests(TestCase):
    """The master refuses orders while its database is away and recovers by itself."""

    timeout = 300

    @inlineCallbacks
    def deployment(self, url: str) -> Any:
        deployment = RunningDeployment(self.mktemp(), "--database", url)
        self.addCleanup(deployment.stop)
        yield deployment.start()
        password = deployment.password_file(PASSWORD)
        yield deployment.cli_json("register", "alice", "alice@example.com", "--password-file", password)
        yield deployment.cli_json("login", "alice", "--password-file", password)
        return deployment

    @inlineCallbacks
    def refused_then_recovered(self, deployment: RunningDeployment, restore: Any, count: Any) -> Any:
        code, out, err = yield deployment.cli("buy", "AAPL", "1")
        self.assertEqual(code, 1, out + err)
        self.assertIn("database is unavailable; order not accepted", err)
        code, out, err = yield deployment.cli("quote", "AAPL")
        self.assertEqual(code, 0, err)  # the worker's cache still answers
        yield restore()
        self.assertEqual(count(), 1)  # only the order placed before the outage
        for _ in range(600):
            code, out, err = yield deployment.cli("buy", "AAPL", "1", "--json")
            if code == 0:
                break
            yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(code, 0, err)
        fill = yield deployment.cli_json("buy", "KO", "1", "--wait")
        self.assertEqual(fill["status"], "filled")

    @inlineCallbacks
    def test_postgresql_stopped(self) -> Any:
        """PostgreSQL stops: orders are refused with a clear error; it starts again: orders go through."""
        server = PrivatePostgreSQL()
        self.addCleanup(server.destroy)
        yield server.create()
        deployment = yield self.deployment(server.url)
        yield deployment.cli_json("buy", "AAPL", "1")
        yield server.stop()
        yield self.refused_then_recovered(
            deployment, server.start, lambda: query(server.url, "SELECT COUNT(*) FROM orders")[0][0]
        )

    @inlineCallbacks
    def test_sqlite_locked(self) -> Any:
        """Another process holds the SQLite file locked: orders are refused until it lets go."""
        url = fresh_database_url(self, "sqlite")
        deployment = yield self.deployment(url)
        yield deployment.cli_json("buy", "AAPL", "1")
        locker = sqlite3.connect(url[len("sqlite:///") :], isolation_level=None)
        self.addCleanup(locker.close)
        locker.execute("BEGIN EXCLUSIVE")

        def release() -> None:
            locker.execute("ROLLBACK")

        yield self.refused_then_recovered(
            deployment, release, lambda: query(url, "SELECT COUNT(*) FROM orders")[0][0]
        )
