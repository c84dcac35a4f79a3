"""Several orders in one message: PlaceOrders, and the client library batching orders that wait."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase, TestCase

from papertrader.client.library import MAX_ORDER_REQUESTS_IN_FLIGHT, connect
from papertrader.errors import BadRequest, OrderConflict, PurchaseFailed, SellFailed, SessionInvalid
from papertrader.protocol import MAX_CLIENT_BATCH, MAX_QUANTITY_LENGTH, MAX_SYMBOL_LENGTH, ClientOrder, PlaceOrders
from tests.processes import RunningDeployment
from tests.support import PASSWORD, Deployment


class PlaceOrdersTests(SynchronousTestCase):
    """The worker answers each order of a batch on its own, and stamps the batch once."""

    def setUp(self) -> None:
        self.deployment = Deployment(self.mktemp())
        self.alice = self.deployment.logged_in("alice")

    def place(self, *orders: dict[str, Any]) -> list[Any]:
        return self.deployment.result(self.alice.place_orders(list(orders)))

    def test_each_order_answered(self) -> None:
        """Good orders are queued with their ids; bad ones are refused with the error a single order gets."""
        results = self.place(
            {"side": "buy", "symbol": "AAPL", "quantity": 2},
            {"side": "buy", "symbol": "NOPE", "quantity": 1},
            {"side": "sell", "symbol": "AAPL", "quantity": "x"},
            {"side": "buy", "symbol": "KO", "quantity": 3},
        )
        self.assertIsInstance(results[0].order_id, int)
        self.assertIsInstance(results[1].error(), PurchaseFailed)
        self.assertIsInstance(results[2].error(), SellFailed)
        self.assertIsInstance(results[3].order_id, int)
        stored = self.deployment.pool.connection.execute(
            "SELECT id, symbol, quantity, received_at FROM orders ORDER BY id"
        ).fetchall()
        self.assertEqual([(row[0], row[1], row[2]) for row in stored],
                         [(results[0].order_id, "AAPL", 2), (results[3].order_id, "KO", 3)])
        self.assertEqual(len({row[3] for row in stored}), 1)  # one receive stamp for the batch

    def test_same_client_order_id_twice(self) -> None:
        """The same client order id twice in one batch is one order; with other terms, a conflict."""
        results = self.place(
            {"side": "buy", "symbol": "AAPL", "quantity": 1, "client_order_id": "once"},
            {"side": "buy", "symbol": "AAPL", "quantity": 1, "client_order_id": "once"},
            {"side": "buy", "symbol": "AAPL", "quantity": 5, "client_order_id": "once"},
        )
        self.assertEqual(results[0].order_id, results[1].order_id)
        self.assertIsInstance(results[2].error(), OrderConflict)
        self.assertEqual(self.deployment.pool.connection.execute("SELECT COUNT(*) FROM orders").fetchone(), (1,))

    def test_invalid_session_refuses_the_batch(self) -> None:
        """Without a valid session the whole batch is refused with SessionInvalid, and nothing is stored."""
        stranger = self.deployment.client()
        stranger.token = "forged"
        self.assertRaises(SessionInvalid, self.deployment.result,
                          stranger.place_orders([{"side": "buy", "symbol": "AAPL", "quantity": 1}]))
        self.assertEqual(self.deployment.pool.connection.execute("SELECT COUNT(*) FROM orders").fetchone(), (0,))

    def test_malformed_batches(self) -> None:
        """A row that is not an order, or more than MAX_CLIENT_BATCH rows, gets BAD_REQUEST; nothing is stored."""
        connection = self.alice.connection
        for orders in (
            b'[{"side": "hold", "symbol": "AAPL", "quantity": "1"}]',
            b'[{"side": "buy", "symbol": "AAPL"}]',
            b'{"side": "buy"}',
            b"[" + b",".join([b'{"side": "buy", "symbol": "AAPL", "quantity": "1"}'] * (MAX_CLIENT_BATCH + 1)) + b"]",
        ):
            d = connection.callRemoteString(PlaceOrders.commandName, token=self.alice.token.encode(), orders=orders)
            error = self.assertRaises(amp.RemoteAmpError, self.deployment.result, d)
            self.assertEqual(error.errorCode, b"BAD_REQUEST")
        self.assertEqual(self.deployment.pool.connection.execute("SELECT COUNT(*) FROM orders").fetchone(), (0,))


class HostileBatchTests(SynchronousTestCase):
    """One client's orders cannot make the batch that carries another user's orders fail."""

    def test_control_characters_in_place_orders(self) -> None:
        """PlaceOrders whose orders hold control characters (six bytes each in JSON) are refused as bad
        requests; another user's order, sent in the same turn, is queued."""
        deployment = Deployment(self.mktemp())
        bob = deployment.logged_in("bob")
        mallory = deployment.logged_in("mallory")
        fine = bob.buy("KO", 1)
        order = ClientOrder("buy", "\x01" * MAX_SYMBOL_LENGTH, "\x01" * MAX_QUANTITY_LENGTH, "\x01" * 64)
        hostile = [
            mallory.connection.callRemote(PlaceOrders, token=mallory.token, orders=[order] * 80) for _ in range(2)
        ]
        outcomes: list[Any] = []
        for d in hostile:
            d.addBoth(outcomes.append)
        deployment.deliver_in_one_turn()
        self.assertIn("order_id", deployment.result(fine))
        self.assertEqual([type(outcome.value) for outcome in outcomes], [BadRequest, BadRequest])
        self.assertEqual(deployment.pool.connection.execute("SELECT COUNT(*) FROM orders").fetchone(), (1,))


class LibraryBatchingTests(SynchronousTestCase):
    """Orders placed while several are in flight wait and go together, each answered as if alone."""

    def setUp(self) -> None:
        self.deployment = Deployment(self.mktemp())
        self.alice = self.deployment.logged_in("alice")
        self.sent: list[bytes] = []
        call = self.alice.connection.callRemote

        def counting(command: Any, **kw: Any) -> Any:
            self.sent.append(command.commandName)
            return call(command, **kw)

        self.alice.connection.callRemote = counting  # type: ignore[method-assign]

    def test_waiting_orders_go_together(self) -> None:
        """Ten buys at once: the first few go alone, the rest as one PlaceOrders; every one gets its own id."""
        orders = [self.alice.buy("AAPL", 1) for _ in range(10)]
        results = [self.deployment.result(d) for d in orders]
        first = MAX_ORDER_REQUESTS_IN_FLIGHT
        self.assertEqual(self.sent, [b"PurchaseAsset"] * first + [b"PlaceOrders"])
        ids = [r["order_id"] for r in results]
        self.assertEqual(len(set(ids)), 10)
        self.assertEqual(self.deployment.pool.connection.execute("SELECT COUNT(*) FROM orders").fetchone(), (10,))

    def test_refusals_in_a_batch(self) -> None:
        """A batched order that is refused fails with the error a single order gets; the others are queued."""
        orders = [self.alice.buy("AAPL", 1) for _ in range(MAX_ORDER_REQUESTS_IN_FLIGHT)]
        bad_buy = self.alice.buy("NOPE", 1)
        bad_sell = self.alice.sell("KO", 5)
        good = self.alice.buy("KO", 1)
        for d in orders:
            self.deployment.result(d)
        self.assertRaises(PurchaseFailed, self.deployment.result, bad_buy)
        self.assertRaises(SellFailed, self.deployment.result, bad_sell)
        self.assertIn("order_id", self.deployment.result(good))
        self.assertEqual(self.sent[-1], b"PlaceOrders")


class RealProcessesTests(TestCase):
    """A batch through a real deployment: stored, each with its id."""

    timeout = 120

    @inlineCallbacks
    def test_batch(self) -> Any:
        """Three orders in one PlaceOrders reach the master's database."""
        d = RunningDeployment(self.mktemp())
        self.addCleanup(d.stop)
        yield d.start()
        host, port = d.worker_address()
        client = yield connect(reactor, host, port, os.path.join(d.data, "tls", "ca.pem"))
        self.addCleanup(client.close)
        yield client.register("batcher", "batcher@example.com", PASSWORD)
        yield client.login("batcher", PASSWORD)
        results = yield client.place_orders([{"side": "buy", "symbol": "AAPL", "quantity": n} for n in (1, 2, 3)])
        ids = [r.order_id for r in results]
        self.assertEqual(len(set(ids)), 3)
        listed = yield client.orders()
        self.assertEqual(sorted((o["order_id"], o["quantity"]) for o in listed["orders"]),
                         sorted(zip(ids, (1, 2, 3))))
