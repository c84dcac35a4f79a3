"""Tests for L{papertrader.assets}: the asset list and its validation."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from papertrader.assets import COLUMNS, MAX_ASSETS, Asset, parse_assets

ETC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc")
SHIPPED_ASSETS = os.path.join(ETC, "assets.csv")
HEADER = ",".join(COLUMNS) + "\n"


def csv_lines(*rows: str, header: str = HEADER) -> list[str]:
    """CSV lines as L{parse_assets} receives them from C{readlines()}."""
    return [header] + [row + "\n" for row in rows]


class ShippedAssetsTests(SynchronousTestCase):
    """
    The sample C{etc/assets.csv} is a valid asset list of reasonable size.
    """

    def setUp(self) -> None:
        with open(SHIPPED_ASSETS, encoding="utf-8", newline="") as f:
            self.assets, self.problems = parse_assets(f.readlines(), SHIPPED_ASSETS)

    def test_noProblems(self) -> None:
        """The shipped file parses without a single problem."""
        self.assertEqual(self.problems, [])

    def test_atLeastTwentyAssets(self) -> None:
        """The shipped file lists at least twenty assets."""
        self.assertGreaterEqual(len(self.assets), 20)

    def test_keyedBySymbol(self) -> None:
        """Every asset is stored under its own symbol."""
        for symbol, asset in self.assets.items():
            self.assertIsInstance(asset, Asset)
            self.assertEqual(asset.symbol, symbol)

    def test_allColumnsFilled(self) -> None:
        """No asset of the shipped file has an empty name, exchange, sector or industry."""
        for asset in self.assets.values():
            for field in ("symbol", "name", "exchange", "sector", "industry"):
                self.assertTrue(getattr(asset, field).strip(), f"{asset.symbol}: empty {field}")

    def test_referencePricesPositive(self) -> None:
        """Every reference price is a positive whole number of cents."""
        for asset in self.assets.values():
            self.assertIs(type(asset.reference_cents), int)
            self.assertGreater(asset.reference_cents, 0, asset.symbol)

    def test_knownAsset(self) -> None:
        """A known row is read field by field, with its price in exact cents."""
        self.assertEqual(
            self.assets["AAPL"],
            Asset("AAPL", "Apple Inc.", "NASDAQ", "Technology", "Consumer Electronics", 18_950, "USD"),
        )

    def test_everyCurrencyGiven(self) -> None:
        """The shipped file names the currency of every asset."""
        with open(SHIPPED_ASSETS, encoding="utf-8") as f:
            header = f.readline().strip().split(",")
        self.assertIn("currency", header)
        self.assertEqual({asset.currency for asset in self.assets.values()}, {"USD"})


class ParseAssetsTests(SynchronousTestCase):
    """
    L{parse_assets} reads assets and reports every problem with its line number.
    """

    def test_valid(self) -> None:
        """Valid rows become assets and no problem is reported."""
        assets, problems = parse_assets(
            csv_lines("KO,Coca-Cola Co.,NYSE,Consumer Defensive,Beverages,60.50", "BRK.B,Berkshire,NYSE,Fin,Ins,400")
        )
        self.assertEqual(problems, [])
        self.assertEqual(sorted(assets), ["BRK.B", "KO"])
        self.assertEqual(assets["KO"].reference_cents, 6050)
        self.assertEqual(assets["BRK.B"].reference_cents, 40_000)

    def test_whitespaceAndCaseNormalised(self) -> None:
        """Symbols are upper-cased and fields stripped of surrounding spaces."""
        assets, problems = parse_assets(csv_lines(" ko , Coca-Cola ,NYSE ,Consumer Defensive, Beverages ,60.50"))
        self.assertEqual(problems, [])
        self.assertEqual(assets["KO"], Asset("KO", "Coca-Cola", "NYSE", "Consumer Defensive", "Beverages", 6050))

    def test_columnOrderFree(self) -> None:
        """Columns are found by their header name, whatever their order."""
        header = "reference_price,industry,sector,exchange,name,symbol\n"
        assets, problems = parse_assets(csv_lines("1.00,Ind,Sec,EX,Name,ABC", header=header))
        self.assertEqual(problems, [])
        self.assertEqual(assets["ABC"], Asset("ABC", "Name", "EX", "Sec", "Ind", 100))

    def test_currency(self) -> None:
        """The optional currency column: USD where it is absent or empty, kept as written otherwise."""
        header = HEADER.strip() + ",currency\n"
        assets, problems = parse_assets(
            csv_lines("VOD,Vodafone,LSE,Tel,Tel,0.70,GBX", "KO,Coca-Cola,NYSE,Cons,Bev,60.50,", header=header)
        )
        self.assertEqual(problems, [])
        self.assertEqual((assets["VOD"].currency, assets["KO"].currency), ("GBX", "USD"))
        assets, _ = parse_assets(csv_lines("KO,Coca-Cola,NYSE,Cons,Bev,60.50"))
        self.assertEqual(assets["KO"].currency, "USD")

    def test_badCurrency(self) -> None:
        """A currency longer than 8 characters, or not letters and digits, is a problem of its line."""
        header = HEADER.strip() + ",currency\n"
        assets, problems = parse_assets(
            csv_lines("A,A,X,S,I,1,DOLLARSXX", "B,B,X,S,I,1,US$", "C,C,X,S,I,1,EUR", header=header), "f"
        )
        self.assertEqual(sorted(assets), ["C"])
        self.assertEqual([p.split(":")[1] for p in problems], ["2", "3"])
        self.assertIn("bad currency", problems[0])

    def test_badSymbol(self) -> None:
        """A malformed symbol is reported with its line number and the symbol."""
        assets, problems = parse_assets(
            csv_lines("AAPL,Apple,NASDAQ,Tech,Hardware,1.00", "BAD SYMBOL,Bad,NYSE,Tech,Hardware,1.00"), "list.csv"
        )
        self.assertEqual(problems, ["list.csv:3: bad symbol 'BAD SYMBOL'"])
        self.assertEqual(list(assets), ["AAPL"])

    def test_emptySymbol(self) -> None:
        """An empty symbol is reported as a bad symbol."""
        _, problems = parse_assets(csv_lines(",Nameless,NYSE,Tech,Hardware,1.00"), "a")
        self.assertEqual(problems, ["a:2: bad symbol ''"])

    def test_symbolTooLong(self) -> None:
        """A symbol longer than ten characters is refused."""
        _, problems = parse_assets(csv_lines("ABCDEFGHIJK,Long,NYSE,Tech,Hardware,1.00"), "a")
        self.assertEqual(problems, ["a:2: bad symbol 'ABCDEFGHIJK'"])

    def test_duplicateSymbol(self) -> None:
        """A symbol listed twice is reported at its second line; the first row is kept."""
        assets, problems = parse_assets(
            csv_lines(
                "AAPL,Apple,NASDAQ,Tech,Hardware,1.00",
                "MSFT,Microsoft,NASDAQ,Tech,Software,2.00",
                "aapl,Other Apple,NYSE,Tech,Hardware,3.00",
            ),
            "a",
        )
        self.assertEqual(problems, ["a:4: duplicate symbol AAPL"])
        self.assertEqual(assets["AAPL"].name, "Apple")

    def test_badPrice(self) -> None:
        """A price that is not an amount of money is reported with its line number."""
        _, problems = parse_assets(csv_lines("AAPL,Apple,NASDAQ,Tech,Hardware,cheap"), "a")
        self.assertEqual(len(problems), 1)
        self.assertTrue(problems[0].startswith("a:2: "), problems)
        self.assertIn("'cheap'", problems[0])

    def test_fractionalCentPrice(self) -> None:
        """A price with fractions of a cent is refused, not rounded."""
        _, problems = parse_assets(csv_lines("AAPL,Apple,NASDAQ,Tech,Hardware,1.005"), "a")
        self.assertEqual(problems, ["a:2: amount has fractions of a cent: '1.005'"])

    def test_zeroPrice(self) -> None:
        """A reference price of zero is refused."""
        assets, problems = parse_assets(csv_lines("AAPL,Apple,NASDAQ,Tech,Hardware,0.00"), "a")
        self.assertEqual(problems, ["a:2: reference price must be positive"])
        self.assertEqual(assets, {})

    def test_negativePrice(self) -> None:
        """A negative reference price is refused."""
        _, problems = parse_assets(csv_lines("AAPL,Apple,NASDAQ,Tech,Hardware,-1.00"), "a")
        self.assertEqual(len(problems), 1)
        self.assertTrue(problems[0].startswith("a:2: "), problems)

    def test_shortRow(self) -> None:
        """A row lacking its price column is reported rather than crashing."""
        _, problems = parse_assets(csv_lines("AAPL,Apple,NASDAQ"), "a")
        self.assertEqual(len(problems), 1)
        self.assertTrue(problems[0].startswith("a:2: "), problems)

    def test_missingColumn(self) -> None:
        """A header lacking columns names every missing one."""
        assets, problems = parse_assets(["symbol,name,sector\n", "AAPL,Apple,Tech\n"], "a")
        self.assertEqual(assets, {})
        self.assertEqual(problems, ["a: missing column(s): exchange, industry, reference_price"])

    def test_emptyFile(self) -> None:
        """An empty file is missing every column."""
        assets, problems = parse_assets([], "a")
        self.assertEqual(assets, {})
        self.assertEqual(problems, ["a: missing column(s): " + ", ".join(COLUMNS)])

    def test_headerOnly(self) -> None:
        """A header without rows is reported as listing no assets."""
        assets, problems = parse_assets([HEADER], "a")
        self.assertEqual(assets, {})
        self.assertEqual(problems, ["a: no assets listed"])

    def test_blankLinesSkipped(self) -> None:
        """Blank lines are skipped, and line numbers still count them."""
        assets, problems = parse_assets(
            [HEADER, "\n", "AAPL,Apple,NASDAQ,Tech,Hardware,1.00\n", "\n", "B@D,Bad,NYSE,Tech,Hardware,1.00\n"], "a"
        )
        self.assertEqual(list(assets), ["AAPL"])
        self.assertEqual(problems, ["a:5: bad symbol 'B@D'"])

    def test_everyProblemCollected(self) -> None:
        """All problems of a file are reported, each with its own line, in order."""
        assets, problems = parse_assets(
            csv_lines(
                "AAPL,Apple,NASDAQ,Tech,Hardware,1.00",
                "bad symbol,Bad,NYSE,Tech,Hardware,1.00",
                "AAPL,Apple again,NASDAQ,Tech,Hardware,1.00",
                "MSFT,Microsoft,NASDAQ,Tech,Software,lots",
                "KO,Coca-Cola,NYSE,Staples,Beverages,0",
                "IBM,IBM,NYSE,Tech,Services,190.00",
            ),
            "a",
        )
        self.assertEqual(sorted(assets), ["AAPL", "IBM"])
        self.assertEqual(len(problems), 4, problems)
        self.assertEqual(problems[0], "a:3: bad symbol 'bad symbol'")
        self.assertEqual(problems[1], "a:4: duplicate symbol AAPL")
        self.assertTrue(problems[2].startswith("a:5: ") and "'lots'" in problems[2], problems)
        self.assertEqual(problems[3], "a:6: reference price must be positive")

    def test_defaultOrigin(self) -> None:
        """Without an origin, problems are prefixed with C{assets}."""
        _, problems = parse_assets(csv_lines("?,x,x,x,x,1"))
        self.assertEqual(problems, ["assets:2: bad symbol '?'"])


class AssetLimitTests(SynchronousTestCase):
    """The list must fit one AMP answer."""

    def test_too_many_assets(self) -> None:
        """More than MAX_ASSETS assets are refused, saying how many are supported."""
        lines = ["symbol,name,exchange,sector,industry,reference_price\n"] + [
            f"S{n},Company {n},NYSE,Sector,Industry,10.00\n" for n in range(MAX_ASSETS + 1)
        ]
        assets, problems = parse_assets(lines, "big.csv")
        self.assertEqual(problems, [f"big.csv: {MAX_ASSETS + 1} assets listed; at most {MAX_ASSETS} are supported"])
        _, problems = parse_assets(lines[:-1], "big.csv")
        self.assertEqual(problems, [])
