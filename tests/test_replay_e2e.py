"""End to end: a real master replaying a CSV of prices; orders fill at the CSV's prices."""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from papertrader.money import parse_amount
from tests.processes import RunningDeployment, replay_deployment

PASSWORD = "correct horse battery"
ASSETS = (
    "symbol,name,exchange,sector,industry,reference_price\n"
    "AAPL,Apple Inc.,NASDAQ,Technology,Consumer Electronics,189.50\n"
    "KO,Coca-Cola Co.,NYSE,Consumer Defensive,Beverages,60.50\n"
)
# Every step a different price for each symbol, so a fill's price says which step it settled at.
DAYS = [f"2024-01-{day:02d}" for day in range(2, 12)]
PRICES = "time,symbol,open,high,low,close\n" + "".join(
    f"{day},AAPL,1.00,999.00,0.50,{180 + i}.{i:02d}\n{day},KO,1.00,999.00,0.50,{60 + i}.{50 + i}\n"
    for i, day in enumerate(DAYS)
)
# An extra symbol that is not an asset: ignored, with a warning.
PRICES += "2024-01-02,ZZZ,1,1,1,1\n"


def replay_prices() -> dict[str, dict[str, int]]:
    """The CSV's close in cents, by day and symbol."""
    prices: dict[str, dict[str, int]] = {}
    for line in PRICES.splitlines()[1:]:
        day, symbol, *_, close = line.split(",")
        prices.setdefault(day, {})[symbol] = parse_amount(close)
    return prices


def replayed_days(log: str) -> dict[str, str]:
    """Each update's time (as orders settled at it show it) -> the replayed day whose prices it took."""
    days: dict[str, str] = {}
    day = None
    for line in log.splitlines():
        step = re.search(r"replay step \d+ of \d+: prices of (\S+)", line)
        if step:
            day = step.group(1)
        update = re.search(r"new prices as of ([^;\s]+)", line)
        if update and day is not None:
            days[update.group(1)] = day
            day = None
    return days


class ReplayEndToEndTests(TestCase):
    """A deployment whose master replays a small CSV, one day per update, looping."""

    timeout = 240

    @inlineCallbacks
    def test_fills_at_replayed_prices(self) -> Any:
        """Orders bought and sold through the CLI fill at the CSV's close of the day their update replayed."""
        d = replay_deployment(self.mktemp(), ASSETS, PRICES)
        self.addCleanup(d.stop)
        yield d.start()
        password = d.password_file(PASSWORD)
        yield d.cli_json("register", "rita", "rita@example.com", "--password-file", password)
        yield d.cli_json("login", "rita", "--password-file", password)

        fills = [
            (yield d.cli_json("buy", "AAPL", "3", "--wait")),
            (yield d.cli_json("buy", "KO", "2", "--wait")),
            (yield d.cli_json("sell", "AAPL", "1", "--wait")),
        ]
        yield d.stop()

        # The master's event log, whole once it has stopped.
        with open(os.path.join(d.data, "logs", "master-events.log"), encoding="utf-8") as f:
            output = f.read()
        self.assertIn("ignoring 1 symbol(s) not in the asset list: ZZZ", output)
        days, closes = replayed_days(output), replay_prices()
        for fill in fills:
            self.assertEqual(fill["status"], "filled", fill)
            day = days[fill["settled_at"]]
            self.assertEqual(fill["price_cents"], closes[day][fill["symbol"]], (fill, day))
        # The three orders settled at (at least) two different steps, all of them replayed ones.
        self.assertGreater(len({fill["settled_at"] for fill in fills}), 1)

    @inlineCallbacks
    def test_bad_file_refused(self) -> Any:
        """A malformed replay file stops twistd before it starts: every problem printed, exit status non-zero."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        prices = os.path.join(base, "prices.csv")
        with open(prices, "w", encoding="utf-8") as f:
            f.write("time,symbol,close\n2024-01-02,AAPL,1\n")
        d = RunningDeployment(
            os.path.join(base, "deployment"), "--price-source", "replay", "--price-replay-file", prices
        )
        watcher = d.spawn()
        reason = yield watcher.ended
        self.assertNotEqual(reason.exitCode, 0)
        output = watcher.output.decode("utf-8", "replace")
        self.assertIn(f"{prices}: missing column(s): price (or open, high, low)", output)
        self.assertFalse(os.path.exists(d.data))
