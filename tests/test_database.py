"""The database through a real ``adbapi`` pool and SQLite file: schema versions and constraints."""

from __future__ import annotations

import os
import sqlite3
from typing import Any

import attr
from twisted.internet.defer import fail, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from papertrader.master import database as database_module
from papertrader.master.database import (
    MAX_RETRIES,
    RETRY_BACKOFF,
    RETRY_BACKOFF_MAX,
    SQLITE,
    Database,
    SchemaTooNew,
    retry_delay,
    schema_files,
)
from papertrader.master.trading import AccountState, NewOrder, refuse_reason
from tests.support import SynchronousPool, make_database


class SchemaTests(TestCase):
    """Versioned schema files applied at start-up."""

    def open(self, path: str) -> Database:
        database = Database.sqlite(path)
        self.addCleanup(database.close)
        return database

    @inlineCallbacks
    def test_fresh_database_gets_newest_version(self) -> Any:
        """A new file gets every schema file applied; applying again changes nothing."""
        path = os.path.join(os.path.abspath(self.mktemp()), "pt.sqlite")
        newest = schema_files()[-1][0]
        version = yield self.open(path).migrate()
        self.assertEqual(version, newest)
        version = yield self.open(path).migrate()
        self.assertEqual(version, newest)
        with sqlite3.connect(path) as connection:
            versions = connection.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
            self.assertEqual(versions, [(version,) for version, _ in schema_files()])

    def test_every_database_has_every_version(self) -> None:
        """SQLite and PostgreSQL have a script for each version, 1 to the newest, so one version
        number means the same schema on both; where a version has per-database scripts they
        differ from each other."""
        sqlite, postgresql = schema_files("sqlite"), schema_files("postgresql")
        versions = [version for version, _ in sqlite]
        self.assertEqual(versions, list(range(1, len(versions) + 1)))
        self.assertEqual([version for version, _ in postgresql], versions)
        self.assertIn("DROP CONSTRAINT transactions_order_id_fkey", dict(postgresql)[6])
        self.assertIn("ALTER TABLE orders_rebuilt RENAME TO orders", dict(sqlite)[6])
        self.assertEqual(dict(sqlite)[5], dict(postgresql)[5])

    @inlineCallbacks
    def test_newer_schema_refused(self) -> Any:
        """A database from a newer PaperTrader is refused with a clear message and left alone."""
        path = os.path.join(os.path.abspath(self.mktemp()), "pt.sqlite")
        yield self.open(path).migrate()
        with sqlite3.connect(path) as connection:
            connection.execute("INSERT INTO schema_version VALUES (999)")
        error = yield self.assertFailure(self.open(path).migrate(), SchemaTooNew)
        self.assertIn("999", str(error))
        with sqlite3.connect(path) as connection:
            self.assertEqual(connection.execute("SELECT MAX(version) FROM schema_version").fetchone(), (999,))

    @inlineCallbacks
    def test_upgrade_applies_only_newer_files(self) -> Any:
        """Starting against an older schema applies just the files after its version."""
        path = os.path.join(os.path.abspath(self.mktemp()), "pt.sqlite")
        yield self.open(path).migrate()
        extra = schema_files() + [(schema_files()[-1][0] + 1, "CREATE TABLE upgrade_marker (x INTEGER);")]
        self.patch(database_module, "schema_files", lambda dialect: extra)
        version = yield self.open(path).migrate()
        self.assertEqual(version, extra[-1][0])
        with sqlite3.connect(path) as connection:
            connection.execute("SELECT x FROM upgrade_marker")

    @inlineCallbacks
    def test_constraints(self) -> Any:
        """The schema refuses negative cash, negative positions and a second trade for one order."""
        path = os.path.join(os.path.abspath(self.mktemp()), "pt.sqlite")
        db = self.open(path)
        yield db.migrate()
        user = yield db.create_user("alice", "a@example.com", "hash", 100, "t")
        with sqlite3.connect(path) as connection:
            for statement in (
                "UPDATE users SET cash_cents = -1",
                f"INSERT INTO positions VALUES ({user}, 'AAPL', -1)",
                "INSERT INTO users (username, email, password_hash, cash_cents, created_at) "
                "VALUES ('ALICE2', 'a@example.com', 'h', 0, 't')",
            ):
                self.assertRaises(sqlite3.IntegrityError, connection.execute, statement)
            connection.execute(
                f"INSERT INTO orders (user_id, side, symbol, quantity, status, created_at, received_at, "
                f"client_address, worker, settled_at) "
                f"VALUES ({user}, 'buy', 'AAPL', 1, 'filled', 't', 't', 'a', 'w', 't')"
            )
            trade = (
                f"INSERT INTO transactions (user_id, order_id, side, symbol, quantity, price_cents, total_cents, "
                f"cash_after_cents, settled_at) VALUES ({user}, 1, 'buy', 'AAPL', 1, 1, 1, 1, 't')"
            )
            connection.execute(trade)
            self.assertRaises(sqlite3.IntegrityError, connection.execute, trade)


    @inlineCallbacks
    def test_version_6_keeps_every_row(self) -> Any:
        """Schema 6 rebuilds orders and transactions on SQLite without the foreign keys settlement
        writes: every row, id and index stays, the CHECK constraints still hold, and only an
        order's user is still checked."""
        path = os.path.join(os.path.abspath(self.mktemp()), "pt.sqlite")
        older = [(version, script) for version, script in schema_files() if version <= 5]
        tables = ("orders", "transactions")
        self.patch(database_module, "schema_files", lambda dialect: older)
        yield self.open(path).migrate()
        with sqlite3.connect(path) as connection:
            connection.execute(
                "INSERT INTO users (id, username, email, password_hash, cash_cents, created_at) "
                "VALUES (7, 'alice', 'a@example.com', 'h', 100, 't')"
            )
            connection.execute("INSERT INTO ticks (id, retrieved_at) VALUES (3, 't')")
            connection.execute(
                "INSERT INTO orders (id, user_id, side, symbol, quantity, status, created_at, received_at, "
                "client_address, worker, tick_id, price_cents, settled_at, client_order_id) VALUES "
                "(41, 7, 'buy', 'KO', 2, 'filled', 't', 't', 'a', 'w', 3, 50, 't', 'c-1'), "
                "(42, 7, 'sell', 'KO', 1, 'queued', 't', 't', 'a', 'w', NULL, NULL, NULL, NULL)"
            )
            connection.execute(
                "INSERT INTO transactions (id, user_id, order_id, side, symbol, quantity, price_cents, total_cents, "
                "cash_after_cents, settled_at) VALUES (5, 7, 41, 'buy', 'KO', 2, 50, 100, 0, 't')"
            )
            before = [connection.execute(f"SELECT * FROM {t} ORDER BY id").fetchall() for t in tables]
        self.patch(database_module, "schema_files", schema_files)
        version = yield self.open(path).migrate()
        self.assertEqual(version, schema_files()[-1][0])
        with sqlite3.connect(path) as connection:
            after = [connection.execute(f"SELECT * FROM {t} ORDER BY id").fetchall() for t in tables]
            self.assertEqual(after, before)
            indexes = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
            self.assertLessEqual(
                {"orders_queued", "orders_user", "orders_client_order_id", "transactions_user"}, indexes
            )
            keys = [(row[2], row[3]) for row in connection.execute("PRAGMA foreign_key_list(orders)")]
            self.assertEqual(keys, [("users", "user_id")])
            self.assertEqual(connection.execute("PRAGMA foreign_key_list(transactions)").fetchall(), [])
            self.assertEqual(connection.execute("PRAGMA integrity_check").fetchall(), [("ok",)])
            for statement in (
                "UPDATE orders SET status = 'filled' WHERE id = 42",  # settled without a time
                "INSERT INTO orders (user_id, side, symbol, quantity, status, created_at, received_at, "
                "client_address, worker, client_order_id) "
                "VALUES (7, 'buy', 'KO', 1, 'queued', 't', 't', 'a', 'w', 'c-1')",  # a name taken
                "INSERT INTO transactions (user_id, order_id, side, symbol, quantity, price_cents, total_cents, "
                "cash_after_cents, settled_at) VALUES (7, 41, 'buy', 'KO', 1, 1, 1, 1, 't')",  # a second trade
                "UPDATE transactions SET cash_after_cents = -1",
            ):
                self.assertRaises(sqlite3.IntegrityError, connection.execute, statement)


class SQLitePragmaTests(TestCase):
    """The SQLite connection is set up for the workload: WAL, a page cache and a checkpoint size."""

    @inlineCallbacks
    def test_pragmas(self) -> Any:
        """The configured cache (in MiB) and checkpoint size (in pages) are what the connection uses."""
        data = os.path.abspath(self.mktemp())
        database = Database.open("sqlite:///pt.sqlite", data, sqlite_cache_mib=64, sqlite_wal_autocheckpoint=2000)
        self.addCleanup(database.close)

        def pragmas(txn: Any) -> list:
            found = []
            for name in ("journal_mode", "synchronous", "cache_size", "wal_autocheckpoint", "journal_size_limit"):
                txn.execute(f"PRAGMA {name}")
                found.append(txn.fetchone()[0])
            return found

        found = yield database._run(pragmas)
        self.assertEqual(found, ["wal", 2, -64 * 1024, 2000, 2000 * 4096])

    @inlineCallbacks
    def test_defaults(self) -> Any:
        """By default the cache is 256 MiB and the log is checkpointed every 16,000 pages."""
        database = Database.sqlite(os.path.join(os.path.abspath(self.mktemp()), "pt.sqlite"))
        self.addCleanup(database.close)

        def pragmas(txn: Any) -> list:
            txn.execute("PRAGMA cache_size")
            cache = txn.fetchone()[0]
            txn.execute("PRAGMA wal_autocheckpoint")
            return [cache, txn.fetchone()[0]]

        found = yield database._run(pragmas)
        self.assertEqual(found, [-256 * 1024, 16_000])


class OrderInsertCostTests(TestCase):
    """The work of storing a batch of named orders grows with the batch, not with users times names."""

    def test_named_orders_looked_up_by_pair(self) -> None:
        """A batch of 1,000 named orders from 1,000 users, over 1,000 stored ones: SQLite runs a bounded
        number of instructions (counted, not timed); looking names up per user times name ran millions."""
        path = os.path.join(os.path.abspath(self.mktemp()) + ".sqlite")
        database, pool = make_database(path)
        connection = pool.connection
        users = [
            connection.execute(
                "INSERT INTO users (username, email, password_hash, cash_cents, created_at) VALUES (?, ?, 'h', ?, 't') "
                "RETURNING id",
                (f"u{n}", f"u{n}@example.com", 10**9),
            ).fetchone()[0]
            for n in range(1000)
        ]
        connection.commit()
        prices = {"KO": 6_000}

        def batch(tag: str) -> list[NewOrder]:
            return [NewOrder(u, f"u{n}", "buy", "KO", 1, "t", "a", "w", f"{tag}{n}") for n, u in enumerate(users)]

        self.successResultOf(database.queue_orders(batch("a"), prices, refuse_reason, "t"))
        steps = [0]

        def count() -> int:
            steps[0] += 1
            return 0

        connection.set_progress_handler(count, 1000)
        results, _ = self.successResultOf(database.queue_orders(batch("b"), prices, refuse_reason, "t"))
        connection.set_progress_handler(None, 0)
        self.assertEqual(len([r for r in results if isinstance(r, int)]), 1000)
        self.assertLess(steps[0] * 1000, 1_000_000, f"{steps[0] * 1000} SQLite instructions for 1,000 orders")


class _Conflict(Exception):
    """Stands for a serialization failure."""


class _FlakyPool:
    """Fails the first ``conflicts`` interactions with `_Conflict`, then runs them on a real SQLite file."""

    def __init__(self, path: str, conflicts: int) -> None:
        self.pool = SynchronousPool(path)
        self.conflicts = conflicts
        self.attempts = 0

    def runInteraction(self, interaction: Any, *args: Any) -> Any:
        self.attempts += 1
        if self.attempts <= self.conflicts:
            return fail(_Conflict())
        return self.pool.runInteraction(interaction, *args)


class RetryTests(TestCase):
    """Transactions that lose a serialization conflict are run again, a bounded number of times,
    each after a short random pause on the injected clock."""

    def database(self, conflicts: int) -> tuple[Database, _FlakyPool]:
        pool = _FlakyPool(os.path.join(os.path.abspath(self.mktemp()) + ".sqlite"), conflicts)
        dialect = attr.evolve(SQLITE, retry_errors=(_Conflict,))
        self.clock = Clock()
        return Database(pool, dialect, self.clock), pool

    def settled(self, d: Any) -> Any:
        """``d`` once every pause it waits for has passed."""
        for _ in range(MAX_RETRIES):
            self.clock.advance(RETRY_BACKOFF_MAX)
        return d

    def test_retried_until_it_succeeds(self) -> None:
        """A transaction that conflicts twice is run a third time and its result delivered."""
        database, pool = self.database(conflicts=2)
        version = self.successResultOf(self.settled(database.migrate()))
        self.assertEqual((version, pool.attempts), (schema_files()[-1][0], 3))

    def test_gives_up(self) -> None:
        """Endless conflicts end in the failure after MAX_RETRIES attempts."""
        database, pool = self.database(conflicts=10_000)
        self.failureResultOf(self.settled(database.migrate()), _Conflict)
        self.assertEqual(pool.attempts, MAX_RETRIES)

    def test_retry_waits(self) -> None:
        """A retry is not run at once (transactions that just conflicted would meet again) but after
        a pause on the clock, with no thread waiting meanwhile."""
        database, pool = self.database(conflicts=1)
        d = database.migrate()
        self.assertNoResult(d)
        self.assertEqual(pool.attempts, 1)
        [pause] = self.clock.getDelayedCalls()
        self.assertLessEqual(pause.getTime(), RETRY_BACKOFF)
        self.clock.advance(RETRY_BACKOFF)
        self.assertEqual(pool.attempts, 2)
        self.successResultOf(d)

    def test_pauses_random_and_bounded(self) -> None:
        """Pauses are random below a bound that doubles with each conflict lost, up to RETRY_BACKOFF_MAX."""
        for tries in range(1, MAX_RETRIES):
            bound = min(RETRY_BACKOFF_MAX, RETRY_BACKOFF * 2 ** (tries - 1))
            pauses = {retry_delay(tries) for _ in range(50)}
            self.assertTrue(all(0 <= pause <= bound for pause in pauses), (tries, pauses))
            self.assertGreater(len(pauses), 1)

    def test_retry_starts_from_clean_account_states(self) -> None:
        """A retried order commit does not count the reservations of its rolled-back attempt."""
        database, pool = self.database(conflicts=0)
        self.successResultOf(database.migrate())
        user = self.successResultOf(database.create_user("alice", "a@example.com", "h", 10_000, "t"))
        known = {user: AccountState(cash_cents=10_000, holdings={})}
        order = NewOrder(user, "alice", "buy", "AAPL", 6, "t", "a", "w")
        pool.conflicts, pool.attempts = pool.attempts + 1, pool.attempts  # the next attempt conflicts
        results, states = self.successResultOf(
            self.settled(database.queue_orders([order], {"AAPL": 1_000}, refuse_reason, "t", known))
        )
        self.assertIsInstance(results[0], int)
        self.assertEqual(states[user].queued_buy_cents, 6_000)
        self.assertEqual(known[user].queued_buy_cents, 0)  # the caller's state is left alone
