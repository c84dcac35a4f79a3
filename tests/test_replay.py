"""Replaying a CSV of historical prices: parsing (every problem listed), one time step per retrieval."""

from __future__ import annotations

import datetime
import os
from typing import Any

from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from papertrader.master.market import MAX_STALE_REASON, Quote, Retrieval
from papertrader.master.sources import REPLAY_FINISHED, ReplayPriceSource, load_replay, parse_replay
from papertrader.master.tap import Options
from tests.support import ASSETS

ETC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc")


def at(*parts: int) -> int:
    """Epoch seconds of a UTC date or date-time."""
    return int(datetime.datetime(*parts, tzinfo=datetime.timezone.utc).timestamp())


CLOSES = """\
time,symbol,price
2024-01-03,AAPL,184.25
2024-01-02,AAPL,185.64
2024-01-02,KO,59.60
2024-01-03,MSFT,370.60
2024-01-02,MSFT,370.87
2024-01-03,KO,59.61
2024-01-04,AAPL,181.91
"""


class ParseTests(SynchronousTestCase):
    """`parse_replay` reads price and OHLC files into sorted time steps of exact cents."""

    def parse(self, text: str) -> Any:
        replay, problems = parse_replay(text.splitlines(keepends=True), "prices.csv", ASSETS)
        self.assertEqual(problems, [])
        return replay

    def problems(self, text: str) -> list[str]:
        replay, problems = parse_replay(text.splitlines(keepends=True), "prices.csv", ASSETS)
        self.assertIsNone(replay)
        return problems

    def test_price_column(self) -> None:
        """Rows are grouped by time and the times sorted, whatever the rows' order."""
        replay = self.parse(CLOSES)
        self.assertEqual([step.at for step in replay.steps], [at(2024, 1, 2), at(2024, 1, 3), at(2024, 1, 4)])
        self.assertEqual(
            [dict(step.prices) for step in replay.steps],
            [
                {"AAPL": 18_564, "KO": 5_960, "MSFT": 37_087},
                {"AAPL": 18_425, "KO": 5_961, "MSFT": 37_060},
                {"AAPL": 18_191},
            ],
        )
        self.assertEqual(replay.ignored, ())

    def test_ohlc_columns(self) -> None:
        """With open, high, low and close (any case, in any order, extra columns ignored) the close is the price."""
        replay = self.parse(
            "Date,Symbol,Open,High,Low,Close,Adj Close,Volume\n"
            "2024-01-02,aapl,187.15,188.44,183.89,185.64,185.1,82488700\n"
            "2024-01-02T14:30:00+01:00,KO,59.11,59.74,58.90,59.60,59.2,1\n"
        )
        self.assertEqual(
            [(step.at, dict(step.prices)) for step in replay.steps],
            [(at(2024, 1, 2), {"AAPL": 18_564}), (at(2024, 1, 2, 13, 30), {"KO": 5_960})],
        )

    def test_times(self) -> None:
        """Dates are midnight UTC; date-times are UTC without a zone, and honour one (``Z`` too)."""
        replay = self.parse(
            "time,symbol,price\n"
            "2024-01-02 15:30,AAPL,1\n"
            "2024-01-02T16:30:00Z,MSFT,1\n"
            "2024-01-02T12:30:00-05:00,KO,1\n"
        )
        self.assertEqual(
            [(step.at, sorted(step.prices)) for step in replay.steps],
            [(at(2024, 1, 2, 15, 30), ["AAPL"]), (at(2024, 1, 2, 16, 30), ["MSFT"]), (at(2024, 1, 2, 17, 30), ["KO"])],
        )

    def test_exact_cents(self) -> None:
        """Decimal text becomes cents without floats, rounded half up beyond the cent."""
        replay = self.parse("time,symbol,price\n2024-01-02,AAPL,1.005\n2024-01-02,KO,\"1,234.5\"\n")
        self.assertEqual(dict(replay.steps[0].prices), {"AAPL": 101, "KO": 123_450})

    def test_unknown_symbols_ignored(self) -> None:
        """Symbols not in the asset list are left out and named once."""
        replay = self.parse("time,symbol,price\n2024-01-02,AAPL,1\n2024-01-02,ZZZ,2\n2024-01-03,ZZZ,3\n")
        self.assertEqual(replay.ignored, ("ZZZ",))
        self.assertEqual([dict(step.prices) for step in replay.steps], [{"AAPL": 100}])

    def test_missing_columns(self) -> None:
        """A file without its columns is refused, naming them."""
        self.assertEqual(
            self.problems("when,symbol,open,close\n2024-01-02,AAPL,1,1\n"),
            ["prices.csv: missing column(s): date, price (or high, low)"],
        )
        self.assertEqual(self.problems(""), ["prices.csv: empty file"])

    def test_every_problem_listed(self) -> None:
        """Bad times, bad, zero and negative prices, short rows and repeats are all reported, with their lines."""
        problems = self.problems(
            "time,symbol,open,high,low,close\n"
            "2024-01-02,AAPL,1,1,1,1\n"
            "yesterday,AAPL,1,1,1,1\n"
            "2024-01-03,AAPL,1,1,1,abc\n"
            "2024-01-03,KO,1,1,1,0\n"
            "2024-01-03,MSFT,-2,1,1,1\n"
            "2024-01-04,AAPL,1,1\n"
            "2024-01-02,AAPL,2,2,2,2\n"
        )
        self.assertEqual(
            problems,
            [
                "prices.csv:3: not an ISO date or date-time: 'yesterday'",
                "prices.csv:4: close: not a price: 'abc'",
                "prices.csv:5: close: price must be positive, got 0",
                "prices.csv:6: open: price must be positive, got -2",
                "prices.csv:7: 4 fields, the header names 6",
                "prices.csv:8: a second price of AAPL at 2024-01-02",
            ],
        )

    def test_no_prices(self) -> None:
        """A file of only a header, or only of symbols that are not assets, is refused."""
        self.assertEqual(self.problems("time,symbol,price\n"), ["prices.csv: no prices"])
        self.assertEqual(
            self.problems("time,symbol,price\n2024-01-02,ZZZ,1\n"),
            ["prices.csv: no prices of listed assets (only of ZZZ)"],
        )

    def test_sample_file(self) -> None:
        """The shipped sample parses against the shipped asset list: five days of five assets."""
        from papertrader.config import load_master_config

        assets = load_master_config(None, {}).assets
        replay, problems = load_replay(os.path.join(ETC, "replay-sample.csv"), assets)
        self.assertEqual(problems, [])
        self.assertEqual(len(replay.steps), 5)
        self.assertEqual({len(step.prices) for step in replay.steps}, {5})

    def test_unreadable(self) -> None:
        """A file that cannot be read is one problem naming it."""
        replay, problems = load_replay("/nonexistent/prices.csv", ASSETS)
        self.assertIsNone(replay)
        [problem] = problems
        self.assertIn("cannot read /nonexistent/prices.csv", problem)


class ReplaySourceTests(SynchronousTestCase):
    """Each retrieval answers the next time step; then the replay loops or is finished."""

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        replay, problems = parse_replay(CLOSES.splitlines(keepends=True), "prices.csv", ASSETS)
        assert not problems
        self.replay = replay

    def fetch(self, source: ReplayPriceSource) -> Retrieval:
        return self.successResultOf(source.fetch())

    def test_steps(self) -> None:
        """One step per retrieval, timed at the step; an asset without a row at a step fails, saying when."""
        source = ReplayPriceSource(self.replay, ASSETS)
        first, second, third = (self.fetch(source) for _ in range(3))
        day2, day3, day4 = at(2024, 1, 2), at(2024, 1, 3), at(2024, 1, 4)
        self.assertEqual(
            first, Retrieval({"AAPL": Quote(18_564, day2), "KO": Quote(5_960, day2), "MSFT": Quote(37_087, day2)})
        )
        self.assertEqual(
            second, Retrieval({"AAPL": Quote(18_425, day3), "KO": Quote(5_961, day3), "MSFT": Quote(37_060, day3)})
        )
        self.assertEqual(
            third,
            Retrieval(
                {"AAPL": Quote(18_191, day4)},
                {"KO": "no replay price at 2024-01-04", "MSFT": "no replay price at 2024-01-04"},
            ),
        )

    def test_finished(self) -> None:
        """Without looping, every asset fails once the steps are spent, and goes on failing."""
        source = ReplayPriceSource(self.replay, ASSETS)
        for _ in range(3):
            self.fetch(source)
        for _ in range(2):
            self.assertEqual(self.fetch(source), Retrieval(failures=dict.fromkeys(ASSETS, REPLAY_FINISHED)))

    def test_loop(self) -> None:
        """Looping, the step after the last is the first again."""
        source = ReplayPriceSource(self.replay, ASSETS, loop=True)
        first = [self.fetch(source) for _ in range(3)]
        self.assertEqual([self.fetch(source) for _ in range(3)], first)

    def test_reason_fits(self) -> None:
        """A missing price at a date-time is reported within the stale reason's limit."""
        replay, _ = parse_replay(["time,symbol,price\n", "2024-01-02T15:30:45Z,AAPL,1\n"], "p.csv", ASSETS)
        retrieval = self.fetch(ReplayPriceSource(replay, ASSETS))
        self.assertEqual(retrieval.failures["KO"], "no replay price at 2024-01-02T15:30:45Z")
        self.assertLessEqual(max(map(len, retrieval.failures.values())), MAX_STALE_REASON)

    def test_ignored_symbols_warned_once(self) -> None:
        """Symbols of the file that are not assets are named in one warning when the source is made."""
        replay, _ = parse_replay(["time,symbol,price\n", "2024-01-02,AAPL,1\n", "2024-01-02,ZZZ,1\n"], "p.csv", ASSETS)
        source = ReplayPriceSource(replay, ASSETS)
        self.fetch(source)
        self.fetch(source)
        warnings = [formatEvent(e) for e in self.events if "not in the asset list" in formatEvent(e)]
        self.assertEqual(warnings, ["replay file p.csv: ignoring 1 symbol(s) not in the asset list: ZZZ"])


class ReplayOptionsTests(SynchronousTestCase):
    """``twistd papertrader-master`` refuses a bad replay file before starting, listing every problem."""

    def test_bad_file_refused(self) -> None:
        """Each problem of the file is in the usage error (twistd prints it and exits non-zero)."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        path = os.path.join(folder, "prices.csv")
        with open(path, "w", encoding="utf-8") as f:
            f.write("time,symbol,price\n2024-01-02,AAPL,0\n2024-13-01,KO,1\n")
        options = Options()
        error = self.assertRaises(
            usage.UsageError,
            options.parseOptions,
            ["--price-source", "replay", "--price-replay-file", path, "--data-dir", folder],
        )
        self.assertIn(f"{path}:2: price: price must be positive, got 0", str(error))
        self.assertIn(f"{path}:3: not an ISO date or date-time: '2024-13-01'", str(error))
