"""Pushes that cost once: price ticks and order updates, encoded once, written in slices, only where wanted."""

from __future__ import annotations

import io
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase

from papertrader import protocol
from papertrader.errors import DataFailed
from papertrader.master import workers as master_workers
from papertrader.master.protocol import MAX_WORKER_UNSENT_BYTES, MasterLocator, WorkerAMP
from papertrader.master.trading import QueuedOrder, Settlement
from papertrader.master.workers import ConnectedWorker, WorkerRegistry
from papertrader.protocol import (
    MAX_SUBSCRIBED_SYMBOLS,
    MAX_UPDATE_BYTES,
    MAX_UPDATES_PER_BOX,
    OrderUpdates,
    PriceTick,
    push_bytes,
)
from papertrader.slices import SlicedWork
from papertrader.stalls import STALL_MONITOR_ENV, StallMonitor, interval_from_environment
from papertrader.wire import PEER_LOG
from papertrader.worker import clients as worker_clients
from papertrader.worker.cache import QuoteCache
from papertrader.worker.clients import ALL_PRICES, ClientFactory, ClientLocator, ClientRegistry
from papertrader.worker.upstream import MasterLink, OrderBatcher
from tests.support import Deployment

PRICES = {"AAPL": 19_000, "MSFT": 41_500, "KO": 6_000}


def parse_pushes(data: bytes) -> list[tuple[type[amp.Command], dict[str, Any]]]:
    """The pushes in ``data`` (bytes written to a transport), as (command, parsed arguments)."""
    commands = {c.commandName: c for c in (OrderUpdates, PriceTick)}
    pushes = []
    for box in amp.parse(io.BytesIO(data)):
        command = commands[box.pop(amp.COMMAND)]
        pushes.append((command, command.parseArguments(box, None)))
    return pushes


def run_one_turn(clock: Clock) -> None:
    """Run the calls due now but not the ones they schedule: one reactor iteration.

    Twisted's reactor runs a ``callLater(0)`` made during a turn in the next
    turn, after I/O; ``Clock.advance(0)`` would run it at once.
    """
    due = [call for call in clock.getDelayedCalls() if call.getTime() <= clock.seconds()]
    for call in due:
        clock.calls.remove(call)
        call.called = 1
        call.func(*call.args, **call.kw)


class Recorder:
    """A client connection that records the pushes written to it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def send_push(self, data: bytes, droppable: bool) -> None:
        self.writes.append(data)

    def pushes(self) -> list[tuple[type[amp.Command], dict[str, Any]]]:
        return parse_pushes(b"".join(self.writes))


class CountingEncoder:
    """Wraps `push_bytes`, counting the boxes it encodes per command."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, command: type[amp.Command], **arguments: Any) -> bytes:
        self.counts[command.__name__] = self.counts.get(command.__name__, 0) + 1
        return push_bytes(command, **arguments)


class SlicedWorkTests(SynchronousTestCase):
    """`SlicedWork` runs queued jobs a bounded number of steps per reactor turn."""

    def test_bounded_steps_in_order(self) -> None:
        """Jobs run in the order queued, never more than ``steps_per_turn`` steps a turn, none during ``add``."""
        clock = Clock()
        work = SlicedWork(clock, 3)
        done: list[str] = []
        work.add(done.append(f"a{i}") for i in range(4))
        work.add(done.append(f"b{i}") for i in range(2))
        self.assertEqual(done, [])
        per_turn = []
        while work.pending:
            before = len(done)
            run_one_turn(clock)
            per_turn.append(len(done) - before)
        self.assertEqual(done, ["a0", "a1", "a2", "a3", "b0", "b1"])
        self.assertEqual(per_turn[:2], [3, 3])
        self.assertLessEqual(max(per_turn), 3)

    def test_superseded_job_dropped(self) -> None:
        """A job added with the key of an unfinished one replaces it; other jobs keep their place."""
        clock = Clock()
        work = SlicedWork(clock, 2)
        done: list[str] = []
        work.add((done.append(f"old{i}") for i in range(5)), supersedes="tick")
        work.add(done.append(f"update{i}") for i in range(1))
        run_one_turn(clock)
        work.add((done.append(f"new{i}") for i in range(2)), supersedes="tick")
        clock.advance(0)
        self.assertEqual(done, ["old0", "old1", "update0", "new0", "new1"])

    def test_failing_job_does_not_stop_the_rest(self) -> None:
        """A job that raises is logged and dropped; the next job still runs."""
        clock = Clock()
        work = SlicedWork(clock, 10)
        done: list[int] = []

        def broken() -> Any:
            yield None
            raise RuntimeError("bug")

        work.add(broken())
        work.add(done.append(i) for i in range(2))
        clock.advance(0)
        self.assertEqual(done, [0, 1])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ClientRegistryPushTests(SynchronousTestCase):
    """The worker encodes each push once and writes it a slice at a time to the connections that want it."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.encoder = CountingEncoder()
        self.patch(worker_clients, "push_bytes", self.encoder)

    def registry(self, slice_size: int = 200) -> ClientRegistry:
        return ClientRegistry(self.clock, slice_size=slice_size)

    def connect(self, registry: ClientRegistry, count: int, prices: Any = frozenset()) -> list[Recorder]:
        connections = [Recorder() for _ in range(count)]
        for connection in connections:
            registry.connected(connection)
            registry.subscribe(connection, prices)
        return connections

    def test_tick_encoded_once_per_subscription(self) -> None:
        """A tick is encoded once for every connection that wants all prices, once per distinct symbol set."""
        registry = self.registry()
        everything = self.connect(registry, 50, ALL_PRICES)
        apple = self.connect(registry, 20, frozenset({"AAPL"}))
        nothing = self.connect(registry, 5)
        registry.push_tick(7, "t7", PRICES)
        self.clock.advance(0)
        self.assertEqual(self.encoder.counts, {"PriceTick": 2})
        for connection in everything:
            [(command, tick)] = connection.pushes()
            self.assertEqual((command, tick["tick"], tick["as_of"]), (PriceTick, 7, "t7"))
            self.assertEqual({p["symbol"]: p["price_cents"] for p in tick["prices"]}, PRICES)
        for connection in apple:
            [(_, tick)] = connection.pushes()
            self.assertEqual(tick["prices"], [{"symbol": "AAPL", "price_cents": 19_000}])
        self.assertEqual([c.writes for c in nothing], [[]] * 5)
        self.assertIs(everything[0].writes[0], everything[-1].writes[0])  # the very same bytes

    def test_one_turn_writes_at_most_a_slice(self) -> None:
        """With many clients, one reactor turn writes to at most ``slice_size`` of them; all get the tick."""
        registry = self.registry(slice_size=100)
        connections = self.connect(registry, 1050, ALL_PRICES)
        registry.push_tick(1, "t1", PRICES)
        self.assertEqual(sum(len(c.writes) for c in connections), 0)
        per_turn = []
        while registry.work.pending:
            before = sum(len(c.writes) for c in connections)
            run_one_turn(self.clock)
            per_turn.append(sum(len(c.writes) for c in connections) - before)
        self.assertEqual(per_turn, [100] * 10 + [50])
        self.assertEqual({len(c.writes) for c in connections}, {1})

    def test_new_tick_supersedes_unfinished_push(self) -> None:
        """A tick arriving before the last one reached everyone replaces it: nobody gets a stale tick after."""
        registry = self.registry(slice_size=100)
        connections = self.connect(registry, 300, ALL_PRICES)
        registry.push_tick(1, "t1", PRICES)
        run_one_turn(self.clock)
        registry.push_tick(2, "t2", PRICES)
        self.clock.advance(0)
        self.assertEqual(sum(len(c.writes) for c in connections), 100 + 300)
        self.assertEqual({c.pushes()[-1][1]["tick"] for c in connections}, {2})

    def test_updates_once_per_user_to_each_of_its_connections(self) -> None:
        """A user's updates of one box are encoded once and reach each of that user's connections only."""
        registry = self.registry(slice_size=1)
        alice = self.connect(registry, 3)
        bob = self.connect(registry, 1)
        for connection in alice:
            registry.attach(connection, "alice")
        registry.attach(bob[0], "bob")
        updates = [
            {"username": name, "order_id": i, "side": "buy", "symbol": "KO", "quantity": 1, "status": "filled",
             "price_cents": 6000}
            for i, name in enumerate(["alice", "carol", "alice", "bob"])
        ]
        registry.push_updates("t3", updates)
        run_one_turn(self.clock)
        self.assertEqual(sum(len(c.writes) for c in alice + bob), 1)
        self.clock.advance(0)
        self.assertEqual(self.encoder.counts, {"OrderUpdates": 2})
        for connection in alice:
            [(command, pushed)] = connection.pushes()
            self.assertEqual((command, pushed["settled_at"]), (OrderUpdates, "t3"))
            self.assertEqual([u["order_id"] for u in pushed["updates"]], [0, 2])
        [(_, pushed)] = bob[0].pushes()
        self.assertEqual([u["order_id"] for u in pushed["updates"]], [3])


def slow_reader_lines(test: SynchronousTestCase) -> list[str]:
    """The log lines about a peer cut off for not reading, as they are logged while ``test`` runs."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if "does not read" in event.get("log_format", ""):
            lines.append(event["log_format"])

    globalLogPublisher.addObserver(observe)
    test.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


class SlowClientTests(SynchronousTestCase):
    """A client that does not read costs the worker a bounded amount of memory."""

    def setUp(self) -> None:
        PEER_LOG.__init__()  # a fresh log budget: lines other tests caused must not hide this one's
        self.clock = Clock()
        cache = QuoteCache()
        self.clients = ClientRegistry(self.clock)
        link = MasterLink(self.clock, None, "w", cache, None)
        factory = ClientFactory(
            lambda: ClientLocator(self.clock, link, OrderBatcher(self.clock, link.call), cache, self.clients),
            clock=self.clock,
        )
        address = IPv4Address("TCP", "10.0.0.9", 4321)
        self.connection = factory.buildProtocol(address)
        self.transport = StringTransport(peerAddress=address)
        self.connection.makeConnection(self.transport)
        self.clients.subscribe(self.connection, ALL_PRICES)
        self.clients.attach(self.connection, "alice")
        self.lines = slow_reader_lines(self)

    def update(self, order_id: int) -> dict[str, Any]:
        """An update whose push is always of the same size (for ``order_id`` below 10,000)."""
        return {"username": "alice", "order_id": 10_000 + order_id, "side": "buy", "symbol": "KO", "quantity": 1,
                "status": "rejected", "reason": "x" * 200}

    def test_is_its_transports_producer(self) -> None:
        """The connection registers as its transport's streaming producer, so it hears "buffer full"."""
        self.assertIs(self.transport.producer, self.connection)
        self.assertTrue(self.transport.streaming)

    def test_paused_client_gets_no_tick_backlog(self) -> None:
        """While the transport is full, ticks are not written; once it drains only the latest follows."""
        self.connection.pauseProducing()  # what the transport does when its buffer is full
        for tick in range(1, 6):
            self.clients.push_tick(tick, f"t{tick}", PRICES)
            self.clock.advance(0)
        self.assertEqual(self.transport.value(), b"")
        self.clients.push_updates("t5", [self.update(1)])
        self.clock.advance(0)
        self.assertEqual([c for c, _ in parse_pushes(self.transport.value())], [OrderUpdates])
        self.transport.clear()
        self.connection.resumeProducing()
        [(command, tick)] = parse_pushes(self.transport.value())
        self.assertEqual((command, tick["tick"]), (PriceTick, 5))
        self.assertFalse(self.transport.disconnecting)

    def test_closed_past_the_hard_bound(self) -> None:
        """A paused client that would be sent more than ``max_unsent_bytes`` is cut off, with one log line."""
        self.connection.pauseProducing()
        box = len(push_bytes(OrderUpdates, settled_at="t", updates=[self.update(0)]))
        count = self.connection.max_unsent_bytes // box
        for order_id in range(count):
            self.clients.push_updates("t", [self.update(order_id)])
        self.clock.advance(0)
        self.assertFalse(self.transport.disconnecting)
        for order_id in range(count, count + 3):
            self.clients.push_updates("t", [self.update(order_id)])
        self.clock.advance(0)
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(self.transport.disconnected)  # aborted: what is waiting will never be read
        self.assertEqual(len(self.lines), 1)
        self.assertLessEqual(len(self.transport.value()), self.connection.max_unsent_bytes + box)

    def test_resumed_client_starts_a_fresh_budget(self) -> None:
        """A client that drains its buffer may be sent as much again before it is judged slow."""
        box = len(push_bytes(OrderUpdates, settled_at="t", updates=[self.update(0)]))
        count = self.connection.max_unsent_bytes // box
        for _ in range(3):
            self.connection.pauseProducing()
            for order_id in range(count):
                self.clients.push_updates("t", [self.update(order_id)])
            self.clock.advance(0)
            self.connection.resumeProducing()
        self.assertFalse(self.transport.disconnecting)

    def test_close_unregisters_the_producer(self) -> None:
        """Closing unregisters the producer first (a TLS transport would not close while one is registered)."""
        self.connection.close()
        self.assertIsNone(self.transport.producer)
        self.assertTrue(self.transport.disconnecting)


class FakeWorker:
    """A worker's connection at the master: what is written to it lands in a StringTransport."""

    def __init__(self) -> None:
        self.transport = StringTransport()

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def pushes(self) -> list[tuple[type[amp.Command], dict[str, Any]]]:
        return parse_pushes(self.transport.value())


def connected(name: str, connection: Any) -> ConnectedWorker:
    """A registry record for ``connection``, as a handshake would make it."""
    return ConnectedWorker(name, connection, "10.0.0.8:40000", "10.0.0.8:2049", "test", 0.0)


def settlement(order_id: int, username: str, reason: str | None = None) -> Settlement:
    order = QueuedOrder(order_id, 1, username, "buy", "KO", 2)
    if reason is not None:
        return Settlement(order, False, 6000, reason=reason)
    return Settlement(order, True, 6000, 12_000, 1)


class MasterRoutingTests(SynchronousTestCase):
    """The master sends each order update only to the workers serving its user, in compact boxes, in slices."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.encoder = CountingEncoder()
        self.patch(master_workers, "push_bytes", self.encoder)

    def registry(self, **workers: FakeWorker) -> WorkerRegistry:
        registry = WorkerRegistry(self.clock, slice_size=1000)
        for name, worker in workers.items():
            registry.workers[name] = connected(name, worker)
        return registry

    def test_updates_only_to_workers_serving_the_user(self) -> None:
        """Every worker gets the tick (encoded once); an update goes only where its user is served."""
        w1, w2, w3 = FakeWorker(), FakeWorker(), FakeWorker()
        registry = self.registry(w1=w1, w2=w2, w3=w3)
        registry.serves(w1, "alice")
        registry.serves(w2, "bob")
        registry.serves(w2, "alice")
        settlements = [settlement(1, "alice"), settlement(2, "bob", "not enough"), settlement(3, "carol")]
        registry.broadcast_tick(4, "t4", PRICES)
        registry.push_updates(4, "t4", settlements)
        self.clock.advance(0)
        self.assertEqual(self.encoder.counts["PriceTick"], 1)
        [(command, tick)] = w3.pushes()
        self.assertEqual((command, tick["tick"]), (PriceTick, 4))
        [_, (command, pushed)] = w1.pushes()
        self.assertEqual((command, pushed["settled_at"]), (OrderUpdates, "t4"))
        self.assertEqual(pushed["updates"], [
            {"username": "alice", "order_id": 1, "side": "buy", "symbol": "KO", "quantity": 2,
             "status": "filled", "price_cents": 6000},
        ])
        [_, (_, pushed)] = w2.pushes()
        self.assertEqual([(u["order_id"], u["status"], u.get("reason")) for u in pushed["updates"]],
                         [(1, "filled", None), (2, "rejected", "not enough")])

    def test_forgets_a_worker_that_disconnects(self) -> None:
        """Once a worker's connection ends, the users it served are no longer routed to it."""
        w1, w2 = FakeWorker(), FakeWorker()
        registry = self.registry(w1=w1, w2=w2)
        registry.serves(w1, "alice")
        registry.serves(w2, "alice")
        registry.remove("w1", w1)
        self.assertEqual(registry.serving("alice"), {w2})
        self.assertNotIn("w1", registry.workers)
        registry.remove("w2", w2)
        self.assertEqual(registry.serving("alice"), set())
        w3 = FakeWorker()
        w3.transport = None
        registry.serves(w3, "alice")  # a connection that has ended already is not remembered
        self.assertEqual(registry.serving("alice"), set())

    def test_many_updates_in_bounded_boxes_and_slices(self) -> None:
        """A big settlement goes out in boxes far under AMP's limits, routed a slice of orders per turn."""
        w1 = FakeWorker()
        registry = self.registry(w1=w1)
        for name in ("alice", "bob"):
            registry.serves(w1, name)
        settlements = [
            settlement(i, ("alice", "bob", "carol")[i % 3], "r" * 300 if i % 7 == 0 else None) for i in range(5000)
        ]
        registry.broadcast_tick(9, "t9", PRICES)
        registry.push_updates(9, "t9", settlements)
        run_one_turn(self.clock)  # the tick, then the first slice of orders
        routed_in_first_turn = sum(len(p["updates"]) for c, p in w1.pushes() if c is OrderUpdates)
        self.assertLessEqual(routed_in_first_turn, 1000)
        self.clock.advance(0)
        boxes = list(amp.parse(io.BytesIO(w1.transport.value())))
        updates = [b for b in boxes if b[amp.COMMAND] == b"OrderUpdates"]
        self.assertGreater(len(updates), 1)
        for box in updates:
            self.assertLessEqual(len(box[b"updates"]), MAX_UPDATE_BYTES)
        pushed = [u for c, p in w1.pushes() if c is OrderUpdates for u in p["updates"]]
        self.assertLessEqual(max(len(p["updates"]) for c, p in w1.pushes() if c is OrderUpdates), MAX_UPDATES_PER_BOX)
        alice, bob = [i for i in range(5000) if i % 3 == 0], [i for i in range(5000) if i % 3 == 1]
        self.assertEqual([u["order_id"] for u in pushed], alice + bob)  # each user's together
        self.assertEqual({len(u.get("reason", "")) for u in pushed}, {0, protocol.MAX_ORDER_REASON})

    def test_each_users_updates_travel_together(self) -> None:
        """A settlement interleaves users; the boxes hold each user's updates together (in order), so a
        worker, which passes a box on as one push per user in it, makes one or two pushes a user, not
        one per box."""
        w1 = FakeWorker()
        registry = self.registry(w1=w1)
        users = [f"user{n}" for n in range(50)]
        for name in users:
            registry.serves(w1, name)
        settlements = [settlement(i, users[i % 50], "r" * 100) for i in range(5000)]
        registry.broadcast_tick(9, "t9", PRICES)
        registry.push_updates(9, "t9", settlements)
        self.clock.advance(0)
        boxes = [p["updates"] for c, p in w1.pushes() if c is OrderUpdates]
        self.assertGreater(len(boxes), 10)
        pushes_per_user = [len({u["username"] for u in box}) for box in boxes]
        self.assertLessEqual(sum(pushes_per_user), len(users) + len(boxes))
        runs = [u["username"] for box in boxes for u in box]
        self.assertEqual([name for n, name in enumerate(runs) if n == 0 or runs[n - 1] != name], users)
        for name in users:
            self.assertEqual(
                [u["order_id"] for box in boxes for u in box if u["username"] == name],
                [i for i in range(5000) if users[i % 50] == name],
            )


class SlowWorkerTests(SynchronousTestCase):
    """A worker that stops reading its pushes costs the master a bounded amount of memory."""

    def setUp(self) -> None:
        PEER_LOG.__init__()  # a fresh log budget: lines other tests caused must not hide this one's
        self.clock = Clock()
        self.registry = WorkerRegistry(self.clock, slice_size=1000)
        self.lines = slow_reader_lines(self)

    def worker(self, name: str, max_unsent_bytes: int) -> tuple[WorkerAMP, StringTransport]:
        """A real worker connection at the master, serving alice, written into a StringTransport."""
        connection = WorkerAMP(MasterLocator(None, self.registry, 30), clock=self.clock)  # type: ignore[arg-type]
        connection.max_unsent_bytes = max_unsent_bytes
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.8", 2048))
        connection.makeConnection(transport)
        self.registry.workers[name] = connected(name, connection)
        self.registry.serves(connection, "alice")
        return connection, transport

    def test_is_its_transports_producer(self) -> None:
        """The connection hears "buffer full" from its transport; the bound is far above a big settlement."""
        connection, transport = self.worker("w1", MAX_WORKER_UNSENT_BYTES)
        self.assertIs(transport.producer, connection)
        self.assertGreaterEqual(MAX_WORKER_UNSENT_BYTES, 64 * 1024 * 1024)

    def test_worker_that_does_not_read_is_cut_off(self) -> None:
        """Past its bound a paused worker is aborted, with one log line; one that reads gets every update."""
        slow, slow_transport = self.worker("slow", 100_000)
        _, fast_transport = self.worker("fast", 100_000)
        slow.pauseProducing()
        settlements = [settlement(i, "alice", "r" * 200) for i in range(2_000)]
        self.registry.broadcast_tick(5, "t5", PRICES)
        self.registry.push_updates(5, "t5", settlements)
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertTrue(slow_transport.disconnected)  # aborted: what is waiting will never be read
        self.assertLess(len(slow_transport.value()), 100_000 + MAX_UPDATE_BYTES + 1_000)
        self.assertEqual(len(self.lines), 1)
        received = [u for c, p in parse_pushes(fast_transport.value()) if c is OrderUpdates for u in p["updates"]]
        self.assertEqual(len(received), 2_000)
        self.assertFalse(fast_transport.disconnecting)

    def test_resumed_worker_starts_a_fresh_budget(self) -> None:
        """A worker that drains its buffer between settlements is never judged slow."""
        connection, transport = self.worker("w1", 100_000)
        for tick in range(5):
            connection.pauseProducing()
            self.registry.broadcast_tick(tick, "t", PRICES)
            self.registry.push_updates(tick, "t", [settlement(i, "alice", "r" * 200) for i in range(300)])
            self.clock.advance(0)
            self.clock.advance(0)
            connection.resumeProducing()
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.lines, [])


class SubscriptionTests(SynchronousTestCase):
    """Clients choose their pushes: price ticks only when asked for, their own order updates always."""

    def setUp(self) -> None:
        self.deployment = Deployment(self.mktemp())

    def watch(self, client: Any) -> tuple[list[dict], list[dict]]:
        ticks: list[dict] = []
        updates: list[dict] = []
        client.on_price_tick(ticks.append)
        client.on_order_update(updates.append)
        return ticks, updates

    def test_client_gets_only_what_it_subscribed_to(self) -> None:
        """Ticks reach only subscribers, with only their symbols; every user gets its own fill and no other."""
        d = self.deployment
        clients = {name: d.logged_in(name) for name in ("alice", "bob", "carol")}
        seen = {name: self.watch(client) for name, client in clients.items()}
        self.assertEqual(d.result(clients["alice"].subscribe(["aapl", "KO"])), {"prices": ["AAPL", "KO"],
                                                                             "all_prices": False})
        self.assertEqual(d.result(clients["bob"].subscribe("all")), {"prices": [], "all_prices": True})
        orders = {name: d.result(client.buy("MSFT", 1))["order_id"] for name, client in clients.items()}
        d.tick()
        alice_ticks, bob_ticks, carol_ticks = (seen[name][0] for name in ("alice", "bob", "carol"))
        self.assertEqual([sorted(p["symbol"] for p in t["prices"]) for t in alice_ticks], [["AAPL", "KO"]])
        self.assertEqual([sorted(p["symbol"] for p in t["prices"]) for t in bob_ticks], [["AAPL", "KO", "MSFT"]])
        self.assertEqual(carol_ticks, [])
        for name in clients:
            self.assertEqual([(u["order_id"], u["status"]) for u in seen[name][1]], [(orders[name], "filled")])

    def test_unsubscribe(self) -> None:
        """Subscribing to nothing stops the ticks."""
        d = self.deployment
        client = d.client()
        ticks, _ = self.watch(client)
        d.result(client.subscribe("all"))
        d.tick()
        d.result(client.subscribe(None))
        d.tick()
        self.assertEqual(len(ticks), 1)

    def test_subscribe_errors(self) -> None:
        """Unknown symbols, too many symbols, or both forms at once are refused with DataFailed."""
        d = self.deployment
        client = d.client()
        error = self.assertRaises(DataFailed, d.result, client.subscribe(["AAPL", "NOPE", "ZZZ"]))
        self.assertIn("unknown symbol 'NOPE' (and 1 more)", str(error))
        error = self.assertRaises(DataFailed, d.result, client.subscribe(["AAPL"] * (MAX_SUBSCRIBED_SYMBOLS + 1)))
        self.assertIn(f"at most {MAX_SUBSCRIBED_SYMBOLS} symbols", str(error))
        error = self.assertRaises(
            DataFailed, d.result, client.connection.callRemote(protocol.Subscribe, prices=["KO"], all_prices=True)
        )
        self.assertIn("not both", str(error))
        self.assertRaises(ValueError, client.subscribe, "AAPL")
        self.assertEqual(d.result(client.quote("KO"))["symbol"], "KO")  # the connection is still good

    def test_waiting_watches_ticks_then_stops(self) -> None:
        """While an order waits the client asks for its symbol's ticks (for the look-up); after, for none again."""
        d = self.deployment
        client = d.logged_in("alice")
        ticks, _ = self.watch(client)
        order_id = d.result(client.buy("MSFT", 1))["order_id"]
        waiting = client.wait_for_settlement(order_id)
        d.flush()
        [connection] = d.clients.by_user["alice"]
        self.assertEqual(d.clients.subscription(connection), frozenset({"MSFT"}))
        d.tick()
        self.assertEqual(d.result(waiting)["status"], "filled")
        self.assertEqual(d.clients.subscription(connection), frozenset())
        self.assertEqual(ticks, [])  # the caller asked for none

    def test_updates_only_to_workers_with_the_users_session(self) -> None:
        """The master sends a user's fill only to the workers where that user logged in or ordered."""
        d = self.deployment
        other = FakeWorker()
        d.registry.workers["elsewhere"] = connected("elsewhere", other)
        alice = d.logged_in("alice")
        _, updates = self.watch(alice)
        d.result(alice.buy("KO", 1))
        self.assertEqual(d.registry.serving("alice"), {d.registry.workers["test-worker"].connection})
        d.tick()
        self.assertEqual([c for c, _ in other.pushes()], [PriceTick])
        self.assertEqual([u["status"] for u in updates], ["filled"])
        d.registry.serves(other, "alice")
        d.result(alice.buy("KO", 1))
        d.tick()
        # the fill goes out as its chunk commits, before the update's prices
        self.assertEqual([c for c, _ in other.pushes()], [PriceTick, OrderUpdates, PriceTick])

    def test_reconnected_worker_tells_the_master_its_users(self) -> None:
        """After the worker's link is re-established, its logged-in users' fills still reach it."""
        d = self.deployment
        alice = d.logged_in("alice")
        _, updates = self.watch(alice)
        d.result(alice.buy("KO", 1))
        d.connect_worker()
        self.assertEqual(d.registry.serving("alice"), {d.registry.workers["test-worker"].connection})
        d.tick()
        self.assertEqual([u["status"] for u in updates], ["filled"])


class StallMonitorTests(SynchronousTestCase):
    """The benchmark's stall monitor: the longest delay of a due call between two updates."""

    def test_reports_longest_stall_per_update(self) -> None:
        """A turn that kept the reactor busy shows as the period's longest stall, reported at the next update."""
        clock = Clock()
        monitor = StallMonitor(clock, 0.01, clients=lambda: 3)
        lines: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(lines.append)
        self.addCleanup(globalLogPublisher.removeObserver, lines.append)
        monitor.start()
        monitor.update_arrived(1)
        clock.pump([0.01] * 5)
        clock.advance(0.25)  # one long turn: the due call runs 0.24 s late
        clock.pump([0.01] * 5)
        monitor.update_arrived(2)
        clock.pump([0.01] * 5)
        monitor.update_arrived(3)
        monitor.stop()
        reports = [e for e in lines if e.get("log_format", "").startswith("stall report")]
        self.assertEqual([(e["tick"], e["clients"]) for e in reports], [(1, 3), (2, 3)])
        self.assertAlmostEqual(reports[0]["ms"], 240.0, places=3)
        self.assertAlmostEqual(reports[1]["ms"], 0.0, places=3)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_off_unless_asked(self) -> None:
        """Only a positive number of seconds in the environment turns it on."""
        self.assertIsNone(interval_from_environment({}))
        self.assertIsNone(interval_from_environment({STALL_MONITOR_ENV: "yes"}))
        self.assertIsNone(interval_from_environment({STALL_MONITOR_ENV: "0"}))
        self.assertEqual(interval_from_environment({STALL_MONITOR_ENV: "0.005"}), 0.005)
