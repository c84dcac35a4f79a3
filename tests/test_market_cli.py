"""``papertrader quote``, ``info``, ``chart`` and ``watch``: their output from given answers, and through a
real deployment (twistd master and its local worker, the CLI as a process)."""

from __future__ import annotations

import io
import json
import re
import sys
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import DeferredList, fail, inlineCallbacks, succeed
from twisted.trial.unittest import SynchronousTestCase, TestCase

from papertrader.client import cli
from papertrader.errors import DataFailed
from papertrader.protocol import HISTORY_RANGES
from tests.processes import DeploymentTestCase, _Watcher, replay_deployment
from tests.test_chart import bar
from tests.test_cli import _Watcher as _WatchClient

QUOTES = {
    "AAPL": {"symbol": "AAPL", "name": "Apple Inc.", "exchange": "NASDAQ", "price_cents": 19_050, "as_of": "t1"},
    "KO": {"symbol": "KO", "name": "Coca-Cola Co.", "exchange": "NYSE", "price_cents": 6_000, "as_of": "t1",
           "stale": "source timed out"},
}


class _MarketClient:
    """A client for the market commands: answers from QUOTES and a given history."""

    def __init__(self, history: dict[str, Any] | None = None) -> None:
        self.history = history

    def quote(self, symbol: str) -> Any:
        if symbol.upper() in QUOTES:
            return succeed(QUOTES[symbol.upper()])
        return fail(DataFailed(f"unknown symbol {symbol!r}"))

    def asset_info(self, symbol: str) -> Any:
        if symbol != "AAPL":
            return fail(DataFailed(f"unknown symbol {symbol!r}"))
        return succeed({**QUOTES["AAPL"], "sector": "Technology", "industry": "Consumer Electronics",
                        "currency": "USD", "stale": None})

    def price_history(self, symbol: str, range: str) -> Any:
        return succeed(self.history)


class MarketCommandTests(SynchronousTestCase):
    """What the commands print for given answers, and how they fail."""

    def run_command(self, client: Any, *argv: str) -> tuple[Any, str]:
        args = cli.build_parser().parse_args(list(argv))
        out = io.StringIO()
        with redirect_stdout(out):
            d = args.run(client, args, None, None)
        return d, out.getvalue()

    def test_quote_several_with_stale(self) -> None:
        """``quote AAPL KO`` prints a line each, a stale price marked with its reason; --json a list."""
        d, out = self.run_command(_MarketClient(), "quote", "AAPL", "KO")
        self.successResultOf(d)
        self.assertEqual(
            out.splitlines(),
            [
                "AAPL  190.50  Apple Inc. (NASDAQ) as of t1",
                "KO  60.00  Coca-Cola Co. (NYSE) as of t1  STALE (source timed out): last good price",
            ],
        )
        d, out = self.run_command(_MarketClient(), "quote", "AAPL", "KO", "--json")
        self.assertEqual([q["symbol"] for q in json.loads(out)], ["AAPL", "KO"])
        d, out = self.run_command(_MarketClient(), "quote", "KO", "--json")
        self.assertEqual(json.loads(out)["stale"], "source timed out")

    def test_quote_unknown_among_others(self) -> None:
        """The known symbols are printed; the unknown ones are the error (every one named)."""
        d, out = self.run_command(_MarketClient(), "quote", "AAPL", "NOPE", "ZZZ")
        error = self.failureResultOf(d, DataFailed).value
        self.assertIn("'NOPE'", str(error))
        self.assertIn("'ZZZ'", str(error))
        self.assertEqual(out, "AAPL  190.50  Apple Inc. (NASDAQ) as of t1\n")

    def test_info(self) -> None:
        """``info`` prints the company's facts and its price."""
        d, out = self.run_command(_MarketClient(), "info", "AAPL")
        self.successResultOf(d)
        self.assertEqual(
            out.splitlines(),
            [
                "AAPL  Apple Inc.",
                "  exchange  NASDAQ",
                "  sector    Technology",
                "  industry  Consumer Electronics",
                "  currency  USD",
                "  price     190.50 as of t1",
            ],
        )

    def test_chart(self) -> None:
        """``chart`` prints a title and the drawing; --json every bar."""
        bars = [bar(i, 19_000 + i, 18_990 + i) for i in range(30)]
        history = {"symbol": "AAPL", "range": "day", "bar_seconds": 60, "as_of": "t1", "bars": bars}
        self.patch(cli, "terminal_columns", lambda: 70)
        d, out = self.run_command(_MarketClient(history), "chart", "AAPL", "--range", "day")
        self.successResultOf(d)
        lines = out.splitlines()
        self.assertEqual(
            lines[0], "AAPL over the last day: 30 bars of 1 min, low 189.90, high 190.29, last 190.29 as of t1"
        )
        self.assertTrue(lines[1].startswith("190.29 |"))
        self.assertTrue(all(len(line) <= 70 for line in lines[1:]))  # the drawing fits the terminal
        d, out = self.run_command(_MarketClient(history), "chart", "AAPL", "--json")
        self.assertEqual(json.loads(out)["bars"], bars)

    def test_ranges(self) -> None:
        """``--range`` takes the protocol's ranges only (another is a usage error, exit 2); default day."""
        parser = cli.build_parser()
        self.assertEqual(parser.parse_args(["chart", "AAPL"]).range, "day")
        for name in HISTORY_RANGES:
            self.assertEqual(parser.parse_args(["chart", "AAPL", "--range", name]).range, name)
        err = io.StringIO()
        with self.assertRaises(SystemExit) as caught:
            with redirect_stderr(err):
                parser.parse_args(["chart", "AAPL", "--range", "decade"])
        self.assertEqual(caught.exception.code, 2)
        self.assertIn("invalid choice: 'decade'", err.getvalue())

    def test_watch_shows_stale(self) -> None:
        """``watch`` marks a stale symbol's price with its reason."""
        client = _WatchClient()
        out = io.StringIO()
        with redirect_stdout(out):
            d = cli.cmd_watch(client, cli.build_parser().parse_args(["watch", "AAPL", "KO", "--count", "1"]), None,
                              None)
            client.on_tick({"tick": 4, "as_of": "t4", "prices": [{"symbol": "KO", "price_cents": 6000},
                            {"symbol": "AAPL", "price_cents": 19_050}], "stale": {"KO": "source timed out"}})
        self.successResultOf(d)
        self.assertEqual(out.getvalue(), "update 4 as of t4: AAPL 190.50  KO 60.00 (stale: source timed out)\n")


class MarketEndToEndTests(DeploymentTestCase):
    """The market commands through a real deployment."""

    @inlineCallbacks
    def test_quote_info_watch(self) -> Any:
        """quote (several symbols), info and watch answer through the worker; an unknown symbol is one
        error line and exit code 1, the others still printed."""
        d = self.deployment
        quotes = yield d.cli_json("quote", "AAPL", "KO")
        self.assertEqual([q["symbol"] for q in quotes], ["AAPL", "KO"])
        self.assertTrue(all(q["price_cents"] > 0 for q in quotes))
        info = yield d.cli_json("info", "msft")
        self.assertEqual((info["symbol"], info["exchange"]), ("MSFT", "NASDAQ"))
        self.assertTrue(info["name"] and info["sector"] and info["industry"] and info["currency"])
        code, out, err = yield d.cli("quote", "AAPL", "NOPE")
        self.assertEqual(code, 1, err)
        self.assertTrue(out.startswith("AAPL  "), out)
        self.assertEqual(err, "papertrader: error: unknown symbol 'NOPE'\n")
        for args in (("info", "NOPE"), ("chart", "NOPE"), ("watch", "NOPE", "--count", "1")):
            code, out, err = yield d.cli(*args)
            self.assertEqual((code, err), (1, "papertrader: error: unknown symbol 'NOPE'\n"), args)
        code, out, err = yield d.cli("chart", "AAPL", "--range", "decade")
        self.assertEqual(code, 2)
        self.assertIn("invalid choice", err)
        results = yield DeferredList([d.cli("watch", "AAPL", "KO", "--count", "2")])
        (ok, (code, out, err)), = results
        self.assertEqual(code, 0, err)
        lines = out.splitlines()
        self.assertEqual(len(lines), 2)
        for line in lines:
            self.assertRegex(line, r"^update \d+ as of \S+: AAPL \d+\.\d\d  KO \d+\.\d\d")

    @inlineCallbacks
    def test_chart_and_interrupted_watch(self) -> Any:
        """``chart`` draws the master's bars (``--json``: the bars themselves); ``watch`` of several symbols
        prints updates until interrupted (SIGINT: Ctrl-C), then ends without an error."""
        d = self.deployment
        history = yield d.cli_json("chart", "AAPL", "--range", "week")
        self.assertEqual((history["symbol"], history["range"]), ("AAPL", "week"))
        self.assertTrue(history["bars"])
        for b in history["bars"]:
            self.assertTrue(b["low_cents"] <= min(b["open_cents"], b["close_cents"]) <= b["high_cents"], b)
        code, out, err = yield d.cli("chart", "AAPL", "--range", "week")
        self.assertEqual(code, 0, err)
        lines = out.splitlines()
        self.assertTrue(lines[0].startswith("AAPL over the last week: "), lines[0])
        self.assertIn(" +-", lines[-2])
        self.assertIn("#", out)

        watcher = _Watcher()
        process = reactor.spawnProcess(
            watcher,
            sys.executable,
            [sys.executable, "-m", "papertrader.client.cli", "watch", "AAPL", "KO", "--data-dir", d.data],
            env=d.env,
            path=d.base,
        )
        yield watcher.wait_for(b"update ")
        process.signalProcess("INT")
        reason = yield watcher.ended
        self.assertEqual(getattr(reason, "exitCode", None), 0, watcher.output)
        self.assertRegex(watcher.output.decode(), r"update \d+ as of \S+: AAPL \d+\.\d\d  KO \d+\.\d\d")
        self.assertNotIn(b"Traceback", watcher.output)


REPLAY_ASSETS = (
    "symbol,name,exchange,sector,industry,reference_price\n"
    "AAPL,Apple Inc.,NASDAQ,Technology,Consumer Electronics,189.50\n"
    "KO,Coca-Cola Co.,NYSE,Consumer Defensive,Beverages,60.50\n"
)
# KO has no price on the second day: replayed, it goes stale then, with the replay's reason.
REPLAY_PRICES = (
    "time,symbol,price\n"
    "2024-01-02,AAPL,185.64\n2024-01-02,KO,59.60\n"
    "2024-01-03,AAPL,184.25\n"
)


class StaleEndToEndTests(TestCase):
    """A master replaying a CSV in which a symbol has no price on some days: the CLI shows it stale."""

    timeout = 240

    @inlineCallbacks
    def test_stale_quote_and_watch(self) -> Any:
        """``quote`` and ``watch`` show KO's last good price as stale, with the reason, on the day it has none."""
        d = replay_deployment(self.mktemp(), REPLAY_ASSETS, REPLAY_PRICES)
        self.addCleanup(d.stop)
        yield d.start()
        for _ in range(100):  # one update a second, alternating days: KO is stale every other one
            code, out, err = yield d.cli("quote", "AAPL", "KO")
            if "STALE" in out:
                break
        self.assertEqual(code, 0, err)
        ko = [line for line in out.splitlines() if line.startswith("KO  ")]
        self.assertEqual(ko, ["KO  59.60  Coca-Cola Co. (NYSE) as of " + ko[0].split(" as of ")[1]])
        self.assertRegex(ko[0], r"STALE \(no replay price at 2024-01-03[^)]*\): last good price$")
        code, out, err = yield d.cli("watch", "KO", "--count", "2")
        self.assertEqual(code, 0, err)
        lines = out.splitlines()
        self.assertEqual(len(lines), 2)
        self.assertTrue(any(re.search(r"KO 59\.60 \(stale: no replay price at 2024-01-03", line) for line in lines),
                        lines)
        info = yield d.cli_json("info", "KO")
        self.assertEqual((info["currency"], info["price_cents"]), ("USD", 5960))
