"""The simulated market and the board of latest prices."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from papertrader.master.market import MAX_STEP_BASIS_POINTS, PriceBoard, Retrieval, SimulatedPriceSource
from tests.support import ASSETS


def prices_of(retrieval: Retrieval) -> dict[str, int]:
    """The cents of each quote of a retrieval that failed for no symbol."""
    assert not retrieval.failures
    return {symbol: quote.price_cents for symbol, quote in retrieval.quotes.items()}


class SimulatedPriceSourceTests(SynchronousTestCase):
    """A seeded random walk in integer cents."""

    def walk(self, seed: int, steps: int) -> list[dict[str, int]]:
        source = SimulatedPriceSource(ASSETS, seed)
        return [prices_of(self.successResultOf(source.fetch())) for _ in range(steps)]

    def test_same_seed_same_walk(self) -> None:
        """The walk is reproducible from its seed and differs for another seed."""
        self.assertEqual(self.walk(7, 20), self.walk(7, 20))
        self.assertNotEqual(self.walk(7, 20), self.walk(8, 20))

    def test_integer_cents_in_bounded_steps(self) -> None:
        """Every price is a positive int and moves at most the maximum step from the previous one."""
        previous = {s: a.reference_cents for s, a in ASSETS.items()}
        for prices in self.walk(1, 200):
            self.assertEqual(set(prices), set(ASSETS))
            for symbol, cents in prices.items():
                self.assertIsInstance(cents, int)
                self.assertGreater(cents, 0)
                largest_step = previous[symbol] * MAX_STEP_BASIS_POINTS // 10_000 + 1
                self.assertLessEqual(abs(cents - previous[symbol]), largest_step)
            previous = prices

    def test_resume_from(self) -> None:
        """After a restart the walk continues from the recorded prices, ignoring unknown symbols."""
        source = SimulatedPriceSource(ASSETS, 3)
        source.resume_from({"AAPL": 1_000_000, "GONE": 5})
        prices = prices_of(self.successResultOf(source.fetch()))
        self.assertLessEqual(abs(prices["AAPL"] - 1_000_000), 1_000_000 * MAX_STEP_BASIS_POINTS // 10_000)
        self.assertNotIn("GONE", prices)


class PriceBoardTests(SynchronousTestCase):
    """The latest prices readers see."""

    def test_update(self) -> None:
        """An update replaces the prices, the tick number and the time."""
        board = PriceBoard(ASSETS)
        self.assertEqual((board.prices, board.tick, board.as_of), ({}, 0, None))
        board.update(4, "2026-01-01T00:00:00.000000+00:00", {"AAPL": 100})
        self.assertEqual((board.prices, board.tick), ({"AAPL": 100}, 4))
