"""The asset list (spec 2.3.1): the tradable companies and their reference prices."""

from __future__ import annotations

import csv
import re

import attr

from papertrader.money import parse_amount

COLUMNS = ("symbol", "name", "exchange", "sector", "industry", "reference_price")
# An optional column: the currency prices are in (ISO 4217 codes and the like: GBX for pence).
CURRENCY_COLUMN = "currency"
DEFAULT_CURRENCY = "USD"
MAX_CURRENCY = 8
# The list travels in pages (ListAssets); every price update in one PriceTick,
# whose compact encoding keeps this many assets far under AMP's 64 KiB value limit.
MAX_ASSETS = 1000
MAX_TEXT = 60
# The longest reason a stale price carries (why the latest retrieval of its symbol failed).
MAX_STALE_REASON = 40
_SYMBOL = re.compile(r"^[A-Z][A-Z0-9.\-]{0,9}$")
_CURRENCY = re.compile(rf"^[A-Za-z0-9]{{1,{MAX_CURRENCY}}}$")


@attr.s(frozen=True, auto_attribs=True)
class Asset:
    """One tradable asset; ``reference_cents`` seeds the simulated market; ``currency`` its prices' currency."""

    symbol: str
    name: str
    exchange: str
    sector: str
    industry: str
    reference_cents: int
    currency: str = DEFAULT_CURRENCY


def parse_assets(lines: list[str], origin: str = "assets") -> tuple[dict[str, Asset], list[str]]:
    """Parse CSV lines (with a header row) into assets keyed by symbol.

    Returns the assets and every problem found, so a caller can report them all.
    """
    problems: list[str] = []
    assets: dict[str, Asset] = {}
    reader = csv.DictReader(lines)
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        return {}, [f"{origin}: missing column(s): {', '.join(missing)}"]
    for row in reader:
        where = f"{origin}:{reader.line_num}"
        symbol = (row["symbol"] or "").strip().upper()
        if not _SYMBOL.match(symbol):
            problems.append(f"{where}: bad symbol {row['symbol']!r}")
            continue
        if symbol in assets:
            problems.append(f"{where}: duplicate symbol {symbol}")
            continue
        try:
            cents = parse_amount(row["reference_price"] or "")
        except ValueError as e:
            problems.append(f"{where}: {e}")
            continue
        if cents <= 0:
            problems.append(f"{where}: reference price must be positive")
            continue
        if any(len(row[c] or "") > MAX_TEXT for c in ("name", "exchange", "sector", "industry")):
            problems.append(f"{where}: name, exchange, sector and industry must be at most {MAX_TEXT} characters")
            continue
        currency = (row.get(CURRENCY_COLUMN) or "").strip() or DEFAULT_CURRENCY
        if not _CURRENCY.match(currency):
            problems.append(
                f"{where}: bad currency {currency[:20]!r}: 1 to {MAX_CURRENCY} letters or digits (e.g. USD)"
            )
            continue
        assets[symbol] = Asset(
            symbol=symbol,
            name=(row["name"] or "").strip(),
            exchange=(row["exchange"] or "").strip(),
            sector=(row["sector"] or "").strip(),
            industry=(row["industry"] or "").strip(),
            reference_cents=cents,
            currency=currency,
        )
    if not assets and not problems:
        problems.append(f"{origin}: no assets listed")
    if len(assets) > MAX_ASSETS:
        problems.append(f"{origin}: {len(assets)} assets listed; at most {MAX_ASSETS} are supported")
    return assets, problems
