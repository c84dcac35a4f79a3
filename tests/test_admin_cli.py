"""The ``papertrader-admin`` command as a real process, against an admin socket this test serves.

The master side is the real `AdminLocator` and `WorkerAdmin` over a real
`WorkerRegistry`; the connected worker is a stand-in that answers
WorkerStatus, and the registrations are the in-memory ones of `test_admin`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks, returnValue, succeed
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from papertrader.admin import unixsocket
from papertrader.master.admin import AdminFactory, AdminLocator, WorkerAdmin
from papertrader.master.workers import ConnectedWorker, WorkerRegistry
from tests.processes import ROOT
from tests.test_admin import KEY, MemoryRegistrations

LIVE = {
    "clients": 3, "sessions": 2, "commands_relayed": 41, "uptime": 90061.5, "tick": 7, "as_of": "2027-01-15T08:00:00"
}


class StandInWorker:
    """A connected worker's connection as the registry uses it: answers WorkerStatus, can be closed."""

    peer = "198.51.100.7:51000"

    def __init__(self) -> None:
        self.transport: Any = object()
        self.closed = False

    def callRemote(self, command: Any, **arguments: Any) -> Any:
        return succeed(dict(LIVE))

    def close(self) -> None:
        self.closed = True
        self.transport = None


class AdminCommandTests(TestCase):
    """Exit codes (0 done, 1 refused, 2 usage or no connection), messages, and ``--json``."""

    def setUp(self) -> None:
        self.base = tempfile.mkdtemp(prefix="pt-cli-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.base)
        self.registry = WorkerRegistry(reactor)
        self.worker = StandInWorker()
        self.registry.workers["eu-1"] = ConnectedWorker(
            "eu-1", self.worker, StandInWorker.peer, "eu1.example.org:2049", "0.1.0", 1_800_000_000.0,
            clients=3, commands_forwarded=12, last_heartbeat=1_800_000_050.0,
        )
        self.registrations = MemoryRegistrations()
        admin = WorkerAdmin(self.registry, self.registrations)
        self.path = os.path.join(self.base, "admin.sock")
        listening, identity = unixsocket.bind_private(self.path)
        factory = AdminFactory(lambda: AdminLocator(admin))
        port = unixsocket.PrivatePort.adopt(reactor, listening, identity, self.path, factory)
        self.addCleanup(port.stopListening)
        self.key = os.path.join(self.base, "eu-2.asc")
        with open(self.key, "w", encoding="ascii") as f:
            f.write(KEY)

    @inlineCallbacks
    def admin(self, *args: str, socket: str | None = None) -> Any:
        """Run ``papertrader-admin ARGS --socket PATH``; fires with (exit code, stdout, stderr)."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, ["-m", "papertrader.admin.cli", *args, "--socket", socket or self.path], env=env
        )
        returnValue((code, out.decode("utf-8"), err.decode("utf-8")))

    @inlineCallbacks
    def test_list(self) -> None:
        """``worker list``: a table of every worker; ``--json``: the rows, with only the fields each has."""
        self.registrations.add("eu-2", KEY, ["192.0.2.0/24"])
        code, out, err = yield self.admin("worker", "list")
        self.assertEqual((code, err), (0, ""))
        header, first, second = out.splitlines()
        self.assertEqual(header.split()[:4], ["NAME", "STATE", "CONNECTED", "ADDRESS"])
        self.assertEqual(
            first.split(),
            ["eu-1", "unregistered", "yes", "198.51.100.7:51000", "eu1.example.org:2049", "0.1.0",
             "2027-01-15T08:00:00.000000+00:00", "3", "12", "2027-01-15T08:00:50.000000+00:00"],
        )
        self.assertEqual(second.split(), ["eu-2", "enabled", "no", "-", "-", "-", "-", "-", "-", "-"])
        code, out, err = yield self.admin("worker", "list", "--json")
        self.assertEqual(code, 0, err)
        rows = json.loads(out)
        self.assertEqual(rows[0]["commands_forwarded"], 12)
        self.assertEqual(rows[1], {"name": "eu-2", "registered": True, "enabled": True, "connected": False,
                                   "fingerprint": "0" * 39 + "1", "networks": "192.0.2.0/24"})

    @inlineCallbacks
    def test_info(self) -> None:
        """``worker info``: stored and tracked facts, then the live figures the worker gave."""
        code, out, err = yield self.admin("worker", "info", "eu-1")
        self.assertEqual(code, 0, err)
        self.assertIn("client address:      eu1.example.org:2049", out)
        self.assertIn("commands forwarded:  12", out)
        self.assertIn("  logged-in sessions:  2", out)
        self.assertIn("  uptime:              1d 01:01:01", out)
        code, out, err = yield self.admin("worker", "info", "eu-1", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["live"], LIVE)

    @inlineCallbacks
    def test_unknown_worker(self) -> None:
        """A name the master does not know: exit 1, the reason on stderr, and with ``--json`` the error code."""
        code, out, err = yield self.admin("worker", "info", "nobody")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, "papertrader-admin: error: no worker named 'nobody' is registered or connected\n")
        code, out, err = yield self.admin("worker", "kick", "nobody", "--json")
        self.assertEqual(code, 1)
        self.assertEqual(
            json.loads(out), {"error": "UNKNOWN_WORKER", "message": "no worker named 'nobody' is connected"}
        )

    @inlineCallbacks
    def test_add(self) -> None:
        """``worker add`` sends the key and the networks; a second add of the name is refused (exit 1)."""
        code, out, err = yield self.admin("worker", "add", "eu-2", "--key", self.key, "--allow", "10.1.2.3/8",
                                          "--allow", "2001:db8::/32")
        self.assertEqual(code, 0, err)
        self.assertIn("registered worker eu-2", out)
        self.assertIn("it may connect from 10.0.0.0/8, 2001:db8::/32", out)
        self.assertEqual(self.registrations.rows["eu-2"].networks, ["10.0.0.0/8", "2001:db8::/32"])
        code, out, err = yield self.admin("worker", "add", "eu-2", "--key", self.key, "--json")
        self.assertEqual(code, 1)
        self.assertIn("registered already", err)
        self.assertEqual(json.loads(out)["error"], "ADMIN_REFUSED")

    @inlineCallbacks
    def test_add_bad_input(self) -> None:
        """A missing or unusable key file, or a network that is none: exit 2 before anything is sent."""
        private = os.path.join(self.base, "private.asc")
        with open(private, "w", encoding="ascii") as f:
            f.write("-----BEGIN PGP PRIVATE KEY BLOCK-----\n")
        for args, message in (
            (["--key", os.path.join(self.base, "missing.asc")], "cannot read the key file"),
            (["--key", private], "holds a private key"),
            (["--key", os.path.join(ROOT, "setup.cfg")], "is not an ASCII-armored public key"),
            (["--key", self.key, "--allow", "10.0.0.300/8"], "is not a network"),
        ):
            code, _, err = yield self.admin("worker", "add", "eu-3", *args)
            self.assertEqual(code, 2, err)
            self.assertIn(message, err)
        self.assertEqual(self.registrations.rows, {})

    @inlineCallbacks
    def test_disable_enable_remove_kick(self) -> None:
        """Each change says what it did, and whether a connected worker was disconnected."""
        self.registrations.add("eu-1", KEY, [])
        code, out, err = yield self.admin("worker", "disable", "eu-1")
        self.assertEqual((code, out), (0, "worker eu-1 disabled; it was connected and has been disconnected\n"), err)
        self.assertTrue(self.worker.closed)
        code, out, err = yield self.admin("worker", "enable", "eu-1", "--json")
        self.assertEqual(json.loads(out), {"name": "eu-1", "enabled": True, "disconnected": False})
        code, out, err = yield self.admin("worker", "remove", "eu-1")
        self.assertEqual((code, out), (0, "worker eu-1 removed; it was connected and has been disconnected\n"), err)
        self.assertEqual(self.registrations.rows, {})
        code, out, err = yield self.admin("worker", "remove", "eu-1")
        self.assertEqual(code, 1)
        self.assertIn("no worker named 'eu-1' is registered", err)

    @inlineCallbacks
    def test_no_master(self) -> None:
        """No socket at the path: exit 2, saying no master listens there; bad usage: exit 2 too."""
        code, _, err = yield self.admin("worker", "list", socket=os.path.join(self.base, "none.sock"))
        self.assertEqual(code, 2)
        self.assertIn("no master is listening at", err)
        code, _, err = yield self.admin("worker", "frobnicate")
        self.assertEqual(code, 2)
        self.assertIn("invalid choice", err)
