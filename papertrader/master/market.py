"""Assets data retrieval (spec 3.1.6): price sources and the latest prices in memory.

A price source answers a Deferred of ``{symbol: cents}``, so a real market
data API (over treq, say) can replace the simulated one without touching the
rest.  `PriceBoard` is what readers see: the prices of the latest update.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Protocol

from twisted.internet.defer import Deferred, succeed

from papertrader.assets import Asset

# A step of the random walk is at most this many basis points either way.
MAX_STEP_BASIS_POINTS = 50


class PriceSource(Protocol):
    """Where prices come from."""

    def fetch(self) -> Deferred[dict[str, int]]:
        """The current price of every asset, in cents."""


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

    def fetch(self) -> Deferred[dict[str, int]]:
        for symbol, cents in self._prices.items():
            step = self._random.randint(-MAX_STEP_BASIS_POINTS, MAX_STEP_BASIS_POINTS)
            self._prices[symbol] = max(1, cents + (cents * step) // 10_000)
        return succeed(dict(self._prices))


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
