"""The master's admin responders (`WorkerAdmin`, `AdminLocator`) in memory, and the private admin socket."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from typing import Any

import attr
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.protocols import amp
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase, TestCase

from papertrader.admin import unixsocket
from papertrader.admin.protocol import (
    WORKER_ROWS_PER_PAGE,
    AddWorker,
    DisableWorker,
    EnableWorker,
    KickWorker,
    ListAllWorkers,
    RemoveWorker,
    WorkerInfo,
)
from papertrader.errors import (
    AdminRefused,
    ServiceUnavailable,
    UnknownWorker,
    WorkerExists,
    WorkerKeyRejected,
    WorkerRefused,
)
from papertrader.master.admin import AdminFactory, AdminLocator, WorkerAdmin
from papertrader.master.workers import WorkerRegistry
from papertrader.wire import BAD_REQUEST, PEER_LOG
from tests.gpgkeys import cached_key
from tests.support import Deployment

KEY = "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmDMEZ...\n-----END PGP PUBLIC KEY BLOCK-----\n"


@attr.s(auto_attribs=True)
class Registered:
    """A stored registration, shaped like `papertrader.master.registration.RegisteredWorker`."""

    name: str
    uuid: str
    fingerprint: str
    networks: list[str]
    enabled: bool
    added_at: str


class MemoryRegistrations:
    """The `WorkerRegistrations` API (`papertrader.master.registration`), in memory."""

    def __init__(self, now: str = "2027-01-15T08:00:00.000000+00:00") -> None:
        self.rows: dict[str, Registered] = {}
        self.now = now

    def add(self, name: str, armored_key: str, networks: list[str]) -> Any:
        if name in self.rows:
            return fail(WorkerRefused(f"a worker named {name!r} is registered already"))
        if "PGP PUBLIC KEY" not in armored_key:
            return fail(WorkerRefused("this is not an OpenPGP public key"))
        number = len(self.rows) + 1
        uuid = f"00000000-0000-4000-8000-{number:012d}"
        row = Registered(name, uuid, f"{number:040X}", list(networks), True, self.now)
        self.rows[name] = row
        return succeed(row)

    def find(self, name: str) -> Any:
        return succeed(self.rows.get(name))

    def get(self, name: str) -> Any:
        if name not in self.rows:
            return fail(UnknownWorker(f"no worker named {name!r} is registered"))
        return succeed(self.rows[name])

    def list(self) -> Any:
        return succeed([self.rows[name] for name in sorted(self.rows)])

    def set_enabled(self, name: str, enabled: bool) -> Any:
        self.rows[name] = attr.evolve(self.rows[name], enabled=enabled)
        return succeed(None)

    def remove(self, name: str) -> Any:
        del self.rows[name]
        return succeed(None)


class AdminResponderTests(SynchronousTestCase):
    """The admin commands answered by a real master registry (iosim, task.Clock) and in-memory registrations."""

    def setUp(self) -> None:
        PEER_LOG.__init__()
        self.deployment = d = Deployment(self.mktemp())
        self.registrations = MemoryRegistrations()
        self.admin = WorkerAdmin(d.registry, self.registrations, status_timeout=5)
        factory = AdminFactory(lambda: AdminLocator(self.admin), clock=d.clock)
        self.client, self.server, pump = iosim.connectedServerAndClient(
            lambda: factory.buildProtocol(None), amp.AMP, clock=d.clock
        )
        d.pumps.append(pump)

    def ask(self, command: type[amp.Command], **arguments: Any) -> Any:
        return self.deployment.result(self.client.callRemote(command, **arguments))

    def test_list_connected_worker(self) -> None:
        """A connected worker that is not registered is listed with every fact the master tracks."""
        d = self.deployment
        d.logged_in("alice")
        d.advance(20)
        [row] = self.ask(ListAllWorkers)["workers"]
        self.assertEqual(row["name"], "test-worker")
        self.assertEqual((row["registered"], row["enabled"], row["connected"]), (False, None, True))
        self.assertIsNone(row["client_address"])  # this worker gives none (see test_tracking for one that does)
        self.assertEqual(row["connected_since"], "2027-01-15T08:00:00.000000+00:00")
        self.assertEqual(row["last_heartbeat"], "2027-01-15T08:00:20.000000+00:00")
        self.assertEqual((row["clients"], row["commands_forwarded"]), (1, 2))
        self.assertEqual(row["address"], d.registry.get("test-worker").address)

    def test_add_list_and_info(self) -> None:
        """A registered worker is listed with its stored facts; info adds uuid, networks and the live figures."""
        stored = self.ask(AddWorker, name="eu-1", key=KEY, networks=["192.0.2.0/24"])
        self.assertEqual(stored["name"], "eu-1")
        self.assertEqual(stored["networks"], ["192.0.2.0/24"])
        self.assertTrue(stored["enabled"])
        self.ask(AddWorker, name="test-worker", key=KEY)
        rows = self.ask(ListAllWorkers)["workers"]
        self.assertEqual([(r["name"], r["registered"], r["connected"]) for r in rows],
                         [("eu-1", True, False), ("test-worker", True, True)])
        self.assertEqual(rows[0]["networks"], "192.0.2.0/24")
        info = self.ask(WorkerInfo, name="test-worker")
        self.assertEqual(info["uuid"], "00000000-0000-4000-8000-000000000002")
        self.assertEqual(info["all_networks"], [])
        self.assertEqual(info["live"]["clients"], 0)
        self.assertIn("commands_relayed", info["live"])
        offline = self.ask(WorkerInfo, name="eu-1")
        self.assertIsNone(offline["live"])
        self.assertEqual(offline["live_error"], "not connected")

    def test_info_of_a_silent_worker(self) -> None:
        """When the worker does not answer in time, info still answers, saying why the live figures are missing."""
        d = self.deployment
        d.pumps.remove(d.master_pump)
        answer = self.client.callRemote(WorkerInfo, name="test-worker")
        d.flush()
        d.clock.advance(6)
        info = d.result(answer)
        self.assertTrue(info["connected"])
        self.assertIn("did not answer", info["live_error"])

    def test_unknown_names(self) -> None:
        """A name the master does not know: UnknownWorker, whatever the command."""
        for command in (WorkerInfo, KickWorker):
            self.assertRaises(UnknownWorker, self.ask, command, name="nobody")
        for command in (EnableWorker, DisableWorker, RemoveWorker):
            error = self.assertRaises(UnknownWorker, self.ask, command, name="test-worker")
            self.assertIn("is registered", str(error))

    def test_refusals(self) -> None:
        """A taken name, a bad key, a bad name: AdminRefused with the reason; the connection keeps working."""
        self.ask(AddWorker, name="eu-1", key=KEY)
        error = self.assertRaises(AdminRefused, self.ask, AddWorker, name="eu-1", key=KEY)
        self.assertIn("registered already", str(error))
        error = self.assertRaises(AdminRefused, self.ask, AddWorker, name="eu-2", key="hello")
        self.assertIn("not an OpenPGP public key", str(error))
        error = self.assertRaises(AdminRefused, self.ask, AddWorker, name="x" * 65, key=KEY)
        self.assertIn("1-64 printable characters", str(error))
        error = self.assertRaises(AdminRefused, self.ask, AddWorker, name="eu-3", key=KEY, networks=["n"] * 33)
        self.assertIn("at most 32 networks", str(error))
        error = self.assertRaises(AdminRefused, self.ask, ListAllWorkers, cursor="7.1")
        self.assertIn("not from it; list again", str(error))
        unreadable = self.client.callRemoteString(b"WorkerInfo")
        error = self.assertRaises(amp.RemoteAmpError, self.deployment.result, unreadable)
        self.assertEqual(error.errorCode, BAD_REQUEST)
        self.assertEqual(len(self.ask(ListAllWorkers)["workers"]), 2)

    def test_disable_enable_remove_disconnect(self) -> None:
        """Disabling or removing a connected worker disconnects it; enabling does not; kick disconnects only."""
        d = self.deployment
        self.ask(AddWorker, name="test-worker", key=KEY)
        answer = self.ask(DisableWorker, name="test-worker")
        self.assertEqual(answer, {"name": "test-worker", "enabled": False, "disconnected": True})
        self.assertIsNone(d.registry.get("test-worker"))
        self.assertFalse(self.registrations.rows["test-worker"].enabled)
        answer = self.ask(EnableWorker, name="test-worker")
        self.assertEqual(answer, {"name": "test-worker", "enabled": True, "disconnected": False})
        d.connect_worker()
        answer = self.ask(KickWorker, name="test-worker")
        self.assertEqual(answer, {"name": "test-worker", "enabled": True, "disconnected": True})
        self.assertIsNone(d.registry.get("test-worker"))
        self.assertTrue(self.registrations.rows["test-worker"].enabled)
        d.connect_worker()
        answer = self.ask(RemoveWorker, name="test-worker")
        self.assertEqual(answer, {"name": "test-worker", "enabled": None, "disconnected": True})
        self.assertEqual(self.registrations.rows, {})
        self.assertIsNone(d.registry.get("test-worker"))

    def test_without_registrations(self) -> None:
        """A master without a registry of workers lists connected ones and refuses changes to the registry."""
        self.admin.registrations = None
        self.assertEqual([r["name"] for r in self.ask(ListAllWorkers)["workers"]], ["test-worker"])
        error = self.assertRaises(AdminRefused, self.ask, AddWorker, name="eu-1", key=KEY)
        self.assertIn("no registry of workers", str(error))
        self.assertTrue(self.ask(KickWorker, name="test-worker")["disconnected"])

    def test_many_workers_in_pages(self) -> None:
        """The list travels in numbered pages, each far under AMP's limits, every worker exactly once."""
        count = 2 * WORKER_ROWS_PER_PAGE + 3
        for n in range(count):
            self.ask(AddWorker, name=f"w{n:03d}-" + "\u00e9" * 59, key=KEY, networks=["2001:db8::/32"] * 8)
        names, cursor, pages = [], None, []
        while True:
            page = self.ask(ListAllWorkers, cursor=cursor)
            names += [row["name"] for row in page["workers"]]
            pages.append((page["page"], page["pages"]))
            cursor = page.get("next_cursor")
            if cursor is None:
                break
        self.assertEqual(pages, [(1, 3), (2, 3), (3, 3)])
        self.assertEqual(len(names), count + 1)
        self.assertEqual(len(set(names)), count + 1)

    def test_changed_list_between_pages(self) -> None:
        """A worker added between two pages makes the next page refused with a clear reason."""
        for n in range(WORKER_ROWS_PER_PAGE + 1):
            self.ask(AddWorker, name=f"w{n}", key=KEY)
        cursor = self.ask(ListAllWorkers)["next_cursor"]
        self.ask(AddWorker, name="late", key=KEY)
        error = self.assertRaises(AdminRefused, self.ask, ListAllWorkers, cursor=cursor)
        self.assertIn("list again", str(error))

    def test_unexpected_failure_declared(self) -> None:
        """A failure that is no domain error (a broken database) is answered as unavailable and logged."""
        self.registrations.list = lambda: fail(RuntimeError("disk on fire"))
        error = self.assertRaises(ServiceUnavailable, self.ask, ListAllWorkers)
        self.assertIn("see its log", str(error))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(self.ask(WorkerInfo, name="test-worker")["name"]), len("test-worker"))


class _Closing(amp.AMP):
    """An admin client whose ``lost`` fires when its connection is gone."""

    def __init__(self) -> None:
        super().__init__()
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self.lost.callback(None)


class PrivateSocketTests(TestCase):
    """The admin socket is mode 0600 from the moment it exists, replaces a stale one, and refuses a live one."""

    def setUp(self) -> None:
        self.base = tempfile.mkdtemp(prefix="pt-adm-", dir="/tmp")
        self.addCleanup(self._remove, self.base)
        self.servers: list[Any] = []

    @staticmethod
    def _remove(path: str) -> None:
        for root, dirs, files in os.walk(path, topdown=False):
            for name in files:
                os.unlink(os.path.join(root, name))
            for name in dirs:
                os.rmdir(os.path.join(root, name))
        os.rmdir(path)

    def listen(self, path: str) -> Any:
        listening, identity = unixsocket.bind_private(path)
        factory = AdminFactory(lambda: AdminLocator(WorkerAdmin(WorkerRegistry(reactor))))
        built = factory.buildProtocol

        def build(address: Any) -> Any:
            connection = built(address)
            self.servers.append(connection)
            return connection

        factory.buildProtocol = build  # type: ignore[method-assign]
        port = unixsocket.PrivatePort.adopt(reactor, listening, identity, path, factory)
        self.addCleanup(port.stopListening)
        return port

    @inlineCallbacks
    def ask_and_close(self, name: str) -> Any:
        """Connect to ``name``, list the workers, and close both ends of the connection."""
        client = yield connectProtocol(UNIXClientEndpoint(reactor, name), _Closing())
        answer = yield client.callRemote(ListAllWorkers)
        client.transport.loseConnection()
        yield client.lost
        while any(server.transport is not None for server in self.servers):
            yield deferLater(reactor, 0.01, lambda: None)
        return answer

    @inlineCallbacks
    def test_mode_0600_and_answers(self) -> None:
        """Even under a umask that leaves everything open, the socket is mode 0600 and answers admin commands."""
        path = os.path.join(self.base, "admin.sock")
        old = os.umask(0)
        try:
            self.listen(path)
        finally:
            os.umask(old)
        mode = os.lstat(path).st_mode
        self.assertTrue(stat.S_ISSOCK(mode))
        self.assertEqual(stat.S_IMODE(mode), 0o600)
        self.assertEqual(os.listdir(self.base), ["admin.sock"])  # its private directory is gone
        answer = yield self.ask_and_close(path)
        self.assertEqual((answer["workers"], answer["page"], answer["pages"]), ([], 1, 1))

    @inlineCallbacks
    def test_removed_when_stopped(self) -> None:
        """Stopping the port removes its file; a later master's socket at the same path is left alone."""
        path = os.path.join(self.base, "admin.sock")
        port = self.listen(path)
        yield port.stopListening()
        self.assertFalse(os.path.exists(path))
        port = self.listen(path)
        os.rename(path, path + ".moved")
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(other.close)
        other.bind(path)
        yield port.stopListening()
        self.assertTrue(os.path.exists(path))

    def test_stale_socket_replaced(self) -> None:
        """A socket nobody listens on (a master that was killed) is replaced."""
        path = os.path.join(self.base, "admin.sock")
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)
        stale.close()
        self.listen(path)
        self.assertTrue(unixsocket.answers(path))
        self.assertEqual(stat.S_IMODE(os.lstat(path).st_mode), 0o600)

    def test_live_socket_refused(self) -> None:
        """A socket another process listens on is not taken over."""
        path = os.path.join(self.base, "admin.sock")
        live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(live.close)
        live.bind(path)
        live.listen(1)
        error = self.assertRaises(unixsocket.SocketInUse, unixsocket.bind_private, path)
        self.assertIn("another process", str(error))
        self.assertEqual(os.listdir(self.base), ["admin.sock"])

    def test_not_a_socket_refused(self) -> None:
        """A file that is not a socket is never removed."""
        path = os.path.join(self.base, "admin.sock")
        with open(path, "w") as f:
            f.write("keep me")
        error = self.assertRaises(unixsocket.SocketInUse, unixsocket.bind_private, path)
        self.assertIn("not a socket", str(error))
        with open(path) as f:
            self.assertEqual(f.read(), "keep me")

    @inlineCallbacks
    def test_long_path(self) -> None:
        """A data directory deeper than a socket name may be still works, for the master and the admin tool."""
        deep = os.path.join(self.base, *["d" * 40] * 4)
        os.makedirs(deep)
        path = os.path.join(deep, "admin.sock")
        self.assertGreater(len(path), unixsocket.MAX_SOCKET_PATH)
        self.listen(path)
        self.assertEqual(stat.S_IMODE(os.lstat(path).st_mode), 0o600)
        with unixsocket.reachable(path) as name:
            self.assertLessEqual(len(name), unixsocket.MAX_SOCKET_PATH)
            answer = yield self.ask_and_close(name)
        self.assertEqual(answer["pages"], 1)


class RealRegistrationsTests(SynchronousTestCase):
    """The admin commands on the master's real registry of workers (the database, the keyring, real gpg)."""

    def setUp(self) -> None:
        PEER_LOG.__init__()
        self.deployment = d = Deployment(self.mktemp())
        factory = AdminFactory(lambda: AdminLocator(WorkerAdmin(d.registry, d.registrations)), clock=d.clock)
        self.client, _, pump = iosim.connectedServerAndClient(
            lambda: factory.buildProtocol(None), amp.AMP, clock=d.clock
        )
        d.pumps.append(pump)

    def ask(self, command: type[amp.Command], **arguments: Any) -> Any:
        return self.deployment.result(self.client.callRemote(command, **arguments))

    def test_add_list_info_remove(self) -> None:
        """A worker added with its public key is stored with the key's fingerprint and listed beside the
        connected, registered test worker; a second add, or a key that is none, is refused with its code."""
        key = cached_key("eu-1")
        stored = self.ask(AddWorker, name="eu-1", key=key.public_key, networks=["192.0.2.0/24"])
        self.assertEqual((stored["fingerprint"], stored["networks"]), (key.fingerprint, ["192.0.2.0/24"]))
        self.assertRaises(WorkerExists, self.ask, AddWorker, name="eu-1", key=key.public_key)
        self.assertRaises(WorkerKeyRejected, self.ask, AddWorker, name="eu-2", key=KEY)
        rows = {row["name"]: row for row in self.ask(ListAllWorkers)["workers"]}
        self.assertEqual(sorted(rows), ["eu-1", "test-worker"])
        self.assertEqual((rows["eu-1"]["registered"], rows["eu-1"]["connected"]), (True, False))
        self.assertEqual((rows["test-worker"]["registered"], rows["test-worker"]["connected"]), (True, True))
        self.assertEqual(rows["test-worker"]["fingerprint"], self.deployment.worker_key.fingerprint)
        info = self.ask(WorkerInfo, name="eu-1")
        self.assertEqual(info["uuid"], stored["uuid"])
        self.assertEqual(info["all_networks"], ["192.0.2.0/24"])
        self.assertEqual(self.ask(RemoveWorker, name="eu-1"), {"name": "eu-1", "enabled": None, "disconnected": False})
        self.assertRaises(UnknownWorker, self.ask, WorkerInfo, name="eu-1")

    def test_disabled_worker_disconnected_and_refused(self) -> None:
        """Disabling the connected worker disconnects it, and its handshake is refused until it is enabled."""
        d = self.deployment
        self.assertTrue(self.ask(DisableWorker, name="test-worker")["disconnected"])
        d.advance(10)
        self.assertIsNone(d.registry.get("test-worker"))
        d.connect_worker()
        self.assertIsNone(d.registry.get("test-worker"))
        self.assertFalse(self.ask(EnableWorker, name="test-worker")["disconnected"])
        d.connect_worker()
        self.assertIsNotNone(d.registry.get("test-worker"))
