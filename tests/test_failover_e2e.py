"""End to end: a master with two local workers as real twistd processes; clients fail over between them."""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from papertrader.client.session import Session, read_directory, tls_connector
from tests.processes import RunningDeployment

PASSWORD = "correct horse battery"


def worker_pid(data_dir: str, name: str) -> int | None:
    """The process id of local worker ``name`` of the deployment in ``data_dir`` (None if it runs not)."""
    wanted = os.path.join(data_dir, f"worker-{name}.address").encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                arguments = f.read().split(b"\0")
        except OSError:
            continue
        if b"papertrader-worker" in arguments and wanted in arguments:
            return int(entry)
    return None


class FailoverTests(TestCase):
    """Two workers; one dies (SIGKILL) under its clients, who finish their work on the other."""

    timeout = 240

    @inlineCallbacks
    def start(self, *extra: str) -> Any:
        self.deployment = d = RunningDeployment(self.mktemp(), "--workers", "2", *extra)
        self.addCleanup(d.stop)
        yield d.start()
        self.ca = os.path.join(d.data, "tls", "ca.pem")
        self.addresses: dict[str, str] = {}
        yield self.wait_for_workers()
        host, port = d.worker_address(2)
        self.assertEqual(self.addresses["local-2"], f"{host}:{port}")
        password = d.password_file(PASSWORD)
        for name in ("alice", "bob"):
            yield d.cli_json("register", name, f"{name}@example.com", "--password-file", password)

    @inlineCallbacks
    def wait_for_workers(self, restarted: str | None = None) -> Any:
        """Wait until the directory lists both workers (worker ``restarted`` at a new address: a killed
        worker comes back on another port); note their addresses."""
        host, port = self.deployment.directory_address()
        listed: dict[str, str] = {}
        for _ in range(600):
            workers = yield read_directory(reactor, f"{host}:{port}", self.ca)
            listed = {w["name"]: w["address"] for w in workers}
            if len(listed) == 2 and (restarted is None or listed[restarted] != self.addresses[restarted]):
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(sorted(listed), ["local-1", "local-2"])
        self.addresses = listed

    def session(self, first: str, **settings: Any) -> Session:
        """A session that tries worker ``first`` first (``settings``: the Session's)."""
        others = [a for name, a in sorted(self.addresses.items()) if name != first]
        session = Session(reactor, tls_connector(reactor, self.ca), [self.addresses[first], *others], **settings)
        self.addCleanup(session.close)
        return session

    def kill(self, name: str) -> None:
        pid = worker_pid(self.deployment.data, name)
        self.assertIsNotNone(pid, f"worker {name} is not running")
        os.kill(pid, signal.SIGKILL)

    @inlineCallbacks
    def test_worker_dies_under_its_clients(self) -> None:
        """Alice trades through local-1 and Bob through local-2; local-1 is killed while Alice has
        orders in flight: each of her twenty orders is answered (on local-2, without logging in again), every
        order is there exactly once and fills, and Bob never notices."""
        yield self.start()
        alice, bob = self.session("local-1"), self.session("local-2")
        yield alice.login("alice", PASSWORD)
        yield bob.login("bob", PASSWORD)
        self.assertEqual((alice.address, bob.address), (self.addresses["local-1"], self.addresses["local-2"]))
        self.assertEqual(sorted(alice.workers), sorted(self.addresses.values()))
        token = alice.token

        first = yield gatherResults([alice.buy("AAPL", 2, "alice-0"), bob.buy("MSFT", 1, "bob-0")])
        fills = yield gatherResults(
            [alice.wait_for_settlement(first[0]["order_id"]), bob.wait_for_settlement(first[1]["order_id"])]
        )
        self.assertEqual([f["status"] for f in fills], ["filled", "filled"])

        burst = [alice.buy("KO", 1, f"alice-{i}") for i in range(1, 21)]
        first_answered: Deferred[None] = Deferred()
        burst[0].addBoth(lambda result: (first_answered.called or first_answered.callback(None), result)[1])
        yield first_answered  # killed while the others are on their way (the library sends them in a batch now)
        self.kill("local-1")
        placed = yield gatherResults(burst)
        more = yield bob.buy("MSFT", 1, "bob-1")
        self.assertEqual(alice.address, self.addresses["local-2"])
        self.assertEqual((alice.token, alice.failovers), (token, 1))
        self.assertEqual((bob.address, bob.failovers), (self.addresses["local-2"], 0))

        settled = yield gatherResults([alice.wait_for_settlement(p["order_id"]) for p in placed])
        self.assertEqual({s["status"] for s in settled}, {"filled"})
        yield bob.wait_for_settlement(more["order_id"])
        orders = (yield alice.orders())["orders"]
        self.assertEqual(
            sorted(o["client_order_id"] for o in orders), sorted(f"alice-{i}" for i in range(21))
        )
        self.assertEqual(sorted(o["order_id"] for o in orders[:20]), sorted(p["order_id"] for p in placed))
        portfolio = yield alice.portfolio()
        self.assertEqual(
            sorted((p["symbol"], p["quantity"]) for p in portfolio["positions"]), [("AAPL", 2), ("KO", 20)]
        )

    @inlineCallbacks
    def test_silent_worker(self) -> None:
        """A worker that stops answering but keeps its connections open (SIGSTOP: no FIN, no RST, as when
        its network link is cut) is left: Alice's order gets no answer within her request timeout, so it is
        sent again on local-2 and stored once; Bob, idle with keep_alive, moves when his Ping is not answered."""
        yield self.start()
        alice = self.session("local-1", request_timeout=2.0)
        bob = self.session("local-1", request_timeout=2.0)
        yield alice.login("alice", PASSWORD)
        yield bob.login("bob", PASSWORD)
        bob_moved: Deferred[str] = Deferred()
        bob.on_worker(lambda address: bob_moved.called or bob_moved.callback(address))
        bob.keep_alive(1.0)
        pid = worker_pid(self.deployment.data, "local-1")
        self.assertIsNotNone(pid, "worker local-1 is not running")
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(_continue, pid)  # before the deployment stops it

        placed = yield alice.buy("KO", 1, "alice-silent")
        self.assertEqual((alice.address, alice.failovers), (self.addresses["local-2"], 1))
        orders = (yield alice.orders())["orders"]
        stored = [(o["order_id"], o["client_order_id"]) for o in orders]
        self.assertEqual(stored, [(placed["order_id"], "alice-silent")])
        fill = yield alice.wait_for_settlement(placed["order_id"])
        self.assertEqual(fill["status"], "filled")
        moved_to = yield bob_moved
        self.assertEqual((moved_to, bob.failovers), (self.addresses["local-2"], 1))
        self.assertEqual((yield bob.portfolio())["username"], "bob")

    @inlineCallbacks
    def test_fill_arrives_through_another_worker(self) -> None:
        """A client waiting for a fill loses its worker before the next price update: it resumes on the
        other worker and still gets the fill.  The CLI fails over the same way, from its session file."""
        yield self.start("--update-interval", "3")
        alice = self.session("local-1")
        yield alice.login("alice", PASSWORD)
        ticks: list[Deferred[Any]] = []

        def tick_arrived(tick: dict[str, Any]) -> None:
            while ticks:
                ticks.pop().callback(tick)

        alice.on_price_tick(tick_arrived)
        yield alice.subscribe(["AAPL"])
        for _ in range(3):
            # Just after a price update, so the next is seconds away; should this machine stall
            # for that long (the order settling before its worker is killed), try again.
            next_tick: Deferred[Any] = Deferred()
            ticks.append(next_tick)
            yield next_tick
            order = yield alice.buy("AAPL", 1)
            fill = alice.wait_for_settlement(order["order_id"])
            if not fill.called:
                break
        self.assertFalse(fill.called)
        self.kill("local-1")
        update = yield fill
        self.assertEqual((update["order_id"], update["status"]), (order["order_id"], "filled"))
        self.assertEqual((alice.address, alice.failovers), (self.addresses["local-2"], 1))

        # The CLI: log in on local-2 (its session file keeps both workers), lose local-2, carry on.
        d = self.deployment
        yield self.wait_for_workers(restarted="local-1")  # the master started it again
        code, out, err = yield d.cli("workers", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(sorted(w["name"] for w in json.loads(out)), ["local-1", "local-2"])
        yield d.cli_json(
            "login", "bob", "--password-file", d.password_file(PASSWORD), "--server", self.addresses["local-2"]
        )
        with open(os.path.join(d.base, "config", "papertrader", "session.json"), encoding="utf-8") as f:
            saved = json.load(f)
        self.assertEqual(saved["server"], self.addresses["local-2"])
        self.assertEqual(sorted(saved["workers"]), sorted(self.addresses.values()))
        self.kill("local-2")
        # Without --data-dir the CLI goes by its session file alone.
        code, out, err = yield _cli_without_data_dir(d, "buy", "KO", "2", "--wait", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["status"], "filled")
        with open(os.path.join(d.base, "config", "papertrader", "session.json"), encoding="utf-8") as f:
            self.assertNotEqual(json.load(f)["server"], self.addresses["local-2"])


def _continue(pid: int) -> None:
    """Let a stopped process run again (it may have gone meanwhile)."""
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


@inlineCallbacks
def _cli_without_data_dir(deployment: RunningDeployment, *args: str) -> Any:
    """Run ``papertrader ARGS`` with only what its session file says; fires with (exit code, stdout, stderr)."""
    out, err, code = yield getProcessOutputAndValue(
        sys.executable, ["-m", "papertrader.client.cli", *args], env=deployment.env, path=deployment.base
    )
    return code, out.decode("utf-8"), err.decode("utf-8")

