"""The guarded AMP base shared by every link: bad requests, bounded boxes, timeouts, heartbeats, worker names.

Everything runs in memory (iosim and a Clock) against the real master and
worker protocols; `tests/test_hostile.py` repeats the hostile cases against
real processes.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.protocols import amp
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from papertrader.errors import BadRequest, ServiceUnavailable, WorkerRefused
from papertrader.eventlog import EventLogger
from papertrader.protocol import (
    MAX_ORDER_BATCH,
    ClientOrder,
    Heartbeat,
    Login,
    OrderGroup,
    OrderRequest,
    SubmitOrders,
    WorkerDirectory,
)
from papertrader.wire import MAX_BAD_REQUESTS, PEER_LOG, GuardedAMP, LogLimiter, note
from tests.support import Deployment


class LoggedEvents:
    """Collects every log event while a test runs."""

    def __init__(self, test: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def about(self, text: str) -> list[dict[str, Any]]:
        return [e for e in self.events if text in (e.get("log_format") or "")]

    def failures(self) -> list[dict[str, Any]]:
        return [e for e in self.events if "log_failure" in e]


class BareAMP(amp.AMP):
    """A bare AMP peer that takes the master's WorkerDirectory pushes (and ignores them), as a worker must."""

    @WorkerDirectory.responder
    def directory(self, workers: list[dict[str, str]]) -> dict:
        return {}


class RawPeer:
    """A bare AMP connection to one of the deployment's listeners, for sending what no real peer would."""

    def __init__(self, deployment: Deployment, factory: Any, port: int, protocol: type = BareAMP) -> None:
        address = IPv4Address("TCP", "10.9.8.7", port)
        self.protocol, self.server, pump = iosim.connectedServerAndClient(
            lambda: factory.buildProtocol(address),
            protocol,
            serverTransportFactory=lambda p: iosim.FakeTransport(p, isServer=True, peerAddress=address),
            clock=deployment.clock,
        )
        deployment.pumps.append(pump)
        self.deployment = deployment
        self.server_transport = self.server.transport

    def ask(self, command: bytes, **values: bytes) -> Any:
        """Send a command with raw argument strings; fires with the answer or fails with the error."""
        return self.protocol.callRemoteString(command, **values)

    def write(self, data: bytes) -> None:
        self.protocol.transport.write(data)
        self.deployment.flush()

    @property
    def closed(self) -> bool:
        return bool(self.server_transport.disconnecting or self.server_transport.disconnected)


class BeatingPeer(BareAMP):
    """A bare worker-side connection that answers the master's heartbeats, as a real worker does."""

    @Heartbeat.responder
    def heartbeat(self, clients: int | None = None) -> dict:
        return {}


def gone(client: Any) -> bool:
    """Whether the worker closed a library client's connection."""
    transport = client.connection.transport
    return transport is None or bool(transport.disconnecting or transport.disconnected)


class BadRequestTests(SynchronousTestCase):
    """Requests that cannot be read get a declared BAD_REQUEST, logged once per connection, and never a traceback."""

    def setUp(self) -> None:
        PEER_LOG.__init__()
        self.deployment = Deployment(self.mktemp())
        self.alice = self.deployment.logged_in("alice")
        self.log = LoggedEvents(self)

    def raw_client(self) -> RawPeer:
        return RawPeer(self.deployment, self.deployment.client_factory, 50000)

    def bad(self, d: Any) -> str:
        failure = self.assertRaises(amp.RemoteAmpError, self.deployment.result, d)
        self.assertEqual(failure.errorCode, b"BAD_REQUEST")
        return str(failure)

    def test_malformed_arguments(self) -> None:
        """Missing, mistyped and non-UTF-8 arguments, and unknown commands, each get BAD_REQUEST with a reason."""
        peer = self.raw_client()
        self.assertIn("missing argument 'password'", self.bad(peer.ask(b"Login", username=b"alice")))
        self.assertIn("not valid UTF-8", self.bad(peer.ask(b"ListOrders", token=b"t", cursor=b"\xff")))
        self.assertIn(
            "malformed argument", self.bad(peer.ask(b"Login", username=b"a", password=b"b", remember=b"maybe"))
        )
        self.assertIn("not valid UTF-8", self.bad(peer.ask(b"GetAssetValue", symbol=b"\xff\xfe")))
        self.assertIn("unknown command", self.bad(peer.ask(b"NoSuchCommand")))
        self.assertFalse(peer.closed)
        self.assertEqual(self.log.failures(), [])
        self.assertEqual(len(self.log.about("more on this connection are only counted")), 1)

    def test_declared_to_the_client_library(self) -> None:
        """A client using the declared Commands receives a bad request as the BadRequest error itself."""

        class LoginWithTextFlag(amp.Command):
            commandName = b"Login"
            arguments = [(b"username", amp.Unicode()), (b"password", amp.Unicode()), (b"remember", amp.Unicode())]
            response = Login.response
            errors = Login.errors

        peer = self.raw_client()
        d = peer.protocol.callRemote(LoginWithTextFlag, username="a", password="b", remember="maybe")
        error = self.assertRaises(BadRequest, self.deployment.result, d)
        self.assertIn("bad Login request", str(error))

    def test_flood_is_dropped_and_counted(self) -> None:
        """A connection that keeps sending bad requests is dropped; its log holds two lines, not one per box."""
        peer = self.raw_client()
        for _ in range(MAX_BAD_REQUESTS - 1):
            self.bad(peer.ask(b"Login", username=b"a", password=b"b", remember=b"maybe"))
        self.assertFalse(peer.closed)
        peer.ask(b"Login", username=b"a", password=b"b", remember=b"maybe").addErrback(lambda _: None)
        self.deployment.advance(1)
        self.assertTrue(peer.closed)
        self.assertEqual(len(self.log.about("more on this connection are only counted")), 1)
        self.assertEqual(len(self.log.about("bad requests; closing the connection")), 1)
        self.assertEqual(len(self.log.about("bad requests in all")), 1)
        self.assertEqual(self.log.failures(), [])
        self.assertEqual(self.deployment.result(self.alice.portfolio())["username"], "alice")

    def test_boxes_without_answers(self) -> None:
        """Bad boxes that want no answer, and answers to no question, are counted without a traceback."""
        peer = self.raw_client()
        peer.write(amp.AmpBox({b"_command": b"Login", b"remember": b"maybe"}).serialize())
        peer.write(amp.AmpBox({b"_answer": b"999"}).serialize())
        peer.write(amp.AmpBox({b"hello": b"world"}).serialize())
        self.assertFalse(peer.closed)
        self.assertEqual(self.log.failures(), [])
        self.assertEqual(len(self.log.about("more on this connection are only counted")), 1)

    def test_master_answers_bad_requests_too(self) -> None:
        """The master's listener answers a worker's unreadable request with BAD_REQUEST and keeps the link."""
        peer = RawPeer(self.deployment, self.deployment.master_factory, 50001)
        self.assertIn("missing argument", self.bad(peer.ask(b"WorkerHello", name=b"w")))
        self.deployment.certified_names[0] = "raw"
        self.deployment.result(self.deployment.handshake(peer.protocol, "raw"))
        self.assertIn("malformed", self.bad(peer.ask(b"SubmitOrders", orders=b"[{\"side\": 1}]")))
        self.assertFalse(peer.closed)
        self.assertEqual(self.log.failures(), [])

    def test_bad_order_rows_refused(self) -> None:
        """A SubmitOrders row that is not an order the worker could have sent is a bad request."""
        peer = RawPeer(self.deployment, self.deployment.master_factory, 50002)
        self.deployment.certified_names[0] = "raw"
        self.deployment.result(self.deployment.handshake(peer.protocol, "raw"))
        for rows in (b"{}", b"[1]", b'[{"side": "buy"}]', b"[" + b'{"side":"x"},' * 200 + b"{}]", b"not json"):
            self.bad(peer.ask(b"SubmitOrders", orders=rows))


    def test_bad_order_groups_refused(self) -> None:
        """A SubmitOrders group that is not one the worker could have sent is a bad request; nothing is stored."""
        peer = RawPeer(self.deployment, self.deployment.master_factory, 50003)
        self.deployment.certified_names[0] = "raw"
        self.deployment.result(self.deployment.handshake(peer.protocol, "raw"))
        group = b'{"token": "t", "received_at": "a", "client_address": "c", "orders": %s}'
        for groups in (
            b"{}",
            b"[1]",
            b'[{"token": "t", "received_at": "a"}]',
            b"[" + group % b"[]" + b"]",
            b"[" + group % b'[["buy", "AAPL"]]' + b"]",
            b"[" + group % b'[["buy", "AAPL", 1]]' + b"]",
            b"[" + group % b'[["buy", "AAPL", "1", null]]' + b"]",
            b"[" + group % b'[["buy", "AAPL", "1", "id", "more"]]' + b"]",
            b"[" + group % b'[{"side": "buy", "symbol": "AAPL", "quantity": "1"}]' + b"]",
            b"[" + group % (b"[" + b",".join([b'["buy", "AAPL", "1"]'] * (MAX_ORDER_BATCH + 1)) + b"]") + b"]",
        ):
            self.bad(peer.ask(b"SubmitOrders", orders=b"[]", groups=groups))
        # Each argument within the bound, the two together past it.
        rows = b"[" + b",".join([b'{"side": "buy", "token": "t", "symbol": "AAPL", "quantity": "1", '
                                 b'"received_at": "a", "client_address": "c"}'] * 100) + b"]"
        groups = b"[" + group % (b"[" + b",".join([b'["buy", "AAPL", "1"]'] * 100) + b"]") + b"]"
        self.assertIn("at most", self.bad(peer.ask(b"SubmitOrders", orders=rows, groups=groups)))
        self.assertEqual(self.deployment.pool.connection.execute("SELECT COUNT(*) FROM orders").fetchone(), (0,))

    def test_rows_and_groups_answered_in_order(self) -> None:
        """One SubmitOrders may carry rows (each with its envelope, as workers before groups sent them) and
        groups: one result per order, the rows' first, then each group's orders in turn."""
        peer = RawPeer(self.deployment, self.deployment.master_factory, 50004)
        self.deployment.certified_names[0] = "raw"
        self.deployment.result(self.deployment.handshake(peer.protocol, "raw"))
        token = self.alice.token
        rows = [OrderRequest("buy", token, "AAPL", "1", "t0", "10.0.0.1:1", "row-1")]
        groups = [
            OrderGroup(token, "t1", "10.0.0.2:2", [ClientOrder("buy", "KO", "2", "g-1"), ClientOrder("buy", "X", "1")]),
            OrderGroup("not-a-token", "t2", "10.0.0.3:3", [ClientOrder("sell", "KO", "1")]),
            OrderGroup(token, "t3", "10.0.0.4:4", [ClientOrder("buy", "MSFT", "3")]),
        ]
        answer = self.deployment.result(peer.protocol.callRemote(SubmitOrders, orders=rows, groups=groups))
        results = answer["results"]
        self.assertEqual([r.code for r in results], [None, None, "PURCHASE_FAILED", "SESSION_INVALID", None])
        stored = self.deployment.pool.connection.execute(
            "SELECT id, symbol, quantity, received_at, client_address, client_order_id, worker FROM orders ORDER BY id"
        ).fetchall()
        self.assertEqual(stored, [
            (results[0].order_id, "AAPL", 1, "t0", "10.0.0.1:1", "row-1", "raw"),
            (results[1].order_id, "KO", 2, "t1", "10.0.0.2:2", "g-1", "raw"),
            (results[4].order_id, "MSFT", 3, "t3", "10.0.0.4:4", None, "raw"),
        ])


class BoxLimitTests(SynchronousTestCase):
    """A box that never ends, or has too many keys, closes the connection that sent it, on worker and master."""

    def setUp(self) -> None:
        PEER_LOG.__init__()
        self.deployment = Deployment(self.mktemp())
        self.alice = self.deployment.logged_in("alice")

    def check(self, factory: Any) -> None:
        endless = RawPeer(self.deployment, factory, 50010)
        for n in range(18):  # 18 values of 60,000 bytes: past 1 MiB, and the box never ends
            self.assertFalse(endless.closed)
            endless.write(_pair(b"k%d" % n, b"v" * 60_000))
        self.assertTrue(endless.closed)
        many = RawPeer(self.deployment, factory, 50011)
        many.write(b"".join(_pair(b"%d" % i, b"") for i in range(1000)))  # 1,000 keys, a few KB
        self.assertTrue(many.closed)
        self.assertEqual(self.deployment.result(self.alice.portfolio())["username"], "alice")

    def test_worker(self) -> None:
        """On the worker's client listener."""
        self.check(self.deployment.client_factory)

    def test_master(self) -> None:
        """On the master's worker listener."""
        self.check(self.deployment.master_factory)


def _pair(key: bytes, value: bytes) -> bytes:
    """One key and value as AMP frames them."""
    return len(key).to_bytes(2, "big") + key + len(value).to_bytes(2, "big") + value


class TimeoutTests(SynchronousTestCase):
    """Every connection has a deadline at each stage; heartbeats keep the worker link alive."""

    def setUp(self) -> None:
        PEER_LOG.__init__()
        self.deployment = Deployment(self.mktemp())

    def test_silent_connection_closed(self) -> None:
        """A connection that sends nothing is closed after the handshake timeout, on both listeners."""
        client = RawPeer(self.deployment, self.deployment.client_factory, 50020)
        master = RawPeer(self.deployment, self.deployment.master_factory, 50021)
        self.deployment.advance(29)
        self.assertFalse(client.closed or master.closed)
        self.deployment.advance(2)
        self.assertTrue(client.closed)
        self.assertTrue(master.closed)

    def test_no_hello_closed(self) -> None:
        """A worker connection that sends commands but never completes WorkerHello is closed all the same."""
        master = RawPeer(self.deployment, self.deployment.master_factory, 50022)
        for _ in range(10):
            master.ask(b"Heartbeat").addErrback(lambda _: None)
            self.deployment.advance(5)
        self.assertTrue(master.closed)

    def test_idle_without_session(self) -> None:
        """A client without a session is closed after the idle timeout; one that logged in stays longer."""
        anonymous = self.deployment.client()
        alice = self.deployment.logged_in("alice")
        self.deployment.result(anonymous.quote("AAPL"))
        self.deployment.advance(301)
        self.assertTrue(gone(anonymous))
        self.assertFalse(gone(alice))
        self.assertEqual(self.deployment.result(alice.portfolio())["username"], "alice")
        self.deployment.advance(3601)
        self.assertTrue(gone(alice))

    def test_client_heartbeats_keep_a_session_connection(self) -> None:
        """A logged-in client that sends heartbeats is never closed for idleness."""
        alice = self.deployment.logged_in("alice")
        for _ in range(10):
            alice.heartbeat()
            self.deployment.advance(1000, step=100)
        self.assertFalse(gone(alice))

    def test_heartbeats_keep_the_worker_link(self) -> None:
        """A quiet worker-master link stays up for hours: both sides send heartbeats."""
        self.deployment.advance(4 * 3600, step=5)
        self.assertIsNotNone(self.deployment.link.connection)
        self.assertIn("test-worker", self.deployment.registry.workers)

    def test_silent_master_link_aborted(self) -> None:
        """A link whose other side stops talking (heartbeats lost) is aborted after two intervals."""
        pump = self.deployment.master_pump
        self.deployment.pumps.remove(pump)  # nothing moves between worker and master any more
        self.deployment.advance(15, step=5)
        self.assertFalse(pump.client.transport.disconnecting or pump.server.transport.disconnecting)
        self.deployment.advance(10, step=5)
        self.assertTrue(pump.client.transport.disconnecting or pump.client.transport.disconnected)
        self.assertTrue(pump.server.transport.disconnecting or pump.server.transport.disconnected)


class WorkerNameTests(SynchronousTestCase):
    """A worker's name belongs to its live connection; only a dead one is replaced."""

    def setUp(self) -> None:
        PEER_LOG.__init__()
        self.deployment = Deployment(self.mktemp())
        self.log = LoggedEvents(self)

    def test_second_connection_refused_while_first_answers(self) -> None:
        """A second connection under a live worker's name is refused with the reason; the first keeps serving."""
        first = self.deployment.registry.workers["test-worker"]
        intruder = RawPeer(self.deployment, self.deployment.master_factory, 50030)
        error = self.assertRaises(
            WorkerRefused,
            self.deployment.result,
            self.deployment.handshake(intruder.protocol, "test-worker"),
        )
        self.assertIn("already connected", str(error))
        self.assertIs(self.deployment.registry.workers["test-worker"], first)
        self.assertEqual(len(self.log.about("refused worker")), 1)
        alice = self.deployment.logged_in("alice")
        self.assertIn("order_id", self.deployment.result(alice.buy("AAPL", 1)))

    def test_dead_connection_replaced(self) -> None:
        """When the old connection does not answer the ping, the new one takes the name."""
        self.deployment.pumps.remove(self.deployment.master_pump)  # the old link hears nothing any more
        newcomer = RawPeer(self.deployment, self.deployment.master_factory, 50031)
        d = self.deployment.handshake(newcomer.protocol, "test-worker")
        self.deployment.advance(11, step=1)
        self.assertEqual(self.successResultOf(d)["update_interval"], 60.0)
        self.assertIs(self.deployment.registry.workers["test-worker"].connection, newcomer.server)


    def test_newcomer_lost_while_claiming(self) -> None:
        """A connection that ends while the old one is being pinged never takes the name; the next one can.

        Before, the lost connection was stored under the name, and every later
        hello failed on its missing transport: the name was locked for good.
        """
        self.deployment.pumps.remove(self.deployment.master_pump)  # the old link hears nothing any more
        newcomer = RawPeer(self.deployment, self.deployment.master_factory, 50032)
        self.deployment.handshake(newcomer.protocol, "test-worker").addErrback(lambda _: None)
        self.deployment.flush()
        newcomer.protocol.transport.loseConnection()
        self.deployment.advance(11, step=1)
        self.assertIsNot(self.deployment.registry._holder("test-worker"), newcomer.server)
        third = RawPeer(self.deployment, self.deployment.master_factory, 50033, BeatingPeer)
        d = self.deployment.handshake(third.protocol, "test-worker")
        self.deployment.advance(11, step=1)
        self.assertEqual(self.successResultOf(d)["update_interval"], 60.0)
        self.assertIs(self.deployment.registry.workers["test-worker"].connection, third.server)
        self.assertEqual(self.log.failures(), [])

    def test_no_timers_after_the_end(self) -> None:
        """A connection that has ended arms no timeout and sends no heartbeat, whatever calls it later."""
        peer = RawPeer(self.deployment, self.deployment.master_factory, 50034)
        server = peer.server
        peer.protocol.transport.loseConnection()
        self.deployment.flush()
        server.refresh_timeout()
        server._arm(5.0, "was idle for")
        server.start_heartbeats(5.0)
        armed = [
            call
            for call in self.deployment.clock.getDelayedCalls()
            if call.func is server._heartbeats or getattr(call.func, "__self__", None) is server
        ]
        self.assertEqual(armed, [])
        self.deployment.advance(30, step=5)
        self.assertEqual(self.log.failures(), [])


class _Huge(amp.Command):
    arguments: list = []
    response = [(b"text", amp.Unicode())]
    errors = {ServiceUnavailable: b"SERVICE_UNAVAILABLE"}


class _Small(amp.Command):
    arguments: list = []
    response = [(b"text", amp.Unicode())]


class _Answers(amp.CommandLocator):
    @_Huge.responder
    def huge(self) -> dict:
        return {"text": "x" * 70_000}

    @_Small.responder
    def small(self) -> dict:
        return {"text": "ok"}


class TooLongAnswerTests(SynchronousTestCase):
    """An answer too long for AMP becomes a declared SERVICE_UNAVAILABLE, not a dropped connection."""

    def test_answer_too_long(self) -> None:
        """The asker hears SERVICE_UNAVAILABLE and the connection goes on serving it."""
        PEER_LOG.__init__()
        log = LoggedEvents(self)
        clock = Clock()
        asker, _, pump = iosim.connectedServerAndClient(
            lambda: GuardedAMP(locator=_Answers(), clock=clock), amp.AMP, clock=clock
        )
        failures: list[Any] = []
        asker.callRemote(_Huge).addErrback(failures.append)  # before the answer arrives, as AMP requires
        pump.flush()
        [failure] = failures
        self.assertIn("too long", str(failure.trap(ServiceUnavailable) and failure.value))
        small = asker.callRemote(_Small)
        pump.flush()
        self.assertEqual(self.successResultOf(small), {"text": "ok"})
        self.assertEqual(len(log.about("too long to send")), 1)
        self.assertEqual(log.failures(), [])


class ConnectionCapTests(SynchronousTestCase):
    """Each listener holds at most its number of connections; past it, new ones are closed at once."""

    def test_cap(self) -> None:
        """With a cap of two, a third connection is refused (logged once), and accepted when one closes."""
        PEER_LOG.__init__()
        log = LoggedEvents(self)
        deployment = Deployment(self.mktemp())
        factory = deployment.client_factory
        factory.max_connections = 2
        first = RawPeer(deployment, factory, 50040)
        second = RawPeer(deployment, factory, 50041)
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "10.9.8.7", 50042)))
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "10.9.8.7", 50043)))
        self.assertEqual(len(log.about("the most allowed")), 1)
        self.assertFalse(first.closed or second.closed)
        first.protocol.transport.loseConnection()
        deployment.flush()
        third = RawPeer(deployment, factory, 50044)
        self.assertFalse(third.closed)
        self.assertEqual(factory.open, 2)


class LogLimiterTests(SynchronousTestCase):
    """The budget for lines caused by peers."""

    def test_burst_then_counted(self) -> None:
        """Past the burst, lines are counted, and the count is reported with the next allowed line."""
        limiter = LogLimiter(burst=2, interval=10)
        self.assertEqual([limiter.allow(0) for _ in range(4)], [(True, 0), (True, 0), (False, 0), (False, 0)])
        self.assertEqual(limiter.allow(10), (True, 2))

    def test_one_peer_cannot_use_up_the_budget(self) -> None:
        """A peer gets at most ``per_peer`` of the lines in a window, so another peer's first mistake
        is still logged; lines caused by no particular peer share only the whole budget."""
        limiter = LogLimiter(burst=4, interval=10, per_peer=2)
        noisy = [limiter.allow(0, "10.0.0.1")[0] for _ in range(5)]
        self.assertEqual(noisy, [True, True, False, False, False])
        self.assertEqual(limiter.allow(1, "10.0.0.2"), (True, 3))
        self.assertEqual(limiter.allow(1, None), (True, 0))
        self.assertEqual(limiter.allow(1, "10.0.0.3"), (False, 0))  # the whole budget is used
        self.assertEqual(limiter.allow(10, "10.0.0.1"), (True, 1))

    def test_peer_counted_by_host(self) -> None:
        """Lines noted for one host count against one share, whatever port each connection came from."""
        limiter = LogLimiter(burst=20, interval=60, per_peer=2)
        clock = Clock()
        log = EventLogger()
        logged = LoggedEvents(self)
        for port in range(5):
            note(log, limiter, clock, "info", "{peer} misbehaved", peer=f"[::1]:{port}")
        note(log, limiter, clock, "info", "{peer} misbehaved", peer="10.0.0.9:1")
        self.assertEqual([e["peer"] for e in logged.about("misbehaved")], ["[::1]:0", "[::1]:1", "10.0.0.9:1"])

