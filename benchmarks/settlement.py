"""Settlement cost of one price tick against a raw bulk insert of as many rows.

What is measured, per backend (SQLite file; PostgreSQL in a throw-away database)
and per workload (by default three: 100,000 orders of 1,000 users, 300,000
orders of 1,000 users, and 100,000 orders of 10,000 users):

* **settlement** -- one ``Database.settle_tick(prices, now, settle_orders)`` call
  that records the tick and settles a queue of N orders, in chunks of
  ``--chunk-orders`` (the master's default) each committed in its own
  transaction, through the real ``adbapi`` pool that ``Database.open`` builds
  (with the master's SQLite pragmas).  The queue mixes buys and sells of every
  symbol in ``etc/assets.csv``, quantities 1-10; most users have plenty of cash
  and shares, a few have little cash or no shares so that some orders are
  rejected.  The garbage collector is tuned as the master's (``GC_YOUNG_THRESHOLD``).
* **baseline** -- in the same database and through the same pool, the fastest
  plain way to store the same N rows into ``bench_orders``, a scratch table
  created from the ``orders`` table's own CREATE TABLE statement (same
  columns, types and constraints; no secondary indexes), in one transaction:
  one ``executemany`` on SQLite, one ``COPY ... FROM STDIN`` on PostgreSQL.

The ratio settlement / baseline is reported per round, then min/median/max;
the target is <= 5x on both backends.  Setting up (creating the database,
migrating, inserting users, positions and the queued orders) is not timed.
Each round rebuilds the database from scratch, so every settlement starts from
the same state.  On PostgreSQL the tables are ANALYZEd after the setup, as
autovacuum would do in a running deployment.

Run it from a source checkout::

    python benchmarks/settlement.py [--orders N --users U] [--backend sqlite|postgresql|both] [--rounds R]
        [--chunk-orders C] [--sqlite-cache-mib M] [--sqlite-wal-autocheckpoint P]

PostgreSQL is looked for like the tests do (``PGHOST``/``PGPORT``, default
127.0.0.1:5432, users ``PGUSER``, ``postgres`` or ``root``, database ``test``,
or ``--postgresql-admin URL``); a database ``papertrader_bench_<hex>`` is created
per round and dropped afterwards.  If none answers the backend is skipped.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import attr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402

from papertrader.assets import parse_assets  # noqa: E402
from papertrader.master.database import (  # noqa: E402
    CHUNK_ORDERS,
    SQLITE_CACHE_MIB,
    SQLITE_WAL_AUTOCHECKPOINT,
    Cursor,
    Database,
    schema_files,
)
from papertrader.master.tap import GC_YOUNG_THRESHOLD  # noqa: E402
from papertrader.master.trading import BUY, SELL, settle_orders  # noqa: E402

ASSETS_FILE = os.path.join(ROOT, "etc", "assets.csv")
NOW = "2024-01-02T15:30:00Z"
RICH_CENTS = 1_000_000_000  # $10M: never short of cash
POOR_CENTS = 50_000  # $500: most of their buys are rejected
SHARES_HELD = 20  # seeded per symbol, so that sells can fill
TARGET_RATIO = 5.0
# (orders, users) of the default workloads.
WORKLOADS = ((100_000, 1_000), (300_000, 1_000), (100_000, 10_000))


class BenchmarkError(Exception):
    """The benchmark could not run, or settlement left the queue in a wrong state."""


@attr.s(frozen=True, auto_attribs=True)
class Workload:
    """The rows to load before settlement: users, positions and queued orders."""

    users: list[tuple[str, str, str, int, str]]
    positions: list[tuple[int, str, int]]  # (user index, symbol, quantity)
    orders: list[tuple[int, str, str, int]]  # (user index, side, symbol, quantity)


@attr.s(frozen=True, auto_attribs=True)
class Round:
    """The figures of one round."""

    settle_seconds: float
    baseline_seconds: float
    filled: int
    rejected: int

    @property
    def ratio(self) -> float:
        return self.settle_seconds / self.baseline_seconds


# ---------------------------------------------------------------- workload


def load_prices(path: str = ASSETS_FILE) -> dict[str, int]:
    """The reference prices of the sample asset list, in cents."""
    with open(path, encoding="utf-8") as f:
        assets, problems = parse_assets(f.read().splitlines(), path)
    if problems:
        raise BenchmarkError("; ".join(problems))
    return {symbol: asset.reference_cents for symbol, asset in assets.items()}


def make_workload(orders: int, users: int, symbols: Sequence[str], seed: int = 1) -> Workload:
    """A deterministic mix: every 10th user is poor, every 7th holds no shares."""
    rng = random.Random(seed)
    user_rows = [
        (f"bench{i:05d}", f"bench{i:05d}@example.com", "x", POOR_CENTS if i % 10 == 0 else RICH_CENTS, NOW)
        for i in range(users)
    ]
    positions = [(i, s, SHARES_HELD) for i in range(users) if i % 7 != 0 for s in symbols]
    order_rows = [
        (rng.randrange(users), rng.choice((BUY, SELL)), rng.choice(symbols), rng.randint(1, 10)) for _ in range(orders)
    ]
    return Workload(user_rows, positions, order_rows)


def order_rows(user_ids: Sequence[int], workload: Workload) -> list[tuple]:
    """The ``orders`` rows (queued) of ``workload`` for users stored under ``user_ids``."""
    return [
        (user_ids[u], side, symbol, quantity, "queued", NOW, NOW, "127.0.0.1:50000", "bench-worker")
        for u, side, symbol, quantity in workload.orders
    ]


ORDER_COLUMNS = "user_id, side, symbol, quantity, status, created_at, received_at, client_address, worker"


# ---------------------------------------------------------------- interactions (run in the pool's thread)


def _setup(txn: Cursor, workload: Workload, analyze: bool) -> list[int]:
    """Insert users, positions and queued orders in one transaction; return the user ids."""
    txn.executemany(
        "INSERT INTO users (username, email, password_hash, cash_cents, created_at) VALUES (?, ?, ?, ?, ?)",
        workload.users,
    )
    txn.execute("SELECT id FROM users ORDER BY id")
    user_ids = [row[0] for row in txn.fetchall()]
    txn.executemany(
        "INSERT INTO positions (user_id, symbol, quantity) VALUES (?, ?, ?)",
        [(user_ids[u], s, q) for u, s, q in workload.positions],
    )
    placeholders = ", ".join("?" * len(ORDER_COLUMNS.split(",")))
    txn.executemany(f"INSERT INTO orders ({ORDER_COLUMNS}) VALUES ({placeholders})", order_rows(user_ids, workload))
    if analyze:
        txn.execute("ANALYZE")
    return user_ids


def _create_bench_table(txn: Cursor) -> None:
    """``bench_orders``: the ``orders`` CREATE TABLE statement under another name."""
    for _version, script in schema_files(txn.dialect.name):
        for statement in txn.dialect.schema_statements(script):
            if statement.startswith("CREATE TABLE orders ("):
                txn.execute(statement.replace("CREATE TABLE orders (", "CREATE TABLE bench_orders (", 1))
                return
    raise BenchmarkError("no CREATE TABLE orders statement in the schema files")


def _bulk_insert(txn: Cursor, rows: list[tuple]) -> None:
    """The baseline: one executemany on SQLite, one COPY on PostgreSQL."""
    if txn.dialect.name == "postgresql":
        with txn._transaction.copy(f"COPY bench_orders ({ORDER_COLUMNS}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        return
    placeholders = ", ".join("?" * len(ORDER_COLUMNS.split(",")))
    txn.executemany(f"INSERT INTO bench_orders ({ORDER_COLUMNS}) VALUES ({placeholders})", rows)


def _drop_bench_table(txn: Cursor) -> None:
    txn.execute("DROP TABLE bench_orders")


def _status_counts(txn: Cursor) -> dict[str, int]:
    txn.execute("SELECT status, COUNT(*) FROM orders GROUP BY status")
    return {status: int(count) for status, count in txn.fetchall()}


# ---------------------------------------------------------------- backends


class Backend:
    """Makes a fresh, empty database per round and removes it afterwards."""

    name = ""

    def create(self) -> str:
        """A URL for a new, empty database."""
        raise NotImplementedError

    def destroy(self) -> None:
        """Remove the database made by the last ``create``."""
        raise NotImplementedError


class SQLiteBackend(Backend):
    """An SQLite file in a temporary directory."""

    name = "sqlite"

    def __init__(self) -> None:
        self.data_dir = ""

    def create(self) -> str:
        self.data_dir = tempfile.mkdtemp(prefix="papertrader-bench-")
        return "sqlite:///" + os.path.join(self.data_dir, "papertrader.sqlite")

    def destroy(self) -> None:
        if self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = ""


class PostgreSQLBackend(Backend):
    """A database ``papertrader_bench_<hex>`` created next to the admin database, dropped afterwards."""

    name = "postgresql"

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.data_dir = ""
        self.database = ""

    def create(self) -> str:
        import psycopg

        self.data_dir = tempfile.mkdtemp(prefix="papertrader-bench-")
        name = f"papertrader_bench_{secrets.token_hex(6)}"
        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        self.database = name
        return self.admin_url.rsplit("/", 1)[0] + "/" + name

    def destroy(self) -> None:
        import psycopg

        try:
            if self.database:
                with psycopg.connect(self.admin_url, autocommit=True) as connection:
                    connection.execute(f"DROP DATABASE IF EXISTS {self.database} WITH (FORCE)")
                self.database = ""
        finally:
            if self.data_dir:
                shutil.rmtree(self.data_dir, ignore_errors=True)
                self.data_dir = ""


def find_postgresql(admin_url: str | None) -> tuple[str | None, str]:
    """A working admin URL (or None) and, if none, why."""
    try:
        import psycopg
    except ImportError as e:
        return None, f"psycopg is not installed ({e})"
    if admin_url:
        candidates = [admin_url]
    else:
        host = os.environ.get("PGHOST", "127.0.0.1")
        port = os.environ.get("PGPORT", "5432")
        users = [u for u in (os.environ.get("PGUSER"), "postgres", "root") if u]
        candidates = [f"postgresql://{user}@{host}:{port}/test" for user in users]
    errors = []
    for url in candidates:
        try:
            with psycopg.connect(url, connect_timeout=5):
                return url, ""
        except psycopg.Error as e:
            errors.append(f"{url}: {' '.join(str(e).split())}")
    return None, "; ".join(errors)


# ---------------------------------------------------------------- measuring


async def timed(call: Callable[[], Deferred]) -> tuple[float, Any]:
    """Seconds taken by the Deferred ``call()`` returns, and its result."""
    started = time.perf_counter()
    result = await call()
    return time.perf_counter() - started, result


async def run_round(backend: Backend, workload: Workload, prices: dict[str, int], args: argparse.Namespace) -> Round:
    """Build a fresh database, then time settlement and the baseline insert; always clean up."""
    db: Database | None = None
    try:
        url = backend.create()
        db = Database.open(url, backend.data_dir, args.sqlite_cache_mib, args.sqlite_wal_autocheckpoint)
        await db.migrate()
        user_ids = await db._run(_setup, workload, db.dialect.name == "postgresql")

        baseline_rows = order_rows(user_ids, workload)
        await db._run(_create_bench_table)
        baseline_seconds, _ = await timed(lambda: db._run(_bulk_insert, baseline_rows))
        await db._run(_drop_bench_table)

        settle_seconds, (_tick_id, settlements) = await timed(
            lambda: db.settle_tick(prices, NOW, settle_orders, args.chunk_orders)
        )

        counts = await db._run(_status_counts)
        filled = sum(1 for s in settlements if s.filled)
        rejected = len(settlements) - filled
        if counts.get("queued", 0) or len(settlements) != len(workload.orders):
            raise BenchmarkError(f"settlement left orders queued: {counts}, {len(settlements)} settled")
        if counts.get("filled", 0) != filled or counts.get("rejected", 0) != rejected:
            raise BenchmarkError(f"stored statuses {counts} differ from {filled} filled, {rejected} rejected")
        return Round(settle_seconds, baseline_seconds, filled, rejected)
    finally:
        if db is not None:
            db.close()
        backend.destroy()


async def run_backend(
    backend: Backend, workload: Workload, prices: dict[str, int], args: argparse.Namespace
) -> list[Round]:
    """All rounds on one backend, printing each as it ends."""
    results = []
    for number in range(1, args.rounds + 1):
        result = await run_round(backend, workload, prices, args)
        results.append(result)
        print(
            f"  {backend.name} round {number}: settlement {result.settle_seconds:.3f} s, "
            f"baseline {result.baseline_seconds:.3f} s, ratio {result.ratio:.2f}x "
            f"({result.filled} filled, {result.rejected} rejected)",
            flush=True,
        )
    return results


def spread(values: Sequence[float], unit: str, digits: int = 3) -> str:
    """min / median / max of ``values``."""
    low, middle, high = min(values), statistics.median(values), max(values)
    return f"{low:.{digits}f} / {middle:.{digits}f} / {high:.{digits}f} {unit}"


def report(name: str, orders: int, users: int, results: list[Round]) -> bool:
    """min/median/max of one backend's rounds on one workload; whether the median ratio meets the target."""
    ratio = statistics.median(r.ratio for r in results)
    baseline = "COPY" if name == "postgresql" else "executemany"
    settle = statistics.median(r.settle_seconds for r in results)
    print(f"{name}: {orders} orders of {users} users, {len(results)} rounds (min / median / max)")
    print(f"  settlement  {spread([r.settle_seconds for r in results], 's')}  ({orders / settle:,.0f} orders/s)")
    print(f"  baseline    {spread([r.baseline_seconds for r in results], 's')}  ({baseline})")
    print(f"  ratio       {spread([r.ratio for r in results], 'x', 2)}  settlement / baseline")
    print(f"  outcome     {results[-1].filled} filled, {results[-1].rejected} rejected, 0 still queued")
    met = ratio <= TARGET_RATIO
    print(f"  target      {'met' if met else 'NOT met'} (median ratio <= {TARGET_RATIO:g}x)")
    return met


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--orders", type=int, help="queued orders to settle (with --users: one workload only)")
    parser.add_argument("--users", type=int, help="users placing them (default 1000 with --orders)")
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per backend and workload (default 3)")
    parser.add_argument("--chunk-orders", type=int, default=CHUNK_ORDERS, help="orders per settlement transaction")
    parser.add_argument("--sqlite-cache-mib", type=int, default=SQLITE_CACHE_MIB, help="SQLite page cache, MiB")
    parser.add_argument(
        "--sqlite-wal-autocheckpoint", type=int, default=SQLITE_WAL_AUTOCHECKPOINT, help="SQLite checkpoint, pages"
    )
    parser.add_argument("--postgresql-admin", metavar="URL", help="a PostgreSQL URL allowed to CREATE DATABASE")
    args = parser.parse_args(argv)
    if args.orders is None and args.users is not None:
        args.orders = 100_000
    if args.orders is not None and args.users is None:
        args.users = 1_000
    if (args.orders is not None and (args.orders < 1 or args.users < 1)) or args.rounds < 1:
        parser.error("--orders, --users and --rounds must be positive")
    if args.chunk_orders < 1 or args.sqlite_cache_mib < 1 or args.sqlite_wal_autocheckpoint < 0:
        parser.error("--chunk-orders and --sqlite-cache-mib must be positive")
    return args


async def main(reactor: Any, *argv: str) -> None:
    """Run the rounds on each chosen backend and workload, and print the figures."""
    args = parse_args(argv)
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])  # as the master does
    prices = load_prices()
    workloads = WORKLOADS if args.orders is None else ((args.orders, args.users),)
    backends: list[Backend] = []
    if args.backend in ("sqlite", "both"):
        backends.append(SQLiteBackend())
    if args.backend in ("postgresql", "both"):
        admin, why = find_postgresql(args.postgresql_admin)
        if admin is None:
            print(f"postgresql: skipped, PostgreSQL is unreachable ({why})", flush=True)
        else:
            backends.append(PostgreSQLBackend(admin))
    print(
        f"{args.rounds} round(s) per backend and workload; {args.chunk_orders} orders per settlement transaction; "
        f"SQLite cache {args.sqlite_cache_mib} MiB, checkpoint every {args.sqlite_wal_autocheckpoint} pages",
        flush=True,
    )
    results = []
    for orders, users in workloads:
        workload = make_workload(orders, users, sorted(prices))
        print(f"settling {orders} orders of {users} users over {len(prices)} symbols", flush=True)
        for backend in backends:
            results.append((backend.name, orders, users, await run_backend(backend, workload, prices, args)))
    print()
    met = [report(*result) for result in results]
    print(f"target <= {TARGET_RATIO:g}x the baseline: met {sum(met)} of {len(met)}")


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
