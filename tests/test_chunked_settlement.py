"""Settlement in chunks and multi-row order inserts, through real pools on SQLite and PostgreSQL.

A tick settles its queue in transactions of a bounded number of orders; orders
stored between them belong to the next tick; a tick interrupted part-way is
finished at its own prices; a batch of orders is inserted with multi-row
statements and keeps client order ids idempotent.
"""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from papertrader.client.library import connect
from papertrader.master.database import (
    Database,
    TickUnsettled,
    _column_arrays,
    _unnest,
    outcomes_statement,
    queued_claims_statement,
)
from papertrader.master.trading import (
    AccountState,
    ClientOrderIdReused,
    NewOrder,
    Settlement,
    refuse_reason,
    settle_orders,
)
from papertrader.timestamps import iso
from tests.databases import fresh_database_url, query
from tests.processes import RunningDeployment
from tests.support import PASSWORD
from tests.test_backends import BackendFixture

PRICES = {"AAPL": 19_000, "KO": 6_000}
START = 1_900_000_000.0
CASH = 1_000_000_000


def at(seconds: float) -> str:
    return iso(START + seconds)


class ChunkedSettlementMixin(BackendFixture):
    """Tests every backend must pass; subclasses name the backend."""

    @inlineCallbacks
    def setUp(self) -> Any:
        yield super().setUp()
        self.users = []
        for name in ("alice", "bob"):
            user_id = yield self.database.create_user(name, f"{name}@example.com", "h", CASH, at(0))
            self.users.append((user_id, name))

    def orders(self, count: int, symbol: str = "KO") -> list[NewOrder]:
        """``count`` buys of one share each, alternating between the two users."""
        return [
            NewOrder(*self.users[n % 2], "buy", symbol, 1, at(1), "127.0.0.1:1", "w")
            for n in range(count)
        ]

    @inlineCallbacks
    def queue(self, orders: list[NewOrder], seconds: float) -> Any:
        """Store ``orders`` created at ``seconds``; fires with their ids (every one must be accepted)."""
        results, _ = yield self.database.queue_orders(orders, PRICES, refuse_reason, at(seconds))
        self.assertTrue(all(isinstance(r, int) for r in results), results)
        return results

    def statuses(self) -> dict[int, tuple[str, int | None]]:
        return {i: (status, tick) for i, status, tick in query(self.url, "SELECT id, status, tick_id FROM orders")}

    def reconcile(self) -> None:
        """Each filled order has one trade; cash and positions follow from the trades exactly."""
        self.assertEqual(
            query(
                self.url,
                "SELECT COUNT(*) FROM orders o LEFT JOIN transactions t ON t.order_id = o.id "
                "WHERE (o.status = 'filled') <> (t.id IS NOT NULL)",
            ),
            [(0,)],
        )
        for user_id, _ in self.users:
            [(spent,)] = query(
                self.url, "SELECT COALESCE(SUM(total_cents), 0) FROM transactions WHERE user_id = ?", user_id
            )
            self.assertEqual(query(self.url, "SELECT cash_cents FROM users WHERE id = ?", user_id), [(CASH - spent,)])
            [(bought,)] = query(
                self.url, "SELECT COALESCE(SUM(quantity), 0) FROM transactions WHERE user_id = ?", user_id
            )
            held = query(self.url, "SELECT COALESCE(SUM(quantity), 0) FROM positions WHERE user_id = ?", user_id)
            self.assertEqual([(int(q),) for (q,) in held], [(int(bought),)])

    @inlineCallbacks
    def test_orders_stored_between_chunks_wait_for_the_next_tick(self) -> Any:
        """Orders stored after a tick began settle at the next tick, even if their creation time is earlier."""
        first = yield self.queue(self.orders(5), 1)
        tick = yield self.database.begin_tick(PRICES, at(3))
        self.assertEqual((tick.through_order_id, tick.orders), (max(first), 5))
        chunk = yield self.database.settle_chunk(tick, 0, 2, settle_orders)
        self.assertEqual([s.order.order_id for s in chunk.settlements], first[:2])
        self.assertFalse(chunk.done)

        # Stored between chunks; created "at 2", before the tick's time, yet after it began.
        between = yield self.queue(self.orders(2), 2)
        self.assertGreater(min(between), tick.through_order_id)
        rest = yield self.database.settle_queue(tick, settle_orders, 2)
        self.assertEqual([s.order.order_id for s in rest], first[2:])
        statuses = self.statuses()
        self.assertEqual({statuses[i] for i in first}, {("filled", tick.tick_id)})
        self.assertEqual({statuses[i] for i in between}, {("queued", None)})
        self.assertEqual(query(self.url, "SELECT settled FROM ticks WHERE id = ?", tick.tick_id), [(1,)])

        next_tick, settlements = yield self.database.settle_tick(PRICES, at(4), settle_orders, 2)
        self.assertEqual([s.order.order_id for s in settlements], between)
        self.assertEqual({self.statuses()[i] for i in between}, {("filled", next_tick)})
        self.reconcile()

    @inlineCallbacks
    def test_interrupted_tick_finishes_at_its_own_prices(self) -> Any:
        """A chunk that fails keeps what earlier chunks committed and nothing of its own; no new tick may be
        recorded until the old one is finished, at its own prices and time; every order settles once."""
        ids = yield self.queue(self.orders(6), 1)
        own = {"AAPL": 18_000, "KO": 5_000}
        tick = yield self.database.begin_tick(own, at(2))
        calls: list[int] = []

        def fail_second(*args: Any) -> list[Settlement]:
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("killed mid-way")
            return settle_orders(*args)

        yield self.assertFailure(self.database.settle_queue(tick, fail_second, 2), RuntimeError)
        statuses = self.statuses()
        self.assertEqual([statuses[i][0] for i in ids], ["filled"] * 2 + ["queued"] * 4)
        self.reconcile()
        yield self.assertFailure(self.database.begin_tick(PRICES, at(3)), TickUnsettled)

        [unsettled] = yield self.database.unsettled_ticks()
        self.assertEqual(
            (unsettled.tick_id, unsettled.as_of, unsettled.prices, unsettled.orders), (tick.tick_id, at(2), own, 4)
        )
        rest = yield self.database.settle_queue(unsettled, settle_orders, 2)
        self.assertEqual([s.order.order_id for s in rest], ids[2:])
        self.assertEqual(
            query(self.url, "SELECT DISTINCT tick_id, price_cents, settled_at FROM orders"),
            [(tick.tick_id, 5_000, at(2))],
        )
        self.assertEqual(query(self.url, "SELECT COUNT(*), COUNT(DISTINCT order_id) FROM transactions"), [(6, 6)])
        self.reconcile()
        unsettled = yield self.database.unsettled_ticks()
        self.assertEqual(unsettled, [])

    @inlineCallbacks
    def test_a_chunk_run_twice_settles_once(self) -> Any:
        """The same chunk run twice at once (as a retried one would be) settles each order once."""
        ids = yield self.queue(self.orders(4), 1)
        tick = yield self.database.begin_tick(PRICES, at(2))
        chunks = yield gatherResults([self.database.settle_chunk(tick, 0, 10, settle_orders) for _ in range(2)])
        self.assertEqual(sorted(s.order.order_id for c in chunks for s in c.settlements), ids)
        self.assertEqual(query(self.url, "SELECT COUNT(*), COUNT(DISTINCT order_id) FROM transactions"), [(4, 4)])
        self.reconcile()

    @inlineCallbacks
    def test_empty_tick_is_settled_at_once(self) -> Any:
        """A tick with nothing queued is recorded settled, so the next one may follow."""
        tick = yield self.database.begin_tick(PRICES, at(1))
        self.assertEqual((tick.through_order_id, tick.orders), (None, 0))
        self.assertEqual(query(self.url, "SELECT settled FROM ticks"), [(1,)])
        settlements = yield self.database.settle_queue(tick, settle_orders)
        self.assertEqual(settlements, [])

    @inlineCallbacks
    def test_order_acknowledged_while_a_chunk_is_held(self) -> Any:
        """While a chunk of the settlement is held, an order is acknowledged and stored; it settles at the
        next tick, not this one."""
        exchange = self.exchange()
        exchange._chunk_orders = 1
        session = yield self.logged_in(exchange, "carol")
        first, _ = yield exchange.submit_order("buy", session.token, "KO", "1", "t", "127.0.0.1:1", "w")
        second, _ = yield exchange.submit_order("buy", session.token, "KO", "2", "t", "127.0.0.1:1", "w")
        pushed: list[tuple[int, list[int]]] = []
        settled_by_tick: dict[int, list[int]] = {}
        exchange.on_settled(lambda tick, as_of, settlements: settled_by_tick.setdefault(tick, []).extend(
            s.order.order_id for s in settlements
        ))
        exchange.on_tick(lambda tick, as_of, prices, stale: pushed.append((tick, settled_by_tick.pop(tick, []))))
        real = self.database.settle_chunk
        held: list[Deferred] = []

        def hold(*args: Any) -> Deferred:
            gate: Deferred = Deferred()
            held.append(gate)
            return gate.addCallback(lambda _: real(*args))

        self.patch(self.database, "settle_chunk", hold)
        ticking = exchange.tick()
        while not held:  # the tick is recorded (a real pool: in a thread), then its first chunk waits
            yield _turn()
        meanwhile, _ = yield exchange.submit_order("buy", session.token, "KO", "3", "t", "127.0.0.1:1", "w")
        self.assertEqual(query(self.url, "SELECT status FROM orders WHERE id = ?", meanwhile), [("queued",)])
        self.assertFalse(ticking.called)

        while not ticking.called:
            if held:
                held.pop(0).callback(None)
            yield _turn()
        [(tick, settled)] = pushed
        self.assertEqual(settled, [first, second])
        self.assertEqual(self.statuses()[meanwhile], ("queued", None))

        self.patch(self.database, "settle_chunk", real)
        yield exchange.tick()
        self.assertEqual(pushed[1][1], [meanwhile])
        self.assertEqual(self.statuses()[meanwhile], ("filled", tick + 1))

    @inlineCallbacks
    def test_multi_row_insert_keeps_client_order_ids_idempotent(self) -> Any:
        """A batch larger than one multi-row statement, repeating names within itself and then as a whole:
        every order is stored once under the right id, repeats get the original's id, a different order
        under a used name is a conflict."""
        alice, bob = self.users

        def named(n: int) -> NewOrder:
            user = (alice, bob)[n % 2]
            # Orders 700-1199 repeat the names (and orders) of 0-499, across statement boundaries.
            key = n % 700
            return NewOrder(*user, "buy", ("KO", "AAPL")[key % 3 == 0], 1 + key % 5, at(1), "a", "w", f"c{key}")

        batch = [named(n) for n in range(1200)]
        results, _ = yield self.database.queue_orders(batch, PRICES, refuse_reason, at(1))
        self.assertTrue(all(isinstance(r, int) for r in results), [r for r in results if not isinstance(r, int)])
        self.assertEqual(results[700:], results[:500])
        self.assertEqual(len(set(results)), 700)
        stored = {
            i: (u, side, symbol, int(q), name)
            for i, u, side, symbol, q, name in query(
                self.url, "SELECT id, user_id, side, symbol, quantity, client_order_id FROM orders"
            )
        }
        self.assertEqual(len(stored), 700)
        for order, order_id in zip(batch, results):
            self.assertEqual(
                stored[order_id],
                (order.user_id, order.side, order.symbol, order.quantity, order.client_order_id),
            )

        conflicting = NewOrder(*alice, "sell", "KO", 1, at(2), "a", "w", "c0")
        again, _ = yield self.database.queue_orders([*batch, conflicting], PRICES, refuse_reason, at(2))
        self.assertEqual(again[:-1], results)
        self.assertIsInstance(again[-1], ClientOrderIdReused)
        self.assertEqual(again[-1].order_id, results[0])
        self.assertEqual(query(self.url, "SELECT COUNT(*) FROM orders"), [(700,)])

    @inlineCallbacks
    def test_batch_ids_follow_the_batch(self) -> Any:
        """Accepted orders get increasing ids in batch order (the queue's order); refused ones take none."""
        poor = yield self.database.create_user("poor", "poor@example.com", "h", 10_000, at(0))
        batch = [
            NewOrder(*self.users[0], "buy", "KO", 1, at(1), "a", "w"),
            NewOrder(poor, "poor", "buy", "AAPL", 1, at(1), "a", "w"),
            NewOrder(*self.users[1], "buy", "KO", 2, at(1), "a", "w"),
        ]
        results, _ = yield self.database.queue_orders(batch, PRICES, refuse_reason, at(1))
        self.assertIsInstance(results[1], str)
        self.assertLess(results[0], results[2])
        self.assertEqual(
            query(self.url, "SELECT id, user_id, quantity FROM orders ORDER BY id"),
            [(results[0], self.users[0][0], 1), (results[2], self.users[1][0], 2)],
        )


def _turn() -> Deferred:
    """Let the reactor run once (the real pool answers from its threads)."""
    return deferLater(reactor, 0.001, lambda: None)


class SQLiteChunkedSettlementTests(ChunkedSettlementMixin, TestCase):
    """Chunked settlement and multi-row inserts on SQLite."""

    backend = "sqlite"


class PostgreSQLChunkedSettlementTests(ChunkedSettlementMixin, TestCase):
    """Chunked settlement and multi-row inserts on PostgreSQL."""

    backend = "postgresql"

    @inlineCallbacks
    def test_outcomes_join_stays_linear_with_stale_statistics(self) -> Any:
        """Statistics taken while the queue was empty (autovacuum analyzes late) make the planner
        believe a chunk's id range holds almost no orders; the plan that stores the outcomes must
        still not read every outcome again for each order (a nested loop over the unnested
        outcomes took 20 s for a chunk of 10,000)."""
        query(self.url, "ANALYZE")
        ids = yield self.queue(self.orders(2_000), 2)
        outcomes = [(i, "filled", None, 6_000, 6_000, CASH - 6_000) for i in ids]
        import psycopg

        with psycopg.connect(self.url) as connection:
            dialect = self.database.dialect
            for statement in (*dialect.settlement_settings, *dialect.outcome_settings):
                connection.execute(statement)
            [(plan,)] = connection.execute(
                "EXPLAIN (FORMAT JSON) " + dialect.sql(outcomes_statement(ids[0], ids[-1])),
                (*_column_arrays(outcomes), 1, at(3), at(3)),
            ).fetchall()
            connection.rollback()
        rescanned = [
            node["Plans"][1]["Node Type"]
            for node in _plan_nodes(plan[0]["Plan"])
            if node["Node Type"] == "Nested Loop" and node["Plans"][1]["Node Type"] in ("Function Scan", "Materialize")
        ]
        self.assertEqual(rescanned, [])


    @inlineCallbacks
    def test_funds_check_reads_only_the_users_orders_with_stale_statistics(self) -> Any:
        """With statistics taken while the queue was empty, the funds check of an order must still read
        the user's own orders (orders_user), not the whole queue (orders_queued) for each user."""
        query(self.url, "ANALYZE")
        yield self.queue(self.orders(2_000), 2)
        [(oldest,)] = query(self.url, "SELECT MIN(id) FROM orders WHERE status = 'queued'")
        user_id = self.users[0][0]
        statement = queued_claims_statement(oldest).format(keys=_unnest((("user_id", "bigint"),)))
        [(plan,)] = query(self.url, "EXPLAIN (FORMAT JSON) " + statement, [user_id])
        indexes = {node.get("Index Name") for node in _plan_nodes(plan[0]["Plan"])} - {None}
        self.assertEqual(indexes, {"orders_user"})


    @inlineCallbacks
    def test_batch_account_states_equal_one_by_one(self) -> Any:
        """The funds check reads a batch's accounts in two statements; each state equals the one read
        on its own: cash, holdings, queued buys (at the given prices) and queued sells."""
        (alice, _), (bob, _) = self.users
        query(self.url, "INSERT INTO positions (user_id, symbol, quantity) VALUES (?, 'AAPL', 10)", bob)
        query(self.url, "INSERT INTO positions (user_id, symbol, quantity) VALUES (?, 'KO', 4)", bob)
        sells = [NewOrder(bob, "bob", "sell", "AAPL", 3, at(1), "127.0.0.1:1", "w")] * 2
        yield self.queue(self.orders(6) + sells, 2)
        carol = yield self.database.create_user("carol", "carol@example.com", "h", 5_000, at(0))

        def both(txn: Any) -> tuple[dict, dict]:
            oldest = Database._oldest_queued(txn)
            users = [alice, bob, carol]
            together = Database._account_states(txn, users, PRICES, oldest)
            alone = {user: Database._account_state(txn, user, PRICES, oldest) for user in users}
            return together, alone

        together, alone = yield self.database._run(both)
        self.assertEqual(together, alone)
        self.assertEqual(together[bob].queued_sell_shares, {"AAPL": 6})
        self.assertEqual(together[bob].holdings, {"AAPL": 10, "KO": 4})
        self.assertEqual(together[alice].queued_buy_cents, 3 * PRICES["KO"])
        self.assertEqual(together[carol], AccountState(cash_cents=5_000, holdings={}))


def _plan_nodes(node: dict) -> list[dict]:
    """``node`` of a JSON query plan and every node under it."""
    return [node, *(found for child in node.get("Plans", ()) for found in _plan_nodes(child))]



SEEDED = 40_000
E2E_CHUNK = 10


class RunningChunkedSettlementMixin:
    """A real master (twistd, local worker, TLS) settling a large queue in many small chunks."""

    backend: str
    timeout = 300
    log = Logger()

    @inlineCallbacks
    def test_order_acknowledged_during_a_long_settlement(self) -> Any:
        """A client's order placed while the master settles a large queue is acknowledged before the
        settlement ends, stored, and settled at the next update, not that one."""
        url = fresh_database_url(self, self.backend)
        deployment = RunningDeployment(
            self.mktemp(),
            "--database", url,
            "--update-interval", "3600",
            "--settlement-chunk-orders", str(E2E_CHUNK),
            "--starting-cash", "100000000.00",
            log_to_stdout=True,
        )
        self.addCleanup(deployment.stop)
        yield deployment.start()
        host, port = deployment.worker_address()
        ca = os.path.join(deployment.data, "tls", "ca.pem")
        client = yield connect(reactor, host, port, ca)
        yield client.register("alice", "alice@example.com", PASSWORD)
        yield client.login("alice", PASSWORD)
        token = client.token
        client.close()
        yield deployment.stop()

        # Queue many orders while the master is down: its first update after starting settles them.
        [(user_id,)] = query(url, "SELECT id FROM users WHERE username = 'alice'")
        _seed(url, user_id, SEEDED, iso(time.time() - 60))
        settling = deployment.spawn().wait_for(b"orders settled so far")
        yield settling
        yield deployment.wait_until_serving()
        host, port = deployment.worker_address()
        client = yield connect(reactor, host, port, ca)
        self.addCleanup(client.close)
        yield client.login_with_token(token)
        answer = yield client.buy("KO", 1)
        [(still_queued,)] = query(url, "SELECT COUNT(*) FROM orders WHERE worker = 'seed' AND status = 'queued'")
        self.log.info("when the order was acknowledged {queued} seeded orders were queued", queued=still_queued)
        self.assertGreater(still_queued, 0, "the order was acknowledged while the queue was settling")
        order_id = answer["order_id"]
        self.assertEqual(query(url, "SELECT status FROM orders WHERE id = ?", order_id), [("queued",)])

        for _ in range(6000):
            if query(url, "SELECT COUNT(*) FROM orders WHERE worker = 'seed' AND status = 'queued'") == [(0,)]:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        [(tick,)] = query(url, "SELECT DISTINCT tick_id FROM orders WHERE worker = 'seed'")
        self.assertEqual(query(url, "SELECT status, tick_id FROM orders WHERE id = ?", order_id), [("queued", None)])

        # The next update (the first after a restart) settles it.
        yield deployment.stop()
        deployment.spawn()
        for _ in range(600):
            if query(url, "SELECT status FROM orders WHERE id = ?", order_id) != [("queued",)]:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(
            query(url, "SELECT status, tick_id FROM orders WHERE id = ?", order_id), [("filled", tick + 1)]
        )


def _seed(url: str, user_id: int, count: int, created_at: str) -> None:
    """Store ``count`` queued buys of one KO share for ``user_id`` straight into the database."""
    rows = [(user_id, "buy", "KO", 1, "queued", created_at, created_at, "127.0.0.1:1", "seed")] * count
    insert = (
        "INSERT INTO orders (user_id, side, symbol, quantity, status, created_at, received_at, client_address, "
        "worker) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    if url.startswith("sqlite:"):
        with sqlite3.connect(url[len("sqlite:///") :]) as connection:
            connection.executemany(insert, rows)
        connection.close()
        return
    import psycopg

    with psycopg.connect(url) as connection:
        connection.cursor().executemany(insert.replace("?", "%s"), rows)


class SQLiteRunningChunkedSettlementTests(RunningChunkedSettlementMixin, TestCase):
    """A real deployment on SQLite."""

    backend = "sqlite"


class PostgreSQLRunningChunkedSettlementTests(RunningChunkedSettlementMixin, TestCase):
    """A real deployment on PostgreSQL."""

    backend = "postgresql"
