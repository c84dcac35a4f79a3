"""The database layer through real ``adbapi`` pools, on SQLite and on PostgreSQL alike."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import DeferredList, gatherResults, inlineCallbacks
from twisted.trial.unittest import TestCase

from papertrader.errors import DataFailed, PurchaseFailed, RegisterFailed
from papertrader.master.accounts import Accounts
from papertrader.master.database import Database, SchemaTooNew, schema_files
from papertrader.master.exchange import Exchange
from papertrader.master.market import PriceBoard
from papertrader.master.trading import NewOrder, refuse_reason, settle_orders
from tests.databases import fresh_database_url, query
from tests.support import ASSETS, PASSWORD, FixedPrices

# A storm of registrations: as many at once, with logins and a settlement in small chunks alongside.
STORM_REGISTRATIONS = 48
STORM_TRADERS = 16
STORM_ORDERS_EACH = 10
STORM_CHUNK = 8


class BackendFixture:
    """A fresh, migrated database of ``backend`` through a real pool, and an exchange on it."""

    backend: str

    def setUp(self) -> Any:
        self.url = fresh_database_url(self, self.backend)
        self.database = self.open()
        return self.database.migrate()

    def open(self) -> Database:
        database = Database.open(self.url, self.mktemp())
        self.addCleanup(database.close)
        return database

    def exchange(self) -> Exchange:
        accounts = Accounts(
            self.database,
            reactor,
            bcrypt_cost=4,
            starting_cash_cents=100_000,
            session_lifetime=3600.0,
            remember_lifetime=7200.0,
        )
        board = PriceBoard(ASSETS)
        board.update(1, "t", {s: a.reference_cents for s, a in ASSETS.items()})
        source = FixedPrices(dict(board.prices))
        return Exchange(self.database, accounts, board, source, reactor, 1000)

    @inlineCallbacks
    def logged_in(self, exchange: Exchange, username: str = "alice") -> Any:
        yield exchange.accounts.register(username, f"{username}@example.com", PASSWORD)
        session = yield exchange.accounts.login(username, PASSWORD)
        return session


class BackendTestsMixin(BackendFixture):
    """Tests every backend must pass; subclasses name the backend."""

    @inlineCallbacks
    def test_schema_version(self) -> Any:
        """The schema is at the newest version, re-applying is a no-op, and a newer database is refused."""
        newest = schema_files(self.database.dialect.name)[-1][0]
        version = yield self.open().migrate()
        self.assertEqual(version, newest)
        self.assertEqual(query(self.url, "SELECT MAX(version) FROM schema_version"), [(newest,)])
        query(self.url, "INSERT INTO schema_version (version) VALUES (?)", newest + 1)
        error = yield self.assertFailure(self.open().migrate(), SchemaTooNew)
        self.assertIn(str(newest + 1), str(error))

    @inlineCallbacks
    def test_usernames_unique_in_any_case(self) -> Any:
        """The database itself refuses a second user whose name differs only in case."""
        yield self.database.create_user("alice", "a@example.com", "h", 1, "t")
        yield self.assertFailure(self.database.create_user("ALICE", "b@example.com", "h", 1, "t"), RegisterFailed)
        yield self.assertFailure(self.database.create_user("bob", "a@example.com", "h", 1, "t"), RegisterFailed)
        self.assertEqual(query(self.url, "SELECT COUNT(*) FROM users"), [(1,)])

    def test_constraints(self) -> Any:
        """Negative cash and negative share counts are refused by the schema."""
        d = self.database.create_user("alice", "a@example.com", "h", 1, "t")

        def check(user_id: int) -> None:
            for statement in (
                "UPDATE users SET cash_cents = -1",
                f"INSERT INTO positions (user_id, symbol, quantity) VALUES ({user_id}, 'AAPL', -1)",
            ):
                self.assertRaises(self.database.dialect.integrity_errors, query, self.url, statement)
            self.assertEqual(query(self.url, "SELECT cash_cents FROM users"), [(1,)])

        return d.addCallback(check)

    @inlineCallbacks
    def test_trade_and_reconcile(self) -> Any:
        """Orders queue, settle at the next tick, and cash reconciles with the history to the cent."""
        exchange = self.exchange()
        session = yield self.logged_in(exchange)
        for side, symbol, quantity in [("buy", "AAPL", 3), ("buy", "KO", 5), ("sell", "AAPL", 1)]:
            if side == "sell":
                yield exchange.tick()
            yield exchange.submit_order(side, session.token, symbol, str(quantity), "t", "127.0.0.1:1", "w")
        yield exchange.tick()
        yield exchange.tick()
        [(cash,)] = query(self.url, "SELECT cash_cents FROM users")
        [(net,)] = query(
            self.url, "SELECT SUM(CASE side WHEN 'buy' THEN -total_cents ELSE total_cents END) FROM transactions"
        )
        self.assertEqual(cash, 100_000 + net)
        self.assertEqual(
            query(self.url, "SELECT symbol, quantity FROM positions ORDER BY symbol"), [("AAPL", 2), ("KO", 5)]
        )
        self.assertEqual(query(self.url, "SELECT COUNT(*) FROM orders WHERE status = 'filled'"), [(3,)])

    @inlineCallbacks
    def test_concurrent_buys_exceeding_cash(self) -> Any:
        """Two concurrent buys that together exceed the cash: exactly one is accepted and fills."""
        exchange = self.exchange()
        session = yield self.logged_in(exchange)
        # 1,000.00 of cash; each buy costs 570.00 at AAPL's 190.00.
        results = yield gatherResults(
            [
                exchange.submit_order("buy", session.token, "AAPL", "3", "t", "127.0.0.1:1", "w").addErrback(
                    lambda f: f.trap(PurchaseFailed) and None
                )
                for _ in range(2)
            ]
        )
        self.assertEqual(sorted(r is None for r in results), [False, True])
        yield exchange.tick()
        self.assertEqual(query(self.url, "SELECT COUNT(*) FROM transactions"), [(1,)])

    @inlineCallbacks
    def test_concurrent_batches_cannot_double_spend(self) -> Any:
        """Two order batches committed at the same time still cannot queue more than the cash covers."""
        exchange = self.exchange()
        session = yield self.logged_in(exchange)
        order = NewOrder(session.user_id, "alice", "buy", "AAPL", 3, "t", "a", "w")
        prices = exchange.board.prices
        results = yield gatherResults(
            [self.database.queue_orders([order], prices, refuse_reason, "t") for _ in range(4)]
        )
        accepted = [r for ([r], _) in results if isinstance(r, int)]
        self.assertEqual(len(accepted), 1, results)

    @inlineCallbacks
    def test_settlement_never_overspends(self) -> Any:
        """Even orders queued past the cash (by any route) settle only while cash lasts."""
        exchange = self.exchange()
        session = yield self.logged_in(exchange)
        for _ in range(3):
            query(
                self.url,
                "INSERT INTO orders (user_id, side, symbol, quantity, status, created_at, received_at, "
                "client_address, worker) VALUES (?, 'buy', 'AAPL', 3, 'queued', ?, 't', 'a', 'w')",
                session.user_id,
                "2000-01-01T00:00:00.000000+00:00",
            )
        yield exchange.tick()
        self.assertEqual(
            query(self.url, "SELECT status FROM orders ORDER BY id"), [("filled",), ("rejected",), ("rejected",)]
        )
        self.assertEqual(query(self.url, "SELECT cash_cents FROM users"), [(100_000 - 3 * 19_000,)])

    @inlineCallbacks
    def test_order_never_settles_before_it_was_placed(self) -> Any:
        """An order stored with a later time than a tick's waits for the next tick: settled_at >= created_at."""
        user_id = yield self.database.create_user("alice", "a@example.com", "h", 100_000, "t")
        order = NewOrder(user_id, "alice", "buy", "KO", 1, "t", "a", "w")
        placed, earlier, later = (f"2030-01-01T00:00:00.00000{n}+00:00" for n in (2, 1, 3))
        ([order_id], _) = yield self.database.queue_orders([order], {"KO": 6_000}, refuse_reason, placed)
        _, settlements = yield self.database.settle_tick({"KO": 6_000}, earlier, settle_orders)
        self.assertEqual(settlements, [])
        self.assertEqual(query(self.url, "SELECT status FROM orders"), [("queued",)])
        _, settlements = yield self.database.settle_tick({"KO": 6_000}, later, settle_orders)
        self.assertEqual([s.order.order_id for s in settlements], [order_id])
        self.assertEqual(
            query(self.url, "SELECT status, created_at, settled_at FROM orders"), [("filled", placed, later)]
        )

    @inlineCallbacks
    def test_history_pages(self) -> Any:
        """The pages of a history are the stored trades, newest first; a forged position is refused."""
        exchange = self.exchange()
        session = yield self.logged_in(exchange)
        for n in range(7):
            [(order_id,)] = query(
                self.url,
                "INSERT INTO orders (user_id, side, symbol, quantity, status, created_at, received_at, "
                "client_address, worker, settled_at) VALUES (?, 'buy', 'AAPL', ?, 'filled', 't', 't', 'a', 'w', 't') "
                "RETURNING id",
                session.user_id, n + 1,
            )
            query(
                self.url,
                "INSERT INTO transactions (user_id, order_id, side, symbol, quantity, price_cents, total_cents, "
                "cash_after_cents, settled_at) VALUES (?, ?, 'buy', 'AAPL', ?, 100, ?, 0, 't')",
                session.user_id, order_id, n + 1, 100 * (n + 1),
            )
        pages = []
        position = None
        while True:
            page = yield self.database.history(session.user_id, 3, position)
            pages.append(page)
            if page.next_cursor is None:
                break
            position = tuple(int(n) for n in page.next_cursor.split("."))
        self.assertEqual([(p.page, p.pages) for p in pages], [(1, 3), (2, 3), (3, 3)])
        self.assertEqual([row["quantity"] for p in pages for row in p.rows], [7, 6, 5, 4, 3, 2, 1])
        top, after, _ = (int(n) for n in pages[0].next_cursor.split("."))
        for forged in ((top, after + 1, 2), (top, after, 3), (top, after, 4)):
            yield self.assertFailure(self.database.history(session.user_id, 3, forged), DataFailed)

    @inlineCallbacks
    def test_failed_settlement_rolls_back(self) -> Any:
        """A settlement chunk that fails part-way leaves no trace of itself: no fill, no cash change; its
        tick stays recorded as not settled, to be finished at its own prices."""
        exchange = self.exchange()
        session = yield self.logged_in(exchange)
        yield exchange.submit_order("buy", session.token, "AAPL", "1", "t", "127.0.0.1:1", "w")

        def half_then_fail(*args: Any) -> Any:
            settle_orders(*args)
            raise RuntimeError("crash in the middle")

        yield self.assertFailure(self.database.settle_tick({"AAPL": 100}, "u", half_then_fail), RuntimeError)
        self.assertEqual(query(self.url, "SELECT retrieved_at, settled FROM ticks"), [("u", 0)])
        self.assertEqual(query(self.url, "SELECT status FROM orders"), [("queued",)])
        self.assertEqual(query(self.url, "SELECT cash_cents FROM users"), [(100_000,)])
        self.assertEqual(query(self.url, "SELECT COUNT(*) FROM transactions"), [(0,)])


    def count_attempts(self, name: str) -> list[int]:
        """Count each run of ``Database.name`` (a transaction's body): retries run it again."""
        attempts = [0]
        real = getattr(Database, name)

        def counted(*args: Any) -> Any:
            attempts[0] += 1
            return real(*args)

        self.patch(self.database, name, counted)
        return attempts

    @inlineCallbacks
    def test_registration_storm(self) -> Any:
        """Registrations all at once, with logins and a settlement in chunks alongside, through the
        real pool (several connections on PostgreSQL): every one succeeds, and none of them, nor
        any settlement chunk, loses a serialization conflict and runs again."""
        traders = []
        for n in range(STORM_TRADERS):
            user_id = yield self.database.create_user(f"trader{n}", f"trader{n}@example.com", "h", 10**9, "t")
            traders.append(user_id)
        prices = {"KO": 6_000}
        orders = [
            NewOrder(user_id, f"trader{n}", "buy", "KO", 1, "t", "a", "w")
            for n, user_id in enumerate(traders)
            for _ in range(STORM_ORDERS_EACH)
        ]
        yield self.database.queue_orders(orders, prices, refuse_reason, "t")
        tick = yield self.database.begin_tick(prices, "u")
        registrations = self.count_attempts("_create_user")
        logins = self.count_attempts("_create_session")
        chunk_runs = self.count_attempts("_settle_chunk")
        chunks = []
        settled = self.database.settle_queue(tick, settle_orders, STORM_CHUNK, chunks.append)
        registered = [
            self.database.create_user(f"Newcomer{n}", f"newcomer{n}@example.com", "h", 100_000, "t")
            for n in range(STORM_REGISTRATIONS)
        ]
        sessions = [
            self.database.create_session(f"token{n}", user_id, 1.0, 2.0, False, "h")
            for n, user_id in enumerate(traders)
        ]
        results = yield DeferredList(registered + sessions + [settled], consumeErrors=True)
        self.assertEqual([r for ok, r in results if not ok], [])
        new_ids = [r for _, r in results[:STORM_REGISTRATIONS]]
        self.assertEqual(len(set(new_ids)), STORM_REGISTRATIONS)
        self.assertEqual([r for _, r in results[STORM_REGISTRATIONS:-1]], [True] * STORM_TRADERS)
        self.assertEqual(len(results[-1][1]), len(orders))
        self.assertEqual(query(self.url, "SELECT COUNT(*) FROM users"), [(STORM_TRADERS + STORM_REGISTRATIONS,)])
        self.assertEqual(query(self.url, "SELECT COUNT(*) FROM orders WHERE status = 'filled'"), [(len(orders),)])
        self.assertEqual(
            (registrations[0], logins[0], chunk_runs[0]), (STORM_REGISTRATIONS, STORM_TRADERS, len(chunks))
        )

    @inlineCallbacks
    def test_same_name_registered_at_once(self) -> Any:
        """Registrations of one name (in any letter case) or one email, all at once: exactly one succeeds."""
        names = ["Carol", "carol", "CAROL", "cArOl"]
        attempts = [
            self.database.create_user(name, f"{n}@example.com", "h", 100_000, "t") for n, name in enumerate(names)
        ] + [self.database.create_user(f"other{n}", "carol@example.com", "h", 100_000, "t") for n in range(4)]
        results = yield DeferredList(attempts, consumeErrors=True)
        for ok, result in results:
            if not ok:
                result.trap(RegisterFailed)
        self.assertEqual([ok for ok, _ in results[:4]].count(True), 1)
        self.assertEqual([ok for ok, _ in results[4:]].count(True), 1)
        self.assertEqual(query(self.url, "SELECT COUNT(*) FROM users"), [(2,)])


class SQLiteTests(BackendTestsMixin, TestCase):
    """The backend tests on SQLite."""

    backend = "sqlite"


class PostgreSQLTests(BackendTestsMixin, TestCase):
    """The backend tests on PostgreSQL."""

    backend = "postgresql"

    def test_foreign_keys(self) -> None:
        """The rows a settlement writes (an order's tick, a trade's user and order) are not checked
        against their parents (schema 6: half of storing the outcomes); the others are."""
        found = query(
            self.url,
            "SELECT conrelid::regclass::text, conname FROM pg_constraint WHERE contype = 'f' ORDER BY 1, 2",
        )
        self.assertEqual(
            found,
            [
                ("orders", "orders_user_id_fkey"),
                ("positions", "positions_user_id_fkey"),
                ("prices", "prices_tick_id_fkey"),
                ("sessions", "sessions_user_id_fkey"),
            ],
        )

    @inlineCallbacks
    def test_registration_read_committed(self) -> Any:
        """A registration runs read committed (outside the serializability checks), and the
        connection's next transaction is serializable again."""
        database = Database.postgresql(self.url, connections=1)
        self.addCleanup(database.close)
        seen = []
        real = Database._create_user

        def observed(txn: Any, *args: Any) -> Any:
            seen.append(txn.execute("SHOW transaction_isolation").fetchone()[0])
            return real(txn, *args)

        self.patch(database, "_create_user", observed)
        yield database.create_user("dora", "dora@example.com", "h", 100_000, "t")
        after = yield database._run(lambda txn: txn.execute("SHOW transaction_isolation").fetchone()[0])
        self.assertEqual((seen, after), (["read committed"], "serializable"))

    def test_room_for_settled_versions(self) -> None:
        """Users and positions leave 30 % of each page free (schema 7), so the cash and holdings a
        settlement rewrites stay on their pages without new index entries."""
        found = query(
            self.url, "SELECT relname, reloptions FROM pg_class WHERE relname IN ('users', 'positions') ORDER BY 1"
        )
        self.assertEqual(found, [("positions", ["fillfactor=70"]), ("users", ["fillfactor=70"])])
