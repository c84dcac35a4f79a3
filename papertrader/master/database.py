"""Database management (spec 3.1.2): the schema and every SQL statement, in one place.

All work runs through ``twisted.enterprise.adbapi`` so it happens in the
pool's threads, never on the reactor.  Each public method is one transaction.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import sqlite3
from collections.abc import Callable, Mapping
from typing import Any

import attr
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred

from papertrader.errors import RegisterFailed
from papertrader.master.trading import (
    BUY,
    AccountState,
    NewOrder,
    QueuedOrder,
    Settlement,
)

_SCHEMA_FILE = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


class SchemaTooNew(Exception):
    """The database was written by a newer PaperTrader than this one."""


def schema_files() -> list[tuple[int, str]]:
    """The versioned schema scripts shipped with the package, in order."""
    folder = importlib.resources.files("papertrader.master.schema")
    found = []
    for entry in folder.iterdir():
        match = _SCHEMA_FILE.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text(encoding="utf-8")))
    return sorted(found)


@attr.s(frozen=True, auto_attribs=True)
class UserRecord:
    """What login needs of a user."""

    user_id: int
    username: str
    password_hash: str


@attr.s(frozen=True, auto_attribs=True)
class SessionRecord:
    """A stored session."""

    user_id: int
    username: str
    expires_at: float


def _sqlite_connected(connection: sqlite3.Connection) -> None:
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("PRAGMA foreign_keys=ON")
    connection.execute("PRAGMA busy_timeout=5000")


class Database:
    """The master's store: accounts, sessions, prices, orders and history."""

    def __init__(self, pool: adbapi.ConnectionPool) -> None:
        self._pool = pool

    @classmethod
    def sqlite(cls, path: str) -> Database:
        """An SQLite database in the file ``path`` (created if missing)."""
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        pool = adbapi.ConnectionPool(
            "sqlite3",
            path,
            check_same_thread=False,
            cp_min=1,
            cp_max=1,
            cp_openfun=_sqlite_connected,
        )
        return cls(pool)

    def close(self) -> None:
        """Stop the pool's threads and close its connections."""
        self._pool.close()

    # ------------------------------------------------------------ schema

    def migrate(self) -> Deferred[int]:
        """Apply every schema file newer than the database; fires with the version."""
        return self._pool.runWithConnection(self._migrate, schema_files())

    @staticmethod
    def _migrate(connection: sqlite3.Connection, files: list[tuple[int, str]]) -> int:
        cursor = connection.cursor()
        cursor.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        cursor.execute("SELECT MAX(version) FROM schema_version")
        current = cursor.fetchone()[0] or 0
        newest = files[-1][0] if files else 0
        if current > newest:
            raise SchemaTooNew(
                f"database schema version {current} is newer than this PaperTrader's ({newest})"
            )
        for version, script in files:
            if version > current:
                connection.executescript(
                    "BEGIN;\n" + script + f"\nINSERT INTO schema_version VALUES ({version});\nCOMMIT;"
                )
                current = version
        connection.commit()
        return current

    # ------------------------------------------------------------ accounts

    def create_user(
        self, username: str, email: str, password_hash: str, cash_cents: int, now: str
    ) -> Deferred[int]:
        """Insert a user; RegisterFailed if the username or email is taken."""
        return self._pool.runInteraction(
            self._create_user, username, email, password_hash, cash_cents, now
        )

    @staticmethod
    def _create_user(txn: Any, username: str, email: str, password_hash: str, cash: int, now: str) -> int:
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
            txn.execute(
                "INSERT INTO users (username, email, password_hash, cash_cents, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (username, email, password_hash, cash, now),
            )
        except sqlite3.IntegrityError:
            raise RegisterFailed("username or email is already taken") from None
        return txn.lastrowid

    def find_user(self, username: str) -> Deferred[UserRecord | None]:
        """The user called ``username`` (any letter case), or None."""
        return self._pool.runInteraction(self._find_user, username)

    @staticmethod
    def _find_user(txn: Any, username: str) -> UserRecord | None:
        txn.execute(
            "SELECT id, username, password_hash FROM users WHERE lower(username) = lower(?)",
            (username,),
        )
        row = txn.fetchone()
        return UserRecord(*row) if row else None

    def create_session(self, token_hash: str, user_id: int, now: float, expires_at: float) -> Deferred:
        """Store a new session."""
        return self._pool.runOperation(
            "INSERT INTO sessions (token_hash, user_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
            (token_hash, user_id, now, expires_at),
        )

    def find_session(self, token_hash: str) -> Deferred[SessionRecord | None]:
        """The session stored under ``token_hash``, or None."""
        return self._pool.runInteraction(self._find_session, token_hash)

    @staticmethod
    def _find_session(txn: Any, token_hash: str) -> SessionRecord | None:
        txn.execute(
            "SELECT s.user_id, u.username, s.expires_at FROM sessions s "
            "JOIN users u ON u.id = s.user_id WHERE s.token_hash = ?",
            (token_hash,),
        )
        row = txn.fetchone()
        return SessionRecord(*row) if row else None

    def delete_session(self, token_hash: str) -> Deferred:
        """Forget a session."""
        return self._pool.runOperation("DELETE FROM sessions WHERE token_hash = ?", (token_hash,))

    def delete_expired_sessions(self, now: float) -> Deferred:
        """Forget every session that expired before ``now``."""
        return self._pool.runOperation("DELETE FROM sessions WHERE expires_at <= ?", (now,))

    # ------------------------------------------------------------ orders

    def queue_orders(
        self,
        orders: list[NewOrder],
        prices: Mapping[str, int],
        refuse_reason: Callable[[AccountState, NewOrder, int], str | None],
        now: str,
    ) -> Deferred[list[int | str]]:
        """Check and insert a batch of orders in one transaction.

        Fires with, per order, its new id or the reason it was refused.
        """
        return self._pool.runInteraction(self._queue_orders, orders, prices, refuse_reason, now)

    @staticmethod
    def _queue_orders(
        txn: Any,
        orders: list[NewOrder],
        prices: Mapping[str, int],
        refuse_reason: Callable[[AccountState, NewOrder, int], str | None],
        now: str,
    ) -> list[int | str]:
        accounts: dict[int, AccountState] = {}
        results: list[int | str] = []
        for order in orders:
            account = accounts.get(order.user_id)
            if account is None:
                account = accounts[order.user_id] = Database._account_state(
                    txn, order.user_id, prices
                )
            reason = refuse_reason(account, order, prices[order.symbol])
            if reason is not None:
                results.append(reason)
                continue
            txn.execute(
                "INSERT INTO orders (user_id, side, symbol, quantity, status, created_at, "
                "received_at, client_address, worker) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
                (
                    order.user_id,
                    order.side,
                    order.symbol,
                    order.quantity,
                    now,
                    order.received_at,
                    order.client_address,
                    order.worker,
                ),
            )
            results.append(txn.lastrowid)
        return results

    @staticmethod
    def _account_state(txn: Any, user_id: int, prices: Mapping[str, int]) -> AccountState:
        txn.execute("SELECT cash_cents FROM users WHERE id = ?", (user_id,))
        (cash,) = txn.fetchone()
        txn.execute("SELECT symbol, quantity FROM positions WHERE user_id = ?", (user_id,))
        state = AccountState(cash_cents=cash, holdings=dict(txn.fetchall()))
        txn.execute(
            "SELECT side, symbol, SUM(quantity) FROM orders WHERE user_id = ? AND status = 'queued' "
            "GROUP BY side, symbol",
            (user_id,),
        )
        for side, symbol, quantity in txn.fetchall():
            if side == BUY:
                state.queued_buy_cents += quantity * prices.get(symbol, 0)
            else:
                state.queued_sell_shares[symbol] = quantity
        return state

    # ------------------------------------------------------------ ticks and settlement

    def settle_tick(
        self,
        prices: Mapping[str, int],
        now: str,
        settle: Callable[..., list[Settlement]],
    ) -> Deferred[tuple[int, list[Settlement]]]:
        """Record a price update and settle the whole queue at it, in one transaction."""
        return self._pool.runInteraction(self._settle_tick, prices, now, settle)

    @staticmethod
    def _settle_tick(
        txn: Any, prices: Mapping[str, int], now: str, settle: Callable[..., list[Settlement]]
    ) -> tuple[int, list[Settlement]]:
        txn.execute("INSERT INTO ticks (retrieved_at) VALUES (?)", (now,))
        tick_id = txn.lastrowid
        txn.executemany(
            "INSERT INTO prices (tick_id, symbol, price_cents) VALUES (?, ?, ?)",
            [(tick_id, symbol, cents) for symbol, cents in prices.items()],
        )
        txn.execute(
            "SELECT o.id, o.user_id, u.username, o.side, o.symbol, o.quantity FROM orders o "
            "JOIN users u ON u.id = o.user_id WHERE o.status = 'queued' ORDER BY o.id"
        )
        queued = [QueuedOrder(*row) for row in txn.fetchall()]
        if not queued:
            return tick_id, []
        user_ids = sorted({o.user_id for o in queued})
        cash: dict[int, int] = {}
        holdings: dict[tuple[int, str], int] = {}
        for chunk in _chunks(user_ids, 500):
            marks = ",".join("?" * len(chunk))
            txn.execute(f"SELECT id, cash_cents FROM users WHERE id IN ({marks})", chunk)
            cash.update(txn.fetchall())
            txn.execute(
                f"SELECT user_id, symbol, quantity FROM positions WHERE user_id IN ({marks})", chunk
            )
            holdings.update(((u, s), q) for u, s, q in txn.fetchall())
        before = dict(holdings)
        settlements = settle(queued, cash, holdings, prices)

        txn.executemany("UPDATE users SET cash_cents = ? WHERE id = ?", [(c, u) for u, c in cash.items()])
        changed = [(u, s, q) for (u, s), q in holdings.items() if before.get((u, s)) != q]
        txn.executemany(
            "INSERT INTO positions (user_id, symbol, quantity) VALUES (?, ?, ?) "
            "ON CONFLICT (user_id, symbol) DO UPDATE SET quantity = excluded.quantity",
            [c for c in changed if c[2] > 0],
        )
        txn.executemany(
            "DELETE FROM positions WHERE user_id = ? AND symbol = ?",
            [(u, s) for u, s, q in changed if q == 0],
        )
        txn.executemany(
            "UPDATE orders SET status = ?, reason = ?, tick_id = ?, price_cents = ?, settled_at = ? "
            "WHERE id = ? AND status = 'queued'",
            [
                (s.status, s.reason, tick_id, s.price_cents, now, s.order.order_id)
                for s in settlements
            ],
        )
        txn.executemany(
            "INSERT INTO transactions (user_id, order_id, side, symbol, quantity, price_cents, "
            "total_cents, cash_after_cents, settled_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        return tick_id, settlements

    # ------------------------------------------------------------ reading an account

    def list_orders(self, user_id: int, limit: int) -> Deferred[list[dict]]:
        """The user's newest orders first."""
        return self._pool.runInteraction(self._list_orders, user_id, limit)

    @staticmethod
    def _list_orders(txn: Any, user_id: int, limit: int) -> list[dict]:
        txn.execute(
            "SELECT id, side, symbol, quantity, status, reason, created_at, settled_at, price_cents "
            "FROM orders WHERE user_id = ? ORDER BY id DESC LIMIT ?",
            (user_id, limit),
        )
        keys = ("order_id", "side", "symbol", "quantity", "status", "reason", "created_at",
                "settled_at", "price_cents")
        return [_without_nulls(dict(zip(keys, row))) for row in txn.fetchall()]

    def portfolio(self, user_id: int) -> Deferred[tuple[int, dict[str, int]]]:
        """The user's cash and share counts."""
        return self._pool.runInteraction(self._portfolio, user_id)

    @staticmethod
    def _portfolio(txn: Any, user_id: int) -> tuple[int, dict[str, int]]:
        txn.execute("SELECT cash_cents FROM users WHERE id = ?", (user_id,))
        (cash,) = txn.fetchone()
        txn.execute(
            "SELECT symbol, quantity FROM positions WHERE user_id = ? ORDER BY symbol", (user_id,)
        )
        return cash, dict(txn.fetchall())

    def history(self, user_id: int, limit: int) -> Deferred[list[dict]]:
        """The user's settled trades, newest first."""
        return self._pool.runInteraction(self._history, user_id, limit)

    @staticmethod
    def _history(txn: Any, user_id: int, limit: int) -> list[dict]:
        txn.execute(
            "SELECT order_id, side, symbol, quantity, price_cents, total_cents, cash_after_cents, "
            "settled_at FROM transactions WHERE user_id = ? ORDER BY id DESC LIMIT ?",
            (user_id, limit),
        )
        keys = ("order_id", "side", "symbol", "quantity", "price_cents", "total_cents",
                "cash_after_cents", "settled_at")
        return [dict(zip(keys, row)) for row in txn.fetchall()]

    def latest_prices(self) -> Deferred[tuple[int, str, dict[str, int]] | None]:
        """The last recorded tick (id, time, prices), to resume the market after a restart."""
        return self._pool.runInteraction(self._latest_prices)

    @staticmethod
    def _latest_prices(txn: Any) -> tuple[int, str, dict[str, int]] | None:
        txn.execute("SELECT id, retrieved_at FROM ticks ORDER BY id DESC LIMIT 1")
        row = txn.fetchone()
        if row is None:
            return None
        txn.execute("SELECT symbol, price_cents FROM prices WHERE tick_id = ?", (row[0],))
        return row[0], row[1], dict(txn.fetchall())


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _without_nulls(row: dict) -> dict:
    return {k: v for k, v in row.items() if v is not None}
