"""Assets data retrieval (spec 3.1.6): price sources and the latest prices in memory.

A price source answers a Deferred `Retrieval`: a `Quote` for each symbol it
could price and a short reason for each it could not.  It never fails as a
whole; a source that cannot reach its provider says so for every symbol.
`PriceBoard` is what readers see: the latest good price of every symbol and,
for those whose latest retrieval failed, why (they are *stale*).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Protocol

import attr
from twisted.internet.defer import Deferred, succeed

from papertrader.assets import MAX_STALE_REASON as MAX_STALE_REASON  # re-exported: sources cut reasons to it
from papertrader.assets import Asset
from papertrader.eventlog import EventLogger

# A step of the random walk is at most this many basis points either way.
MAX_STEP_BASIS_POINTS = 50


@attr.s(frozen=True, auto_attribs=True)
class Quote:
    """One retrieved price: integer cents, and the market time it is of (seconds since the epoch).

    ``quoted_at`` is the provider's time for the price (a replayed row's
    time, Finnhub's ``t``, Alpha Vantage's latest trading day), which history
    ranges are measured in; None when the source gives none (the retrieval time is used).
    """

    price_cents: int
    quoted_at: int | None = None


@attr.s(frozen=True, auto_attribs=True)
class Retrieval:
    """What one retrieval found: a quote per symbol priced, a reason per symbol not."""

    quotes: dict[str, Quote] = attr.ib(factory=dict)
    failures: dict[str, str] = attr.ib(factory=dict)


class PriceSource(Protocol):
    """Where prices come from."""

    def fetch(self) -> Deferred[Retrieval]:
        """Retrieve every asset's price once; never fails (failures are per symbol, in the answer)."""


class SimulatedPriceSource:
    """A seeded random walk from each asset's reference price, in integer cents."""

    def __init__(self, assets: Mapping[str, Asset], seed: int | None = None) -> None:
        self._random = random.Random(seed)
        self._prices = {symbol: asset.reference_cents for symbol, asset in assets.items()}

    def resume_from(self, prices: Mapping[str, int]) -> None:
        """Continue the walk from previously recorded prices (after a restart)."""
        for symbol, cents in prices.items():
            if symbol in self._prices:
                self._prices[symbol] = cents

    def fetch(self) -> Deferred[Retrieval]:
        for symbol, cents in self._prices.items():
            step = self._random.randint(-MAX_STEP_BASIS_POINTS, MAX_STEP_BASIS_POINTS)
            self._prices[symbol] = max(1, cents + (cents * step) // 10_000)
        return succeed(Retrieval({symbol: Quote(cents) for symbol, cents in self._prices.items()}))


# Each price history range (GetPriceHistory): how far back it reaches (None: all of it) and its bar
# length, in seconds.  A day is 288 bars of 5 minutes; a year 365 of a day.
HISTORY_BARS: dict[str, tuple[int | None, int]] = {
    "day": (86_400, 300),
    "week": (7 * 86_400, 1_800),
    "month": (30 * 86_400, 7_200),
    "year": (365 * 86_400, 86_400),
    "all": (None, 86_400),
}
# The bar lengths kept up to date as prices arrive.
BAR_SECONDS = tuple(sorted({bar for _, bar in HISTORY_BARS.values()}))

# A log line about symbols that went stale (or recovered) names at most this many of them.
LOGGED_SYMBOLS = 10
# Why a symbol is stale when the source answered nothing about it.
NO_ANSWER = "no answer from the price source"


@attr.s(frozen=True, auto_attribs=True)
class BoardPrice:
    """A symbol's latest good price: its market time (epoch seconds, None if unknown) and the
    update (tick and its ISO time) that brought it."""

    price_cents: int
    quoted_at: int | None
    tick: int
    as_of: str


class PriceBoard:
    """The latest prices, read by everything that needs a current price.

    ``prices`` holds the latest good price of every symbol priced so far: a
    failed retrieval keeps a symbol's last good price and marks it stale, with
    the reason (``stale``), until a retrieval prices it again.  Going stale,
    changing reason and recovering are logged once per change, one line per
    reason naming at most LOGGED_SYMBOLS symbols, so a provider failing for
    every symbol on every update logs one line, once.
    """

    log = EventLogger()

    def __init__(self, assets: Mapping[str, Asset]) -> None:
        self.assets = dict(assets)
        self.prices: dict[str, int] = {}
        self.latest: dict[str, BoardPrice] = {}
        # Why each failing symbol failed (priced before or not); `stale` shows the priced ones.
        self.failing: dict[str, str] = {}
        self.tick = 0
        self.as_of: str | None = None

    @property
    def stale(self) -> dict[str, str]:
        """The priced symbols whose latest retrieval failed, and why."""
        return {symbol: reason for symbol, reason in self.failing.items() if symbol in self.prices}

    def restore(self, tick: int, as_of: str, latest: Mapping[str, BoardPrice]) -> None:
        """Take the recorded latest prices back after a restart (nothing is stale until a retrieval says so)."""
        self.tick = tick
        self.as_of = as_of
        self.latest = {symbol: price for symbol, price in latest.items() if symbol in self.assets}
        self.prices = {symbol: price.price_cents for symbol, price in self.latest.items()}

    def update(
        self,
        tick: int,
        as_of: str,
        prices: Mapping[str, int],
        quoted_at: Mapping[str, int] | None = None,
        failures: Mapping[str, str] | None = None,
    ) -> None:
        """Publish update number ``tick``: ``prices`` are fresh (their market times in ``quoted_at``).

        With ``failures`` (a whole retrieval's), those symbols, and every listed
        asset neither priced nor failed, are stale; without (an update recorded
        earlier, published again), only the prices given change.
        """
        self.tick = tick
        self.as_of = as_of
        times = quoted_at or {}
        for symbol, cents in prices.items():
            self.prices[symbol] = cents
            self.latest[symbol] = BoardPrice(cents, times.get(symbol), tick, as_of)
        if failures is None:
            failing = {symbol: reason for symbol, reason in self.failing.items() if symbol not in prices}
        else:
            failing = {symbol: reason[:MAX_STALE_REASON] for symbol, reason in failures.items() if symbol not in prices}
            for symbol in self.assets:
                if symbol not in prices and symbol not in failing:
                    failing[symbol] = NO_ANSWER
        self._log_changes(self.failing, failing)
        self.failing = failing

    def _log_changes(self, before: Mapping[str, str], after: Mapping[str, str]) -> None:
        """One line per reason for the symbols that went stale or changed reason, one for those that recovered."""
        changed: dict[str, list[str]] = {}
        for symbol, reason in after.items():
            if before.get(symbol) != reason:
                changed.setdefault(reason, []).append(symbol)
        for reason, symbols in sorted(changed.items()):
            self.log.warn(
                "{count} symbol(s) stale: {reason}: {symbols}",
                count=len(symbols),
                reason=reason,
                symbols=_cut(symbols),
            )
        recovered = [symbol for symbol in before if symbol not in after]
        if recovered:
            self.log.info(
                "{count} symbol(s) priced again: {symbols}", count=len(recovered), symbols=_cut(recovered)
            )


def _cut(symbols: list[str]) -> str:
    """At most LOGGED_SYMBOLS of ``symbols``, sorted, and how many more."""
    symbols = sorted(symbols)
    shown = ", ".join(symbols[:LOGGED_SYMBOLS])
    if len(symbols) > LOGGED_SYMBOLS:
        shown += f" and {len(symbols) - LOGGED_SYMBOLS} more"
    return shown
