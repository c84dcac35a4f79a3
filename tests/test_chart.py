"""The terminal price chart on its own: what `papertrader.client.chart.render` draws for given bars."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from papertrader.client.chart import CHART_HEIGHT, NO_BARS, bar_time, chart_width, columns, render


def bar(minute: int, high: int, low: int) -> dict[str, Any]:
    """A one-minute bar ``minute`` minutes after 09:30 on 2027-01-15, from ``low`` to ``high`` cents."""
    hour, rest = divmod(30 + minute, 60)
    return {
        "start": f"2027-01-15T{9 + hour:02d}:{rest:02d}:00.000000+00:00",
        "open_cents": low,
        "high_cents": high,
        "low_cents": low,
        "close_cents": high,
    }


def plot_rows(lines: list[str]) -> list[str]:
    """The plot's rows without their y-axis labels and axis."""
    axis = lines[-2].index("+")
    return [line[axis + 1 :] for line in lines[:-2]]


class ChartTests(SynchronousTestCase):
    """A chart is the same lines for the same bars: rows of price levels, a labelled y axis, the x axis times."""

    def test_flat_series(self) -> None:
        """Bars all at one price are a line of ``|`` across the middle row, labelled with that price alone."""
        lines = render([bar(i, 19_005, 19_005) for i in range(5)], 60, 80)
        self.assertEqual(len(lines), CHART_HEIGHT + 2)
        middle = (CHART_HEIGHT - 1) // 2
        self.assertEqual(lines[middle], "190.05 |#####")
        self.assertEqual([line for i, line in enumerate(lines[:CHART_HEIGHT]) if i != middle],
                         ["       |"] * (CHART_HEIGHT - 1))
        self.assertEqual(lines[-2], "       +-----")
        self.assertEqual(lines[-1], "        2027-01-15 09:30 2027-01-15 09:34")

    def test_one_bar(self) -> None:
        """One bar fills its column from its high (top row) to its low (bottom row); one time below."""
        lines = render([bar(0, 10_099, 10_001)], 60, 80)
        self.assertEqual(lines[0], "100.99 |#")
        self.assertEqual(lines[-3], "100.01 |#")
        self.assertTrue(all(row == "#" for row in plot_rows(lines)))
        self.assertEqual(lines[-1].strip(), "2027-01-15 09:30")

    def test_rising_series_and_exact_cents(self) -> None:
        """A rising series climbs from the bottom left to the top right; the labels are exact cents
        (integer arithmetic: 1.00 to 1.14 in 15 rows is one cent a row)."""
        bars = [bar(i, 100 + i, 100 + i) for i in range(15)]
        lines = render(bars, 60, 80)
        rows = plot_rows(lines)
        for column in range(15):
            self.assertEqual([r for r, row in enumerate(rows) if row[column : column + 1] == "#"], [14 - column])
        labels = {r: line.split("|")[0].strip() for r, line in enumerate(lines[:CHART_HEIGHT])}
        self.assertEqual(
            {r: text for r, text in labels.items() if text},
            {0: "1.14", 3: "1.11", 6: "1.08", 9: "1.05", 12: "1.02", 14: "1.00"},
        )

    def test_more_bars_than_columns(self) -> None:
        """Past the width, each column covers an even share of the bars: its highest high to lowest low;
        no line is wider than asked."""
        bars = [bar(i, 20_000 + i % 7, 19_990 - i % 5) for i in range(1000)]
        lines = render(bars, 60, 60)
        self.assertTrue(all(len(line) <= 60 for line in lines), lines)
        spans = columns(bars, 50)
        self.assertEqual(len(spans), 50)
        self.assertEqual(spans[0], (max(b["high_cents"] for b in bars[:20]), min(b["low_cents"] for b in bars[:20])))
        self.assertEqual(render(bars, 60, 60), lines)  # the same bars draw the same chart

    def test_daily_bars_and_nothing(self) -> None:
        """Bars of a day or more name days on the x axis; no bars at all say so; widths stay in bounds."""
        self.assertEqual(bar_time("2027-01-15T00:00:00.000000+00:00", 86400), "2027-01-15")
        self.assertEqual(bar_time("2027-01-15T13:45:00.000000+00:00", 300), "2027-01-15 13:45")
        self.assertEqual(render([], 60, 80), [NO_BARS])
        self.assertEqual((chart_width(5), chart_width(100), chart_width(10_000)), (20, 100, 160))
