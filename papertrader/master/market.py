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


class PriceBoard:
    """The latest prices, read by everything that needs a current price."""

    def __init__(self, assets: Mapping[str, Asset]) -> None:
        self.assets = dict(assets)
        self.prices: dict[str, int] = {}
        self.tick = 0
        self.as_of: str | None = None

    def update(self, tick: int, as_of: str, prices: Mapping[str, int]) -> None:
        """Publish the prices of update number ``tick``."""
        self.tick = tick
        self.as_of = as_of
        self.prices = dict(prices)
