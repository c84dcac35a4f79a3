"""Client order ids: an order retried under the same id is stored once, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from papertrader.errors import OrderConflict, PurchaseFailed, SellFailed, ServiceUnavailable
from papertrader.master.database import Database
from papertrader.master.exchange import Exchange
from papertrader.master.market import PriceBoard
from papertrader.master.trading import NewOrder, parse_client_order_id, refuse_reason
from papertrader.protocol import OrderRequest
from tests.databases import query
from tests.support import ASSETS, PASSWORD, FixedPrices, make_accounts, make_database
from tests.test_backends import BackendFixture


class ParseClientOrderIdTests(SynchronousTestCase):
    """What a client order id may be."""

    def test_accepted(self) -> None:
        """1 to 64 letters, digits and . _ : - are kept as they are."""
        for text in ("a", "A-1", "order_2026.11.25:0001", "x" * 64, "0"):
            self.assertEqual(parse_client_order_id(text), text)

    def test_refused(self) -> None:
        """Empty, too long, spaces, other punctuation and non-ASCII letters are refused, saying why."""
        for text, reason in [
            ("", "1 to 64 characters long, got 0"),
            ("x" * 65, "1 to 64 characters long, got 65"),
            ("a b", "only letters, digits"),
            (" a", "only letters, digits"),
            ("a/b", "only letters, digits"),
            ("é", "only letters, digits"),
            ("a\n", "only letters, digits"),
        ]:
            with self.assertRaises(ValueError) as caught:
                parse_client_order_id(text)
            self.assertIn(reason, str(caught.exception))


class ClientOrderIdTestsMixin(BackendFixture):
    """Client order ids through the exchange and a real pool; subclasses name the backend."""

    @inlineCallbacks
    def submit(self, exchange: Exchange, token: str, *orders: tuple[str, str, str, str | None]) -> Any:
        """Submit ``(side, symbol, quantity, client_order_id)`` orders as one batch; fires with the results."""
        requests = [
            OrderRequest(side, token, symbol, quantity, "t", "127.0.0.1:1", client_order_id)
            for side, symbol, quantity, client_order_id in orders
        ]
        results = yield exchange.submit_orders(requests, "w")
        return results

    def order_count(self) -> int:
        [(count,)] = query(self.url, "SELECT COUNT(*) FROM orders")
        return count

    @inlineCallbacks
    def test_same_id_same_order_stored_once(self) -> Any:
        """A repeat gets the original id, reserves nothing again, and still does after the order settled."""
        exchange = self.exchange()
        session = yield self.logged_in(exchange)
        # 1,000.00 of cash; 3 AAPL cost 570.00, so a second reservation would be refused.
        [first] = yield self.submit(exchange, session.token, ("buy", "AAPL", "3", "retry-1"))
        [again] = yield self.submit(exchange, session.token, ("buy", "aapl", "3", "retry-1"))
        self.assertEqual(again, first)
        self.assertEqual(self.order_count(), 1)
        yield exchange.tick()
        [after] = yield self.submit(exchange, session.token, ("buy", "AAPL", "3", "retry-1"))
        self.assertEqual(after, first)
        self.assertEqual(query(self.url, "SELECT status, client_order_id FROM orders"), [("filled", "retry-1")])

    @inlineCallbacks
    def test_same_id_other_order_conflicts(self) -> Any:
        """Reusing an id for another side, symbol or quantity is an OrderConflict naming the original."""
        exchange = self.exchange()
        session = yield self.logged_in(exchange)
        yield exchange.tick()
        [(order_id, _)] = yield self.submit(exchange, session.token, ("buy", "KO", "2", "mine"))
        yield exchange.tick()
        for side, symbol, quantity in [("sell", "KO", "2"), ("buy", "AAPL", "2"), ("buy", "KO", "1")]:
            [result] = yield self.submit(exchange, session.token, (side, symbol, quantity, "mine"))
            self.assertIsInstance(result, OrderConflict)
            self.assertIn(f"already used for order {order_id} (buy 2 KO)", str(result))
        self.assertEqual(self.order_count(), 1)

    @inlineCallbacks
    def test_same_id_twice_in_one_batch(self) -> Any:
        """Inside one batch the second use of an id gets the first's order; a conflict spoils nothing else."""
        exchange = self.exchange()
        session = yield self.logged_in(exchange)
        results = yield self.submit(
            exchange,
            session.token,
            ("buy", "KO", "1", "a"),
            ("buy", "KO", "1", "a"),
            ("buy", "KO", "5", "a"),
            ("buy", "KO", "1", None),
            ("buy", "KO", "1", "b"),
        )
        first, repeat, conflict, unnamed, other = results
        self.assertEqual(repeat, first)
        self.assertIsInstance(conflict, OrderConflict)
        self.assertEqual(len({first[0], unnamed[0], other[0]}), 3)
        self.assertEqual(
            query(self.url, "SELECT client_order_id, quantity FROM orders ORDER BY id"),
            [("a", 1), (None, 1), ("b", 1)],
        )

    @inlineCallbacks
    def test_ids_are_per_account(self) -> Any:
        """Two users may use the same id; each gets an order of their own."""
        exchange = self.exchange()
        alice = yield self.logged_in(exchange, "alice")
        bob = yield self.logged_in(exchange, "bob")
        [(alice_order, _)] = yield self.submit(exchange, alice.token, ("buy", "KO", "1", "same"))
        [(bob_order, _)] = yield self.submit(exchange, bob.token, ("buy", "KO", "2", "same"))
        self.assertNotEqual(alice_order, bob_order)
        self.assertEqual(
            query(self.url, "SELECT user_id, quantity FROM orders ORDER BY id"),
            [(alice.user_id, 1), (bob.user_id, 2)],
        )

    @inlineCallbacks
    def test_bad_id_refused(self) -> Any:
        """A malformed id is refused like a bad quantity, with the side's failure; nothing is stored."""
        exchange = self.exchange()
        session = yield self.logged_in(exchange)
        bought, sold = yield self.submit(
            exchange, session.token, ("buy", "KO", "1", "has space"), ("sell", "KO", "1", "x" * 65)
        )
        self.assertIsInstance(bought, PurchaseFailed)
        self.assertIn("client order id", str(bought))
        self.assertIsInstance(sold, SellFailed)
        self.assertEqual(self.order_count(), 0)

    @inlineCallbacks
    def test_listed_with_orders(self) -> Any:
        """The orders list shows the client order id of orders that have one, and no key for the others."""
        exchange = self.exchange()
        session = yield self.logged_in(exchange)
        yield self.submit(exchange, session.token, ("buy", "KO", "1", "named"), ("buy", "KO", "1", None))
        page = yield exchange.orders(session.token, None)
        unnamed, named = page.rows
        self.assertEqual(named["client_order_id"], "named")
        self.assertNotIn("client_order_id", unnamed)

    @inlineCallbacks
    def test_database_keeps_ids_unique(self) -> Any:
        """The schema itself refuses a second order under one account's id, but not unnamed orders."""
        user_id = yield self.database.create_user("alice", "a@example.com", "h", 100_000, "t")
        insert = (
            "INSERT INTO orders (user_id, side, symbol, quantity, status, created_at, received_at, client_address, "
            "worker, client_order_id) VALUES (?, 'buy', 'KO', 1, 'queued', 't', 't', 'a', 'w', ?)"
        )
        for name in ("x", None, None):
            query(self.url, insert, user_id, name)
        self.assertRaises(self.database.dialect.integrity_errors, query, self.url, insert, user_id, "x")
        self.assertEqual(self.order_count(), 3)

    @inlineCallbacks
    def test_name_taken_after_lookup(self) -> Any:
        """If the id is taken between the look-up and the insert, the batch goes on and answers the original."""
        user_id = yield self.database.create_user("alice", "a@example.com", "h", 100_000, "t")
        order = NewOrder(user_id, "alice", "buy", "KO", 2, "t", "a", "w", "late")
        ([original], _) = yield self.database.queue_orders([order], {"KO": 6_000}, refuse_reason, "t")
        real = Database._orders_named
        lookups: list[int] = []

        def blind_first(txn: Any, orders: list[NewOrder]) -> Any:
            lookups.append(len(orders))
            return {} if len(lookups) == 1 else real(txn, orders)

        self.patch(Database, "_orders_named", staticmethod(blind_first))
        other = NewOrder(user_id, "alice", "buy", "KO", 1, "t", "a", "w")
        (results, states) = yield self.database.queue_orders(
            [order, other], {"KO": 6_000}, refuse_reason, "t"
        )
        self.assertEqual(results[0], original)
        self.assertIsInstance(results[1], int)
        self.assertEqual(len(lookups), 2, "the insert found the id taken and read the original")
        # Reserved: the original (read from the queue) and the new order; the repeat not again.
        self.assertEqual(states[user_id].queued_buy_cents, 3 * 6_000)
        self.assertEqual(self.order_count(), 2)


class SQLiteClientOrderIdTests(ClientOrderIdTestsMixin, TestCase):
    """Client order ids on SQLite."""

    backend = "sqlite"


class PostgreSQLClientOrderIdTests(ClientOrderIdTestsMixin, TestCase):
    """Client order ids on PostgreSQL."""

    backend = "postgresql"


class RetryAfterFailureTests(SynchronousTestCase):
    """A client that retries after the database failed, and again after losing the answer, stores one order."""

    def test_retry_stores_once(self) -> None:
        """Failed attempt: nothing stored; retry: stored; retry of the acknowledged order: same id, one row."""
        path = os.path.join(os.path.abspath(self.mktemp()) + ".sqlite")
        clock = Clock()
        database, pool = make_database(path)
        accounts = make_accounts(database, clock)
        board = PriceBoard(ASSETS)
        board.update(1, "t", {s: a.reference_cents for s, a in ASSETS.items()})
        exchange = Exchange(database, accounts, board, FixedPrices(dict(board.prices)), clock, 1000)
        self.successResultOf(accounts.register("alice", "alice@example.com", PASSWORD))
        session = self.successResultOf(accounts.login("alice", PASSWORD))

        def place() -> Any:
            d = exchange.submit_order("buy", session.token, "KO", "4", "t", "127.0.0.1:1", "w", "retry-me")
            clock.advance(0)
            return d

        pool.broken = RuntimeError("the database went away")
        self.failureResultOf(place(), ServiceUnavailable)
        self.flushLoggedErrors(RuntimeError)
        pool.broken = None
        order_id, _ = self.successResultOf(place())
        self.assertEqual(self.successResultOf(place()), (order_id, "alice"))
        rows = pool.connection.execute("SELECT id, client_order_id, quantity FROM orders").fetchall()
        self.assertEqual(rows, [(order_id, "retry-me", 4)])

