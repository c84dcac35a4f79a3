"""Cache management: asset details and the latest prices, refreshed by the master's ticks, and the
worker directory the master last pushed."""

from __future__ import annotations

from typing import Any

from papertrader.errors import DataFailed


class QuoteCache:
    """Answers quotes between price updates without asking the master."""

    def __init__(self) -> None:
        self.assets: dict[str, dict[str, str]] = {}
        self.prices: dict[str, int] = {}
        self.tick = 0
        self.as_of: str | None = None
        # The workers clients may use ({"name", "address"}), as the master last said (WorkerDirectory).
        self.workers: list[dict[str, str]] = []

    def load(self, assets: list[dict[str, Any]], tick: int, as_of: str | None) -> None:
        """Fill the cache afresh from the master's ListAssets answer (at every handshake).

        Everything is replaced, tick number included: the master may have
        restarted with other assets or another database.
        """
        self.assets = {a["symbol"]: {"name": a["name"], "exchange": a["exchange"]} for a in assets}
        self.tick = tick
        self.as_of = as_of
        self.prices = {a["symbol"]: a["price_cents"] for a in assets if a.get("price_cents") is not None}

    def update(self, tick: int, as_of: str, prices: list[dict[str, Any]]) -> bool:
        """Take the prices of a newer update; whether it was taken (older ones are ignored)."""
        if tick < self.tick:
            return False
        self.tick = tick
        self.as_of = as_of
        self.prices = {p["symbol"]: p["price_cents"] for p in prices}
        return True

    def quote(self, symbol: str) -> dict[str, Any] | None:
        """The cached quote for ``symbol``; None when the cache cannot answer.

        Raises DataFailed for a symbol the deployment does not list.
        """
        if not self.assets:
            return None
        asset = self.assets.get(symbol)
        if asset is None:
            raise DataFailed(f"unknown symbol {symbol!r}")
        if symbol not in self.prices or self.as_of is None:
            return None
        return {
            "symbol": symbol,
            "name": asset["name"],
            "exchange": asset["exchange"],
            "price_cents": self.prices[symbol],
            "as_of": self.as_of,
        }
