"""The ``papertrader`` command's parsing, session file and server resolution (no network)."""

from __future__ import annotations

import argparse
import io
import json
import os
import stat
import sys
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase

from papertrader.client import cli
from papertrader.client import session as session_module
from papertrader.client.library import ClientAMP, client_from_connection
from papertrader.client.session import FIRST_RETRY_DELAY, NoWorkerReachable

COMMANDS = (
    "register", "login", "logout", "quote", "info", "chart", "buy", "sell", "orders", "portfolio", "history", "watch",
    "workers",
)


class ParserTests(SynchronousTestCase):
    """Every command, its help and its options."""

    def test_every_command_has_help(self) -> None:
        """``papertrader COMMAND --help`` prints help mentioning the shared options and exits 0."""
        for command in COMMANDS:
            out = io.StringIO()
            with redirect_stdout(out), self.assertRaises(SystemExit) as caught:
                cli.build_parser().parse_args([command, "--help"])
            self.assertEqual(caught.exception.code, 0)
            for option in ("--server", "--ca", "--json", "--timeout"):
                self.assertIn(option, out.getvalue(), command)

    def test_no_password_on_command_line(self) -> None:
        """There is no way to pass a password as an argument."""
        devnull = io.StringIO()
        for command in (["login", "alice"], ["register", "alice", "a@example.com"]):
            with self.assertRaises(SystemExit) as caught:
                sys.stderr, saved = devnull, sys.stderr
                try:
                    cli.build_parser().parse_args([*command, "--password", "hunter22"])
                finally:
                    sys.stderr = saved
            self.assertEqual(caught.exception.code, 2)

    def test_order_arguments(self) -> None:
        """``buy`` keeps the quantity as typed, for the server to judge, and takes ``--wait``."""
        args = cli.build_parser().parse_args(["buy", "AAPL", "1.5", "--wait", "--server", "h:1"])
        self.assertEqual((args.symbol, args.quantity, args.wait, args.server), ("AAPL", "1.5", True, "h:1"))


    def test_limit_or_all(self) -> None:
        """``--limit N`` takes a positive N, ``--all`` means every row, and the two exclude each other."""
        parser = cli.build_parser()
        self.assertEqual(parser.parse_args(["history", "--limit", "100000"]).limit, 100_000)
        self.assertEqual(parser.parse_args(["history"]).limit, 50)
        self.assertTrue(parser.parse_args(["orders", "--all"]).all)
        devnull = io.StringIO()
        for bad in (["history", "--limit", "0"], ["orders", "--limit", "x"], ["history", "--all", "--limit", "3"]):
            sys.stderr, saved = devnull, sys.stderr
            try:
                with self.assertRaises(SystemExit) as caught:
                    parser.parse_args(bad)
            finally:
                sys.stderr = saved
            self.assertEqual(caught.exception.code, 2, bad)


class FilesTests(SynchronousTestCase):
    """The session file and the password file."""

    def setUp(self) -> None:
        self.home = os.path.abspath(self.mktemp())
        self.patch(os, "environ", dict(os.environ, XDG_CONFIG_HOME=self.home, XDG_DATA_HOME=self.home))

    def test_session_file_private(self) -> None:
        """The session is saved readable by the user alone and read back intact."""
        cli.save_session({"token": "t", "username": "alice"})
        path = cli.session_path()
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o700)
        self.assertEqual(cli.load_session(), {"token": "t", "username": "alice"})
        cli.forget_session()
        self.assertIsNone(cli.load_session())

    def test_password_file(self) -> None:
        """The password is the first line of the file; an empty or missing file is a clear error."""
        os.makedirs(self.home)
        path = os.path.join(self.home, "pw")
        with open(path, "w") as f:
            f.write("s3cret words\nignored\n")
        self.assertEqual(cli.read_password(argparse.Namespace(password_file=path)), "s3cret words")
        open(path, "w").close()
        self.assertRaises(cli.CommandError, cli.read_password, argparse.Namespace(password_file=path))
        error = self.assertRaises(
            cli.CommandError, cli.read_password, argparse.Namespace(password_file=path + "-missing")
        )
        self.assertIn("cannot read password file", str(error))

    def test_resolve_local_deployment(self) -> None:
        """Without --server the CLI uses the local deployment's worker address and CA."""
        data = os.path.join(self.home, "data")
        os.makedirs(os.path.join(data, "tls"))
        with open(os.path.join(data, "worker-local-1.address"), "w") as f:
            f.write("127.0.0.1:40123\n")
        open(os.path.join(data, "tls", "ca.pem"), "w").close()
        args = argparse.Namespace(server=None, ca=None, data_dir=data)
        self.assertEqual(cli.resolve_server(args, None), ("127.0.0.1", 40123, os.path.join(data, "tls", "ca.pem")))
        args = argparse.Namespace(server="localhost:9", ca=None, data_dir=data)
        self.assertEqual(cli.resolve_server(args, None)[:2], ("localhost", 9))

    def make_deployment(self, name: str, address: str) -> tuple[str, str]:
        """A local deployment's data directory with a worker address file and a CA; returns both paths."""
        data = os.path.join(self.home, name)
        os.makedirs(os.path.join(data, "tls"))
        with open(os.path.join(data, "worker-local-1.address"), "w") as f:
            f.write(address + "\n")
        ca = os.path.join(data, "tls", "ca.pem")
        open(ca, "w").close()
        return data, ca

    def test_explicit_data_dir_beats_session(self) -> None:
        """An explicit --data-dir wins over the server and CA remembered in the saved session."""
        old_data, old_ca = self.make_deployment("old", "127.0.0.1:40001")
        new_data, new_ca = self.make_deployment("new", "127.0.0.1:40002")
        cli.save_session({"token": "t", "server": "127.0.0.1:40001", "ca": old_ca})
        session = cli.load_session()
        args = argparse.Namespace(server=None, ca=None, data_dir=new_data)
        self.assertEqual(cli.resolve_server(args, session), ("127.0.0.1", 40002, new_ca))

    def test_explicit_server_and_ca_beat_data_dir(self) -> None:
        """--server and --ca win over an explicit --data-dir and over the session."""
        old_data, old_ca = self.make_deployment("old", "127.0.0.1:40001")
        new_data, new_ca = self.make_deployment("new", "127.0.0.1:40002")
        cli.save_session({"token": "t", "server": "127.0.0.1:40001", "ca": old_ca})
        session = cli.load_session()
        args = argparse.Namespace(server="localhost:9", ca=old_ca, data_dir=new_data)
        self.assertEqual(cli.resolve_server(args, session), ("localhost", 9, old_ca))
        args = argparse.Namespace(server="localhost:9", ca=None, data_dir=new_data)
        self.assertEqual(cli.resolve_server(args, session), ("localhost", 9, new_ca))
        args = argparse.Namespace(server=None, ca=old_ca, data_dir=new_data)
        self.assertEqual(cli.resolve_server(args, session), ("127.0.0.1", 40002, old_ca))

    def test_session_beats_default_data_dir(self) -> None:
        """Without --data-dir the session's server and CA win over the default local deployment."""
        self.make_deployment("papertrader", "127.0.0.1:40002")  # the default: $XDG_DATA_HOME/papertrader
        old_data, old_ca = self.make_deployment("old", "127.0.0.1:40001")
        cli.save_session({"token": "t", "server": "127.0.0.1:40001", "ca": old_ca})
        args = argparse.Namespace(server=None, ca=None, data_dir=None)
        self.assertEqual(cli.resolve_server(args, cli.load_session()), ("127.0.0.1", 40001, old_ca))

    def test_resolve_workers(self) -> None:
        """The worker list: every local worker; the saved session's worker first, then the workers its
        login listed; with --server that worker alone."""
        data, ca = self.make_deployment("papertrader", "127.0.0.1:40001")
        with open(os.path.join(data, "worker-local-2.address"), "w") as f:
            f.write("127.0.0.1:40002\n")
        args = argparse.Namespace(server=None, ca=None, data_dir=data)
        self.assertEqual(cli.resolve_workers(args, None), (["127.0.0.1:40001", "127.0.0.1:40002"], ca))
        saved = {"token": "t", "server": "127.0.0.1:40002", "workers": ["127.0.0.1:40001", "127.0.0.1:40002"]}
        args = argparse.Namespace(server=None, ca=None, data_dir=None)
        self.assertEqual(cli.resolve_workers(args, saved)[0], ["127.0.0.1:40002", "127.0.0.1:40001"])
        args = argparse.Namespace(server="[::1]:9", ca=None, data_dir=None)
        self.assertEqual(cli.resolve_workers(args, saved)[0], ["[::1]:9"])

    def test_resolve_nothing_found(self) -> None:
        """With no server and no local deployment, the error says how to proceed."""
        args = argparse.Namespace(server=None, ca=None, data_dir=os.path.join(self.home, "none"))
        error = self.assertRaises(cli.CommandError, cli.resolve_server, args, None)
        self.assertIn("--server", str(error))
        args = argparse.Namespace(server="localhost:9", ca=None, data_dir=os.path.join(self.home, "none"))
        error = self.assertRaises(cli.CommandError, cli.resolve_server, args, None)
        self.assertIn("--ca", str(error))


class _FakeClient:
    """Answers like the library would, without a network."""

    token = None

    def __init__(self) -> None:
        self.limits: list[int | None] = []

    def orders(self, limit: int | None) -> Any:
        self.limits.append(limit)
        queued = {"order_id": 7, "side": "buy", "symbol": "AAPL", "quantity": 3, "status": "queued",
                  "reason": None, "created_at": "2026-01-01T00:00:00.000000+00:00", "settled_at": None,
                  "price_cents": None}
        filled = dict(queued, order_id=6, status="filled", price_cents=19_050,
                      settled_at="2026-01-01T00:01:00.000000+00:00")
        return succeed({"orders": [queued, filled]})


class OutputTests(SynchronousTestCase):
    """What the commands print."""

    def test_orders_table(self) -> None:
        """Queued orders (no price yet) and filled ones (with their price) are both listed."""
        args = cli.build_parser().parse_args(["orders"])
        out = io.StringIO()
        with redirect_stdout(out):
            self.successResultOf(cli.cmd_orders(_FakeClient(), args, {"token": "t"}, None))
        lines = out.getvalue().splitlines()
        self.assertRegex(lines[1], r"^\s+7\s+buy\s+AAPL\s+3\s+queued\s+-\s+placed 2026-01-01")
        self.assertRegex(lines[2], r"^\s+6\s+buy\s+AAPL\s+3\s+filled\s+190\.50\s+2026-01-01T00:01")

    def test_orders_all(self) -> None:
        """``orders --all`` asks the library for every order, ``--limit N`` for N."""
        client = _FakeClient()
        for argv in (["orders", "--all"], ["orders", "--limit", "300"]):
            with redirect_stdout(io.StringIO()):
                self.successResultOf(cli.cmd_orders(client, cli.build_parser().parse_args(argv), {"token": "t"}, None))
        self.assertEqual(client.limits, [None, 300])

class _Watcher:
    """A client for ``watch``: records what it is asked and hands the CLI the ticks the test pushes."""

    def __init__(self) -> None:
        self.subscribed: list[Any] = []
        self.heartbeats: list[float] = []
        self.closed: Deferred[Any] = Deferred()
        self.on_tick: Any = None

    def on_price_tick(self, callback: Any) -> None:
        self.on_tick = callback

    def subscribe(self, prices: Any) -> Any:
        self.subscribed.append(prices)
        return succeed({})

    def keep_alive(self, interval: float) -> None:
        self.heartbeats.append(interval)

    def when_given_up(self) -> Deferred[Any]:
        return self.closed


class WatchTests(SynchronousTestCase):
    """``papertrader watch`` subscribes to prices and prints each update."""

    def watch(self, *argv: str) -> tuple[_Watcher, Deferred[Any], io.StringIO]:
        client = _Watcher()
        out = io.StringIO()
        with redirect_stdout(out):
            d = cli.cmd_watch(client, cli.build_parser().parse_args(["watch", *argv]), None, None)
        return client, d, out

    def test_count_then_stops(self) -> None:
        """``watch AAPL KO --count 2 --json`` asks for those symbols, prints two JSON lines, then ends."""
        client, d, out = self.watch("AAPL", "KO", "--count", "2", "--json")
        self.assertEqual(client.subscribed, [["AAPL", "KO"]])
        self.assertEqual(client.heartbeats, [cli.WATCH_HEARTBEAT])
        with redirect_stdout(out):
            for tick in (1, 2):
                self.assertNoResult(d)
                client.on_tick({"tick": tick, "as_of": f"t{tick}", "prices": [
                    {"symbol": "KO", "price_cents": 6000}, {"symbol": "AAPL", "price_cents": 19_050}]})
        self.successResultOf(d)
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual([line["tick"] for line in lines], [1, 2])
        self.assertEqual([p["symbol"] for p in lines[0]["prices"]], ["AAPL", "KO"])

    def test_text_and_all(self) -> None:
        """``watch --all`` asks for every price; each update is one line; a session that can reach no
        worker ends it, with the reason."""
        client, d, out = self.watch("--all")
        self.assertEqual(client.subscribed, ["all"])
        with redirect_stdout(out):
            client.on_tick({"tick": 3, "as_of": "t3", "prices": [{"symbol": "KO", "price_cents": 6000}]})
        self.assertEqual(out.getvalue(), "update 3 as of t3: KO 60.00\n")
        client.closed.callback(NoWorkerReachable("no worker could be reached"))
        self.failureResultOf(d, NoWorkerReachable)

    def test_symbols_or_all(self) -> None:
        """Neither symbols nor ``--all``, or both, is a usage error."""
        for argv in ([], ["AAPL", "--all"]):
            _, d, _ = self.watch(*argv)
            self.assertIn("--all", str(self.failureResultOf(d, cli.CommandError).value))


class RunFailureTests(SynchronousTestCase):
    """``cli.run`` turns every failure into one ``papertrader: error:`` line and an exit code."""

    def setUp(self) -> None:
        self.home = os.path.abspath(self.mktemp())
        self.patch(os, "environ", dict(os.environ, XDG_CONFIG_HOME=self.home, XDG_DATA_HOME=self.home))
        self.data = os.path.join(self.home, "data")
        os.makedirs(os.path.join(self.data, "tls"))
        with open(os.path.join(self.data, "worker-local-1.address"), "w") as f:
            f.write("127.0.0.1:40123\n")
        open(os.path.join(self.data, "tls", "ca.pem"), "w").close()
        self.connection = ClientAMP()
        self.transport = StringTransport()
        self.connection.makeConnection(self.transport)
        self.patch(session_module, "connect", lambda *args: succeed(client_from_connection(self.connection)))

    def run_cli(self, *argv: str) -> tuple[int, str]:
        """Run ``papertrader ARGV`` in process; return its exit code and what it printed on stderr."""
        args = cli.build_parser().parse_args([*argv, "--data-dir", self.data])
        err = io.StringIO()
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            failure = self.failureResultOf(cli.run(None, args), SystemExit)
        return failure.value.code, err.getvalue()

    def test_oversized_argument_not_sent(self) -> None:
        """A symbol longer than an AMP value is refused before anything is sent (exit code 2)."""
        code, err = self.run_cli("quote", "A" * 65_536)
        self.assertEqual(code, 2)
        self.assertEqual(err, "papertrader: error: SYMBOL is too long to send (65,536 bytes; at most 65,535)\n")
        self.assertEqual(self.transport.value(), b"")

    def test_too_long_while_sending(self) -> None:
        """A value AMP cannot carry (here a corrupt saved token) is one error line, exit code 2."""
        cli.save_session({"token": "t" * 70_000, "username": "alice"})
        code, err = self.run_cli("portfolio")
        self.assertEqual(code, 2)
        self.assertEqual(err, "papertrader: error: token is too long to send (at most 65,535 bytes)\n")

    def test_timeout_option(self) -> None:
        """``--timeout`` reaches the connection attempt and the session's request timeout; the default is the
        session's, and a timeout that is not a number of seconds above 0 is a usage error."""
        timeouts: list[float] = []
        sessions: list[cli.Session] = []

        def connect(reactor: Any, host: str, port: int, ca: str, timeout: float) -> Any:
            timeouts.append(timeout)
            return succeed(client_from_connection(self.connection))

        class Recorded(cli.Session):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                sessions.append(self)

        self.patch(session_module, "connect", connect)
        self.patch(cli, "Session", Recorded)
        self.patch(cli.PaperTraderClient, "quote", lambda client, symbol: fail(amp.UnknownRemoteError("x")))
        self.run_cli("quote", "AAPL", "--timeout", "2.5")
        self.assertEqual((timeouts, [s.request_timeout for s in sessions]), ([2.5], [2.5]))
        self.assertEqual(cli.build_parser().parse_args(["quote", "AAPL"]).timeout, cli.REQUEST_TIMEOUT)
        for bad in ("0", "-1", "soon"):
            with redirect_stderr(io.StringIO()), self.assertRaises(SystemExit) as caught:
                cli.build_parser().parse_args(["quote", "AAPL", "--timeout", bad])
            self.assertEqual(caught.exception.code, 2)

    def test_server_failure(self) -> None:
        """An undeclared error from the server is one error line with exit code 1."""
        self.patch(
            cli.PaperTraderClient, "quote", lambda client, symbol: fail(amp.UnknownRemoteError("Unknown Error"))
        )
        code, err = self.run_cli("quote", "AAPL")
        self.assertEqual(code, 1)
        self.assertEqual(err, "papertrader: error: the server could not answer: Unknown Error\n")

    def test_workers(self) -> None:
        """``workers`` prints the directory read from the local deployment's directory listener (or
        --directory); a directory that cannot be reached is one error line with exit code 2."""
        with open(os.path.join(self.data, "directory.address"), "w") as f:
            f.write("127.0.0.1:40200\n")
        asked: list[str] = []

        def read(reactor: Any, address: str, ca: str, timeout: float) -> Any:
            asked.append(address)
            return succeed([{"name": "local-1", "address": "127.0.0.1:40123"}])

        self.patch(cli, "read_directory", read)
        args = cli.build_parser().parse_args(["workers", "--json", "--data-dir", self.data])
        out = io.StringIO()
        with redirect_stdout(out):
            self.successResultOf(cli.run(None, args))
        self.assertEqual(json.loads(out.getvalue()), [{"name": "local-1", "address": "127.0.0.1:40123"}])
        args = cli.build_parser().parse_args(["workers", "--directory", "pt.example:2050", "--data-dir", self.data])
        with redirect_stdout(out):
            self.successResultOf(cli.run(None, args))
        self.assertEqual(asked, ["127.0.0.1:40200", "pt.example:2050"])

        self.patch(cli, "read_directory", lambda *a: fail(cli.DirectoryUnavailable("cannot reach it")))
        code, err = self.run_cli("workers")
        self.assertEqual((code, err), (2, "papertrader: error: cannot reach it\n"))

    def test_no_worker_reachable(self) -> None:
        """When no worker in the list answers, after the rounds of attempts the error names each and
        says why (exit code 2)."""
        self.patch(session_module, "connect", lambda reactor, host, port, ca, timeout: fail(ConnectionRefusedError()))
        args = cli.build_parser().parse_args(["quote", "AAPL", "--data-dir", self.data])
        clock = Clock()
        err = io.StringIO()
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            d = cli.run(clock, args)
            self.assertNoResult(d)
            clock.advance(FIRST_RETRY_DELAY)
            clock.advance(2 * FIRST_RETRY_DELAY)
            failure = self.failureResultOf(d, SystemExit)
        self.assertEqual(failure.value.code, 2)
        self.assertRegex(
            err.getvalue(),
            r"^papertrader: error: cannot connect: no worker could be reached \(127.0.0.1:40123: .*refused",
        )

    def test_unexpected_exception(self) -> None:
        """Even an unforeseen exception is one line naming it, not a traceback."""
        self.patch(cli.PaperTraderClient, "quote", lambda client, symbol: fail(KeyError("price_cents")))
        code, err = self.run_cli("quote", "AAPL")
        self.assertEqual(code, 2)
        self.assertEqual(err, "papertrader: error: unexpected KeyError: 'price_cents'\n")
