"""Crash safety with real processes: SIGKILL the master while it settles a large tick, restart, reconcile."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from papertrader.client.library import connect
from papertrader.errors import PurchaseFailed, SellFailed
from tests.databases import fresh_database_url, query
from tests.processes import RunningDeployment

USERS = 40
ORDERS_PER_USER = 250
WINDOW = 50
SYMBOLS = ("AAPL", "MSFT", "KO", "JPM", "XOM")
STARTING_CASH = 10_000_000
PASSWORD = "correct horse battery"


class CrashTestsMixin:
    """Every acknowledged order is settled exactly once, whatever the kill interrupted."""

    backend: str
    timeout = 600
    log = Logger()

    @inlineCallbacks
    def test_sigkill_during_settlement(self) -> Any:
        """SIGKILL mid-settlement of thousands of orders; after restart cash and shares reconcile to the cent."""
        url = fresh_database_url(self, self.backend)
        # All USERS register from one address (loopback), more than the default hourly limit.
        deployment = RunningDeployment(
            self.mktemp(), "--database", url, "--update-interval", "3600",
            "--registrations-per-address-per-hour", str(USERS), log_to_stdout=True,
        )
        self.addCleanup(deployment.stop)
        yield deployment.start()

        acknowledged = yield self.queue_orders(deployment)
        self.assertGreater(len(acknowledged), USERS * ORDERS_PER_USER // 2)
        self.assertEqual(query(url, "SELECT COUNT(*) FROM orders WHERE status = 'queued'"), [(len(acknowledged),)])

        # Restart: the first update after start settles the whole queue; kill it as it begins.
        yield deployment.kill()
        settling = deployment.spawn().wait_for(b"settling the order queue")
        yield settling
        yield deployment.kill()
        [(still_queued,)] = query(url, "SELECT COUNT(*) FROM orders WHERE status = 'queued'")
        self.log.info("after the kill {queued} orders were still queued", queued=still_queued)
        self.assertIn(still_queued, (0, len(acknowledged)), "a settlement must never be half applied")

        deployment.spawn()
        for _ in range(1200):
            if query(url, "SELECT COUNT(*) FROM orders WHERE status = 'queued'") == [(0,)]:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.reconcile(url, acknowledged)

    @inlineCallbacks
    def queue_orders(self, deployment: RunningDeployment) -> Any:
        """Many users pipeline buys and sells; fires with the acknowledged order ids."""
        host, port = deployment.worker_address()
        ca = os.path.join(deployment.data, "tls", "ca.pem")
        clients = []
        for n in range(USERS):
            client = yield connect(reactor, host, port, ca)
            self.addCleanup(client.close)
            yield client.register(f"trader{n}", f"trader{n}@example.com", PASSWORD)
            yield client.login(f"trader{n}", PASSWORD)
            clients.append(client)
        acknowledged: list[int] = []

        @inlineCallbacks
        def trade(n: int, client: Any) -> Any:
            for start in range(0, ORDERS_PER_USER, WINDOW):
                calls = []
                for i in range(start, start + WINDOW):
                    symbol = SYMBOLS[(n + i) % len(SYMBOLS)]
                    place = client.sell if i % 7 == 6 else client.buy
                    calls.append(place(symbol, 1 + i % 3).addErrback(_refused))
                answers = yield gatherResults(calls)
                acknowledged.extend(a["order_id"] for a in answers if a)

        yield gatherResults([trade(n, c) for n, c in enumerate(clients)])
        return acknowledged

    def reconcile(self, url: str, acknowledged: list[int]) -> None:
        """Every acknowledged order settled once; cash and positions follow from the history exactly."""
        orders = dict(query(url, "SELECT id, status FROM orders"))
        self.assertEqual(sorted(orders), sorted(acknowledged))
        self.assertEqual(set(orders.values()) - {"filled", "rejected"}, set())
        self.assertEqual(
            query(
                url,
                "SELECT COUNT(*) FROM orders o LEFT JOIN transactions t ON t.order_id = o.id "
                "WHERE (o.status = 'filled' AND t.id IS NULL) OR (o.status <> 'filled' AND t.id IS NOT NULL)",
            ),
            [(0,)],
        )
        [(filled,)] = query(url, "SELECT COUNT(*) FROM orders WHERE status = 'filled'")
        self.assertEqual(query(url, "SELECT COUNT(*), COUNT(DISTINCT order_id) FROM transactions"), [(filled, filled)])
        self.assertGreater(filled, 0)
        mismatched_cash = query(
            url,
            "SELECT u.username FROM users u WHERE u.cash_cents <> ? + COALESCE((SELECT SUM(CASE t.side "
            "WHEN 'sell' THEN t.total_cents ELSE -t.total_cents END) FROM transactions t WHERE t.user_id = u.id), 0)",
            STARTING_CASH,
        )
        self.assertEqual(mismatched_cash, [])
        held = {(u, s): int(q) for u, s, q in query(url, "SELECT user_id, symbol, quantity FROM positions")}
        traded = {
            (u, s): int(q)
            for u, s, q in query(
                url,
                "SELECT user_id, symbol, SUM(CASE side WHEN 'buy' THEN quantity ELSE -quantity END) "
                "FROM transactions GROUP BY user_id, symbol",
            )
            if int(q) != 0
        }
        self.assertEqual(held, traded)


class SQLiteCrashTests(CrashTestsMixin, TestCase):
    """The crash test on SQLite."""

    backend = "sqlite"


class PostgreSQLCrashTests(CrashTestsMixin, TestCase):
    """The crash test on PostgreSQL."""

    backend = "postgresql"


def _refused(failure: Any) -> None:
    """An order refused before queueing (no cash, no shares) is simply not acknowledged."""
    failure.trap(PurchaseFailed, SellFailed)
