"""A price chart drawn in characters, for ``papertrader chart``: pure, so the same bars always draw the same lines.

Each column is one bar, or (when there are more bars than columns) the bars
of an even share of them, drawn as a column of ``#`` from its highest to its lowest
price.  Rows are price levels from the highest high (top) to the lowest low
(bottom); the y axis is labelled in dollars and cents, worked out from the
integer cents; the x axis names the first and the last bar's time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from papertrader.money import format_cents

# Rows of the plot, and the widths a chart is drawn at (the terminal's, within these).
CHART_HEIGHT = 15
MIN_WIDTH = 20
MAX_WIDTH = 160
# Every this many rows (and the bottom one) carries its price on the y axis.
LABEL_EVERY = 3
BAR = "#"
NO_BARS = "no price history in this range yet"


def chart_width(terminal_columns: int) -> int:
    """The width to draw at in a terminal of ``terminal_columns`` columns."""
    return max(MIN_WIDTH, min(MAX_WIDTH, terminal_columns))


def columns(bars: Sequence[dict[str, Any]], count: int) -> list[tuple[int, int]]:
    """The (high, low) cents of ``count`` columns (or one per bar, if fewer), each covering an even share of
    ``bars`` in order."""
    n = len(bars)
    count = min(count, n)
    spans = []
    for c in range(count):
        share = bars[c * n // count : (c + 1) * n // count]
        spans.append((max(b["high_cents"] for b in share), min(b["low_cents"] for b in share)))
    return spans


def _row(cents: int, high: int, span: int, height: int) -> int:
    """The row (0 at the top) of price ``cents`` on a plot from ``high`` down to ``high - span``, rounded."""
    if span == 0:
        return (height - 1) // 2
    return ((high - cents) * (height - 1) * 2 + span) // (2 * span)


def _level(row: int, high: int, span: int, height: int) -> int:
    """The price (cents) that row ``row`` stands for, rounded to the cent."""
    return high - (row * span * 2 + (height - 1)) // (2 * (height - 1))


def bar_time(start: str, bar_seconds: int) -> str:
    """A bar's start as the x axis shows it: the day, and the minute for bars shorter than a day."""
    day = start[:10]
    return day if bar_seconds >= 86400 else f"{day} {start[11:16]}"


def render(
    bars: Sequence[dict[str, Any]], bar_seconds: int, width: int, height: int = CHART_HEIGHT
) -> list[str]:
    """The lines of a chart of ``bars`` (``start``, ``high_cents``, ``low_cents``; oldest first) at most
    ``width`` characters wide (unless too narrow for the axis), with ``height`` rows of plot."""
    if not bars:
        return [NO_BARS]
    high = max(b["high_cents"] for b in bars)
    low = min(b["low_cents"] for b in bars)
    span = high - low
    labelled = (
        {(height - 1) // 2} if span == 0 else {r for r in range(height) if r % LABEL_EVERY == 0} | {height - 1}
    )
    labels = {r: format_cents(_level(r, high, span, height)) for r in labelled}
    label_width = max(len(text) for text in labels.values())
    plot = columns(bars, max(1, width - label_width - 2))
    grid = [[" "] * len(plot) for _ in range(height)]
    for c, (top, bottom) in enumerate(plot):
        for r in range(_row(top, high, span, height), _row(bottom, high, span, height) + 1):
            grid[r][c] = BAR
    lines = [f"{labels.get(r, ''):>{label_width}} |{''.join(cells)}".rstrip() for r, cells in enumerate(grid)]
    lines.append(" " * label_width + " +" + "-" * len(plot))
    first, last = bar_time(bars[0]["start"], bar_seconds), bar_time(bars[-1]["start"], bar_seconds)
    room = max(len(plot), width - label_width - 2)
    if len(bars) == 1 or first == last:
        times = first
    elif len(first) + 1 + len(last) <= room:
        times = first + " " * (max(len(plot), len(first) + 1 + len(last)) - len(first) - len(last)) + last
    else:
        times = f"{first} .. {last}"
    lines.append(" " * (label_width + 2) + times)
    return lines
