"""Cache management: asset facts, the latest prices and stale reasons, refreshed by the master's ticks; pages of
price history until the next tick; and the worker directory the master last pushed."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from papertrader.errors import DataFailed
from papertrader.protocol import HISTORY_RANGES, MAX_SYMBOL_LENGTH

# The company facts the asset list gives each symbol (ListAssets), kept for GetAssetInfo.
ASSET_FACTS = ("name", "exchange", "sector", "industry", "currency")
# The currency of an asset the master's list names none for (a master from before ``currency``): prices
# are cents of US dollars.
DEFAULT_CURRENCY = "USD"
# Pages of price history kept between two ticks, and their bytes at most (each page is at most
# `papertrader.paging.PAGE_BUDGET` bytes of bars on the wire: ~32 KiB).
HISTORY_ENTRIES = 256
HISTORY_BYTES = 4 * 1024 * 1024
# Set to "off", the worker passes every quote and asset info on to the master instead of answering them
# itself: the baseline of benchmarks/quotes.py, and nothing else.
QUOTE_CACHE_ENV = "PAPERTRADER_QUOTE_CACHE"


def quote_cache_from_environment(environ: dict[str, str] | None = None) -> bool:
    """Whether the worker answers quotes and asset info from its cache (unless QUOTE_CACHE_ENV says "off")."""
    return (os.environ if environ is None else environ).get(QUOTE_CACHE_ENV, "").strip().lower() != "off"


class QuoteCache:
    """Answers quotes and asset facts between price updates without asking the master.

    With ``answers`` false it answers neither (`quote` and `info` say they
    cannot), so the worker relays each: the benchmarks' baseline.
    """

    def __init__(self, answers: bool = True) -> None:
        self.answers = answers
        self.assets: dict[str, dict[str, str]] = {}
        self.prices: dict[str, int] = {}
        # Symbols whose latest retrieval failed, and why: their price is the last good one.
        self.stale: dict[str, str] = {}
        self.tick = 0
        self.as_of: str | None = None
        # Bumped whenever the prices change (a load or a newer tick): what is cached of the old ones goes.
        self.generation = 0
        # The workers clients may use ({"name", "address"}), as the master last said (WorkerDirectory).
        self.workers: list[dict[str, str]] = []
        # Pages of price history, kept until the prices change.
        self.history = HistoryCache(lambda: self.generation)

    def load(self, assets: list[dict[str, Any]], tick: int, as_of: str | None) -> None:
        """Fill the cache afresh from the master's ListAssets answer (at every handshake).

        Everything is replaced, tick number included: the master may have
        restarted with other assets or another database.
        """
        self.assets = {
            a["symbol"]: {
                "name": a["name"],
                "exchange": a["exchange"],
                "sector": a.get("sector") or "",
                "industry": a.get("industry") or "",
                "currency": a.get("currency") or DEFAULT_CURRENCY,
            }
            for a in assets
        }
        self.tick = tick
        self.as_of = as_of
        self.prices = {a["symbol"]: a["price_cents"] for a in assets if a.get("price_cents") is not None}
        self.stale = {a["symbol"]: a["stale"] for a in assets if a.get("stale")}
        self.generation += 1

    def update(
        self, tick: int, as_of: str, prices: list[dict[str, Any]], stale: dict[str, str] | None = None
    ) -> bool:
        """Take the prices (and stale reasons) of a newer update; whether it was taken (older ones are ignored)."""
        if tick < self.tick:
            return False
        self.tick = tick
        self.as_of = as_of
        self.prices = {p["symbol"]: p["price_cents"] for p in prices}
        self.stale = dict(stale or {})
        self.generation += 1
        return True

    def known(self, symbol: str) -> bool | None:
        """Whether the deployment lists ``symbol``; None while the cache holds no asset list to say."""
        if not self.assets:
            return None
        return symbol in self.assets

    def _asset(self, symbol: str) -> dict[str, str] | None:
        if not self.assets or not self.answers:
            return None
        asset = self.assets.get(symbol)
        if asset is None:
            raise DataFailed(f"unknown symbol {symbol[:MAX_SYMBOL_LENGTH]!r}")
        return asset

    def _price(self, symbol: str) -> dict[str, Any]:
        """``price_cents``, ``as_of`` and (if so) ``stale`` of ``symbol``; empty while it has no price."""
        if symbol not in self.prices or self.as_of is None:
            return {}
        price: dict[str, Any] = {"price_cents": self.prices[symbol], "as_of": self.as_of}
        if symbol in self.stale:
            price["stale"] = self.stale[symbol]
        return price

    def quote(self, symbol: str) -> dict[str, Any] | None:
        """The cached quote for ``symbol`` (GetAssetValue's answer); None when the cache cannot answer.

        Raises DataFailed for a symbol the deployment does not list.
        """
        asset = self._asset(symbol)
        if asset is None:
            return None
        price = self._price(symbol)
        if not price:
            return None
        return {"symbol": symbol, "name": asset["name"], "exchange": asset["exchange"], **price}

    def info(self, symbol: str) -> dict[str, Any] | None:
        """What the asset list says of ``symbol``, with its price if it has one (GetAssetInfo's answer);
        None when the cache holds no asset list.  Raises DataFailed for a symbol the deployment does not list."""
        asset = self._asset(symbol)
        if asset is None:
            return None
        return {"symbol": symbol, **asset, **self._price(symbol)}


HistoryKey = tuple[str, str, str | None]


class HistoryCache:
    """Pages of price history (GetPriceHistory answers) by (symbol, range, cursor), kept until the prices change.

    ``generation()`` says which prices are current (`QuoteCache.generation`):
    a page fetched under older ones is dropped, and one whose fetch began
    before a change is answered but not kept.  At most ``max_entries`` pages
    and ``max_bytes`` bytes of bars (as sent) are kept, the least recently
    used going first.  Concurrent requests for the same page share one fetch;
    a failed fetch is passed to each of them and not kept.
    """

    def __init__(
        self,
        generation: Callable[[], int],
        max_entries: int = HISTORY_ENTRIES,
        max_bytes: int = HISTORY_BYTES,
    ) -> None:
        self._generation = generation
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._seen = generation()
        self._pages: OrderedDict[HistoryKey, tuple[dict[str, Any], int]] = OrderedDict()
        self._bytes = 0
        # Fetches under way, by the prices they began under and the page: one begun before an update is not
        # joined by requests that come after it.
        self._fetching: dict[tuple[int, HistoryKey], list[Deferred[dict[str, Any]]]] = {}
        # Answers served from the cache, and fetches made (for tests and the benchmark).
        self.hits = 0
        self.fetches = 0

    def __len__(self) -> int:
        self._expire()
        return len(self._pages)

    @property
    def size(self) -> int:
        """Bytes of bars held (as sent on the wire)."""
        self._expire()
        return self._bytes

    def _expire(self) -> None:
        current = self._generation()
        if current != self._seen:
            self._seen = current
            self._pages.clear()
            self._bytes = 0

    def get(self, key: HistoryKey, fetch: Callable[[], Deferred[dict[str, Any]]]) -> Deferred[dict[str, Any]]:
        """The page at ``key``: kept, being fetched already, or fetched now with ``fetch()``."""
        self._expire()
        kept = self._pages.get(key)
        if kept is not None:
            self._pages.move_to_end(key)
            self.hits += 1
            return succeed(kept[0])
        waiting: Deferred[dict[str, Any]] = Deferred()
        started = self._seen
        flight = (started, key)
        if flight in self._fetching:
            self.hits += 1
            self._fetching[flight].append(waiting)
            return waiting
        self._fetching[flight] = [waiting]
        self.fetches += 1
        fetch().addBoth(self._fetched, key, started)
        return waiting

    def _fetched(self, result: dict[str, Any] | Failure, key: HistoryKey, started: int) -> None:
        waiters = self._fetching.pop((started, key), [])
        if not isinstance(result, Failure):
            self._keep(key, result, started)
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def _keep(self, key: HistoryKey, page: dict[str, Any], started: int) -> None:
        self._expire()
        if started != self._seen:
            return  # fetched under prices that are no longer the latest
        size = page_bytes(page)
        if size > self.max_bytes or self.max_entries < 1:
            return
        old = self._pages.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        self._pages[key] = (page, size)
        self._bytes += size
        while len(self._pages) > self.max_entries or self._bytes > self.max_bytes:
            _, (_, dropped) = self._pages.popitem(last=False)
            self._bytes -= dropped


# Bytes a bar costs on the wire beyond its start text: five AMP keys, their lengths and four integers.
_BAR_OVERHEAD = 100


def page_bytes(page: dict[str, Any]) -> int:
    """About how many bytes a page of history is on the wire (its bars, and the rest of the answer)."""
    return 200 + sum(len(bar.get("start", "")) + _BAR_OVERHEAD for bar in page.get("bars", ()))


def check_range(range: str) -> str:
    """``range`` if it is one of HISTORY_RANGES; DataFailed if not."""
    if range not in HISTORY_RANGES:
        raise DataFailed(f"unknown range {range[:16]!r}: expected one of {', '.join(HISTORY_RANGES)}")
    return range
