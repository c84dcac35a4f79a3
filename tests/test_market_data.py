"""Market data on the master: stale prices, settlement at fresh prices only, price history bars, asset info."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from papertrader.assets import Asset
from papertrader.errors import DataFailed, PurchaseFailed
from papertrader.master import database as database_module
from papertrader.master import workers as master_workers
from papertrader.master.accounts import Accounts
from papertrader.master.database import Database
from papertrader.master.exchange import Exchange
from papertrader.master.market import HISTORY_BARS, NO_ANSWER, PriceBoard, Quote, Retrieval
from papertrader.protocol import (
    BAR_FIELDS,
    BARS_PER_PAGE,
    HISTORY_RANGES,
    ListAssets,
    PriceTick,
    RelayedGetAssetInfo,
    RelayedGetPriceHistory,
)
from papertrader.timestamps import iso
from tests.databases import fresh_database_url, query
from tests.processes import ROOT
from tests.support import ASSETS, PASSWORD, Deployment
from tests.test_paging import encoded_size

AMP_VALUE_LIMIT = 65_535
DAY = 86_400
# 2027-01-01T00:00:00Z, a market time the history tests start from.
START = 1_798_761_600


def many_assets(count: int) -> dict[str, Asset]:
    return {f"S{n:04d}": Asset(f"S{n:04d}", f"Company {n}", "NYSE", "S", "I", 1_000 + n) for n in range(count)}


class ScriptedSource:
    """A price source answering the retrieval the test sets next."""

    def __init__(self, retrieval: Retrieval) -> None:
        self.retrieval = retrieval

    def fetch(self) -> Deferred[Retrieval]:
        return succeed(self.retrieval)


def retrieval(prices: dict[str, int], failures: dict[str, str] | None = None, at: int | None = None) -> Retrieval:
    return Retrieval({symbol: Quote(cents, at) for symbol, cents in prices.items()}, dict(failures or {}))


class BoardTests(SynchronousTestCase):
    """The board keeps the last good price of a failing symbol, says why it is stale, and logs changes only."""

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def stale_lines(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_format", "").startswith("{count} symbol(s)")]

    def test_failure_keeps_price_then_recovers(self) -> None:
        """A failed retrieval keeps the symbol's last good price and marks it stale with the reason; the
        next good one replaces the price and clears the mark; an unanswered symbol is stale too."""
        board = PriceBoard(ASSETS)
        board.update(1, "t1", {"AAPL": 100, "MSFT": 200, "KO": 300}, {"AAPL": 10}, {})
        self.assertEqual((board.prices, board.stale), ({"AAPL": 100, "MSFT": 200, "KO": 300}, {}))
        board.update(2, "t2", {"KO": 310}, {}, {"AAPL": "rate limited"})
        self.assertEqual(board.prices, {"AAPL": 100, "MSFT": 200, "KO": 310})
        self.assertEqual(board.stale, {"AAPL": "rate limited", "MSFT": NO_ANSWER})
        self.assertEqual((board.latest["AAPL"].as_of, board.latest["AAPL"].quoted_at), ("t1", 10))
        board.update(3, "t3", {"AAPL": 120, "MSFT": 210, "KO": 320}, {}, {})
        self.assertEqual((board.prices["AAPL"], board.stale, board.tick), (120, {}, 3))

    def test_logs_once_per_change(self) -> None:
        """1,000 symbols failing for the same reason on every update: one line, naming ten of them, at the
        first; none while nothing changes; one when the reason changes; one when they recover."""
        assets = many_assets(1000)
        board = PriceBoard(assets)
        everything = {symbol: 100 for symbol in assets}
        board.update(1, "t1", everything, {}, {})
        self.assertEqual(self.stale_lines(), [])
        for tick in range(2, 6):
            board.update(tick, "t", {}, {}, {symbol: "provider unreachable" for symbol in assets})
        [line] = self.stale_lines()
        self.assertEqual((line["count"], line["reason"]), (1000, "provider unreachable"))
        self.assertEqual(line["symbols"], ", ".join(sorted(assets)[:10]) + " and 990 more")
        self.assertEqual(len(board.stale), 1000)
        for tick in range(6, 9):
            board.update(tick, "t", {}, {}, {symbol: "HTTP 503" for symbol in assets})
        self.assertEqual([line["reason"] for line in self.stale_lines()], ["provider unreachable", "HTTP 503"])
        board.update(9, "t", everything, {}, {})
        board.update(10, "t", everything, {}, {})
        self.assertEqual(len(self.stale_lines()), 3)
        self.assertEqual(self.stale_lines()[-1]["count"], 1000)
        self.assertEqual(board.stale, {})

    def test_every_range_has_bars(self) -> None:
        """Each range the protocol offers has its span and bar length, the bar length dividing the span."""
        self.assertEqual(tuple(HISTORY_BARS), HISTORY_RANGES)
        for span, bar in HISTORY_BARS.values():
            self.assertEqual((span or bar) % bar, 0)

    def test_long_reason_cut(self) -> None:
        """A reason is kept at most MAX_STALE_REASON characters long."""
        board = PriceBoard(ASSETS)
        board.update(1, "t", {"AAPL": 1}, {}, {})
        board.update(2, "t", {}, {}, {"AAPL": "x" * 500})
        self.assertEqual(len(board.stale["AAPL"]), 40)


class BackendFixture:
    """A fresh database of ``backend`` through a real pool, and exchanges on it with a scripted source."""

    backend: str

    def setUp(self) -> Any:
        self.url = fresh_database_url(self, self.backend)
        self.database = self.open()
        self.source = ScriptedSource(retrieval({}))
        return self.database.migrate()

    def open(self) -> Database:
        database = Database.open(self.url, self.mktemp())
        self.addCleanup(database.close)
        return database

    def exchange(self, database: Database | None = None, chunk_orders: int = 10_000) -> Exchange:
        database = database or self.database
        accounts = Accounts(
            database,
            reactor,
            bcrypt_cost=4,
            starting_cash_cents=10_000_000,
            session_lifetime=3600.0,
            remember_lifetime=7200.0,
        )
        return Exchange(database, accounts, PriceBoard(ASSETS), self.source, reactor, 1000, chunk_orders)

    @inlineCallbacks
    def token(self, exchange: Exchange, username: str = "alice") -> Any:
        yield exchange.accounts.register(username, f"{username}@example.com", PASSWORD)
        session = yield exchange.accounts.login(username, PASSWORD)
        return session.token

    def buy(self, exchange: Exchange, token: str, symbol: str, quantity: int = 1) -> Deferred:
        return exchange.submit_order("buy", token, symbol, str(quantity), "t", "127.0.0.1:1", "w")

    def orders(self) -> list[tuple]:
        return query(self.url, "SELECT id, symbol, status, price_cents, tick_id FROM orders ORDER BY id")


class SettlementMixin(BackendFixture):
    """Settlement uses the fresh prices only: orders in stale symbols wait for a fresh price."""

    @inlineCallbacks
    def test_partial_retrieval_orders_wait(self) -> Any:
        """AAPL fails to be retrieved: its order stays queued while KO's fills; the next update that prices
        AAPL fills it at that fresh price.  (Before, it was rejected with "no price for AAPL".)"""
        exchange = self.exchange()
        self.source.retrieval = retrieval({"AAPL": 19_000, "MSFT": 41_000, "KO": 6_000})
        yield exchange.tick()
        token = yield self.token(exchange)
        yield self.buy(exchange, token, "AAPL")
        yield self.buy(exchange, token, "KO")
        self.source.retrieval = retrieval({"KO": 6_100, "MSFT": 41_000}, {"AAPL": "HTTP 429"})
        yield exchange.tick()
        self.assertEqual(
            [(symbol, status, price) for _, symbol, status, price, _ in self.orders()],
            [("AAPL", "queued", None), ("KO", "filled", 6_100)],
        )
        self.assertEqual(exchange.board.stale, {"AAPL": "HTTP 429"})
        self.assertEqual(query(self.url, "SELECT COUNT(*) FROM ticks WHERE settled = 0"), [(0,)])
        self.source.retrieval = retrieval({"AAPL": 19_500, "MSFT": 41_000, "KO": 6_100})
        yield exchange.tick()
        self.assertEqual(
            [(symbol, status, price) for _, symbol, status, price, _ in self.orders()],
            [("AAPL", "filled", 19_500), ("KO", "filled", 6_100)],
        )
        self.assertEqual(exchange.board.stale, {})

    @inlineCallbacks
    def test_new_orders_in_stale_and_unpriced_symbols(self) -> Any:
        """A new order in a stale symbol is accepted and waits; one in a symbol never priced is refused."""
        exchange = self.exchange()
        self.source.retrieval = retrieval({"AAPL": 19_000}, {"MSFT": "unknown symbol"})
        yield exchange.tick()
        self.source.retrieval = retrieval({"KO": 6_000}, {"AAPL": "timeout", "MSFT": "unknown symbol"})
        yield exchange.tick()
        token = yield self.token(exchange)
        yield self.buy(exchange, token, "AAPL", 2)
        error = yield self.assertFailure(self.buy(exchange, token, "MSFT"), PurchaseFailed)
        self.assertIn("no price yet for MSFT (its retrieval failed: unknown symbol)", str(error))
        self.assertRaises(DataFailed, exchange.asset_value, "MSFT")
        self.assertNotIn("price_cents", exchange.asset_info("MSFT"))
        yield exchange.tick()
        self.assertEqual([(s, status) for _, s, status, _, _ in self.orders()], [("AAPL", "queued")])
        self.assertEqual(exchange.asset_value("AAPL")["stale"], "timeout")
        self.assertEqual(exchange.asset_value("AAPL")["price_cents"], 19_000)
        self.source.retrieval = retrieval({"AAPL": 18_000})
        yield exchange.tick()
        self.assertEqual([(s, status, p) for _, s, status, p, _ in self.orders()], [("AAPL", "filled", 18_000)])
        self.assertNotIn("stale", exchange.asset_value("AAPL"))

    @inlineCallbacks
    def test_nothing_fresh(self) -> Any:
        """A retrieval that prices nothing settles nothing; the tick is recorded (settled) and the
        listeners get every last good price and why each is stale."""
        exchange = self.exchange()
        told: list[tuple] = []
        exchange.on_tick(lambda tick, as_of, prices, stale: told.append((tick, prices, stale)))
        self.source.retrieval = retrieval({"AAPL": 19_000, "KO": 6_000})
        yield exchange.tick()
        token = yield self.token(exchange)
        yield self.buy(exchange, token, "KO")
        self.source.retrieval = retrieval({}, {"AAPL": "down", "KO": "down"})
        yield exchange.tick()
        self.assertEqual([(s, status) for _, s, status, _, _ in self.orders()], [("KO", "queued")])
        self.assertEqual(query(self.url, "SELECT id, settled FROM ticks ORDER BY id"), [(1, 1), (2, 1)])
        self.assertEqual(
            told[-1], (2, {"AAPL": 19_000, "KO": 6_000}, {"AAPL": "down", "KO": "down"})
        )
        self.assertEqual(exchange.board.stale, {"AAPL": "down", "KO": "down"})

    @inlineCallbacks
    def test_resume_keeps_every_latest_price(self) -> Any:
        """After a restart every symbol's latest good price is back, including those the last tick left out."""
        exchange = self.exchange()
        self.source.retrieval = retrieval({"AAPL": 19_000, "KO": 6_000}, at=START)
        yield exchange.tick()
        self.source.retrieval = retrieval({"KO": 6_100}, {"AAPL": "down"}, at=START + 60)
        yield exchange.tick()
        restarted = self.exchange(self.open())
        yield restarted.resume()
        self.assertEqual(restarted.board.prices, {"AAPL": 19_000, "KO": 6_100})
        self.assertEqual((restarted.board.tick, restarted.board.latest["AAPL"].quoted_at), (2, START))

    @inlineCallbacks
    def test_upgrade_keeps_the_latest_prices(self) -> Any:
        """A database of schema version 8 with recorded ticks, upgraded: the last tick's prices are every
        symbol's latest (market time unknown), so a restarted master resumes them; history starts empty."""
        url = fresh_database_url(self, self.backend)
        old = Database.open(url, self.mktemp())
        self.addCleanup(old.close)
        newest = database_module.schema_files
        self.patch(database_module, "schema_files", lambda dialect="sqlite": newest(dialect)[:8])
        version = yield old.migrate()
        self.assertEqual(version, 8)
        for tick, cents in ((1, 100), (2, 200)):
            query(url, "INSERT INTO ticks (id, retrieved_at, settled) VALUES (?, ?, 1)", tick, f"t{tick}")
            for symbol in ("AAPL", "KO"):
                query(url, "INSERT INTO prices (tick_id, symbol, price_cents) VALUES (?, ?, ?)", tick, symbol, cents)
        self.patch(database_module, "schema_files", newest)
        version = yield old.migrate()
        self.assertEqual(version, 9)
        exchange = self.exchange(old)
        yield exchange.resume()
        self.assertEqual((exchange.board.prices, exchange.board.tick), ({"AAPL": 200, "KO": 200}, 2))
        self.assertIsNone(exchange.board.latest["KO"].quoted_at)
        answer = yield exchange.price_history("KO", "all")
        self.assertEqual(answer["bars"], [])

    @inlineCallbacks
    def test_killed_mid_partial_tick_settles_exactly_once(self) -> Any:
        """The master dies after the first chunk of a tick that priced AAPL but not KO.  Restarted, it
        finishes that tick at its own AAPL price (KO's orders stay queued: the tick has no KO price),
        then settles KO's at the next tick that prices KO: every order exactly once."""
        exchange = self.exchange(chunk_orders=2)
        self.source.retrieval = retrieval({"AAPL": 19_000, "KO": 6_000})
        yield exchange.tick()
        token = yield self.token(exchange)
        for symbol in ("AAPL", "KO", "AAPL", "KO", "AAPL", "AAPL"):
            yield self.buy(exchange, token, symbol)
        real = self.database.settle_chunk
        chunks = [0]

        def dies_after_one(*args: Any) -> Any:
            chunks[0] += 1
            if chunks[0] > 1:
                raise RuntimeError("killed")
            return real(*args)

        self.patch(self.database, "settle_chunk", dies_after_one)
        self.source.retrieval = retrieval({"AAPL": 19_100}, {"KO": "timeout"})
        yield exchange.tick()
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(query(self.url, "SELECT id, settled FROM ticks ORDER BY id"), [(1, 1), (2, 0)])
        self.assertEqual(query(self.url, "SELECT COUNT(*) FROM orders WHERE status = 'filled'"), [(2,)])

        restarted = self.exchange(self.open(), chunk_orders=2)
        yield restarted.resume()
        self.source.retrieval = retrieval({"AAPL": 19_200, "KO": 6_200})
        yield restarted.tick()
        rows = self.orders()
        self.assertEqual(
            [(symbol, status, price, tick) for _, symbol, status, price, tick in rows],
            [
                ("AAPL", "filled", 19_100, 2),
                ("KO", "filled", 6_200, 3),
                ("AAPL", "filled", 19_100, 2),
                ("KO", "filled", 6_200, 3),
                ("AAPL", "filled", 19_100, 2),
                ("AAPL", "filled", 19_100, 2),
            ],
        )
        self.assertEqual(query(self.url, "SELECT COUNT(*), COUNT(DISTINCT order_id) FROM transactions"), [(6, 6)])
        self.assertEqual(query(self.url, "SELECT COUNT(*) FROM ticks WHERE settled = 0"), [(0,)])


def expected_bars(rows: list[tuple[int, int, int]], range_name: str) -> tuple[list[dict[str, Any]], int | None]:
    """The bars of ``range_name`` computed here from stored (market time, tick, cents) rows, and the latest time."""
    if not rows:
        return [], None
    span, bar = HISTORY_BARS[range_name]
    latest = max(at for at, _, _ in rows)
    last = latest - latest % bar
    first = None if span is None else last - span + bar
    buckets: dict[int, list[tuple[int, int, int]]] = {}
    for at, tick, cents in rows:
        start = at - at % bar
        if first is None or start >= first:
            buckets.setdefault(start, []).append((at, tick, cents))
    bars = []
    for start, prices in sorted(buckets.items()):
        prices.sort()
        bars.append(
            {
                "start": iso(start),
                "open_cents": prices[0][2],
                "high_cents": max(p[2] for p in prices),
                "low_cents": min(p[2] for p in prices),
                "close_cents": prices[-1][2],
            }
        )
    return bars, latest


def stored_prices(url: str, symbol: str) -> list[tuple[int, int, int]]:
    return [
        (int(at), int(tick), int(cents))
        for at, tick, cents in query(
            url, "SELECT quoted_at, tick_id, price_cents FROM prices WHERE symbol = ? AND quoted_at IS NOT NULL", symbol
        )
    ]


def market_times() -> list[int]:
    """Irregular market times over about two years, denser at the end (every minute in the last days),
    with a replay that loops back four days and some repeated times (a daily price quoted again)."""
    times = [START + n * DAY for n in range(0, 700, 3)]
    end = times[-1]
    times += [end + n * 7_200 for n in range(1, 100)]
    end = times[-1]
    times += [end + n * 60 for n in range(1, 300)]
    end = times[-1]
    times += [end - 4 * DAY + n * 600 for n in range(40)]  # the replay looped
    times += [end, end, end + 1]
    return times


class HistoryMixin(BackendFixture):
    """Stored prices make the bars of every range, equal to those computed from the stored rows."""

    @inlineCallbacks
    def record(self, times: list[int]) -> Any:
        for n, at in enumerate(times):
            # AAPL every time, KO every other time; prices that move both ways.
            prices = {"AAPL": 10_000 + (n * 37) % 1_001}
            if n % 2 == 0:
                prices["KO"] = 5_000 + (n * 53) % 700
            yield self.database.begin_tick(prices, iso(START + n), {symbol: at for symbol in prices})

    @inlineCallbacks
    def read_all(self, exchange: Exchange, symbol: str, range_name: str) -> Any:
        answers = []
        cursor = None
        while True:
            answer = yield exchange.price_history(symbol, range_name, cursor)
            answers.append(answer)
            cursor = answer.get("next_cursor")
            if cursor is None:
                return answers

    @inlineCallbacks
    def test_bars_of_every_range(self) -> Any:
        """For each range and symbol the bars read (over all pages) equal those computed from the stored
        prices; the window ends at the latest market time, whatever order the times came in."""
        yield self.record(market_times())
        exchange = self.exchange()
        for symbol in ("AAPL", "KO"):
            rows = stored_prices(self.url, symbol)
            for range_name in HISTORY_RANGES:
                answers = yield self.read_all(exchange, symbol, range_name)
                expected, latest = expected_bars(rows, range_name)
                self.assertGreater(len(expected), 1)
                self.assertEqual([bar for a in answers for bar in a["bars"]], expected, (symbol, range_name))
                self.assertEqual({a["as_of"] for a in answers}, {iso(latest)})
                self.assertEqual([a["page"] for a in answers], list(range(1, answers[0]["pages"] + 1)))
                self.assertEqual(answers[0]["bar_seconds"], HISTORY_BARS[range_name][1])
        answers = yield self.read_all(exchange, "MSFT", "day")
        self.assertEqual(answers, [{"symbol": "MSFT", "range": "day", "bar_seconds": 300, "bars": [],
                                    "page": 1, "pages": 1}])

    @inlineCallbacks
    def test_refusals(self) -> Any:
        """An unknown symbol or range, or a malformed or foreign cursor: DataFailed."""
        yield self.record([START + n * 3600 for n in range(400)])
        exchange = self.exchange()
        yield self.assertFailure(exchange.price_history("NOPE", "day"), DataFailed)
        yield self.assertFailure(exchange.price_history("AAPL", "decade"), DataFailed)
        yield self.assertFailure(exchange.price_history("AAPL", "day", "x.y"), DataFailed)
        first = yield exchange.price_history("AAPL", "month")
        cursor = first["next_cursor"]
        yield self.assertFailure(exchange.price_history("KO", "month", cursor), DataFailed)
        yield self.assertFailure(exchange.price_history("AAPL", "week", cursor), DataFailed)
        page, tick, latest, after, fingerprint = cursor.split(".")
        for forged in (
            f"3.{tick}.{latest}.{after}.{fingerprint}",
            f"{page}.{tick}.{latest}.{int(after) + 7200}.{fingerprint}",
            f"{page}.{int(tick) + 5}.{latest}.{after}.{fingerprint}",
        ):
            yield self.assertFailure(exchange.price_history("AAPL", "month", forged), DataFailed)
        second = yield exchange.price_history("AAPL", "month", cursor)
        self.assertEqual(second["page"], 2)

    @inlineCallbacks
    def test_postgresql_plan_uses_the_index(self) -> Any:
        """(PostgreSQL) Reading a page of bars and rebuilding a bar look rows up through indexes, not
        by reading whole tables."""
        if self.backend != "postgresql":
            return
        yield self.record([START + n * 3600 for n in range(50)])
        query(self.url, "ANALYZE")
        statements = [
            "SELECT start_at FROM price_bars WHERE symbol = 'AAPL' AND bar_seconds = 300 AND start_at >= 0 "
            "AND start_at <= 1900000000 AND first_tick <= 100 AND start_at > 5 ORDER BY start_at LIMIT 175",
            "SELECT price_cents FROM prices WHERE symbol = 'AAPL' AND quoted_at >= 0 AND quoted_at < 1900000000 "
            "AND tick_id <= 100 ORDER BY quoted_at, tick_id LIMIT 1",
        ]
        import psycopg

        for statement in statements:
            with psycopg.connect(self.url, autocommit=True) as connection:
                # Tiny test tables are cheapest to read whole; what matters is that an index serves.
                connection.execute("SET enable_seqscan = off")
                plan = "\n".join(row[0] for row in connection.execute("EXPLAIN " + statement).fetchall())
            self.assertIn("Index", plan)
            self.assertNotIn("Seq Scan", plan)


class SQLiteSettlementTests(SettlementMixin, TestCase):
    backend = "sqlite"


class PostgreSQLSettlementTests(SettlementMixin, TestCase):
    backend = "postgresql"


class SQLiteHistoryTests(HistoryMixin, TestCase):
    backend = "sqlite"


class PostgreSQLHistoryTests(HistoryMixin, TestCase):
    backend = "postgresql"


class ThroughTheMasterTests(SynchronousTestCase):
    """GetAssetInfo, GetPriceHistory, ListAssets and PriceTick between the master and a worker (iosim)."""

    def setUp(self) -> None:
        self.deployment = Deployment(self.mktemp())
        self.pushed: list[dict[str, Any]] = []
        real = master_workers.push_bytes

        def recording(command: Any, **arguments: Any) -> bytes:
            if command is PriceTick:
                self.pushed.append(arguments)
            return real(command, **arguments)

        self.patch(master_workers, "push_bytes", recording)

    def call(self, command: Any, **arguments: Any) -> Any:
        return self.deployment.result(
            self.deployment.link.call(command, received_at="t", client_address="127.0.0.1:1", **arguments)
        )

    def fail_next(self, failures: dict[str, str]) -> None:
        self.deployment.source.fetch = lambda: succeed(  # type: ignore[method-assign]
            Retrieval({s: Quote(a.reference_cents) for s, a in ASSETS.items() if s not in failures}, failures)
        )

    def test_asset_info_list_and_tick_carry_stale(self) -> None:
        """A symbol whose retrieval failed is stale in GetAssetInfo, the asset list and the PriceTick push,
        with its last good price; an unknown symbol is DataFailed."""
        info = self.call(RelayedGetAssetInfo, symbol="ko")
        self.assertEqual(
            {k: v for k, v in info.items() if k != "as_of" and v is not None},
            {"symbol": "KO", "name": "Coca-Cola Co.", "exchange": "NYSE", "sector": "Consumer Defensive",
             "industry": "Beverages", "currency": "USD", "price_cents": 6_000},
        )
        self.fail_next({"KO": "HTTP 500"})
        self.deployment.tick()
        info = self.call(RelayedGetAssetInfo, symbol="KO")
        self.assertEqual((info["price_cents"], info["stale"]), (6_000, "HTTP 500"))
        self.assertEqual(self.pushed[-1]["stale"], {"KO": "HTTP 500"})
        self.assertEqual(len(self.pushed[-1]["prices"]), 3)
        listed = {row["symbol"]: row for row in self.deployment.result(self.deployment.link.call(ListAssets))["assets"]}
        self.assertEqual((listed["KO"]["stale"], listed["KO"]["currency"]), ("HTTP 500", "USD"))
        self.assertIsNone(listed["AAPL"].get("stale"))
        self.assertRaises(DataFailed, self.call, RelayedGetAssetInfo, symbol="NOPE")
        self.fail_next({})
        self.deployment.tick()
        self.assertNotIn("stale", self.pushed[-1])
        self.assertIsNone(self.call(RelayedGetAssetInfo, symbol="KO")["stale"])

    def test_long_history_in_pages_while_prices_arrive(self) -> None:
        """Five years of daily prices ("all": far over one AMP value) cross the master's AMP responder in
        pages; a price update between pages (a new bar, a changed last bar and a looped replay changing an
        old one) leaves the reading as it was at its first page; a new reading shows the update."""
        deployment = self.deployment
        database = deployment.database
        days = 5 * 365

        def record(txn: Any) -> None:
            for n in range(days):
                Database._begin_tick(txn, {"AAPL": 10_000 + (n * 7919) % 5_000}, iso(START), {"AAPL": START + n * DAY})

        deployment.result(database._run(record))
        url = "sqlite:///" + deployment.pool.connection.execute("PRAGMA database_list").fetchone()[2]
        expected, _ = expected_bars(stored_prices(url, "AAPL"), "all")
        self.assertGreater(encoded_size(BAR_FIELDS, expected), AMP_VALUE_LIMIT)
        self.assertGreater(len(expected), 3 * BARS_PER_PAGE)

        first = self.call(RelayedGetPriceHistory, symbol="AAPL", range="all")
        bars = list(first["bars"])
        end = START + (days - 1) * DAY
        self.deployment.result(
            database.begin_tick({"AAPL": 99_999}, iso(START + 1), {"AAPL": end + 3600})  # the last bar changes
        )
        self.deployment.result(database.begin_tick({"AAPL": 1}, iso(START + 2), {"AAPL": START + 7}))  # looped back
        self.deployment.result(database.begin_tick({"AAPL": 55_555}, iso(START + 3), {"AAPL": end + DAY}))  # new bar
        answer = first
        while answer.get("next_cursor"):
            answer = self.call(RelayedGetPriceHistory, symbol="AAPL", range="all", cursor=answer["next_cursor"])
            bars.extend(answer["bars"])
        self.assertEqual(answer["pages"], -(-len(expected) // BARS_PER_PAGE))
        self.assertEqual(bars, expected)

        answer = self.call(RelayedGetPriceHistory, symbol="AAPL", range="all")
        again = list(answer["bars"])
        while answer.get("next_cursor"):
            answer = self.call(RelayedGetPriceHistory, symbol="AAPL", range="all", cursor=answer["next_cursor"])
            again.extend(answer["bars"])
        self.assertEqual(again, expected_bars(stored_prices(url, "AAPL"), "all")[0])
        self.assertEqual((again[0]["low_cents"], again[-2]["high_cents"], again[-1]["open_cents"]), (1, 99_999, 55_555))
        self.assertRaises(
            DataFailed, self.call, RelayedGetPriceHistory, symbol="AAPL", range="all", cursor="1.2.3"
        )
        self.assertRaises(DataFailed, self.call, RelayedGetPriceHistory, symbol="AAPL", range="ever")


class BenchmarkLogReadingTests(SynchronousTestCase):
    """benchmarks/tick_stall.py reads the master's log lines of each update: what the exchange logs now."""

    def test_tick_stall_reads_every_update(self) -> None:
        """Each update's "new prices" and "settled" lines, as the exchange logs them, are found by the
        benchmark's patterns, with the update's time (the log line gained fresh and failed counts)."""
        spec = importlib.util.spec_from_file_location("tick_stall", os.path.join(ROOT, "benchmarks", "tick_stall.py"))
        assert spec is not None and spec.loader is not None
        tick_stall = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tick_stall)
        deployment = Deployment(self.mktemp())
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        deployment.tick()
        lines = [formatEvent(event) for event in events]
        started = [m.group(1) for m in map(tick_stall._NEW_PRICES.search, lines) if m]
        settled = [m.group(1) for m in map(tick_stall._SETTLED.search, lines) if m]
        self.assertEqual(started, [deployment.exchange.board.as_of])
        self.assertEqual(settled, [str(deployment.exchange.board.tick)])
