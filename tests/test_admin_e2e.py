"""``papertrader-admin`` against a real master process and its local worker."""

from __future__ import annotations

import json
import os
import stat
from datetime import datetime
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks, returnValue
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from papertrader import __version__
from papertrader.client.library import connect
from papertrader.client.session import Session, read_directory, tls_connector
from tests.processes import RunningDeployment

PASSWORD = "correct horse battery"


class AdminEndToEndTests(TestCase):
    """A master with one local worker; the admin tool shows what the master tracks about it."""

    timeout = 120

    @inlineCallbacks
    def setUp(self) -> Any:
        # Heartbeats every second, so the test sees one soon.
        self.deployment = RunningDeployment(self.mktemp(), "--heartbeat-interval", "1")
        self.addCleanup(self.deployment.stop)
        yield self.deployment.start()

    def admin(self, *args: str) -> Any:
        return self.deployment.admin(*args)

    @inlineCallbacks
    def admin_json(self, *args: str) -> Any:
        code, out, err = yield self.admin(*args, "--json")
        self.assertEqual(code, 0, err)
        returnValue(json.loads(out))

    @inlineCallbacks
    def test_list_and_info_show_the_tracked_facts(self) -> None:
        """``worker list`` and ``worker info local-1`` show address, client address, connected since, version,
        clients, commands forwarded and last heartbeat; info adds the worker's live figures."""
        d = self.deployment
        socket_path = os.path.join(d.data, "admin.sock")
        self.assertEqual(stat.S_IMODE(os.lstat(socket_path).st_mode), 0o600)
        password = d.password_file("correct horse")
        code, _, err = yield d.cli("register", "alice", "alice@example.com", "--password-file", password)
        self.assertEqual(code, 0, err)
        host, port = d.worker_address()
        client = yield connect(reactor, host, port, os.path.join(d.data, "tls", "ca.pem"))
        self.addCleanup(client.close)
        yield client.quote("AAPL")  # a command, so the worker keeps the connection

        row = None
        for _ in range(100):  # until a heartbeat has counted the connected client
            [row] = yield self.admin_json("worker", "list")
            if row.get("clients") == 1:
                break
            yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(row["name"], "local-1")
        self.assertEqual((row["connected"], row["registered"], row["enabled"]), (True, True, True))
        self.assertEqual(len(row["fingerprint"]), 40)  # the key the master made and registered for it
        self.assertTrue(row["address"].startswith("127.0.0.1:"), row)
        self.assertEqual(row["client_address"], f"{host}:{port}")
        self.assertEqual(row["version"], __version__)
        self.assertEqual(row["clients"], 1)
        self.assertGreaterEqual(row["commands_forwarded"], 1)  # the registration at least
        connected_since = datetime.fromisoformat(row["connected_since"])
        last_heartbeat = datetime.fromisoformat(row["last_heartbeat"])
        self.assertLessEqual(connected_since, last_heartbeat)

        code, text, err = yield self.admin("worker", "list")
        self.assertEqual(code, 0, err)
        header, line = text.splitlines()
        self.assertEqual(header.split()[:3], ["NAME", "STATE", "CONNECTED"])
        self.assertEqual(line.split()[:5], ["local-1", "enabled", "yes", row["address"], f"{host}:{port}"])

        info = yield self.admin_json("worker", "info", "local-1")
        for key in ("address", "client_address", "connected_since", "version", "fingerprint"):
            self.assertEqual(info[key], row[key])
        self.assertEqual(len(info["uuid"]), 36)
        self.assertGreaterEqual(info["commands_forwarded"], row["commands_forwarded"])
        live = info["live"]
        self.assertEqual((live["clients"], live["sessions"]), (1, 0))
        self.assertGreaterEqual(live["commands_relayed"], 1)
        self.assertGreater(live["uptime"], 0)
        self.assertGreaterEqual(live["tick"], 1)
        code, text, err = yield self.admin("worker", "info", "local-1")
        self.assertEqual(code, 0, err)
        self.assertIn(f"client address:      {host}:{port}", text)
        self.assertIn("live figures (asked from the worker now):", text)
        self.assertIn("clients connected:   1", text)

        code, out, err = yield self.admin("worker", "info", "nobody", "--json")
        self.assertEqual(code, 1)
        self.assertIn("no worker named 'nobody'", err)
        self.assertEqual(json.loads(out)["error"], "UNKNOWN_WORKER")

    @inlineCallbacks
    def test_socket_removed_at_stop(self) -> None:
        """The master removes its admin socket when it stops; the admin tool then says no master listens."""
        d = self.deployment
        socket_path = os.path.join(d.data, "admin.sock")
        self.assertTrue(stat.S_ISSOCK(os.lstat(socket_path).st_mode))
        yield d.stop()
        self.assertFalse(os.path.exists(socket_path))
        code, _, err = yield self.admin("worker", "list")
        self.assertEqual(code, 2)
        self.assertIn("no master is listening at", err)


class KickEndToEndTests(TestCase):
    """A master with two real workers; ``papertrader-admin worker kick`` boots one off under its clients."""

    timeout = 240

    @inlineCallbacks
    def test_kicked_workers_clients_finish_on_the_other(self) -> None:
        """Alice trades through local-1, Bob through local-2; local-1 is kicked right after Alice ordered:
        she carries on through local-2 with the same session (no new login), gets the fill, and every order
        she placed is there exactly once and filled; Bob never notices.  The list shows the kicked worker
        gone (or back, connected anew, after its back-off)."""
        d = RunningDeployment(self.mktemp(), "--workers", "2", "--update-interval", "2")
        self.addCleanup(d.stop)
        yield d.start()
        ca = os.path.join(d.data, "tls", "ca.pem")
        host, port = d.directory_address()
        listed: dict[str, str] = {}
        for _ in range(600):
            listed = {w["name"]: w["address"] for w in (yield read_directory(reactor, f"{host}:{port}", ca))}
            if len(listed) == 2:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(sorted(listed), ["local-1", "local-2"])
        password = d.password_file(PASSWORD)
        for name in ("alice", "bob"):
            yield d.cli_json("register", name, f"{name}@example.com", "--password-file", password)
        sessions = {}
        for name, first, other in (("alice", "local-1", "local-2"), ("bob", "local-2", "local-1")):
            sessions[name] = Session(reactor, tls_connector(reactor, ca), [listed[first], listed[other]])
            self.addCleanup(sessions[name].close)
            yield sessions[name].login(name, PASSWORD)
        alice, bob = sessions["alice"], sessions["bob"]
        self.assertEqual((alice.address, bob.address), (listed["local-1"], listed["local-2"]))
        token = alice.token
        before = yield d.admin("worker", "info", "local-1", "--json")
        self.assertEqual(json.loads(before[1])["live"]["sessions"], 1)

        first = yield alice.buy("AAPL", 3, "alice-kick-0")
        waiting = alice.wait_for_settlement(first["order_id"])
        code, out, err = yield d.admin("worker", "kick", "local-1")
        self.assertEqual((code, out), (0, "worker local-1 kicked; it was connected and has been disconnected\n"), err)
        placed = yield gatherResults([alice.buy("KO", 1, f"alice-kick-{i}") for i in range(1, 6)])
        more = yield bob.buy("MSFT", 1, "bob-kick-0")
        self.assertEqual((alice.address, alice.token, alice.failovers), (listed["local-2"], token, 1))
        self.assertEqual((bob.address, bob.failovers), (listed["local-2"], 0))

        fill = yield waiting
        self.assertEqual((fill["order_id"], fill["status"]), (first["order_id"], "filled"))
        settled = yield gatherResults([alice.wait_for_settlement(p["order_id"]) for p in placed])
        self.assertEqual({s["status"] for s in settled}, {"filled"})
        yield bob.wait_for_settlement(more["order_id"])
        orders = (yield alice.orders())["orders"]
        self.assertEqual(sorted(o["client_order_id"] for o in orders), sorted(f"alice-kick-{i}" for i in range(6)))
        self.assertEqual({o["status"] for o in orders}, {"filled"})

        rows = {row["name"]: row for row in json.loads((yield d.admin("worker", "list", "--json"))[1])}
        self.assertEqual(rows["local-2"]["connected"], True)
        self.assertTrue(rows["local-1"]["registered"])  # kicked, not forgotten: it may come back
        if rows["local-1"]["connected"]:  # back after its back-off: a new connection, counted afresh
            self.assertLessEqual(rows["local-1"]["commands_forwarded"], 1)
