"""What the master tracks about each connected worker (`ConnectedWorker`), in memory on a task.Clock."""

from __future__ import annotations

from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase

from papertrader import __version__, gpg
from papertrader.errors import LoginFailed, ServiceUnavailable
from papertrader.master.workers import ConnectedWorker
from papertrader.protocol import WorkerDirectory, WorkerHello, WorkerProof
from papertrader.wire import PEER_LOG
from tests.gpgkeys import cached_key
from tests.support import Deployment
from tests.test_wire import RawPeer


class DirectoryReader(amp.AMP):
    """A bare worker-side connection that takes the directory the master sends a worker with a client address."""

    @WorkerDirectory.responder
    def worker_directory(self, workers: list[dict[str, str]]) -> dict:
        return {}


class TrackingTests(SynchronousTestCase):
    """Each connected worker is one record: addresses, version, connected since, clients, commands, heartbeat."""

    def setUp(self) -> None:
        PEER_LOG.__init__()
        self.deployment = Deployment(self.mktemp())
        self.record = self.deployment.registry.get("test-worker")

    def test_record_made_at_the_handshake(self) -> None:
        """The handshake makes the record: the peer, the version the worker gave, the time."""
        d = self.deployment
        record = self.record
        self.assertIsInstance(record, ConnectedWorker)
        self.assertEqual(d.registry.connected(), [record])
        self.assertIs(record.connection, d.master_pump.server)
        self.assertEqual(record.address, d.master_pump.server.peer)
        self.assertIsNone(record.client_address)  # the in-memory worker listens nowhere
        self.assertEqual(record.version, __version__)
        self.assertEqual(record.connected_since, 1_800_000_000.0)
        self.assertEqual((record.clients, record.commands_forwarded, record.last_heartbeat), (None, 0, None))

    def test_heartbeats_noted_with_the_clients(self) -> None:
        """Each Heartbeat from the worker sets the last heartbeat (the clock's time) and its client count."""
        d = self.deployment
        d.advance(60)
        self.assertEqual(self.record.last_heartbeat, 1_800_000_060.0)
        self.assertEqual(self.record.clients, 0)
        for _ in range(2):
            d.result(d.client().quote("KO"))
        d.advance(60)
        self.assertEqual(self.record.last_heartbeat, 1_800_000_120.0)
        self.assertEqual(self.record.clients, 2)
        self.assertEqual(self.record.connected_since, 1_800_000_000.0)

    def test_commands_forwarded_counted(self) -> None:
        """Every relayed command the master answers counts, refused ones too, and every order of a batch."""
        d = self.deployment
        alice = d.logged_in("alice")  # register, login
        self.assertEqual(self.record.commands_forwarded, 2)
        self.assertRaises(LoginFailed, d.result, alice.login("alice", "wrong password"))
        self.assertEqual(self.record.commands_forwarded, 3)
        d.result(alice.buy("KO", 1))
        self.assertEqual(self.record.commands_forwarded, 4)
        d.result(alice.place_orders([{"side": "buy", "symbol": "KO", "quantity": 1}] * 3))
        self.assertEqual(self.record.commands_forwarded, 7)
        alice.quote("KO")  # answered by the worker's cache: not forwarded
        d.flush()
        self.assertEqual(self.record.commands_forwarded, 7)
        self.assertEqual(d.clients.relayed, 7)

    def test_worker_status(self) -> None:
        """WorkerStatus brings the worker's live figures: clients, sessions, relayed commands, uptime, tick."""
        d = self.deployment
        d.result(d.client().quote("KO"))  # answered from the worker's cache: not relayed
        alice = d.logged_in("alice")
        d.result(alice.buy("KO", 1))
        d.advance(30)
        status = d.result(d.registry.status("test-worker"))
        self.assertEqual(status["clients"], 2)
        self.assertEqual(status["sessions"], 1)
        self.assertEqual(status["commands_relayed"], 3)
        self.assertEqual(status["uptime"], 30.0)
        self.assertEqual(status["tick"], d.cache.tick)
        self.assertEqual(status["as_of"], d.cache.as_of)

    def test_status_of_a_worker_not_connected(self) -> None:
        """Asking a name that is not connected fails with the reason."""
        error = self.assertRaises(ServiceUnavailable, self.deployment.result, self.deployment.registry.status("nobody"))
        self.assertIn("'nobody' is not connected", str(error))

    def test_status_of_a_silent_worker(self) -> None:
        """A worker that does not answer within the timeout: ServiceUnavailable, not a hang."""
        d = self.deployment
        d.pumps.remove(d.master_pump)
        status = d.registry.status("test-worker", timeout=5)
        d.clock.advance(6)
        error = self.assertRaises(ServiceUnavailable, d.result, status)
        self.assertIn("did not answer", str(error))

    def test_reconnection_makes_a_new_record(self) -> None:
        """A worker that reconnects starts a new record: counters from zero, connected since the new time."""
        d = self.deployment
        d.logged_in("alice")
        d.clock.advance(100)
        d.connect_worker()
        record = d.registry.get("test-worker")
        self.assertIsNot(record, self.record)
        self.assertEqual(record.connected_since, 1_800_000_100.0)
        self.assertEqual(record.commands_forwarded, 0)

    def accept(self, name: str, port: int, version: str = "1", client_address: str | None = None) -> None:
        """Connect a bare worker ``name`` (registered, with its key) and complete its handshake."""
        d = self.deployment
        d.register(name)
        d.certified_names[0] = name
        peer = RawPeer(d, d.master_factory, port, DirectoryReader)
        hello = peer.protocol.callRemote(WorkerHello, name=name, version=version, client_address=client_address)
        nonce = d.result(hello)["nonce"]
        signature = cached_key(name).sign(gpg.proof_statement(name, nonce))
        d.result(peer.protocol.callRemote(WorkerProof, signature=signature))

    def test_bad_client_address_not_kept(self) -> None:
        """A hello whose client address is not HOST:PORT is accepted, but the record (like the directory)
        holds no client address for it."""
        d = self.deployment
        for number, bad in enumerate(("no-port", "host:99999", "a\nb:1")):
            self.accept(f"other-{number}", 50040 + number, client_address=bad)
            self.assertIsNone(d.registry.get(f"other-{number}").client_address)
        self.accept("v6", 50049, client_address="[::1]:2049")
        self.assertEqual(d.registry.get("v6").client_address, "[::1]:2049")

    def test_hello_without_client_address(self) -> None:
        """A worker from before the client address is still accepted; its record has none."""
        d = self.deployment
        self.accept("old", 50050, version="0.0.9")
        record = d.registry.get("old")
        self.assertIsNone(record.client_address)
        self.assertEqual(record.version, "0.0.9")
        self.assertEqual([r.name for r in d.registry.connected()], ["old", "test-worker"])
