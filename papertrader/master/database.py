"""Database management (spec 3.1.2): the schema and every SQL statement, in one place.

All work runs through ``twisted.enterprise.adbapi`` so it happens in the
pool's threads, never on the reactor.  Each public method is one transaction,
except `settle_queue` (and `settle_tick`), which settles a tick's queue in
chunks: one transaction per chunk of at most ``chunk_orders`` orders.

Settling in chunks (DESIGN): a tick is first recorded with its prices and the
highest id of the orders it settles -- those queued and created no later than
the tick, at that moment -- in one transaction (`begin_tick`).  Each chunk
then settles the next orders among those, at the tick's prices, and commits
their statuses, the trades, cash and positions together (`settle_chunk`); the
last one marks the tick settled.  Between chunks, order inserts run: the
orders they store have higher ids (order writers run one at a time), so they
belong to the next tick, and acknowledging them never waits for a whole
settlement.  A tick left unsettled -- the master was killed mid-way, or a chunk
failed -- is finished at its own prices and time before another tick may be
recorded (`unsettled_ticks`, and `begin_tick` refuses with `TickUnsettled`).
Every order is settled exactly once: a chunk only takes orders still queued,
and its writes commit or vanish together.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import random
import re
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import attr
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from papertrader.errors import DataFailed, RegisterFailed, WorkerExists
from papertrader.master.market import BAR_SECONDS, BoardPrice
from papertrader.master.registration import RegisteredWorker
from papertrader.master.trading import (
    BUY,
    AccountState,
    ClientOrderIdReused,
    NewOrder,
    QueuedOrder,
    QueueOutcome,
    Settlement,
)
from papertrader.paging import Page, encode_cursor, page_count

# NNN_name.sql serves every database; NNN_name.sqlite.sql or NNN_name.postgresql.sql one of them
# (where one script cannot serve both: each then has its own file of that version).
_SCHEMA_FILE = re.compile(r"^(\d{3})_[a-z0-9_]+(?:\.(sqlite|postgresql))?\.sql$")
# The PostgreSQL advisory lock registrations take turns under (any number no other lock uses).
_REGISTRATION_LOCK = 0x70745F7573657273  # "pt_users"
# Retries of a transaction that lost a serialization conflict (PostgreSQL).
MAX_RETRIES = 10
# Before retry n a transaction waits a random time of up to RETRY_BACKOFF * 2 ** (n - 1) seconds, at most
# RETRY_BACKOFF_MAX: run again at once, transactions that conflicted kept meeting each other again.
RETRY_BACKOFF = 0.002
RETRY_BACKOFF_MAX = 0.1
# Orders settled per transaction: order inserts wait at most about one chunk.
CHUNK_ORDERS = 10_000
# SQLite's page cache per connection (the default, 2 MiB, makes settling a
# queue of 100,000 orders or more grow faster than linearly).
SQLITE_CACHE_MIB = 256
# SQLite checkpoints its write-ahead log into the database after a commit that
# leaves this many pages (4 KiB) in it; the commit waits for the checkpoint.  A
# chunk of a large settlement dirties thousands of pages: with SQLite's default
# (1,000) nearly every chunk waited for one; with this, one every few chunks.
SQLITE_WAL_AUTOCHECKPOINT = 16_000
# Rows per multi-row statement on SQLite (it binds at most 32,766 values).
_SQLITE_ROWS_PER_STATEMENT = 500


class SchemaTooNew(Exception):
    """The database was written by a newer PaperTrader than this one."""


class DatabaseURLError(ValueError):
    """A ``database`` setting that names no supported database."""


class TickUnsettled(Exception):
    """A new tick was to be recorded while an earlier one is not settled yet: finish that one first."""


def schema_files(dialect: str = "sqlite") -> list[tuple[int, str]]:
    """The versioned schema scripts shipped with the package for the database named ``dialect``
    ("sqlite" or "postgresql"), in order."""
    folder = importlib.resources.files("papertrader.master.schema")
    found: dict[int, tuple[str, str]] = {}
    for entry in folder.iterdir():
        match = _SCHEMA_FILE.match(entry.name)
        if match and match.group(2) in (None, dialect):
            version = int(match.group(1))
            if version in found:
                raise RuntimeError(f"two schema files of version {version}: {found[version][0]} and {entry.name}")
            found[version] = (entry.name, entry.read_text(encoding="utf-8"))
    return [(version, script) for version, (_, script) in sorted(found.items())]


@attr.s(frozen=True, auto_attribs=True)
class Dialect:
    """Everything that differs between the SQL databases, in one place.

    Statements are written once with ``?`` placeholders; schema files use
    ``{identity}`` for generated keys and ``{real}`` for floating columns.
    ``order_writers_lock`` are the statements that open a transaction writing
    orders (queueing, settlement) so that such transactions run one at a time.
    ``registration_settings`` open a transaction that inserts a user (a
    registration).
    ``settlement_settings`` open each settlement chunk's transaction;
    ``outcome_settings`` precede the statement that stores a chunk's outcomes,
    the chunk's last.
    With ``arrays``, bulk statements pass each column as one array parameter
    (``unnest``) and new ids come from the table's sequence; without, they are
    multi-row statements (or ``executemany``) and new ids follow the highest.
    """

    name: str
    placeholder: str
    identity: str
    real: str
    integrity_errors: tuple[type[Exception], ...]
    retry_errors: tuple[type[Exception], ...] = ()
    order_writers_lock: tuple[str, ...] = ()
    registration_settings: tuple[str, ...] = ()
    arrays: bool = False
    settlement_settings: tuple[str, ...] = ()
    outcome_settings: tuple[str, ...] = ()
    # The functions of the smaller and the larger of their arguments.
    least: str = "min"
    greatest: str = "max"

    def sql(self, statement: str) -> str:
        return statement if self.placeholder == "?" else statement.replace("?", self.placeholder)

    def schema_statements(self, script: str) -> list[str]:
        script = script.format(identity=self.identity, real=self.real)
        lines = [line for line in script.splitlines() if not line.lstrip().startswith("--")]
        return [statement.strip() for statement in "\n".join(lines).split(";") if statement.strip()]


# SQLite: the pool has a single connection, so order writers already run one at a time.
SQLITE = Dialect(
    name="sqlite",
    placeholder="?",
    identity="INTEGER PRIMARY KEY",
    real="REAL",
    integrity_errors=(sqlite3.IntegrityError,),
)


def _postgresql_dialect() -> Dialect:
    import psycopg

    return Dialect(
        name="postgresql",
        placeholder="%s",
        identity="BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        real="DOUBLE PRECISION",
        integrity_errors=(psycopg.errors.IntegrityError,),
        retry_errors=(psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected),
        # Serializable transactions that queue orders and one that settles the
        # queue conflict with each other every time, so under a steady stream of
        # orders settlement lost every retry.  This lock (self-conflicting, and
        # conflicting with every row write, but not with plain reads) makes them
        # wait for each other instead.  It must come first: LOCK TABLE takes no
        # snapshot, so the transaction's snapshot is taken once the lock is held
        # and sees everything the previous holder committed.
        order_writers_lock=("LOCK TABLE orders IN SHARE ROW EXCLUSIVE MODE",),
        # Serializable registrations each read the users' name and email indexes and
        # insert into them, so concurrent ones conflicted with each other (and with
        # settlement chunks, which read users and update their cash): in a storm of
        # registrations some lost every retry, and chunks were settled again.  A
        # lock taken first (as for orders) left a few: PostgreSQL releases a
        # transaction's locks before it counts it as committed for serializability,
        # so the next holder could still count as its contemporary.  A registration
        # needs none of it: it inserts one row that nothing else refers to yet, and
        # the unique indexes keep names and emails unique at any isolation level.  So
        # it runs READ COMMITTED, outside the serializability checks: it can lose no
        # conflict and makes no other transaction lose one.  Registrations take
        # turns under a lock of their own (blocking nothing else), so the check
        # before the insert sees every earlier one and names what is taken; each
        # statement's snapshot is taken after it, once the lock is held.
        registration_settings=(
            "SET TRANSACTION ISOLATION LEVEL READ COMMITTED",
            f"SELECT pg_advisory_xact_lock({_REGISTRATION_LOCK})",
        ),
        arrays=True,
        # A chunk joins a few thousand of its rows with whole tables (positions: one row per user
        # and symbol held).  PostgreSQL's default costs choose to hash the whole table, scanning all
        # of it for every chunk (10,000 users: 205,704 positions, 40 ms a chunk for 5,000 orders);
        # looking each row up in the index is what makes a chunk's cost follow its size.
        settlement_settings=("SET LOCAL enable_hashjoin = off", "SET LOCAL enable_mergejoin = off"),
        # The outcomes join a chunk's orders (an id range) with as many outcome rows.  Statistics
        # taken before the queue grew (autovacuum analyzes late) put almost no rows in that range,
        # and without hash joins the plan then read every outcome again for each order: 20 s for
        # a chunk of 10,000, over a minute for 100,000 queued orders.  A hash join is linear
        # whatever the estimates; it is the chunk's last statement, so the setting stays there.
        outcome_settings=("SET LOCAL enable_hashjoin = on",),
        least="LEAST",
        greatest="GREATEST",
    )


class Cursor:
    """A transaction's cursor that speaks the dialect: ``?`` placeholders, ``insert`` returning the id."""

    def __init__(self, transaction: Any, dialect: Dialect) -> None:
        self._transaction = transaction
        self.dialect = dialect

    def execute(self, statement: str, parameters: Sequence[Any] = ()) -> Cursor:
        self._transaction.execute(self.dialect.sql(statement), tuple(parameters))
        return self

    def executemany(self, statement: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._transaction.executemany(self.dialect.sql(statement), rows)

    def insert(self, statement: str, parameters: Sequence[Any]) -> int:
        """Run an INSERT and return the new row's ``id``."""
        self.execute(statement + " RETURNING id", parameters)
        return self.fetchone()[0]

    def fetchone(self) -> Any:
        return self._transaction.fetchone()

    def fetchall(self) -> list[Any]:
        return self._transaction.fetchall()

    @property
    def rowcount(self) -> int:
        return self._transaction.rowcount

    def new_ids(self, table: str, count: int) -> list[int]:
        """``count`` unused ids for rows of ``table``, increasing; the caller holds the order-writers lock."""
        if count == 0:
            return []
        if self.dialect.arrays:
            self.execute(
                f"SELECT nextval(pg_get_serial_sequence('{table}', 'id')) FROM generate_series(1, ?)", (count,)
            )
            return sorted(row[0] for row in self.fetchall())
        self.execute(f"SELECT COALESCE(MAX(id), 0) FROM {table}")
        top = self.fetchone()[0]
        return list(range(top + 1, top + 1 + count))

    def insert_rows(self, table: str, columns: Columns, rows: Sequence[Sequence[Any]], suffix: str = "") -> int:
        """Insert ``rows`` with a few multi-row statements (one on PostgreSQL); the number inserted.

        ``columns`` are (name, SQL type) pairs; ``suffix`` follows the rows (an ON CONFLICT clause).
        """
        if not rows:
            return 0
        names = ", ".join(name for name, _ in columns)
        if self.dialect.arrays:
            self.execute(
                f"INSERT INTO {table} ({names}) SELECT * FROM {_unnest(columns)} {suffix}", _column_arrays(rows)
            )
            return self.rowcount
        mark = "(" + ", ".join("?" * len(columns)) + ")"
        inserted = 0
        for part in _chunks(rows, _SQLITE_ROWS_PER_STATEMENT):
            self.execute(
                f"INSERT INTO {table} ({names}) VALUES {', '.join([mark] * len(part))} {suffix}",
                [value for row in part for value in row],
            )
            inserted += self.rowcount
        return inserted

    def update_rows(self, table: str, key: Columns, columns: Columns, rows: Sequence[Sequence[Any]],
                    where: str = "") -> int:
        """Set ``columns`` of the rows of ``table`` found by ``key``; each row is column values then key
        values.  ``where`` is a further condition (qualify columns with the table's name).  The number updated."""
        if not rows:
            return 0
        extra = f" AND {where}" if where else ""
        if self.dialect.arrays:
            values = ", ".join(f"{name} = k.{name}" for name, _ in columns)
            match = " AND ".join(f"{table}.{name} = k.{name}" for name, _ in key)
            self.execute(
                f"UPDATE {table} SET {values} FROM {_unnest((*columns, *key))} WHERE {match}{extra}",
                _column_arrays(rows),
            )
            return self.rowcount
        values = ", ".join(f"{name} = ?" for name, _ in columns)
        match = " AND ".join(f"{name} = ?" for name, _ in key)
        self.executemany(f"UPDATE {table} SET {values} WHERE {match}{extra}", rows)
        return self.rowcount

    def delete_rows(self, table: str, key: Columns, rows: Sequence[Sequence[Any]]) -> None:
        """Delete the rows of ``table`` whose ``key`` columns equal one of ``rows``."""
        if not rows:
            return
        if self.dialect.arrays:
            match = " AND ".join(f"{table}.{name} = k.{name}" for name, _ in key)
            self.execute(f"DELETE FROM {table} USING {_unnest(key)} WHERE {match}", _column_arrays(rows))
            return
        self.executemany(f"DELETE FROM {table} WHERE {' AND '.join(f'{name} = ?' for name, _ in key)}", rows)

    def select_joined(self, statement: str, key: Columns, rows: Sequence[Sequence[Any]]) -> list[Any]:
        """Run ``statement``, whose ``{keys}`` is a table ``k`` of ``rows`` with the ``key`` columns, and
        return every row it selects (in several statements on SQLite)."""
        if not rows:
            return []
        if self.dialect.arrays:
            self.execute(statement.format(keys=_unnest(key)), _column_arrays(rows))
            return self.fetchall()
        names = ", ".join(f"column{n + 1} AS {name}" for n, (name, _) in enumerate(key))
        mark = "(" + ", ".join("?" * len(key)) + ")"
        found = []
        for part in _chunks(rows, _SQLITE_ROWS_PER_STATEMENT):
            source = f"(SELECT {names} FROM (VALUES {', '.join([mark] * len(part))})) AS k"
            self.execute(statement.format(keys=source), [value for row in part for value in row])
            found.extend(self.fetchall())
        return found


# (column name, PostgreSQL type) pairs, for the bulk statements of `Cursor`.
Columns = Sequence[tuple[str, str]]

_ID: Columns = (("id", "bigint"),)
_ORDER_COLUMNS: Columns = (
    ("id", "bigint"),
    ("user_id", "bigint"),
    ("side", "text"),
    ("symbol", "text"),
    ("quantity", "bigint"),
    ("status", "text"),
    ("created_at", "text"),
    ("received_at", "text"),
    ("client_address", "text"),
    ("worker", "text"),
    ("client_order_id", "text"),
)
_ORDER_NAME: Columns = (("user_id", "bigint"), ("client_order_id", "text"))
_ORDER_NAME_CONFLICT = "ON CONFLICT (user_id, client_order_id) WHERE client_order_id IS NOT NULL DO NOTHING"
_SETTLED_ORDER: Columns = (
    ("status", "text"),
    ("reason", "text"),
    ("tick_id", "bigint"),
    ("price_cents", "bigint"),
    ("settled_at", "text"),
)
_OUTCOME: Columns = (
    ("id", "bigint"),
    ("status", "text"),
    ("reason", "text"),
    ("price_cents", "bigint"),
    ("total_cents", "bigint"),
    ("cash_after_cents", "bigint"),
)
_POSITION_KEY: Columns = (("user_id", "bigint"), ("symbol", "text"))
_POSITION: Columns = (*_POSITION_KEY, ("quantity", "bigint"))
_PRICE: Columns = (("tick_id", "bigint"), ("symbol", "text"), ("price_cents", "bigint"), ("quoted_at", "bigint"))
_BAR: Columns = (
    ("symbol", "text"),
    ("bar_seconds", "integer"),
    ("start_at", "bigint"),
    ("open_cents", "bigint"),
    ("high_cents", "bigint"),
    ("low_cents", "bigint"),
    ("close_cents", "bigint"),
    ("open_at", "bigint"),
    ("close_at", "bigint"),
    ("first_tick", "bigint"),
    ("last_tick", "bigint"),
)
_LATEST: Columns = (
    ("symbol", "text"),
    ("price_cents", "bigint"),
    ("quoted_at", "bigint"),
    ("tick_id", "bigint"),
    ("retrieved_at", "text"),
)
_TRADE: Columns = (
    ("user_id", "bigint"),
    ("order_id", "bigint"),
    ("side", "text"),
    ("symbol", "text"),
    ("quantity", "bigint"),
    ("price_cents", "bigint"),
    ("total_cents", "bigint"),
    ("cash_after_cents", "bigint"),
    ("settled_at", "text"),
)


def _unnest(columns: Columns) -> str:
    """A PostgreSQL table ``k`` of the ``columns``, each passed as one array parameter.

    The arrays travel in binary (``%b``): dumping a long array as text costs
    psycopg two to three times as much.
    """
    arrays = ", ".join(f"%b::{kind}[]" for _, kind in columns)
    return f"unnest({arrays}) AS k({', '.join(name for name, _ in columns)})"


def _column_arrays(rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
    return [list(column) for column in zip(*rows)]


# What a user's queued orders claim, by side and symbol (SQLite: one user at a time, in-process).
QUEUED_CLAIMS = (
    "SELECT side, symbol, SUM(quantity) FROM orders WHERE user_id = ? AND id >= ? AND status = 'queued' "
    "GROUP BY side, symbol"
)


def queued_claims_statement(oldest_queued: int) -> str:
    """PostgreSQL's statement for what the queued orders of the users of ``{keys}`` claim, by user,
    side and symbol: each user's orders from ``oldest_queued`` on (orders_user), one user after the
    other (LATERAL), then the queued ones among them.  Asked with the status test beside the others,
    PostgreSQL with statistics taken before the queue grew chose the index of queued orders and read
    the whole queue for each user (100,000 queued: 11.6 ms instead of 0.4 ms, with the order
    writers' lock held); OFFSET 0 keeps that test out of the index scan."""
    return (
        "SELECT k.user_id, c.side, c.symbol, c.total FROM {keys} CROSS JOIN LATERAL ("
        "SELECT side, symbol, SUM(quantity) AS total FROM (SELECT side, symbol, quantity, status FROM orders "
        f"WHERE user_id = k.user_id AND id >= {int(oldest_queued)} OFFSET 0) mine "
        "WHERE status = 'queued' GROUP BY side, symbol) c"
    )


def outcomes_statement(first: int, last: int) -> str:
    """PostgreSQL's one statement storing a chunk's outcomes (orders ``first`` to ``last``): it
    settles the orders still queued and makes the trades from them, so only the outcomes travel
    (psycopg dumps long arrays slowly); parameters: the `_OUTCOME` arrays, tick id, time, time."""
    return (
        f"WITH k AS (SELECT * FROM {_unnest(_OUTCOME)}), "
        "settled AS (UPDATE orders SET status = k.status, reason = k.reason, tick_id = ?, "
        "price_cents = k.price_cents, settled_at = ? FROM k WHERE orders.id = k.id "
        f"AND orders.status = 'queued' AND orders.id BETWEEN {first} AND {last} "
        "RETURNING orders.id, orders.user_id, orders.side, orders.symbol, orders.quantity, k.status, "
        "k.price_cents, k.total_cents, k.cash_after_cents), "
        "trades AS (INSERT INTO transactions (user_id, order_id, side, symbol, quantity, price_cents, "
        "total_cents, cash_after_cents, settled_at) SELECT user_id, id, side, symbol, quantity, price_cents, "
        "total_cents, cash_after_cents, ? FROM settled WHERE status = 'filled' ORDER BY id RETURNING 1) "
        "SELECT (SELECT COUNT(*) FROM settled), (SELECT COUNT(*) FROM trades)"
    )


@attr.s(frozen=True, auto_attribs=True)
class OpenTick:
    """A recorded tick whose queue is being settled: its prices, its time, and which orders it settles.

    It settles the orders with ids up to ``through_order_id`` (None: none)
    that were created no later than ``as_of``; ``orders`` is how many were
    still queued when this was read.
    """

    tick_id: int
    as_of: str
    prices: dict[str, int]
    through_order_id: int | None
    orders: int
    # The market time of each price (epoch seconds).
    quoted_at: dict[str, int] = attr.ib(factory=dict)


@attr.s(frozen=True, auto_attribs=True)
class SettledChunk:
    """One committed chunk of a tick's settlement."""

    settlements: list[Settlement]
    last_order_id: int
    done: bool


@attr.s(frozen=True, auto_attribs=True)
class HistoryBar:
    """One OHLC bar of a price history: its start (epoch seconds) and its prices."""

    start: int
    open_cents: int
    high_cents: int
    low_cents: int
    close_cents: int


@attr.s(frozen=True, auto_attribs=True)
class HistoryPage:
    """A page of a price history reading pinned at ``tick`` and the market time ``latest`` (None:
    no history); ``after`` is the start of its last bar when a page follows (the next position)."""

    bars: list[HistoryBar]
    page: int
    pages: int
    tick: int
    latest: int | None
    after: int | None


@attr.s(frozen=True, auto_attribs=True)
class UserRecord:
    """What login needs of a user."""

    user_id: int
    username: str
    password_hash: str


@attr.s(frozen=True, auto_attribs=True)
class SessionRecord:
    """A stored session.

    ``last_used_at`` and ``remember`` are None for sessions stored before
    schema version 4.
    """

    user_id: int
    username: str
    expires_at: float
    last_used_at: float | None = None
    remember: bool | None = None


def _sqlite_connected(
    connection: sqlite3.Connection,
    cache_mib: int = SQLITE_CACHE_MIB,
    wal_autocheckpoint: int = SQLITE_WAL_AUTOCHECKPOINT,
) -> None:
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("PRAGMA foreign_keys=ON")
    connection.execute("PRAGMA busy_timeout=5000")
    # A negative cache_size is in KiB; the cache grows only as pages are used.
    connection.execute(f"PRAGMA cache_size=-{int(cache_mib) * 1024}")
    connection.execute(f"PRAGMA wal_autocheckpoint={int(wal_autocheckpoint)}")
    # Keep at most this much of a write-ahead log file once a checkpoint has reset it.
    connection.execute(f"PRAGMA journal_size_limit={max(int(wal_autocheckpoint), 1024) * 4096}")


def _postgresql_connected(connection: Any) -> None:
    import psycopg

    connection.isolation_level = psycopg.IsolationLevel.SERIALIZABLE


def describe(url: str) -> str:
    """``url`` without its password, for logs and messages."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


class Database:
    """The master's store: accounts, sessions, prices, orders and history."""

    def __init__(self, pool: Any, dialect: Dialect = SQLITE, clock: IReactorTime | None = None) -> None:
        self._pool = pool
        self.dialect = dialect
        self._clock = clock

    @classmethod
    def open(
        cls,
        url: str,
        data_dir: str,
        sqlite_cache_mib: int = SQLITE_CACHE_MIB,
        sqlite_wal_autocheckpoint: int = SQLITE_WAL_AUTOCHECKPOINT,
        clock: IReactorTime | None = None,
    ) -> Database:
        """The database named by ``url``: empty for SQLite in ``data_dir``, ``sqlite:///NAME`` (in
        ``data_dir``), ``sqlite:////ABSOLUTE/PATH`` or ``postgresql://...``; ``clock`` times the
        pauses between retries (the global reactor if None)."""
        if not url or url.startswith("sqlite:"):
            path = "papertrader.sqlite"
            if url:
                # sqlite:///NAME is relative to the data directory, sqlite:////PATH absolute.
                path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else url[len("sqlite:") :]
                if not path:
                    raise DatabaseURLError("sqlite: URL without a file path")
            return cls.sqlite(os.path.join(data_dir, path), sqlite_cache_mib, sqlite_wal_autocheckpoint)
        if url.startswith(("postgresql://", "postgres://")):
            return cls.postgresql(url, clock=clock)
        raise DatabaseURLError(f"unsupported database {describe(url)!r}: use sqlite:///PATH or postgresql://...")

    @classmethod
    def sqlite(
        cls, path: str, cache_mib: int = SQLITE_CACHE_MIB, wal_autocheckpoint: int = SQLITE_WAL_AUTOCHECKPOINT
    ) -> Database:
        """An SQLite database in the file ``path`` (created if missing), with a page cache of
        ``cache_mib`` MiB and a checkpoint once the write-ahead log holds ``wal_autocheckpoint`` pages."""
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        pool = adbapi.ConnectionPool(
            "sqlite3",
            path,
            check_same_thread=False,
            cp_min=1,
            cp_max=1,
            cp_openfun=functools.partial(
                _sqlite_connected, cache_mib=cache_mib, wal_autocheckpoint=wal_autocheckpoint
            ),
        )
        return cls(pool, SQLITE)

    @classmethod
    def postgresql(cls, url: str, connections: int = 4, clock: IReactorTime | None = None) -> Database:
        """A PostgreSQL database; transactions are serializable and retried on conflicts, after a
        pause timed by ``clock`` (the global reactor if None)."""
        pool = adbapi.ConnectionPool(
            "psycopg",
            url,
            cp_min=1,
            cp_max=connections,
            cp_reconnect=True,
            cp_openfun=_postgresql_connected,
            cp_noisy=False,
        )
        return cls(pool, _postgresql_dialect(), clock)

    def close(self) -> None:
        """Stop the pool's threads and close its connections."""
        self._pool.close()

    def _run(self, interaction: Callable[..., Any], *args: Any) -> Deferred:
        """Run ``interaction(cursor, *args)`` as one transaction, retrying serialization conflicts
        after a short random pause (`retry_delay`), on the reactor's clock: no thread waits."""

        def attempt(transaction: Any) -> Any:
            return interaction(Cursor(transaction, self.dialect), *args)

        def retry(failure: Failure, tries: int) -> Any:
            if self.dialect.retry_errors and failure.check(*self.dialect.retry_errors) and tries < MAX_RETRIES:
                again = deferLater(self._reactor(), retry_delay(tries), self._pool.runInteraction, attempt)
                return again.addErrback(retry, tries + 1)
            return failure

        return self._pool.runInteraction(attempt).addErrback(retry, 1)

    def _reactor(self) -> IReactorTime:
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor  # type: ignore[assignment]
        return self._clock  # type: ignore[return-value]

    def _run_locked(self, opening: Sequence[str], interaction: Callable[..., Any], *args: Any) -> Deferred:
        """`_run` for a transaction that first runs the statements ``opening`` (a dialect's locks or settings)."""

        def locked(cursor: Cursor, *args: Any) -> Any:
            for statement in opening:
                cursor.execute(statement)
            return interaction(cursor, *args)

        return self._run(locked, *args)

    def _run_writing_orders(self, interaction: Callable[..., Any], *args: Any) -> Deferred:
        """`_run` for a transaction that writes orders: it first waits for every other one to finish."""
        return self._run_locked(self.dialect.order_writers_lock, interaction, *args)

    # ------------------------------------------------------------ schema

    def migrate(self) -> Deferred[int]:
        """Apply every schema file newer than the database, in one transaction; fires with the version."""
        return self._run(self._migrate)

    @staticmethod
    def _migrate(cursor: Cursor) -> int:
        files = schema_files(cursor.dialect.name)  # package files: read here, in the pool's thread
        if cursor.dialect is SQLITE:
            cursor.execute("BEGIN IMMEDIATE")  # make DDL part of the transaction
        cursor.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        cursor.execute("SELECT MAX(version) FROM schema_version")
        current = cursor.fetchone()[0] or 0
        newest = files[-1][0] if files else 0
        if current > newest:
            raise SchemaTooNew(
                f"the database has schema version {current}, newer than this PaperTrader's ({newest}); "
                "upgrade PaperTrader or point it at another database"
            )
        for version, script in files:
            if version > current:
                for statement in cursor.dialect.schema_statements(script):
                    cursor.execute(statement)
                cursor.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                current = version
        return current

    # ------------------------------------------------------------ accounts

    def create_user(
        self, username: str, email: str, password_hash: str, cash_cents: int, now: str
    ) -> Deferred[int]:
        """Insert a user; RegisterFailed if the username or email is taken.

        On PostgreSQL registrations take turns and run outside the serializability
        checks (``registration_settings``): they never conflict with any transaction.
        """
        return self._run_locked(
            self.dialect.registration_settings, self._create_user, username, email, password_hash, cash_cents, now
        )

    @staticmethod
    def _create_user(txn: Cursor, username: str, email: str, password_hash: str, cash: int, now: str) -> int:
        txn.execute(
            "SELECT lower(username) = lower(?), email = ? FROM users "
            "WHERE lower(username) = lower(?) OR email = ?",
            (username, email, username, email),
        )
        for same_name, _same_email in txn.fetchall():
            if same_name:
                raise RegisterFailed(f"username {username!r} is already taken")
            raise RegisterFailed("an account with that email address already exists")
        try:
            return txn.insert(
                "INSERT INTO users (username, email, password_hash, cash_cents, created_at) VALUES (?, ?, ?, ?, ?)",
                (username, email, password_hash, cash, now),
            )
        except txn.dialect.integrity_errors:
            raise RegisterFailed("username or email is already taken") from None

    def find_user(self, username: str) -> Deferred[UserRecord | None]:
        """The user called ``username`` (any letter case), or None."""
        return self._run(self._find_user, username)

    @staticmethod
    def _find_user(txn: Cursor, username: str) -> UserRecord | None:
        txn.execute(
            "SELECT id, username, password_hash FROM users WHERE lower(username) = lower(?)",
            (username,),
        )
        row = txn.fetchone()
        return UserRecord(*row) if row else None

    def create_session(
        self,
        token_hash: str,
        user_id: int,
        now: float,
        expires_at: float,
        remember: bool = False,
        password_hash: str | None = None,
    ) -> Deferred[bool]:
        """Store a new session; fires with False (storing nothing) if ``password_hash`` is
        given and is no longer the user's, i.e. the password changed since it was checked."""
        return self._run(self._create_session, token_hash, user_id, now, expires_at, remember, password_hash)

    @staticmethod
    def _create_session(
        txn: Cursor,
        token_hash: str,
        user_id: int,
        now: float,
        expires_at: float,
        remember: bool,
        password_hash: str | None,
    ) -> bool:
        if password_hash is not None:
            txn.execute("SELECT password_hash FROM users WHERE id = ?", (user_id,))
            row = txn.fetchone()
            if row is None or row[0] != password_hash:
                return False
        txn.execute(
            "INSERT INTO sessions (token_hash, user_id, created_at, expires_at, last_used_at, remember) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (token_hash, user_id, now, expires_at, now, int(remember)),
        )
        return True

    def find_session(self, token_hash: str) -> Deferred[SessionRecord | None]:
        """The session stored under ``token_hash``, or None."""
        return self._run(self._find_session, token_hash)

    @staticmethod
    def _find_session(txn: Cursor, token_hash: str) -> SessionRecord | None:
        txn.execute(
            "SELECT s.user_id, u.username, s.expires_at, s.last_used_at, s.remember FROM sessions s "
            "JOIN users u ON u.id = s.user_id WHERE s.token_hash = ?",
            (token_hash,),
        )
        row = txn.fetchone()
        if row is None:
            return None
        user_id, username, expires_at, last_used_at, remember = row
        return SessionRecord(user_id, username, expires_at, last_used_at, None if remember is None else bool(remember))

    def record_session_use(self, uses: Sequence[tuple[str, float]]) -> Deferred:
        """Store when each session ``(token_hash, last_used_at)`` was last used (never moving it back)."""
        return self._run(self._record_session_use, list(uses))

    @staticmethod
    def _record_session_use(txn: Cursor, uses: list[tuple[str, float]]) -> None:
        txn.executemany(
            "UPDATE sessions SET last_used_at = ? WHERE token_hash = ? "
            "AND (last_used_at IS NULL OR last_used_at < ?)",
            [(used, token_hash, used) for token_hash, used in uses],
        )

    def delete_session(self, token_hash: str) -> Deferred:
        """Forget a session."""
        return self._run(_execute, "DELETE FROM sessions WHERE token_hash = ?", (token_hash,))

    def delete_user_sessions(self, user_id: int) -> Deferred[list[str]]:
        """Forget every session of the user; fires with the token hashes deleted."""
        return self._run(self._delete_user_sessions, user_id)

    @staticmethod
    def _delete_user_sessions(txn: Cursor, user_id: int) -> list[str]:
        txn.execute("DELETE FROM sessions WHERE user_id = ? RETURNING token_hash", (user_id,))
        return [row[0] for row in txn.fetchall()]

    def delete_expired_sessions(
        self, now: float, idle_since: float | None = None, remember_idle_since: float | None = None
    ) -> Deferred:
        """Forget every session that expired before ``now``, and those last used before
        ``idle_since`` (``remember_idle_since`` for "remember me" sessions)."""
        return self._run(self._delete_expired_sessions, now, idle_since, remember_idle_since)

    @staticmethod
    def _delete_expired_sessions(
        txn: Cursor, now: float, idle_since: float | None, remember_idle_since: float | None
    ) -> None:
        txn.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
        # Sessions from before schema version 4 (remember IS NULL) count as "remember me".
        if idle_since is not None:
            txn.execute("DELETE FROM sessions WHERE remember = 0 AND last_used_at <= ?", (idle_since,))
        if remember_idle_since is not None:
            txn.execute(
                "DELETE FROM sessions WHERE (remember = 1 OR remember IS NULL) AND last_used_at <= ?",
                (remember_idle_since,),
            )

    # ------------------------------------------------------------ registered workers

    _WORKER_COLUMNS = "name, uuid, fingerprint, public_key, networks, enabled, added_at"

    def add_worker(self, worker: RegisteredWorker) -> Deferred[None]:
        """Store a worker's registration; WorkerExists if its name or its key's fingerprint is taken."""
        return self._run(self._add_worker, worker)

    @classmethod
    def _add_worker(cls, txn: Cursor, worker: RegisteredWorker) -> None:
        txn.execute(
            "SELECT name, fingerprint FROM workers WHERE name = ? OR fingerprint = ?", (worker.name, worker.fingerprint)
        )
        for name, _fingerprint in txn.fetchall():
            raise _worker_exists(worker, name)
        try:
            txn.execute(
                f"INSERT INTO workers ({cls._WORKER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", _worker_row(worker)
            )
        except txn.dialect.integrity_errors:
            raise WorkerExists(
                f"a worker named {worker.name!r}, or one with this key, was registered meanwhile"
            ) from None

    def find_worker(self, name: str) -> Deferred[RegisteredWorker | None]:
        """The registration of the worker called ``name``, or None."""
        return self._run(self._find_worker, name)

    @classmethod
    def _find_worker(cls, txn: Cursor, name: str) -> RegisteredWorker | None:
        txn.execute(f"SELECT {cls._WORKER_COLUMNS} FROM workers WHERE name = ?", (name,))
        row = txn.fetchone()
        return None if row is None else _registered_worker(row)

    def list_workers(self) -> Deferred[list[RegisteredWorker]]:
        """Every registered worker, by name."""
        return self._run(self._list_workers)

    @classmethod
    def _list_workers(cls, txn: Cursor) -> list[RegisteredWorker]:
        txn.execute(f"SELECT {cls._WORKER_COLUMNS} FROM workers ORDER BY name")
        return [_registered_worker(row) for row in txn.fetchall()]

    def set_worker_enabled(self, name: str, enabled: bool) -> Deferred[bool]:
        """Enable or disable worker ``name``; fires with False if there is none."""
        return self._run(self._changed, "UPDATE workers SET enabled = ? WHERE name = ?", (int(enabled), name))

    def remove_worker(self, name: str) -> Deferred[bool]:
        """Forget worker ``name``; fires with False if there was none."""
        return self._run(self._changed, "DELETE FROM workers WHERE name = ?", (name,))

    def set_worker_key(self, name: str, fingerprint: str, public_key: str) -> Deferred[bool]:
        """Give worker ``name`` a (new or updated) key; False if there is no such worker, WorkerExists if
        another worker has this key."""
        return self._run(self._set_worker_key, name, fingerprint, public_key)

    @classmethod
    def _set_worker_key(cls, txn: Cursor, name: str, fingerprint: str, public_key: str) -> bool:
        txn.execute("SELECT name FROM workers WHERE fingerprint = ? AND name <> ?", (fingerprint, name))
        row = txn.fetchone()
        if row is not None:
            raise WorkerExists(f"this key is registered to worker {row[0]!r} already")
        return cls._changed(
            txn, "UPDATE workers SET fingerprint = ?, public_key = ? WHERE name = ?", (fingerprint, public_key, name)
        )

    @staticmethod
    def _changed(txn: Cursor, statement: str, parameters: Sequence[Any]) -> bool:
        txn.execute(statement, parameters)
        return txn.rowcount > 0

    # ------------------------------------------------------------ users

    def change_password(self, user_id: int, old_hash: str, new_hash: str) -> Deferred[list[str] | None]:
        """Replace the user's password hash if it is still ``old_hash`` and forget all their
        sessions, in one transaction; fires with the token hashes deleted, or None (nothing
        changed) if the password changed meanwhile."""
        return self._run(self._change_password, user_id, old_hash, new_hash)

    @staticmethod
    def _change_password(txn: Cursor, user_id: int, old_hash: str, new_hash: str) -> list[str] | None:
        txn.execute(
            "UPDATE users SET password_hash = ? WHERE id = ? AND password_hash = ? RETURNING id",
            (new_hash, user_id, old_hash),
        )
        if not txn.fetchall():
            return None
        return Database._delete_user_sessions(txn, user_id)

    # ------------------------------------------------------------ orders

    def queue_orders(
        self,
        orders: list[NewOrder],
        prices: Mapping[str, int],
        refuse_reason: Callable[[AccountState, NewOrder, int], str | None],
        now: str,
        known: Mapping[int, AccountState] | None = None,
    ) -> Deferred[tuple[list[QueueOutcome], dict[int, AccountState]]]:
        """Check and insert a batch of orders in one transaction.

        ``known`` holds account states the caller already has (they are updated
        in place); others are read from the database.  Fires with, per order,
        its new id or the reason it was refused, and every account state used.

        An order whose client order id the account already used (stored
        earlier or earlier in this batch) is not stored again: for the same
        side, symbol and quantity its outcome is the original order's id, with
        nothing reserved again; otherwise it is a `ClientOrderIdReused`.

        The accepted orders are inserted together, with multi-row statements
        and ids chosen beforehand (order writers run one at a time, so the ids
        also follow the order in which batches are stored).
        """
        return self._run_writing_orders(
            self._queue_orders, orders, prices, refuse_reason, now, dict(known or {})
        )

    @staticmethod
    def _queue_orders(
        txn: Cursor,
        orders: list[NewOrder],
        prices: Mapping[str, int],
        refuse_reason: Callable[[AccountState, NewOrder, int], str | None],
        now: str,
        known: dict[int, AccountState],
    ) -> tuple[list[QueueOutcome], dict[int, AccountState]]:
        # States before this batch; every attempt below reserves on copies (and so
        # does a retried transaction: it must not see what a rolled-back one reserved).
        before = {user_id: state.copy() for user_id, state in known.items()}
        named = Database._orders_named(txn, [o for o in orders if o.client_order_id is not None])
        oldest_queued = Database._oldest_queued(txn)
        missing = sorted({order.user_id for order in orders} - before.keys())
        before.update(Database._account_states(txn, missing, prices, oldest_queued))
        for _attempt in range(2):
            results, accounts, rows = Database._plan_orders(
                txn, orders, prices, refuse_reason, now, before, named, oldest_queued
            )
            if txn.insert_rows("orders", _ORDER_COLUMNS, rows, _ORDER_NAME_CONFLICT) == len(rows):
                for user_id, state in before.items():
                    accounts.setdefault(user_id, state)
                return results, accounts
            # A client order id was taken between the look-up and the insert: take
            # back what this attempt stored and plan again knowing every name.
            txn.delete_rows("orders", (("id", "bigint"),), [(row[0],) for row in rows])
            named = Database._orders_named(txn, [o for o in orders if o.client_order_id is not None])
        raise RuntimeError("client order ids of this batch keep being taken while it is stored")

    @staticmethod
    def _plan_orders(
        txn: Cursor,
        orders: list[NewOrder],
        prices: Mapping[str, int],
        refuse_reason: Callable[[AccountState, NewOrder, int], str | None],
        now: str,
        before: dict[int, AccountState],
        named: Mapping[tuple[int, str], tuple[int, str, str, int]],
        oldest_queued: int | None,
    ) -> tuple[list[QueueOutcome], dict[int, AccountState], list[tuple]]:
        """Each order's outcome in batch order, the account states after them, and the rows to insert.

        ``before`` holds the state of every account of the batch before it.
        """
        ids = iter(txn.new_ids("orders", len(orders)))
        named = dict(named)
        accounts: dict[int, AccountState] = {}
        results: list[QueueOutcome] = []
        rows: list[tuple] = []
        for order in orders:
            name = (order.user_id, order.client_order_id)
            if order.client_order_id is not None and name in named:
                results.append(_repeated(order, named[name]))
                continue
            account = accounts.get(order.user_id)
            if account is None:
                account = accounts[order.user_id] = before[order.user_id].copy()
            reason = refuse_reason(account, order, prices[order.symbol])
            if reason is not None:
                results.append(reason)
                continue
            order_id = next(ids)
            rows.append(
                (
                    order_id,
                    order.user_id,
                    order.side,
                    order.symbol,
                    order.quantity,
                    "queued",
                    now,
                    order.received_at,
                    order.client_address,
                    order.worker,
                    order.client_order_id,
                )
            )
            if order.client_order_id is not None:
                named[name] = (order_id, order.side, order.symbol, order.quantity)
            results.append(order_id)
        return results, accounts, rows

    @staticmethod
    def _orders_named(txn: Cursor, orders: list[NewOrder]) -> dict[tuple[int, str], tuple[int, str, str, int]]:
        """The stored orders under the client order ids of ``orders``: (id, side, symbol, quantity) by name.

        Looked up by exact (user, name) pairs: ``user_id IN (...) AND client_order_id IN (...)``
        had SQLite probe every user with every name of a batch.
        """
        pairs = sorted({(o.user_id, o.client_order_id) for o in orders})
        return {
            (user_id, name): (order_id, side, symbol, int(quantity))
            for user_id, name, order_id, side, symbol, quantity in txn.select_joined(
                "SELECT o.user_id, o.client_order_id, o.id, o.side, o.symbol, o.quantity FROM {keys} "
                "JOIN orders o ON o.user_id = k.user_id AND o.client_order_id = k.client_order_id",
                _ORDER_NAME,
                pairs,
            )
        }

    @staticmethod
    def _oldest_queued(txn: Cursor) -> int | None:
        """The lowest id of a queued order (None: none is queued)."""
        txn.execute("SELECT MIN(id) FROM orders WHERE status = 'queued'")
        return txn.fetchone()[0]

    @staticmethod
    def _account_state(
        txn: Cursor, user_id: int, prices: Mapping[str, int], oldest_queued: int | None
    ) -> AccountState:
        """The user's cash and shares, less what their queued orders claim (``oldest_queued``: see
        `_oldest_queued`; the queue settles in id order, so a user's queued orders are among their
        newest, found through their orders by id without an index of queued orders to keep up)."""
        cash, holdings = Database._portfolio(txn, user_id)
        state = AccountState(cash_cents=cash, holdings=holdings)
        if oldest_queued is None:
            return state
        txn.execute(QUEUED_CLAIMS, (user_id, oldest_queued))
        for side, symbol, total in txn.fetchall():
            _claim(state, side, symbol, total, prices)
        return state

    @staticmethod
    def _account_states(
        txn: Cursor, user_ids: list[int], prices: Mapping[str, int], oldest_queued: int | None
    ) -> dict[int, AccountState]:
        """`_account_state` of each of ``user_ids``.  On PostgreSQL in two statements, not two per
        user: each is a round trip, made with the order writers' lock held (settlement chunks wait);
        each user's rows are looked up by index, one user after the other (LATERAL), whatever the
        statistics say.  SQLite reads them one user at a time, in-process."""
        if not txn.dialect.arrays:
            return {user_id: Database._account_state(txn, user_id, prices, oldest_queued) for user_id in user_ids}
        states: dict[int, AccountState] = {}
        user = (("user_id", "bigint"),)
        keys = [(user_id,) for user_id in user_ids]
        for user_id, cash, symbol, quantity in txn.select_joined(
            "SELECT k.user_id, (SELECT cash_cents FROM users WHERE id = k.user_id), p.symbol, p.quantity "
            "FROM {keys} LEFT JOIN LATERAL (SELECT symbol, quantity FROM positions WHERE user_id = k.user_id) p "
            "ON true",
            user,
            keys,
        ):
            if cash is None:
                raise LookupError(f"no user {user_id}")  # as `_account_state` fails (orders come with a session)
            state = states.setdefault(user_id, AccountState(cash_cents=cash, holdings={}))
            if symbol is not None:
                state.holdings[symbol] = quantity
        if oldest_queued is not None and states:
            for user_id, side, symbol, total in txn.select_joined(queued_claims_statement(oldest_queued), user, keys):
                _claim(states[user_id], side, symbol, total, prices)
        return states

    # ------------------------------------------------------------ ticks and settlement

    def begin_tick(
        self, prices: Mapping[str, int], now: str, quoted_at: Mapping[str, int] | None = None
    ) -> Deferred[OpenTick]:
        """Record a price update and which queued orders it settles, in one transaction.

        ``prices`` are the fresh prices retrieved (possibly none: the tick is
        still recorded, and settles nothing), ``quoted_at`` their market times
        (epoch seconds; a symbol without one is at ``now``).  Each is stored,
        with its market time, in the history (`price_history`) and as its
        symbol's latest price (`latest_prices`).

        It settles the orders queued now in a symbol it prices whose creation
        time is not later than ``now`` (instants are sortable text): one placed
        later, or stored after this, waits for the next update, so no order ever
        settles before it was placed or at an update that began before it was
        stored; one in a symbol it does not price (stale) stays queued for a
        later tick that does.  Fails with `TickUnsettled` while an earlier tick
        is not settled.
        """
        retrieved = _epoch(now)
        times = {symbol: (quoted_at or {}).get(symbol, retrieved) for symbol in prices}
        return self._run_writing_orders(self._begin_tick, dict(prices), now, times)

    @staticmethod
    def _begin_tick(txn: Cursor, prices: dict[str, int], now: str, times: dict[str, int]) -> OpenTick:
        txn.execute("SELECT id FROM ticks WHERE settled = 0 ORDER BY id LIMIT 1")
        row = txn.fetchone()
        if row is not None:
            raise TickUnsettled(f"tick {row[0]} is not settled yet")
        tick_id = txn.insert("INSERT INTO ticks (retrieved_at, through_order_id, settled) VALUES (?, NULL, 1)", (now,))
        rows = [(tick_id, symbol, cents, times[symbol]) for symbol, cents in sorted(prices.items())]
        txn.insert_rows("prices", _PRICE, rows)
        # The orders it settles: those queued in the symbols it prices (the tick's own prices).
        txn.execute(
            "SELECT MAX(o.id), COUNT(*) FROM orders o JOIN prices p ON p.tick_id = ? AND p.symbol = o.symbol "
            "WHERE o.status = 'queued' AND o.created_at <= ?",
            (tick_id, now),
        )
        through, count = txn.fetchone()
        if through is not None:
            txn.execute("UPDATE ticks SET through_order_id = ?, settled = 0 WHERE id = ?", (through, tick_id))
        Database._record_history(txn, tick_id, now, rows)
        return OpenTick(tick_id, now, prices, through, int(count), times)

    @staticmethod
    def _record_history(txn: Cursor, tick_id: int, now: str, rows: list[tuple[int, str, int, int]]) -> None:
        """Fold a tick's prices (tick, symbol, cents, market time) into every bar length's bars and
        the latest prices: one upsert of a row per symbol and bar length."""
        if not rows:
            return
        least, greatest = txn.dialect.least, txn.dialect.greatest
        bars = [
            (symbol, seconds, at - at % seconds, cents, cents, cents, cents, at, at, tick_id, tick_id)
            for _, symbol, cents, at in rows
            for seconds in BAR_SECONDS
        ]
        txn.insert_rows(
            "price_bars",
            _BAR,
            bars,
            "ON CONFLICT (symbol, bar_seconds, start_at) DO UPDATE SET "
            "open_cents = CASE WHEN excluded.open_at < price_bars.open_at "
            "THEN excluded.open_cents ELSE price_bars.open_cents END, "
            f"open_at = {least}(price_bars.open_at, excluded.open_at), "
            f"high_cents = {greatest}(price_bars.high_cents, excluded.high_cents), "
            f"low_cents = {least}(price_bars.low_cents, excluded.low_cents), "
            "close_cents = CASE WHEN excluded.close_at >= price_bars.close_at "
            "THEN excluded.close_cents ELSE price_bars.close_cents END, "
            f"close_at = {greatest}(price_bars.close_at, excluded.close_at), "
            "last_tick = excluded.last_tick",
        )
        txn.insert_rows(
            "latest_prices",
            _LATEST,
            [(symbol, cents, at, tick_id, now) for _, symbol, cents, at in rows],
            "ON CONFLICT (symbol) DO UPDATE SET price_cents = excluded.price_cents, quoted_at = excluded.quoted_at, "
            "tick_id = excluded.tick_id, retrieved_at = excluded.retrieved_at",
        )

    def unsettled_ticks(self) -> Deferred[list[OpenTick]]:
        """Every recorded tick whose queue is not settled yet (oldest first), with its own prices.

        ``orders`` counts the orders it still has to settle.
        """
        return self._run(self._unsettled_ticks)

    @staticmethod
    def _unsettled_ticks(txn: Cursor) -> list[OpenTick]:
        txn.execute("SELECT id, retrieved_at, through_order_id FROM ticks WHERE settled = 0 ORDER BY id")
        ticks = []
        for tick_id, as_of, through in txn.fetchall():
            txn.execute("SELECT symbol, price_cents, quoted_at FROM prices WHERE tick_id = ?", (tick_id,))
            rows = txn.fetchall()
            prices = {symbol: cents for symbol, cents, _ in rows}
            times = {symbol: at for symbol, _, at in rows if at is not None}
            txn.execute(
                "SELECT COUNT(*) FROM orders o JOIN prices p ON p.tick_id = ? AND p.symbol = o.symbol "
                "WHERE o.status = 'queued' AND o.id <= ? AND o.created_at <= ?",
                (tick_id, through, as_of),
            )
            ticks.append(OpenTick(tick_id, as_of, prices, through, int(txn.fetchone()[0]), times))
        return ticks

    def settle_chunk(
        self, tick: OpenTick, after: int, limit: int, settle: Callable[..., list[Settlement]]
    ) -> Deferred[SettledChunk]:
        """Settle, in one transaction, at most ``limit`` of ``tick``'s orders still queued with ids
        above ``after``, in id order; the chunk that leaves none marks the tick settled."""
        return self._run_writing_orders(self._settle_chunk, tick, after, limit, settle)

    @staticmethod
    def _settle_chunk(
        txn: Cursor, tick: OpenTick, after: int, limit: int, settle: Callable[..., list[Settlement]]
    ) -> SettledChunk:
        for statement in txn.dialect.settlement_settings:
            txn.execute(statement)
        rows: list[Any] = []
        if tick.through_order_id is not None:
            # Each order with its user's cash and what the user holds of its symbol: read together,
            # in the same transaction as the writes.  Only orders in the symbols the tick prices:
            # the others (stale symbols) stay queued for a later tick.
            txn.execute(
                "SELECT o.id, o.user_id, u.username, o.side, o.symbol, o.quantity, u.cash_cents, p.quantity "
                "FROM orders o JOIN prices pr ON pr.tick_id = ? AND pr.symbol = o.symbol "
                "JOIN users u ON u.id = o.user_id "
                "LEFT JOIN positions p ON p.user_id = o.user_id AND p.symbol = o.symbol "
                "WHERE o.status = 'queued' AND o.id > ? AND o.id <= ? AND o.created_at <= ? ORDER BY o.id LIMIT ?",
                (tick.tick_id, after, tick.through_order_id, tick.as_of, limit),
            )
            rows = txn.fetchall()
        done = len(rows) < limit or rows[-1][0] == tick.through_order_id
        settlements: list[Settlement] = []
        if rows:
            settlements = Database._settle_orders(txn, tick, rows, settle)
        if done:
            txn.execute("UPDATE ticks SET settled = 1 WHERE id = ?", (tick.tick_id,))
        return SettledChunk(settlements, rows[-1][0] if rows else after, done)

    @staticmethod
    def _settle_orders(
        txn: Cursor, tick: OpenTick, rows: list[Any], settle: Callable[..., list[Settlement]]
    ) -> list[Settlement]:
        """Settle the orders of ``rows`` (see `_settle_chunk`) at the tick's prices and write every
        outcome, trade, cash and position."""
        queued: list[QueuedOrder] = []
        cash: dict[int, int] = {}
        holdings: dict[tuple[int, str], int] = {}
        for order_id, user_id, username, side, symbol, quantity, cash_cents, held in rows:
            queued.append(QueuedOrder(order_id, user_id, username, side, symbol, quantity))
            cash[user_id] = cash_cents
            if held is not None:
                holdings[(user_id, symbol)] = held
        cash_before = dict(cash)
        holdings_before = dict(holdings)
        settlements = settle(queued, cash, holdings, tick.prices)

        txn.update_rows(
            "users",
            _ID,
            (("cash_cents", "bigint"),),
            [(c, u) for u, c in cash.items() if cash_before[u] != c],
        )
        changed = [(key, q) for key, q in holdings.items() if holdings_before.get(key) != q]
        txn.update_rows(
            "positions",
            _POSITION_KEY,
            (("quantity", "bigint"),),
            [(q, *key) for key, q in changed if q > 0 and key in holdings_before],
        )
        txn.insert_rows(
            "positions", _POSITION, [(*key, q) for key, q in changed if q > 0 and key not in holdings_before]
        )
        txn.delete_rows("positions", _POSITION_KEY, [key for key, q in changed if q == 0 and key in holdings_before])
        if settlements:
            Database._write_outcomes(txn, tick, queued, settlements)
        return settlements

    @staticmethod
    def _write_outcomes(txn: Cursor, tick: OpenTick, queued: list[QueuedOrder], settlements: list[Settlement]) -> None:
        """Store each order's outcome and a trade for each fill; every one of the orders must still be queued."""
        now = tick.as_of
        # The id range lets PostgreSQL read just these orders' part of the table.
        first, last = int(queued[0].order_id), int(queued[-1].order_id)
        if txn.dialect.arrays:
            for statement in txn.dialect.outcome_settings:
                txn.execute(statement)
            txn.execute(
                outcomes_statement(first, last),
                (
                    *_column_arrays(
                        [
                            (s.order.order_id, s.status, s.reason, s.price_cents, s.total_cents, s.cash_after_cents)
                            for s in settlements
                        ]
                    ),
                    tick.tick_id,
                    now,
                    now,
                ),
            )
            updated, traded = txn.fetchone()
        else:
            updated = txn.update_rows(
                "orders",
                _ID,
                _SETTLED_ORDER,
                [(s.status, s.reason, tick.tick_id, s.price_cents, now, s.order.order_id) for s in settlements],
                where=f"orders.status = 'queued' AND orders.id BETWEEN {first} AND {last}",
            )
            traded = txn.insert_rows(
                "transactions",
                _TRADE,
                [
                    (
                        s.order.user_id,
                        s.order.order_id,
                        s.order.side,
                        s.order.symbol,
                        s.order.quantity,
                        s.price_cents,
                        s.total_cents,
                        s.cash_after_cents,
                        now,
                    )
                    for s in settlements
                    if s.filled
                ],
            )
        if updated != len(settlements) or traded != sum(1 for s in settlements if s.filled):
            raise RuntimeError(f"{len(settlements) - updated} orders of tick {tick.tick_id} were settled meanwhile")

    @inlineCallbacks
    def settle_queue(
        self,
        tick: OpenTick,
        settle: Callable[..., list[Settlement]],
        chunk_orders: int = CHUNK_ORDERS,
        on_chunk: Callable[[SettledChunk], None] | None = None,
    ) -> Any:
        """Settle the rest of ``tick``'s queue, a chunk (one transaction) at a time; fires with
        every settlement.  ``on_chunk`` is told of each chunk once it is committed."""
        settlements: list[Settlement] = []
        after = 0
        while True:
            chunk = yield self.settle_chunk(tick, after, chunk_orders, settle)
            settlements.extend(chunk.settlements)
            after = chunk.last_order_id
            if on_chunk is not None:
                on_chunk(chunk)
            if chunk.done:
                return settlements

    @inlineCallbacks
    def settle_tick(
        self,
        prices: Mapping[str, int],
        now: str,
        settle: Callable[..., list[Settlement]],
        chunk_orders: int = CHUNK_ORDERS,
    ) -> Any:
        """Record a price update and settle its queue (`begin_tick`, then `settle_queue`);
        fires with the tick's id and every settlement."""
        tick = yield self.begin_tick(prices, now)
        settlements = yield self.settle_queue(tick, settle, chunk_orders)
        return tick.tick_id, settlements

    # ------------------------------------------------------------ reading an account

    def list_orders(self, user_id: int, per_page: int, position: tuple[int, int, int] | None) -> Deferred[Page]:
        """A page of the user's orders, newest first; ``position`` is a decoded cursor (None: the first page)."""
        return self._run(self._list_orders, user_id, per_page, position)

    @staticmethod
    def _list_orders(txn: Cursor, user_id: int, per_page: int, position: tuple[int, int, int] | None) -> Page:
        keys = ("order_id", "side", "symbol", "quantity", "status", "reason", "created_at",
                "settled_at", "price_cents", "client_order_id")
        page = _newest_first_page(txn, "orders", "id, " + ", ".join(keys[1:]), user_id, per_page, position)
        return attr.evolve(page, rows=[_without_nulls(dict(zip(keys, row))) for row in page.rows])

    def portfolio(self, user_id: int) -> Deferred[tuple[int, dict[str, int]]]:
        """The user's cash and share counts."""
        return self._run(self._portfolio, user_id)

    @staticmethod
    def _portfolio(txn: Cursor, user_id: int) -> tuple[int, dict[str, int]]:
        # One statement, not two: on PostgreSQL each is a round trip, and the funds check of an
        # order batch reads one portfolio per user with the order writers' lock held.
        txn.execute(
            "SELECT u.cash_cents, p.symbol, p.quantity FROM users u LEFT JOIN positions p ON p.user_id = u.id "
            "WHERE u.id = ? ORDER BY p.symbol",
            (user_id,),
        )
        rows = txn.fetchall()
        return rows[0][0], {symbol: quantity for _, symbol, quantity in rows if symbol is not None}

    def history(self, user_id: int, per_page: int, position: tuple[int, int, int] | None) -> Deferred[Page]:
        """A page of the user's settled trades, newest first; ``position`` as for `list_orders`."""
        return self._run(self._history, user_id, per_page, position)

    @staticmethod
    def _history(txn: Cursor, user_id: int, per_page: int, position: tuple[int, int, int] | None) -> Page:
        keys = ("order_id", "side", "symbol", "quantity", "price_cents", "total_cents",
                "cash_after_cents", "settled_at")
        page = _newest_first_page(txn, "transactions", "id, " + ", ".join(keys), user_id, per_page, position)
        return attr.evolve(page, rows=[dict(zip(keys, row[1:])) for row in page.rows])

    def latest_prices(self) -> Deferred[tuple[int, str, dict[str, BoardPrice]] | None]:
        """The last recorded tick (id, time) and the latest good price of every symbol (whichever
        tick brought it), to resume the market after a restart; None before the first tick."""
        return self._run(self._latest_prices)

    @staticmethod
    def _latest_prices(txn: Cursor) -> tuple[int, str, dict[str, BoardPrice]] | None:
        txn.execute("SELECT id, retrieved_at FROM ticks ORDER BY id DESC LIMIT 1")
        row = txn.fetchone()
        if row is None:
            return None
        txn.execute("SELECT symbol, price_cents, quoted_at, tick_id, retrieved_at FROM latest_prices")
        latest = {symbol: BoardPrice(cents, at, tick, as_of) for symbol, cents, at, tick, as_of in txn.fetchall()}
        return row[0], row[1], latest

    # ------------------------------------------------------------ price history

    def price_history(
        self,
        symbol: str,
        span: int | None,
        bar_seconds: int,
        per_page: int,
        position: tuple[int, int, int, int] | None,
    ) -> Deferred[HistoryPage]:
        """A page of ``symbol``'s OHLC bars of ``bar_seconds``, oldest first, over the ``span`` seconds
        (None: all) up to its latest market time; ``position`` is a decoded cursor (None: the first page).

        A reading is pinned at the tick recorded last when its first page was
        read, and at the latest market time then: its later pages hold the bars
        as they were at that tick (bars made since are left out; bars changed
        since are rebuilt from the stored prices of that tick and earlier), so
        the pages add up whatever updates arrive meanwhile.  The window is the
        span's whole bars ending with the bar of the latest market time.  A
        position not of a reading of this symbol and bar length: DataFailed.
        """
        return self._run(self._price_history, symbol, span, bar_seconds, per_page, position)

    @staticmethod
    def _price_history(
        txn: Cursor,
        symbol: str,
        span: int | None,
        bar: int,
        per_page: int,
        position: tuple[int, int, int, int] | None,
    ) -> HistoryPage:
        txn.execute("SELECT MAX(id) FROM ticks")
        current = txn.fetchone()[0] or 0
        if position is None:
            tick, page, after = current, 1, None
            # The bar of the latest market time is the one that starts last (bars never overlap).
            txn.execute(
                "SELECT close_at FROM price_bars WHERE symbol = ? AND bar_seconds = ? ORDER BY start_at DESC LIMIT 1",
                (symbol, bar),
            )
            row = txn.fetchone()
            if row is None:
                return HistoryPage([], 1, 1, tick, None, None)
            latest = int(row[0])
        else:
            page, tick, latest, after = position
        last_start = latest - latest % bar
        first_start = last_start - span + bar if span is not None else -(2**62)
        where = "symbol = ? AND bar_seconds = ? AND start_at >= ? AND start_at <= ? AND first_tick <= ?"
        window = (symbol, bar, first_start, last_start, tick)
        txn.execute(f"SELECT COUNT(*) FROM price_bars WHERE {where}", window)
        pages = page_count(int(txn.fetchone()[0]), per_page)
        if after is not None:
            txn.execute(f"SELECT COUNT(*) FROM price_bars WHERE {where} AND start_at <= ?", (*window, after))
            sent = int(txn.fetchone()[0])
            if tick > current or not 2 <= page <= pages or sent != (page - 1) * per_page:
                raise DataFailed("this cursor is not from this price history; read it again from the first page")
        txn.execute(
            "SELECT start_at, open_cents, high_cents, low_cents, close_cents, last_tick FROM price_bars "
            f"WHERE {where} AND start_at > ? ORDER BY start_at LIMIT ?",
            (*window, first_start - 1 if after is None else after, per_page),
        )
        bars = []
        for start, open_cents, high, low, close, last_tick in txn.fetchall():
            if last_tick > tick:
                open_cents, high, low, close = Database._bar_at(txn, symbol, start, bar, tick)
            bars.append(HistoryBar(int(start), int(open_cents), int(high), int(low), int(close)))
        return HistoryPage(bars, page, pages, tick, latest, bars[-1].start if page < pages else None)

    @staticmethod
    def _bar_at(txn: Cursor, symbol: str, start: int, bar: int, tick: int) -> tuple[int, int, int, int]:
        """The bar of ``symbol`` starting at ``start`` as it was at ``tick``, from the stored prices."""
        prices = "FROM prices WHERE symbol = ? AND quoted_at >= ? AND quoted_at < ? AND tick_id <= ?"
        parameters = (symbol, start, start + bar, tick)
        txn.execute(f"SELECT MIN(price_cents), MAX(price_cents) {prices}", parameters)
        low, high = txn.fetchone()
        txn.execute(f"SELECT price_cents {prices} ORDER BY quoted_at, tick_id LIMIT 1", parameters)
        open_cents = txn.fetchone()[0]
        txn.execute(f"SELECT price_cents {prices} ORDER BY quoted_at DESC, tick_id DESC LIMIT 1", parameters)
        close = txn.fetchone()[0]
        return open_cents, high, low, close


def retry_delay(tries: int) -> float:
    """How long to wait, in seconds, before running again a transaction that lost ``tries`` conflicts:
    random (full jitter), so that the ones that met do not meet again, and growing with ``tries``."""
    return random.uniform(0, min(RETRY_BACKOFF_MAX, RETRY_BACKOFF * 2 ** (tries - 1)))


def _claim(state: AccountState, side: str, symbol: str, total: Any, prices: Mapping[str, int]) -> None:
    """Add to ``state`` what a user's queued orders of one side and symbol (``total`` shares) claim."""
    quantity = int(total)  # PostgreSQL sums BIGINT as NUMERIC
    if side == BUY:
        state.queued_buy_cents += quantity * prices.get(symbol, 0)
    else:
        state.queued_sell_shares[symbol] = quantity


def _epoch(instant: str) -> int:
    """The epoch seconds of an ISO 8601 instant (0 for text that is none, as tests' labels)."""
    try:
        return int(datetime.fromisoformat(instant).timestamp())
    except ValueError:
        return 0


def _execute(cursor: Cursor, statement: str, parameters: Sequence[Any]) -> None:
    cursor.execute(statement, parameters)


def _newest_first_page(
    txn: Cursor, table: str, columns: str, user_id: int, per_page: int, position: tuple[int, int, int] | None
) -> Page:
    """A page of the user's rows of ``table``, newest (highest id) first; each row starts with its id.

    A listing holds the rows up to the highest id at its first page, so rows
    added meanwhile never shift its pages.  Its cursor holds that id, the id of
    the last row sent and the next page's number: (top, after, page).  One that
    does not match the user's rows is refused with DataFailed.
    """
    if position is None:
        txn.execute(f"SELECT COUNT(*), MAX(id) FROM {table} WHERE user_id = ?", (user_id,))
        total, top = txn.fetchone()
        top, after, page = top or 0, None, 1
    else:
        top, after, page = position
        txn.execute(
            f"SELECT COUNT(*), SUM(CASE WHEN id >= ? THEN 1 ELSE 0 END) FROM {table} WHERE user_id = ? AND id <= ?",
            (after, user_id, top),
        )
        total, sent = txn.fetchone()
        sent = int(sent or 0)  # PostgreSQL sums as NUMERIC, and to NULL over no rows
        if page < 2 or page > page_count(total, per_page) or after > top or sent != (page - 1) * per_page:
            raise DataFailed("this cursor is not from a listing of yours; list again from the first page")
    if after is None:
        txn.execute(
            f"SELECT {columns} FROM {table} WHERE user_id = ? AND id <= ? ORDER BY id DESC LIMIT ?",
            (user_id, top, per_page),
        )
    else:
        txn.execute(
            f"SELECT {columns} FROM {table} WHERE user_id = ? AND id < ? AND id <= ? ORDER BY id DESC LIMIT ?",
            (user_id, after, top, per_page),
        )
    rows = txn.fetchall()
    pages = page_count(total, per_page)
    next_cursor = encode_cursor(top, rows[-1][0], page + 1) if page < pages else None
    return Page(rows, page, pages, next_cursor)


def _worker_row(worker: RegisteredWorker) -> tuple[Any, ...]:
    return (
        worker.name,
        worker.uuid,
        worker.fingerprint,
        worker.public_key,
        " ".join(worker.networks),
        int(worker.enabled),
        worker.added_at,
    )


def _registered_worker(row: Sequence[Any]) -> RegisteredWorker:
    name, uuid, fingerprint, public_key, networks, enabled, added_at = row
    return RegisteredWorker(name, uuid, fingerprint, public_key, tuple(networks.split()), bool(enabled), added_at)


def _worker_exists(worker: RegisteredWorker, name: str) -> WorkerExists:
    if name == worker.name:
        return WorkerExists(f"a worker named {name!r} is registered already")
    return WorkerExists(f"this key is registered to worker {name!r} already")


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _repeated(order: NewOrder, stored: tuple[int, str, str, int]) -> int | ClientOrderIdReused:
    """The outcome of ``order`` whose client order id names the ``stored`` order (id, side, symbol, quantity)."""
    order_id, side, symbol, quantity = stored
    if order.same_as(side, symbol, quantity):
        return order_id
    return ClientOrderIdReused(
        order_id,
        f"client order id {order.client_order_id!r} was already used for order {order_id} "
        f"({side} {quantity} {symbol}); use a new id for a different order",
    )


def _without_nulls(row: dict) -> dict:
    return {k: v for k, v in row.items() if v is not None}
