"""The worker's parts on their own: quote cache, client registry, order batcher."""

from __future__ import annotations

import io
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase

from papertrader.errors import DataFailed, ServiceUnavailable
from papertrader.protocol import (
    MAX_CLIENT_ORDER_ID_LENGTH,
    MAX_ORDER_BATCH,
    MAX_QUANTITY_LENGTH,
    MAX_STAMP_LENGTH,
    MAX_SYMBOL_LENGTH,
    MAX_TOKEN_LENGTH,
    ClientOrder,
    OrderGroup,
    OrderRequest,
    OrderUpdates,
    PriceTick,
    SubmitOrders,
)
from papertrader.worker.cache import QuoteCache
from papertrader.worker.clients import ClientRegistry
from papertrader.worker.upstream import MasterLink, OrderBatcher
from tests.support import Deployment

UPDATE = {"username": "alice", "side": "buy", "symbol": "KO", "quantity": 1, "status": "filled", "price_cents": 6000}
ASSETS = [
    {"symbol": "AAPL", "name": "Apple", "exchange": "NASDAQ", "sector": "", "industry": "", "price_cents": 100},
    {"symbol": "KO", "name": "Coca-Cola", "exchange": "NYSE", "sector": "", "industry": ""},
]


class QuoteCacheTests(SynchronousTestCase):
    """`QuoteCache` answers what it can and defers the rest to the master."""

    def test_empty_cache_cannot_answer(self) -> None:
        """Before the handshake the cache answers nothing (the worker asks the master)."""
        self.assertIsNone(QuoteCache().quote("AAPL"))

    def test_answers_and_refuses(self) -> None:
        """Known and priced symbols are answered, unknown ones refused, unpriced ones deferred."""
        cache = QuoteCache()
        cache.load(ASSETS, 3, "t3")
        self.assertEqual(cache.quote("AAPL")["price_cents"], 100)
        self.assertIsNone(cache.quote("KO"))
        self.assertRaises(DataFailed, cache.quote, "NOPE")

    def test_ignores_older_ticks(self) -> None:
        """A tick older than the cached one never replaces it."""
        cache = QuoteCache()
        cache.load(ASSETS, 3, "t3")
        cache.update(2, "t2", [{"symbol": "AAPL", "price_cents": 1}])
        self.assertEqual(cache.quote("AAPL")["as_of"], "t3")
        cache.update(4, "t4", [{"symbol": "AAPL", "price_cents": 5}])
        self.assertEqual((cache.quote("AAPL")["price_cents"], cache.quote("AAPL")["as_of"]), (5, "t4"))


class FakeConnection:
    """Records the pushes written to it, as the commands and arguments they carry."""

    def __init__(self) -> None:
        self.pushed: list[tuple[Any, dict]] = []

    def send_push(self, data: bytes, droppable: bool) -> None:
        [box] = amp.parse(io.BytesIO(data))
        command = {c.commandName: c for c in (OrderUpdates, PriceTick)}[box.pop(amp.COMMAND)]
        self.pushed.append((command, command.parseArguments(box, None)))


class ClientRegistryTests(SynchronousTestCase):
    """Which connection acts for which user, for pushes."""

    def test_updates_reach_the_users_connections_only(self) -> None:
        """An order update goes to every connection of its user and to nobody else."""
        clock = Clock()
        registry = ClientRegistry(clock)
        a1, a2, b = FakeConnection(), FakeConnection(), FakeConnection()
        for connection in (a1, a2, b):
            registry.connected(connection)
        registry.attach(a1, "alice")
        registry.attach(a2, "alice")
        registry.attach(b, "bob")
        registry.push_updates("t1", [UPDATE | {"order_id": 1}, UPDATE | {"order_id": 2}])
        clock.advance(0)
        self.assertEqual([len(c.pushed) for c in (a1, a2, b)], [1, 1, 0])
        command, arguments = a1.pushed[0]
        self.assertIs(command, OrderUpdates)
        self.assertEqual(arguments["settled_at"], "t1")
        self.assertEqual([u["order_id"] for u in arguments["updates"]], [1, 2])

    def test_disconnect_and_relogin(self) -> None:
        """A closed connection leaves the registry; logging in as someone else moves it."""
        registry = ClientRegistry(Clock())
        c = FakeConnection()
        registry.connected(c)
        registry.attach(c, "alice")
        registry.attach(c, "bob")
        self.assertEqual(registry.by_user, {"bob": {c}})
        registry.disconnected(c)
        self.assertEqual((registry.by_user, registry.connections), ({}, set()))
        registry.attach(c, "carol")
        self.assertEqual(registry.by_user, {})


def _group(*quantities: int, token: str = "tok") -> OrderGroup:
    return OrderGroup(token, "at", "addr", [ClientOrder("buy", "AAPL", str(q)) for q in quantities])


class OrderBatcherTests(SynchronousTestCase):
    """Order groups of one reactor turn travel together."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.sent: list[tuple[Any, dict[str, Any], Deferred]] = []
        self.sizes: list[int] = []  # the longest value of each box sent

        def send(command: Any, **arguments: Any) -> Deferred:
            # What the master would read, from the box the link would write (TooLong if it could not).
            box = amp.AmpBox(command.makeArguments(arguments, None))
            self.sizes.append(max(len(value) for value in box.values()))
            box.serialize()
            d: Deferred = Deferred()
            self.sent.append((command, command.parseArguments(box, None), d))
            return d

        self.send = send
        self.batcher = OrderBatcher(self.clock, send)

    def quantities(self, index: int) -> list[list[int]]:
        """The quantities of each group in the ``index``th batch sent."""
        return [[int(o.quantity) for o in group.orders] for group in self.sent[index][1]["groups"]]

    def test_batches_split_at_limit(self) -> None:
        """More orders than fit one box go in several SubmitOrders, each answered in order."""
        results = [self.batcher.submit_group(_group(i)) for i in range(MAX_ORDER_BATCH + 1)]
        self.assertEqual(self.sent, [])
        self.clock.advance(0)
        self.assertEqual([(c, a["orders"], len(a["groups"])) for c, a, _ in self.sent],
                         [(SubmitOrders, [], MAX_ORDER_BATCH), (SubmitOrders, [], 1)])
        self.sent[0][2].callback({"results": [{"i": i} for i in range(MAX_ORDER_BATCH)]})
        self.sent[1][2].errback(ServiceUnavailable("gone"))
        self.assertEqual(self.successResultOf(results[5]), [{"i": 5}])
        [refused] = self.successResultOf(results[-1])
        self.assertIsInstance(refused, ServiceUnavailable)

    def test_orders_left_unanswered_are_refused(self) -> None:
        """Orders the master gave no result for are refused as unavailable, not left hanging."""
        group = self.batcher.submit_group(_group(1, 2, 3))
        self.clock.advance(0)
        self.sent[0][2].callback({"results": [{"i": 0}]})
        results = self.successResultOf(group)
        self.assertEqual(results[0], {"i": 0})
        for result in results[1:]:
            self.assertIsInstance(result, ServiceUnavailable)
            self.assertIn("no answer for this order", str(result))

    def test_group_answered_once_in_order(self) -> None:
        """A group travels whole when it fits and is answered once, each order's result in its place, even
        when it is split across batches."""
        self.batcher = OrderBatcher(self.clock, self.send, max_batch=4)
        single = self.batcher.submit_group(_group(100))
        group = self.batcher.submit_group(_group(1, 2, 3, 4, 5, 6))
        self.clock.advance(0)
        self.assertEqual([self.quantities(0), self.quantities(1)], [[[100], [1, 2, 3]], [[4, 5, 6]]])
        self.assertEqual({g.token for g in self.sent[0][1]["groups"] + self.sent[1][1]["groups"]}, {"tok"})
        self.sent[0][2].callback({"results": [{"i": i} for i in range(4)]})
        self.assertEqual(self.successResultOf(single), [{"i": 0}])
        self.assertNoResult(group)  # three of its orders are still out
        self.sent[1][2].callback({"results": [{"i": i} for i in range(4, 7)]})
        self.assertEqual(self.successResultOf(group), [{"i": i} for i in range(1, 7)])

    def test_group_with_failed_batch(self) -> None:
        """A group never fails: orders whose batch could not be sent get the error in their places."""
        self.batcher = OrderBatcher(self.clock, self.send, max_batch=2)
        group = self.batcher.submit_group(_group(1, 2, 3))
        self.clock.advance(0)
        self.sent[0][2].errback(ServiceUnavailable("gone"))
        self.sent[1][2].callback({"results": []})
        results = self.successResultOf(group)
        self.assertEqual([type(r) for r in results], [ServiceUnavailable] * 3)
        self.assertEqual(str(results[0]), "gone")
        self.assertIn("no answer for this order", str(results[2]))

    def test_rows_for_a_master_without_groups(self) -> None:
        """While the master does not take groups, each order goes as a row with its group's token and
        envelope; the group is answered as before."""
        takes_groups = [False]
        self.batcher = OrderBatcher(self.clock, self.send, master_takes_groups=lambda: takes_groups[0])
        first = self.batcher.submit_group(OrderGroup("t1", "at1", "a1", [ClientOrder("buy", "KO", "1", "c1")]))
        second = self.batcher.submit_group(_group(2, 3, token="t2"))
        self.clock.advance(0)
        [(command, arguments, d)] = self.sent
        self.assertEqual(arguments, {"groups": None, "orders": [
            OrderRequest("buy", "t1", "KO", "1", "at1", "a1", "c1"),
            OrderRequest("buy", "t2", "AAPL", "2", "at", "addr"),
            OrderRequest("buy", "t2", "AAPL", "3", "at", "addr"),
        ]})
        d.callback({"results": [{"i": i} for i in range(3)]})
        self.assertEqual(self.successResultOf(first), [{"i": 0}])
        self.assertEqual(self.successResultOf(second), [{"i": 1}, {"i": 2}])
        takes_groups[0] = True
        self.batcher.submit_group(_group(4))
        self.clock.advance(0)
        self.assertEqual(self.sent[1][1]["orders"], [])
        self.assertEqual(self.quantities(1), [[4]])

    def test_batches_fit_one_amp_value(self) -> None:
        """Orders with every field at its bound -- printable, or control characters that JSON writes in six
        bytes each (the worker refuses those; the batcher does not count on it) -- go in batches each of whose
        values fits in AMP's 64 KiB; every order is sent once, in order, and answered with its own result."""
        for char in ("x", "\x01"):
            for takes_groups in (True, False):
                self.sent, self.sizes = [], []
                self.batcher = OrderBatcher(self.clock, self.send, master_takes_groups=lambda t=takes_groups: t)
                order = ClientOrder(
                    "sell", char * MAX_SYMBOL_LENGTH, char * MAX_QUANTITY_LENGTH, char * MAX_CLIENT_ORDER_ID_LENGTH
                )
                stamps = ("r" * MAX_STAMP_LENGTH, "a" * MAX_STAMP_LENGTH)
                singles = [
                    self.batcher.submit_group(OrderGroup(char * MAX_TOKEN_LENGTH, *stamps, [order]))
                    for _ in range(MAX_ORDER_BATCH)
                ]
                placed = self.batcher.submit_group(OrderGroup(char * MAX_TOKEN_LENGTH, *stamps, [order] * 100))
                other = self.batcher.submit_group(_group(7))
                self.clock.advance(0)
                self.assertLessEqual(max(self.sizes), amp.MAX_VALUE_LENGTH)
                sent: list[Any] = []
                for _, arguments, d in self.sent:
                    orders = arguments["orders"] or [o for group in arguments["groups"] for o in group.orders]
                    self.assertLessEqual(len(orders), MAX_ORDER_BATCH)
                    d.callback({"results": [{"i": len(sent) + i} for i in range(len(orders))]})
                    sent.extend(orders)
                self.assertEqual(len(sent), MAX_ORDER_BATCH + 101)
                self.assertEqual([o.quantity for o in sent], [order.quantity] * (len(sent) - 1) + ["7"])
                self.assertEqual([self.successResultOf(d) for d in singles], [[{"i": i}] for i in range(len(singles))])
                self.assertEqual(self.successResultOf(placed), [{"i": len(singles) + i} for i in range(100)])
                self.assertEqual(self.successResultOf(other), [{"i": len(sent) - 1}])

    def test_empty_group(self) -> None:
        """An empty group is answered at once and sends nothing."""
        self.assertEqual(self.successResultOf(self.batcher.submit_group(_group())), [])
        self.clock.advance(0)
        self.assertEqual(self.sent, [])


class MasterLinkTests(SynchronousTestCase):
    """The worker's link to the master."""

    def test_unreachable_until_handshake(self) -> None:
        """Calls fail as unavailable until the handshake has completed."""
        link = MasterLink(Clock(), None, "w", QuoteCache(), None)
        self.failureResultOf(link.call(SubmitOrders, orders=[]), ServiceUnavailable)

    def test_handshake_loads_cache(self) -> None:
        """The handshake registers the worker with the master and fills the quote cache; the master
        says it takes order groups."""
        deployment = Deployment(self.mktemp())
        self.assertTrue(deployment.link.order_groups)
        self.assertIn("test-worker", deployment.registry.workers)
        self.assertEqual(set(deployment.cache.assets), {"AAPL", "MSFT", "KO"})
        self.assertEqual(deployment.cache.prices["AAPL"], 19_000)
        self.assertEqual(deployment.link.update_interval, 60.0)
