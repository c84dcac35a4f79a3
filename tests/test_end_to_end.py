"""End to end: real twistd processes on loopback, driven through the ``papertrader`` CLI over TLS."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import stat
import sys
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.internet.utils import getProcessOutputAndValue
from twisted.protocols import amp
from twisted.trial.unittest import TestCase

from papertrader import tls
from papertrader.errors import WorkerRefused
from papertrader.protocol import WorkerHello
from tests.databases import fresh_postgresql
from tests.processes import ROOT, TWISTD, RunningDeployment

PASSWORD = "correct horse battery"


class EndToEndTests(TestCase):
    """A whole deployment: master, its local worker, and the command-line client."""

    timeout = 240

    def database_args(self) -> list[str]:
        """Extra master options choosing the database (none: SQLite in the data directory)."""
        return []

    @inlineCallbacks
    def setUp(self) -> Any:
        # A throttled account stays throttled for the whole test, however slowly the CLI starts.
        throttle = ("--login-delay", "600", "--login-max-delay", "600")
        self.deployment = RunningDeployment(self.mktemp(), *self.database_args(), *throttle)
        self.addCleanup(self.deployment.stop)
        yield self.deployment.start()
        self.password = self.deployment.password_file(PASSWORD)

    @inlineCallbacks
    def test_register_login_buy_sell(self) -> Any:
        """Register, log in, buy, see the fill in portfolio and history with its settlement time, sell."""
        d = self.deployment
        code, out, err = yield d.cli("register", "alice", "alice@example.com", "--password-file", self.password)
        self.assertEqual((code, err), (0, ""), out)
        code, out, err = yield d.cli("login", "alice", "--password-file", self.password)
        self.assertEqual(code, 0, err)
        self.assertIn("logged in as alice", out)
        session_file = os.path.join(d.base, "config", "papertrader", "session.json")
        self.assertEqual(stat.S_IMODE(os.stat(session_file).st_mode), 0o600)

        fill = yield d.cli_json("buy", "AAPL", "5", "--wait")
        self.assertEqual((fill["status"], fill["symbol"], fill["quantity"]), ("filled", "AAPL", 5))

        portfolio = yield d.cli_json("portfolio")
        [position] = portfolio["positions"]
        self.assertEqual((position["symbol"], position["quantity"]), ("AAPL", 5))
        self.assertEqual(portfolio["cash_cents"], 10_000_000 - 5 * fill["price_cents"])

        [trade] = yield d.cli_json("history")
        self.assertEqual((trade["order_id"], trade["side"], trade["quantity"]), (fill["order_id"], "buy", 5))
        self.assertEqual(trade["settled_at"], fill["settled_at"])
        self.assertEqual(trade["total_cents"], 5 * fill["price_cents"])

        queued = yield d.cli_json("sell", "AAPL", "2")
        self.assertEqual(queued["status"], "queued")
        code, out, err = yield d.cli("orders")
        self.assertEqual(code, 0, err)
        self.assertRegex(out, rf"\s{queued['order_id']}\s+sell\s+AAPL\s+2\s+(queued|filled)")
        sold = yield d.cli_json("sell", "AAPL", "1", "--wait")
        self.assertEqual(sold["status"], "filled")
        orders = yield d.cli_json("orders")
        self.assertEqual([o["status"] for o in orders], ["filled", "filled", "filled"])
        portfolio = yield d.cli_json("portfolio")
        self.assertEqual([(p["symbol"], p["quantity"]) for p in portfolio["positions"]], [("AAPL", 2)])
        history = yield d.cli_json("history")
        self.assertEqual([t["side"] for t in history], ["sell", "sell", "buy"])

        code, out, err = yield d.cli("logout")
        self.assertEqual(code, 0, err)
        code, out, err = yield d.cli("portfolio")
        self.assertEqual(code, 2)
        self.assertIn("not logged in", err)

        # Fewer entries than log_memory_entries were logged: all were held in
        # memory until SIGTERM, and all must be in the event logs now.
        yield d.stop()
        logs = os.path.join(d.data, "logs")
        with open(os.path.join(logs, "master-events.log"), encoding="utf-8") as f:
            master_events = f.read()
        self.assertRegex(
            master_events,
            r"\d{4}-\d\d-\d\dT[\d:.]+\+00:00 \[info\] papertrader/master/protocol\.py:\d+ proof: "
            r"worker local-1 \(version [\d.]+, key [0-9A-F]{40}\) connected",
        )
        self.assertIn("settling the order queue", master_events)
        with open(os.path.join(logs, "worker-local-1-events.log"), encoding="utf-8") as f:
            self.assertIn("connected to the master as local-1", f.read())

    @inlineCallbacks
    def test_bad_input(self) -> Any:
        """Each bad input gets a one-line message and a non-zero exit; nothing stored changes."""
        d = self.deployment
        code, out, err = yield d.cli("portfolio")
        self.assertEqual(code, 2)
        self.assertEqual(err, "papertrader: error: not logged in; run 'papertrader login USERNAME' first\n")
        yield d.cli_json("register", "bob", "bob@example.com", "--password-file", self.password)
        yield d.cli_json("login", "bob", "--password-file", self.password)
        before = yield d.cli_json("portfolio")

        refusals = [
            (("register", "bob", "other@example.com", "--password-file", self.password), "already taken"),
            (("register", "carol", "carol-at-example", "--password-file", self.password), "malformed email"),
            (("buy", "NOPE", "1"), "unknown symbol 'NOPE'"),
            (("buy", "AAPL", "0"), "at least 1"),
            (("buy", "AAPL", "-3"), "at least 1"),
            (("buy", "AAPL", "2.5"), "whole number"),
            (("buy", "AAPL", "100001"), "at most 100000"),
            (("buy", "NFLX", "100000"), "insufficient cash"),
            (("sell", "MSFT", "1"), "not enough shares"),
            (("quote", "NOPE"), "unknown symbol"),
        ]
        for args, message in refusals:
            code, out, err = yield d.cli(*args)
            self.assertEqual(code, 1, f"{args}: {out}{err}")
            self.assertIn(message, err)
            self.assertEqual(len(err.strip().splitlines()), 1, err)

        code, _, wrong = yield d.cli("login", "bob", "--password-file", d.password_file("not the password"))
        self.assertEqual(code, 1)
        code, _, unknown = yield d.cli("login", "nobody", "--password-file", self.password)
        self.assertEqual(code, 1)
        self.assertEqual(wrong, unknown)

        code, out, err = yield d.cli("login", "bob", "--password", PASSWORD)
        self.assertEqual(code, 2)

        session_file = os.path.join(d.base, "config", "papertrader", "session.json")
        with open(session_file, encoding="utf-8") as f:
            session = json.load(f)
        forged = dict(session, token="x" * 43)
        with open(session_file, "w", encoding="utf-8") as f:
            json.dump(forged, f)
        code, out, err = yield d.cli("buy", "AAPL", "1")
        self.assertEqual(code, 1)
        self.assertIn("session is not valid", err)
        with open(session_file, "w", encoding="utf-8") as f:
            json.dump(session, f)

        host, port = d.worker_address()
        yield threads.deferToThread(_send_garbage, host, port, os.path.join(d.data, "tls", "ca.pem"))

        after = yield d.cli_json("portfolio")
        self.assertEqual(after["cash_cents"], before["cash_cents"])
        self.assertEqual(after["positions"], before["positions"])
        orders = yield d.cli_json("orders")
        self.assertEqual(orders, [])
        fill = yield d.cli_json("buy", "KO", "1", "--wait")
        self.assertEqual(fill["status"], "filled")

    @inlineCallbacks
    def test_account_protection(self) -> Any:
        """Through the CLI: wrong passwords are throttled (one message); passwd and logout --everywhere end sessions."""
        d = self.deployment
        yield d.cli_json("register", "dana", "dana@example.com", "--password-file", self.password)
        wrong = d.password_file("not the password")
        messages = set()
        for _ in range(6):
            code, out, err = yield d.cli("login", "dana", "--password-file", wrong)
            self.assertEqual(code, 1, err)
            messages.add(err)
        code, out, err = yield d.cli("login", "dana", "--password-file", self.password)
        self.assertEqual(code, 1, "the right password too is refused while the account is throttled")
        self.assertEqual(messages, {err})

        yield d.cli_json("register", "erin", "erin@example.com", "--password-file", self.password)
        yield d.cli_json("login", "erin", "--password-file", self.password)
        session_file = os.path.join(d.base, "config", "papertrader", "session.json")
        with open(session_file, encoding="utf-8") as f:
            first = json.load(f)
        yield d.cli_json("login", "erin", "--password-file", self.password)
        new = d.password_file("a brand new secret")
        code, out, err = yield d.cli("passwd", "--password-file", self.password, "--new-password-file", new)
        self.assertEqual(code, 0, err)
        self.assertIn("2 sessions ended", out)
        with open(session_file, "w", encoding="utf-8") as f:
            json.dump(first, f)
        code, out, err = yield d.cli("portfolio")
        self.assertEqual(code, 1)
        self.assertIn("log in again", err)
        code, out, err = yield d.cli("login", "erin", "--password-file", self.password)
        self.assertEqual(code, 1)
        yield d.cli_json("login", "erin", "--password-file", new)
        ended = yield d.cli_json("logout", "--everywhere")
        self.assertEqual(ended["sessions"], 1)

    @inlineCallbacks
    def test_worker_name_bound_to_certificate(self) -> Any:
        """Over real TLS, a certificate of the deployment that does not name the worker cannot log in as it."""
        d = self.deployment
        with open(os.path.join(d.base, "master.log"), encoding="utf-8") as f:
            port = int(re.search(r"listening for workers on .*port=(\d+)", f.read()).group(1))
        tls_dir = os.path.join(d.data, "tls")
        ca = os.path.join(tls_dir, "ca.pem")
        master_certificate = tls.Identity(os.path.join(tls_dir, "master.pem"), os.path.join(tls_dir, "master.key"), ca)
        options = yield threads.deferToThread(tls.client_options, "localhost", ca, master_certificate)
        connection = yield tls.tls_client_endpoint(reactor, "localhost", port, options).connect(
            Factory.forProtocol(amp.AMP)
        )
        self.addCleanup(connection.transport.loseConnection)
        error = yield self.assertFailure(
            connection.callRemote(WorkerHello, name="local-1", version="0"), WorkerRefused
        )
        self.assertIn("not for a worker named 'local-1'", str(error))
        code, out, err = yield d.cli("quote", "AAPL")
        self.assertEqual(code, 0, err)  # the real local-1 is still serving

    @inlineCallbacks
    def test_untrusted_ca_refused(self) -> Any:
        """A client that trusts another CA refuses the worker's certificate."""
        other = os.path.join(self.deployment.base, "other-ca")
        ca = yield threads.deferToThread(tls.create_ca, other)
        code, out, err = yield self.deployment.cli("quote", "AAPL", "--ca", ca)
        self.assertEqual(code, 2)
        self.assertIn("TLS handshake failed", err)


def _send_garbage(host: str, port: int, ca: str) -> None:
    """Send bytes that are not AMP: once in plain TCP, once inside a verified TLS session."""
    with socket.create_connection((host, port), timeout=30) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: papertrader\r\n\r\n")
        raw.recv(1024)
    context = ssl.create_default_context(cafile=ca)
    with socket.create_connection((host, port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname=host) as wrapped:
            wrapped.sendall(b"\xff\xff" + bytes(range(256)) * 4)
            while wrapped.recv(1024):
                pass


class PostgreSQLEndToEndTests(EndToEndTests):
    """The same, with the master on a fresh PostgreSQL database (``--database postgresql://...``)."""

    def database_args(self) -> list[str]:
        return ["--database", fresh_postgresql(self)]


class TwistdTests(TestCase):
    """The twistd command line itself."""

    @inlineCallbacks
    def test_help_lists_plugins(self) -> Any:
        """``twistd --help`` lists both PaperTrader daemons."""
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, ["-c", TWISTD, "--help"], env=_env(), path=os.path.abspath(".")
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"papertrader-master", out)
        self.assertIn(b"papertrader-worker", out)

    @inlineCallbacks
    def test_bad_configuration_refused(self) -> Any:
        """A master with invalid settings refuses to start and names every problem."""
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-c", TWISTD, "-n", "--pidfile=", "papertrader-master", "--update-interval", "-1", "--workers", "many",
             "--assets", os.path.abspath("no-such-assets.csv"), "--data-dir", os.path.abspath(self.mktemp())],
            env=_env(),
            path=os.path.abspath("."),
        )
        self.assertNotEqual(code, 0)
        for problem in (b"update_interval", b"workers", b"no-such-assets.csv"):
            self.assertIn(problem, out + err)


class RefusedStartTests(TestCase):
    """A master that cannot use its configuration or database refuses to start, naming the problem."""

    @inlineCallbacks
    def master(self, *args: str) -> Any:
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-c", TWISTD, "-n", "--pidfile=", "papertrader-master", "--listen", "tcp:0:interface=127.0.0.1",
             "--worker-listen", "tcp:0:interface=127.0.0.1", *args],
            env=_env(),
            path=os.path.abspath("."),
        )
        return code, (out + err).decode("utf-8", "replace")

    @inlineCallbacks
    def test_corrupt_database(self) -> Any:
        """A database file full of garbage: exit status 1 and the reason in the log."""
        data = os.path.abspath(self.mktemp())
        os.makedirs(data)
        with open(os.path.join(data, "papertrader.sqlite"), "wb") as f:
            f.write(b"this is not an SQLite database\n" * 200)
        code, output = yield self.master("--data-dir", data)
        self.assertEqual(code, 1, output)
        self.assertIn("the master could not start: DatabaseError: file is not a database", output)

    @inlineCallbacks
    def test_unreadable_configuration(self) -> Any:
        """A configuration file that cannot be read or parsed is named in the refusal."""
        missing = os.path.abspath("missing.ini")
        code, output = yield self.master("--config", missing)
        self.assertNotEqual(code, 0)
        self.assertIn(f"cannot read configuration {missing}", output)
        corrupt = os.path.abspath(self.mktemp())
        with open(corrupt, "w") as f:
            f.write("[papertrader\nworkers = = 1\n")
        code, output = yield self.master("--config", corrupt)
        self.assertNotEqual(code, 0)
        self.assertIn(corrupt, output)

    @inlineCallbacks
    def test_bad_database_setting(self) -> Any:
        """An unsupported database URL is refused before anything starts."""
        code, output = yield self.master("--database", "mysql://root@localhost/x", "--data-dir", self.mktemp())
        self.assertNotEqual(code, 0)
        self.assertIn("database: expected empty (SQLite in data_dir), sqlite:///PATH or postgresql://", output)

    @inlineCallbacks
    def test_unreachable_postgresql(self) -> Any:
        """A PostgreSQL nobody listens on: exit status 1 naming the connection failure."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        code, output = yield self.master(
            "--database", f"postgresql://postgres@127.0.0.1:{port}/none", "--data-dir", self.mktemp()
        )
        self.assertEqual(code, 1, output)
        self.assertIn("the master could not start: OperationalError", output)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
