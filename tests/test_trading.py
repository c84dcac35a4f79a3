"""Order rules, the group-committing order desk and settlement of the queue."""

from __future__ import annotations

import sqlite3
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from papertrader.master.database import TickUnsettled
from papertrader.master.trading import (
    AccountState,
    NewOrder,
    OrderDesk,
    QueuedOrder,
    parse_quantity,
    refuse_reason,
    settle_orders,
)
from tests.support import Deployment


def order(side: str, quantity: int, symbol: str = "AAPL", user: int = 1) -> NewOrder:
    return NewOrder(user, "alice", side, symbol, quantity, "t", "127.0.0.1:1", "w")


class QuantityTests(SynchronousTestCase):
    """`parse_quantity` accepts whole numbers in range only."""

    def test_accepts(self) -> None:
        """Whole numbers from 1 to the maximum, with surrounding blanks, are accepted."""
        self.assertEqual([parse_quantity(t, 100) for t in ("1", " 42 ", "100", "+7")], [1, 42, 100, 7])

    def test_refuses(self) -> None:
        """Zero, negatives, fractions, words, exponents and too-large numbers are refused with a reason."""
        for text, reason in [
            ("0", "at least 1"),
            ("-3", "at least 1"),
            ("1.5", "whole number"),
            ("1e3", "whole number"),
            ("", "whole number"),
            ("ten", "whole number"),
            ("101", "at most 100"),
        ]:
            with self.assertRaises(ValueError) as caught:
                parse_quantity(text, 100)
            self.assertIn(reason, str(caught.exception))


class RefuseReasonTests(SynchronousTestCase):
    """The funds check made before an order is queued."""

    def test_buy_reserves_cash(self) -> None:
        """An accepted buy reserves its cost, so the next one sees less cash."""
        account = AccountState(cash_cents=10_000, holdings={})
        self.assertIsNone(refuse_reason(account, order("buy", 6), 1_000))
        self.assertIn("insufficient cash", refuse_reason(account, order("buy", 5), 1_000))
        self.assertIsNone(refuse_reason(account, order("buy", 4), 1_000))
        self.assertEqual(account.queued_buy_cents, 10_000)

    def test_sell_reserves_shares(self) -> None:
        """An accepted sell reserves its shares."""
        account = AccountState(cash_cents=0, holdings={"AAPL": 5})
        self.assertIsNone(refuse_reason(account, order("sell", 3), 1))
        self.assertIn("2 held", refuse_reason(account, order("sell", 3), 1))
        self.assertIn("0 held", refuse_reason(account, order("sell", 1, "KO"), 1))


class SettleOrdersTests(SynchronousTestCase):
    """`settle_orders`: queue order, cash and share checks at the fill price."""

    def queued(self, order_id: int, side: str, quantity: int, symbol: str = "AAPL", user: int = 1) -> QueuedOrder:
        return QueuedOrder(order_id, user, f"user{user}", side, symbol, quantity)

    def test_fills_in_queue_order(self) -> None:
        """Orders settle in order: a buy funds a later sell; a later buy that no longer fits is rejected."""
        cash = {1: 1_000}
        holdings: dict = {}
        results = settle_orders(
            [self.queued(1, "buy", 3), self.queued(2, "sell", 2), self.queued(3, "buy", 4)],
            cash,
            holdings,
            {"AAPL": 300},
        )
        self.assertEqual([r.status for r in results], ["filled", "filled", "rejected"])
        self.assertEqual([r.total_cents for r in results], [900, 600, None])
        self.assertEqual(cash, {1: 700})
        self.assertEqual(holdings, {(1, "AAPL"): 1})
        self.assertIn("insufficient cash", results[2].reason)

    def test_sell_without_shares_rejected(self) -> None:
        """A sell of more than is held is rejected and changes nothing."""
        cash = {1: 0}
        holdings = {(1, "AAPL"): 1}
        [result] = settle_orders([self.queued(1, "sell", 2)], cash, holdings, {"AAPL": 300})
        self.assertFalse(result.filled)
        self.assertEqual((cash, holdings), ({1: 0}, {(1, "AAPL"): 1}))

    def test_users_independent(self) -> None:
        """One user's orders never touch another's cash."""
        cash = {1: 500, 2: 10_000}
        results = settle_orders(
            [self.queued(1, "buy", 2, user=1), self.queued(2, "buy", 2, user=2)], cash, {}, {"AAPL": 300}
        )
        self.assertEqual([r.status for r in results], ["rejected", "filled"])
        self.assertEqual(cash, {1: 500, 2: 9_400})


class OrderDeskTests(SynchronousTestCase):
    """`OrderDesk` turns the orders of one reactor turn into one commit."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.commits: list[tuple[list[NewOrder], Deferred]] = []

        def commit(orders: list[NewOrder]) -> Deferred:
            d: Deferred = Deferred()
            self.commits.append((orders, d))
            return d

        self.desk = OrderDesk(self.clock, commit, max_batch=3)

    def test_one_commit_per_turn(self) -> None:
        """Orders placed in the same turn share one commit; each gets its own result."""
        first, second = self.desk.place(order("buy", 1)), self.desk.place(order("buy", 2))
        self.assertEqual(self.commits, [])
        self.clock.advance(0)
        [(orders, d)] = self.commits
        self.assertEqual([o.quantity for o in orders], [1, 2])
        d.callback([7, "refused"])
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), (7, "refused"))

    def test_orders_wait_for_running_commit(self) -> None:
        """While a commit runs, new orders gather and go in the next one."""
        self.desk.place(order("buy", 1))
        self.clock.advance(0)
        later = [self.desk.place(order("buy", n)) for n in (2, 3, 4, 5)]
        self.clock.advance(0)
        self.assertEqual(len(self.commits), 1)
        self.commits[0][1].callback([1])
        self.clock.advance(0)
        self.assertEqual([o.quantity for o in self.commits[1][0]], [2, 3, 4])  # max_batch
        self.commits[1][1].callback([2, 3, 4])
        self.clock.advance(0)
        self.assertEqual([o.quantity for o in self.commits[2][0]], [5])
        self.commits[2][1].callback([5])
        self.assertEqual([self.successResultOf(d) for d in later], [2, 3, 4, 5])

    def test_failed_commit_fails_its_orders_only(self) -> None:
        """A failed commit fails the orders in it, and the desk goes on with the next batch."""
        doomed = self.desk.place(order("buy", 1))
        self.clock.advance(0)
        survivor = self.desk.place(order("buy", 2))
        self.commits[0][1].errback(RuntimeError("disk full"))
        self.failureResultOf(doomed, RuntimeError)
        self.clock.advance(0)
        self.commits[1][1].callback([9])
        self.assertEqual(self.successResultOf(survivor), 9)


class ChunkedSettlementTests(SynchronousTestCase):
    """A tick settles its queue in chunks; orders keep being acknowledged between them."""

    def test_order_acknowledged_while_a_chunk_is_held(self) -> None:
        """With a settlement chunk held open, a client's order is acknowledged and stored; the committed
        chunk's fills are pushed at once; the tick settles and pushes only the orders queued before it;
        the new order settles at the next tick."""
        deployment = Deployment(self.mktemp(), chunk_orders=2)
        client = deployment.logged_in("alice")
        updates: list[dict] = []
        client.on_order_update(updates.append)
        before = [deployment.result(client.buy("KO", n))["order_id"] for n in (1, 2, 3)]
        real = deployment.database.settle_chunk
        held: list[Deferred] = []

        def hold(*args: Any) -> Deferred:
            gate: Deferred = Deferred()
            held.append(gate)
            return gate.addCallback(lambda _: real(*args))

        self.patch(deployment.database, "settle_chunk", hold)
        deployment.exchange.tick()
        self.assertEqual(len(held), 1)
        held.pop().callback(None)  # the first chunk (two orders) commits; the second is held
        self.assertEqual(len(held), 1)
        connection = deployment.pool.connection
        self.assertEqual(connection.execute("SELECT COUNT(*) FROM orders WHERE status = 'queued'").fetchone(), (1,))

        def status(order_id: int) -> tuple:
            return connection.execute("SELECT status, tick_id FROM orders WHERE id = ?", (order_id,)).fetchone()

        meanwhile = deployment.result(client.buy("KO", 4))["order_id"]
        self.assertEqual(status(meanwhile), ("queued", None))
        self.assertEqual(sorted(u["order_id"] for u in updates), before[:2])  # committed: told at once

        held.pop().callback(None)
        deployment.flush()
        self.assertEqual(sorted(u["order_id"] for u in updates), before)
        [(tick,)] = connection.execute("SELECT DISTINCT tick_id FROM orders WHERE id <> ?", (meanwhile,)).fetchall()
        self.assertEqual(status(meanwhile), ("queued", None))

        self.patch(deployment.database, "settle_chunk", real)
        deployment.tick()
        self.assertEqual([u["order_id"] for u in updates[3:]], [meanwhile])
        self.assertEqual(status(meanwhile), ("filled", tick + 1))


class SettlementTransactionTests(SynchronousTestCase):
    """Settling a tick: chunks of orders, each one transaction over the real schema."""

    def setUp(self) -> None:
        self.deployment = Deployment(self.mktemp())
        self.client = self.deployment.logged_in("alice")
        self.deployment.result(self.client.buy("AAPL", 2))
        self.deployment.result(self.client.buy("KO", 1))

    def table(self, sql: str) -> list[tuple]:
        return self.deployment.pool.connection.execute(sql).fetchall()

    def test_failed_chunk_changes_nothing_and_the_tick_is_finished_later(self) -> None:
        """A chunk that fails keeps no fill, cash or position; the tick stays recorded, unsettled, and the
        next update first finishes it at its own prices, then records its own."""
        before = [self.table(f"SELECT * FROM {t}") for t in ("orders", "users", "positions", "transactions")]

        def explode(queued: list, cash: dict, holdings: dict, prices: Any) -> list:
            raise RuntimeError("power cut")

        database = self.deployment.database
        failure = self.failureResultOf(database.settle_tick({"AAPL": 1, "KO": 2}, "t", explode))
        failure.trap(RuntimeError)
        after = [self.table(f"SELECT * FROM {t}") for t in ("orders", "users", "positions", "transactions")]
        self.assertEqual(after, before)
        [(tick, settled)] = self.table("SELECT id, settled FROM ticks WHERE retrieved_at = 't'")
        self.assertEqual(settled, 0)
        self.failureResultOf(database.begin_tick({"AAPL": 3, "KO": 4}, "u"), TickUnsettled)

        self.deployment.tick()
        self.assertEqual(
            self.table("SELECT symbol, tick_id, price_cents, settled_at FROM orders ORDER BY id"),
            [("AAPL", tick, 1, "t"), ("KO", tick, 2, "t")],
        )
        self.assertEqual(self.table("SELECT COUNT(*) FROM ticks WHERE settled = 0"), [(0,)])
        self.assertEqual(self.table("SELECT MAX(id) FROM ticks"), [(tick + 1,)])

    def test_tick_errors_do_not_stop_the_market(self) -> None:
        """A failing update is logged and the queue settles at the next one."""
        self.deployment.pool.broken = RuntimeError("database is locked")
        self.deployment.exchange.tick()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.table("SELECT COUNT(*) FROM orders WHERE status = 'queued'"), [(2,)])
        self.deployment.pool.broken = None
        self.deployment.tick()
        self.assertEqual(self.table("SELECT COUNT(*) FROM transactions"), [(2,)])

    def test_settled_once(self) -> None:
        """An order settles at one tick only; later ticks leave it alone."""
        self.deployment.tick()
        self.deployment.tick()
        self.assertEqual(self.table("SELECT order_id FROM transactions ORDER BY order_id"), [(1,), (2,)])
        self.assertEqual(self.table("SELECT COUNT(DISTINCT tick_id) FROM orders"), [(1,)])

    def test_cash_reconciles_with_history(self) -> None:
        """Cash equals the starting cash less bought plus sold, to the cent."""
        self.deployment.tick()
        self.deployment.result(self.client.sell("AAPL", 1))
        self.deployment.source.prices["AAPL"] += 123
        self.deployment.tick()
        [(cash,)] = self.table("SELECT cash_cents FROM users WHERE username = 'alice'")
        [(net,)] = self.table(
            "SELECT SUM(CASE side WHEN 'buy' THEN -total_cents ELSE total_cents END) FROM transactions"
        )
        self.assertEqual(cash, 10_000_000 + net)

    def test_database_refuses_negative_cash(self) -> None:
        """The schema itself refuses a negative cash balance."""
        with self.assertRaises(sqlite3.IntegrityError):
            self.deployment.pool.connection.execute("UPDATE users SET cash_cents = -1")


class AccountStateCacheTests(SynchronousTestCase):
    """Funds checks use cached account states only while no settlement can have changed them."""

    def setUp(self) -> None:
        self.deployment = Deployment(self.mktemp())
        self.client = self.deployment.logged_in("alice")
        database = self.deployment.database
        self.known: list[dict] = []
        real_queue_orders = database.queue_orders

        def queue_orders(orders: list, prices: Any, refuse: Any, now: str, known: Any = None) -> Deferred:
            self.known.append({user: state.copy() for user, state in (known or {}).items()})
            return real_queue_orders(orders, prices, refuse, now, known)

        self.patch(database, "queue_orders", queue_orders)
        self.settlements: list[Deferred] = []
        real_settle_chunk = database.settle_chunk

        def held_settle_chunk(*args: Any) -> Deferred:
            held: Deferred = Deferred()
            held.addCallback(lambda _: real_settle_chunk(*args))
            self.settlements.append(held)
            return held

        self.held_settle_chunk = held_settle_chunk

    def test_cache_between_ticks_only(self) -> None:
        """Cached between updates; not used or filled while settling; forgotten after."""
        self.deployment.result(self.client.buy("KO", 1))
        self.deployment.result(self.client.buy("KO", 1))
        self.assertEqual([list(k) for k in self.known], [[], [1]])  # the second commit used the cache
        self.assertEqual(self.known[1][1].queued_buy_cents, 6_000)

        self.patch(self.deployment.database, "settle_chunk", self.held_settle_chunk)
        self.deployment.exchange.tick()
        self.deployment.result(self.client.buy("KO", 1))
        self.deployment.result(self.client.buy("KO", 1))
        self.assertEqual([list(k) for k in self.known[2:]], [[], []])  # settling: no cache, none kept

        self.settlements[0].callback(None)
        self.deployment.flush()
        self.deployment.result(self.client.buy("KO", 1))
        self.assertEqual(list(self.known[4]), [])  # forgotten after the update
