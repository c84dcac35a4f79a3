"""Market data through a worker: asset facts, quotes and stale reasons from its cache, pages of price
history cached until the next price update, and the client library's readings of them."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase

from papertrader.client import cli
from papertrader.client.library import HISTORY_ATTEMPTS
from papertrader.client.session import Session
from papertrader.errors import DataFailed, ServiceUnavailable
from papertrader.master.market import Quote, Retrieval
from papertrader.master.protocol import MasterLocator
from papertrader.protocol import BAR_FIELDS, PriceTick, RelayedGetPriceHistory
from papertrader.worker.cache import (
    DEFAULT_CURRENCY,
    QUOTE_CACHE_ENV,
    HistoryCache,
    QuoteCache,
    page_bytes,
    quote_cache_from_environment,
)
from tests.support import ASSETS, Deployment, SimWorker, sim_connector

LISTED = [
    {
        "symbol": "AAPL", "name": "Apple", "exchange": "NASDAQ", "sector": "Technology",
        "industry": "Consumer Electronics", "price_cents": 19_000, "currency": "USD",
    },
    {
        "symbol": "SAP", "name": "SAP SE", "exchange": "XETRA", "sector": "Technology", "industry": "Software",
        "price_cents": 12_000, "currency": "EUR", "stale": "source timed out",
    },
    {"symbol": "KO", "name": "Coca-Cola", "exchange": "NYSE", "sector": "Consumer", "industry": "Beverages"},
]


def bar(index: int, cents: int) -> dict[str, Any]:
    """A one-minute bar ``index`` minutes into a day, at ``cents`` give or take a cent."""
    return {
        "start": f"2027-01-15T{index // 60:02d}:{index % 60:02d}:00.000000+00:00",
        "open_cents": cents,
        "high_cents": cents + 1,
        "low_cents": cents - 1,
        "close_cents": cents,
    }


class QuoteCacheTests(SynchronousTestCase):
    """`QuoteCache` keeps every asset's facts, prices and stale reasons."""

    def test_asset_facts_and_stale_from_the_list(self) -> None:
        """The asset list's facts, currency and stale reasons answer GetAssetInfo and GetAssetValue."""
        cache = QuoteCache()
        cache.load(LISTED, 4, "t4")
        self.assertEqual(
            cache.info("SAP"),
            {
                "symbol": "SAP", "name": "SAP SE", "exchange": "XETRA", "sector": "Technology",
                "industry": "Software", "currency": "EUR", "price_cents": 12_000, "as_of": "t4",
                "stale": "source timed out",
            },
        )
        self.assertEqual(cache.quote("SAP")["stale"], "source timed out")
        self.assertNotIn("stale", cache.quote("AAPL"))
        # No price yet: the facts alone; no quote from the cache.
        self.assertEqual(cache.info("KO")["currency"], DEFAULT_CURRENCY)
        self.assertNotIn("price_cents", cache.info("KO"))
        self.assertIsNone(cache.quote("KO"))

    def test_unknown_and_empty(self) -> None:
        """An unknown symbol is refused; an empty cache answers nothing (the worker asks the master)."""
        self.assertIsNone(QuoteCache().info("AAPL"))
        self.assertIsNone(QuoteCache().known("AAPL"))
        cache = QuoteCache()
        cache.load(LISTED, 1, "t1")
        self.assertRaises(DataFailed, cache.info, "NOPE")
        self.assertIs(cache.known("NOPE"), False)

    def test_tick_replaces_stale(self) -> None:
        """Each newer tick's stale reasons replace the last ones; an older tick changes nothing."""
        cache = QuoteCache()
        cache.load(LISTED, 4, "t4")
        prices = [{"symbol": "AAPL", "price_cents": 19_100}, {"symbol": "SAP", "price_cents": 12_000}]
        self.assertTrue(cache.update(5, "t5", prices, {"AAPL": "no answer"}))
        self.assertEqual(cache.quote("AAPL")["stale"], "no answer")
        self.assertNotIn("stale", cache.quote("SAP"))
        self.assertFalse(cache.update(3, "t3", prices, {}))
        self.assertEqual(cache.quote("AAPL")["stale"], "no answer")


    def test_switched_off(self) -> None:
        """With PAPERTRADER_QUOTE_CACHE=off (the benchmark's baseline) the cache answers no quote or info,
        so the worker relays them; any other value, or none, leaves it on."""
        self.assertFalse(quote_cache_from_environment({QUOTE_CACHE_ENV: "off"}))
        self.assertTrue(quote_cache_from_environment({}))
        self.assertTrue(quote_cache_from_environment({QUOTE_CACHE_ENV: "on"}))
        cache = QuoteCache(answers=False)
        cache.load(LISTED, 4, "t4")
        self.assertEqual((cache.quote("AAPL"), cache.info("AAPL"), cache.info("NOPE")), (None, None, None))


class HistoryCacheTests(SynchronousTestCase):
    """`HistoryCache` keeps pages until the prices change, bounded, sharing concurrent fetches."""

    def setUp(self) -> None:
        self.generation = 1
        self.fetches: list[Deferred[dict[str, Any]]] = []
        self.cache = HistoryCache(lambda: self.generation, max_entries=3)

    def fetch(self) -> Deferred[dict[str, Any]]:
        d: Deferred[dict[str, Any]] = Deferred()
        self.fetches.append(d)
        return d

    def page(self, cents: int) -> dict[str, Any]:
        return {"symbol": "AAPL", "range": "day", "bar_seconds": 60, "bars": [bar(0, cents)], "page": 1, "pages": 1}

    def test_kept_until_prices_change(self) -> None:
        """A page is fetched once, served from the cache after, and fetched again after the next tick."""
        key = ("AAPL", "day", None)
        first = self.cache.get(key, self.fetch)
        self.fetches[0].callback(self.page(100))
        self.assertEqual(self.successResultOf(first)["bars"][0]["close_cents"], 100)
        self.assertEqual(self.successResultOf(self.cache.get(key, self.fetch))["bars"][0]["close_cents"], 100)
        self.assertEqual(len(self.fetches), 1)
        self.generation += 1
        again = self.cache.get(key, self.fetch)
        self.assertEqual(len(self.fetches), 2)
        self.fetches[1].callback(self.page(200))
        self.assertEqual(self.successResultOf(again)["bars"][0]["close_cents"], 200)

    def test_concurrent_misses_share_a_fetch(self) -> None:
        """Requests for a page being fetched wait for that fetch; each gets the answer."""
        key = ("AAPL", "day", None)
        waiting = [self.cache.get(key, self.fetch) for _ in range(10)]
        self.assertEqual(len(self.fetches), 1)
        for d in waiting:
            self.assertNoResult(d)
        self.fetches[0].callback(self.page(100))
        self.assertEqual({self.successResultOf(d)["bars"][0]["close_cents"] for d in waiting}, {100})
        other = self.cache.get(("AAPL", "week", None), self.fetch)
        self.assertEqual(len(self.fetches), 2)
        self.assertNoResult(other)

    def test_failures_not_kept(self) -> None:
        """A failed fetch fails every request that waited for it, and the next request fetches again."""
        key = ("AAPL", "day", None)
        waiting = [self.cache.get(key, self.fetch) for _ in range(3)]
        self.fetches[0].errback(ServiceUnavailable("master unreachable"))
        for d in waiting:
            self.failureResultOf(d, ServiceUnavailable)
        self.cache.get(key, self.fetch)
        self.assertEqual(len(self.fetches), 2)
        self.assertEqual(len(self.cache), 0)

    def test_bounded_least_recently_used(self) -> None:
        """Past ``max_entries`` pages the least recently used goes; so does what exceeds ``max_bytes``."""
        for index, span in enumerate(("day", "week", "month")):
            self.cache.get(("AAPL", span, None), self.fetch)
            self.fetches[index].callback(self.page(index))
        self.cache.get(("AAPL", "day", None), self.fetch)  # used: "week" is now the least recently used
        self.cache.get(("AAPL", "year", None), self.fetch)
        self.fetches[3].callback(self.page(3))
        self.assertEqual(len(self.cache), 3)
        self.assertEqual(len(self.fetches), 4)
        self.cache.get(("AAPL", "week", None), self.fetch)
        self.assertEqual(len(self.fetches), 5)  # it was dropped
        self.cache.get(("AAPL", "day", None), self.fetch)
        self.assertEqual(len(self.fetches), 5)  # it was kept

        small = HistoryCache(lambda: 1, max_entries=100, max_bytes=2 * page_bytes(self.page(0)))
        for index in range(5):
            small.get(("AAPL", "day", str(index)), lambda index=index: succeed(self.page(index)))
        self.assertEqual(len(small), 2)
        self.assertLessEqual(small.size, small.max_bytes)

    def test_fetch_across_a_tick_not_kept(self) -> None:
        """A page whose fetch began before a price update is answered, but neither kept nor shared with
        requests that come after the update: they wait for a fetch of their own."""
        key = ("AAPL", "day", None)
        d = self.cache.get(key, self.fetch)
        self.generation += 1
        later = self.cache.get(key, self.fetch)  # after the update: not a share of the older fetch
        self.assertEqual(len(self.fetches), 2)
        self.fetches[0].callback(self.page(100))
        self.successResultOf(d)
        self.assertNoResult(later)
        self.cache.get(key, self.fetch)
        self.assertEqual(len(self.fetches), 2)  # the newer fetch is still the one to wait for
        self.fetches[1].callback(self.page(200))
        self.assertEqual(self.successResultOf(later)["bars"][0]["close_cents"], 200)
        self.assertEqual(self.successResultOf(self.cache.get(key, self.fetch))["bars"][0]["close_cents"], 200)


class FakeHistory:
    """A master's price history for the tests, served as RelayedGetPriceHistory in pages of ``per_page`` bars.

    A reading is pinned to the board's tick: a cursor from an earlier tick is refused with DataFailed, as
    the master does.  ``fail_next`` makes the next request fail.  Every request is counted.
    """

    def __init__(self, per_page: int = 3) -> None:
        self.deployment: Any = None  # the Deployment, once made
        self.per_page = per_page
        self.bars: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.fail_next: Exception | None = None

    def answer(self, symbol: str, range: str, cursor: str | None) -> dict[str, Any]:
        self.requests.append((symbol, range, cursor))
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        bars = self.bars.get((symbol, range))
        if bars is None:
            raise DataFailed(f"unknown symbol {symbol!r}")
        tick = self.deployment.board.tick
        number = 1
        if cursor is not None:
            reading, _, page = cursor.partition(".")
            if reading != str(tick):
                raise DataFailed("prices changed since the first page; read again from the first page")
            number = int(page)
        pages = max(1, -(-len(bars) // self.per_page))
        answer = {
            "symbol": symbol,
            "range": range,
            "bar_seconds": 60,
            "bars": bars[(number - 1) * self.per_page : number * self.per_page],
            "as_of": self.deployment.board.as_of,
            "page": number,
            "pages": pages,
        }
        if number < pages:
            answer["next_cursor"] = f"{tick}.{number + 1}"
        return answer

    def install(self, test: SynchronousTestCase) -> None:
        """Answer RelayedGetPriceHistory with this history on every master connection made from now on."""

        def responder(locator: MasterLocator, symbol: str, range: str, received_at: str, client_address: str,
                      cursor: str | None = None) -> Deferred:
            try:
                answer = succeed(self.answer(symbol, range, cursor))
            except Exception:
                answer = fail()
            return answer.addBoth(locator._count_forwarded, 1)

        dispatch = dict(MasterLocator._commandDispatch)
        dispatch[RelayedGetPriceHistory.commandName] = (RelayedGetPriceHistory, responder)
        test.patch(MasterLocator, "_commandDispatch", dispatch)


class WorkerMarketTests(SynchronousTestCase):
    """A real master and worker in memory: what reaches the master, and what the clients get."""

    def setUp(self) -> None:
        self.history = FakeHistory()
        self.history.install(self)
        self.d = Deployment(self.mktemp() + ".db")
        self.history.deployment = self.d
        self.history.bars[("AAPL", "day")] = [bar(i, 19_000 + i) for i in range(10)]
        self.client = self.d.client()

    def forwarded(self) -> int:
        """How many relayed client commands the master has answered for the worker."""
        return self.d.registry.get("test-worker").commands_forwarded

    def push(self, prices: dict[str, int], stale: dict[str, str] | None = None) -> int:
        """Have the master push a PriceTick (the next tick number) to the worker; returns the tick."""
        tick = self.d.board.tick + 1
        connection = self.d.registry.get("test-worker").connection
        arguments: dict[str, Any] = {"tick": tick, "as_of": f"t{tick}",
                                     "prices": [{"symbol": s, "price_cents": c} for s, c in prices.items()]}
        if stale is not None:
            arguments["stale"] = stale
        connection.callRemote(PriceTick, **arguments)
        self.d.flush()
        return tick

    def test_quotes_and_info_without_the_master(self) -> None:
        """A hundred quotes and a hundred asset infos are answered by the worker: none reaches the master;
        after an update they carry the new prices, still without asking."""
        before = self.forwarded()
        for _ in range(100):
            quote = self.d.result(self.client.quote("aapl"))
            info = self.d.result(self.client.asset_info("KO"))
        self.assertEqual(quote["price_cents"], ASSETS["AAPL"].reference_cents)
        self.assertEqual(
            {key: info[key] for key in ("symbol", "name", "exchange", "sector", "industry")},
            {"symbol": "KO", "name": "Coca-Cola Co.", "exchange": "NYSE", "sector": "Consumer Defensive",
             "industry": "Beverages"},
        )
        self.assertEqual(info["price_cents"], ASSETS["KO"].reference_cents)
        self.assertIn("currency", info)
        self.d.source.prices["AAPL"] = 20_000
        self.d.tick()
        self.assertEqual(self.d.result(self.client.quote("AAPL"))["price_cents"], 20_000)
        self.assertEqual(self.forwarded(), before)

    def test_unknown_symbol_refused_by_the_worker(self) -> None:
        """Quote, info and history of an unknown symbol, or an unknown range, are refused by the worker
        itself (DataFailed), without asking the master."""
        before = self.forwarded()
        for request in (
            lambda: self.client.quote("NOPE"),
            lambda: self.client.asset_info("NOPE"),
            lambda: self.client.price_history_page("NOPE", "day"),
            lambda: self.client.price_history_page("AAPL", "decade"),
        ):
            error = self.assertRaises(DataFailed, self.d.result, request())
            self.assertIn("unknown", str(error))
        self.assertEqual(self.forwarded(), before)
        self.assertEqual(self.history.requests, [])

    def test_stale_carried_to_quotes_info_and_pushes(self) -> None:
        """A tick's stale reasons reach quotes, asset info and the pushes of the clients subscribed to
        those symbols (and only those)."""
        watching_aapl, watching_ko, watching_all = self.d.client(), self.d.client(), self.d.client()
        ticks: dict[str, list[dict[str, Any]]] = {"aapl": [], "ko": [], "all": []}
        for name, client, wanted in (("aapl", watching_aapl, ["AAPL"]), ("ko", watching_ko, ["KO"]),
                                     ("all", watching_all, "all")):
            client.on_price_tick(ticks[name].append)
            self.d.result(client.subscribe(wanted))
        tick = self.push({"AAPL": 19_000, "KO": 6_100, "MSFT": 41_500}, {"AAPL": "source timed out"})
        quote = self.d.result(self.client.quote("AAPL"))
        self.assertEqual((quote["price_cents"], quote["stale"]), (19_000, "source timed out"))
        self.assertEqual(self.d.result(self.client.asset_info("AAPL"))["stale"], "source timed out")
        self.assertIsNone(self.d.result(self.client.quote("KO")).get("stale"))
        self.assertEqual([(t["tick"], t["stale"]) for t in ticks["aapl"]], [(tick, {"AAPL": "source timed out"})])
        self.assertEqual([(t["tick"], t["stale"]) for t in ticks["ko"]], [(tick, {})])
        self.assertEqual(ticks["all"][-1]["stale"], {"AAPL": "source timed out"})
        # The next tick with AAPL retrieved again: no longer stale.
        self.push({"AAPL": 19_100, "KO": 6_100, "MSFT": 41_500})
        self.assertIsNone(self.d.result(self.client.quote("AAPL")).get("stale"))
        self.assertEqual(ticks["aapl"][-1]["stale"], {})

    def test_repeated_requests_reach_the_master_once_per_update(self) -> None:
        """A hundred quotes and a hundred reads of a history page between two updates reach the master
        once (the history page; the quotes never); after the next update, once more."""
        before = self.forwarded()
        for _ in range(100):
            self.d.result(self.client.quote("AAPL"))
            page = self.d.result(self.client.price_history_page("AAPL", "day"))
        self.assertEqual(page["bars"], self.history.bars[("AAPL", "day")][:3])
        self.assertEqual(self.forwarded() - before, 1)
        self.d.tick()
        for _ in range(100):
            self.d.result(self.client.quote("AAPL"))
            self.d.result(self.client.price_history_page("AAPL", "day"))
        self.assertEqual(self.forwarded() - before, 2)
        self.assertEqual(self.history.requests, [("AAPL", "day", None)] * 2)

    def test_concurrent_misses_coalesced(self) -> None:
        """Fifty identical history requests arriving together, from five clients, reach the master as one."""
        clients = [self.d.client() for _ in range(5)]
        requests = [client.price_history_page("AAPL", "day") for client in clients for _ in range(10)]
        self.d.deliver_in_one_turn()
        self.d.flush()
        pages = [self.successResultOf(d) for d in requests]
        self.assertEqual({len(page["bars"]) for page in pages}, {3})
        self.assertEqual(self.history.requests, [("AAPL", "day", None)])

    def test_failures_not_cached(self) -> None:
        """A history request the master fails is failed, and the next one asks the master again."""
        self.history.fail_next = DataFailed("the history store is busy")
        self.assertRaises(DataFailed, self.d.result, self.client.price_history_page("AAPL", "day"))
        self.d.result(self.client.price_history_page("AAPL", "day"))
        self.assertEqual(len(self.history.requests), 2)

    def test_reading_reassembled(self) -> None:
        """`price_history` reads every page and puts the bars back together, oldest first."""
        history = self.d.result(self.client.price_history("AAPL", "day"))
        self.assertEqual(history["bars"], self.history.bars[("AAPL", "day")])
        self.assertEqual((history["symbol"], history["range"], history["bar_seconds"]), ("AAPL", "day", 60))
        self.assertEqual(len(self.history.requests), 4)  # pages of 3, 3, 3 and 1 bars

    def test_reading_restarts_when_an_update_comes_between_pages(self) -> None:
        """A page refused because an update came since the first page: the reading starts again at page 1
        (of the new prices); an update between every page gives up after HISTORY_ATTEMPTS readings."""
        bars = self.history.bars[("AAPL", "day")]
        original = self.history.answer
        updates = []

        def answer_then_tick(symbol: str, range: str, cursor: str | None) -> dict[str, Any]:
            answer = original(symbol, range, cursor)
            if cursor is None and len(updates) < 1:
                updates.append(self.d.board.tick)
                self.d.exchange.tick()  # after the first page of the first reading
            return answer

        self.history.answer = answer_then_tick  # type: ignore[method-assign]
        history = self.d.result(self.client.price_history("AAPL", "day"))
        self.assertEqual(history["bars"], bars)
        cursors = [cursor for _, _, cursor in self.history.requests]
        self.assertEqual(cursors[:3], [None, f"{updates[0]}.2", None])

        def tick_after_first_pages(symbol: str, range: str, cursor: str | None) -> dict[str, Any]:
            answer = original(symbol, range, cursor)
            if cursor is None:
                self.d.exchange.tick()
            return answer

        self.history.answer = tick_after_first_pages  # type: ignore[method-assign]
        self.d.tick()  # the pages the worker keeps from the first reading go
        self.history.requests.clear()
        self.assertRaises(DataFailed, self.d.result, self.client.price_history("AAPL", "day"))
        self.assertEqual([c for _, _, c in self.history.requests].count(None), HISTORY_ATTEMPTS)

    def test_tick_pushes_reach_a_client_with_stale_key(self) -> None:
        """Every tick a client's callback gets has ``stale`` (empty when nothing is)."""
        ticks: list[dict[str, Any]] = []
        self.client.on_price_tick(ticks.append)
        self.d.result(self.client.subscribe(["KO"]))
        self.d.tick()
        self.assertEqual(ticks[-1]["stale"], {})
        self.assertEqual(ticks[-1]["prices"], [{"symbol": "KO", "price_cents": ASSETS["KO"].reference_cents}])




class _DatedPrices:
    """A price source giving each symbol's next price at a market time the test sets, or a failure."""

    def __init__(self, prices: dict[str, int]) -> None:
        self.prices = dict(prices)
        self.quoted_at: int | None = None
        self.failures: dict[str, str] = {}

    def fetch(self) -> Deferred[Retrieval]:
        quotes = {s: Quote(c, self.quoted_at) for s, c in self.prices.items() if s not in self.failures}
        return succeed(Retrieval(quotes, dict(self.failures)))


class MasterHistoryTests(SynchronousTestCase):
    """The worker with the master's own history and stale board (no stand-ins on the master side)."""

    def setUp(self) -> None:
        self.d = Deployment(self.mktemp() + ".db")
        self.source = _DatedPrices({s: a.reference_cents for s, a in ASSETS.items()})
        self.d.source.fetch = self.source.fetch  # the exchange's source answers as this one

    def test_history_over_64_kib_reassembled_through_the_worker(self) -> None:
        """Seven hundred daily bars (over 64 KiB as sent) read through the worker page by page, by the
        client library and by ``papertrader chart --json``, are the bars the master stores."""
        start = 1_700_000_000 - 1_700_000_000 % 86_400
        for day in range(700):
            self.source.quoted_at = start + day * 86_400
            self.source.prices["AAPL"] = 19_000 + (day * 37) % 500
            self.d.exchange.tick()
        self.d.flush()
        client = self.d.client()
        history = self.d.result(client.price_history("AAPL", "all"))
        stored: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = self.d.result(self.d.exchange.price_history("AAPL", "all", cursor))
            stored.extend(page["bars"])
            cursor = page.get("next_cursor")
            if cursor is None:
                break
        self.assertEqual(len(stored), 701)  # and the bar of the deployment's first update
        self.assertEqual(history["bars"], stored)
        self.assertGreater(len(amp.AmpList(BAR_FIELDS).toStringProto(stored, None)), 64 * 1024)

        args = cli.build_parser().parse_args(["chart", "AAPL", "--range", "all", "--json"])
        out = io.StringIO()
        with redirect_stdout(out):
            d = cli.cmd_chart(client, args, None, None)
            self.d.flush()
        self.successResultOf(d)
        self.assertEqual(json.loads(out.getvalue())["bars"], stored)

    def test_stale_from_the_master(self) -> None:
        """A symbol the source fails for is stale in the worker's quotes, asset info and pushes."""
        ticks: list[dict[str, Any]] = []
        client = self.d.client()
        client.on_price_tick(ticks.append)
        self.d.result(client.subscribe(["AAPL", "KO"]))
        self.source.failures = {"AAPL": "source timed out"}
        self.d.tick()
        quote = self.d.result(client.quote("AAPL"))
        self.assertEqual((quote["price_cents"], quote["stale"]), (ASSETS["AAPL"].reference_cents, "source timed out"))
        self.assertEqual(self.d.result(client.asset_info("AAPL"))["stale"], "source timed out")
        self.assertEqual(ticks[-1]["stale"], {"AAPL": "source timed out"})
        self.source.failures = {}
        self.d.tick()
        self.assertIsNone(self.d.result(client.quote("AAPL")).get("stale"))
        self.assertEqual(ticks[-1]["stale"], {})


class SessionMarketTests(SynchronousTestCase):
    """A `Session` routes the market requests like the others: to another worker when its own is gone."""

    def test_market_requests_fail_over(self) -> None:
        """Asset info and a whole price history are read on the second worker once the first has crashed."""
        d = Deployment(self.mktemp() + ".db")
        first, second = SimWorker(d, "w1", "w1.example:2049"), SimWorker(d, "w2", "w2.example:2049")
        session = Session(d.clock, sim_connector([first, second]), [first.address, second.address])
        self.assertEqual(d.result(session.asset_info("KO"))["name"], ASSETS["KO"].name)
        self.assertEqual(session.address, first.address)
        first.crash()
        history = d.result(session.price_history("AAPL", "day"))
        self.assertEqual(session.address, second.address)
        stored = d.result(d.exchange.price_history("AAPL", "day"))
        self.assertEqual(history["bars"], stored["bars"])
        self.assertTrue(history["bars"])
        self.assertRaises(DataFailed, d.result, session.asset_info("NOPE"))
        session.close()
