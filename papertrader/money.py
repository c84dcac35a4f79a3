"""Exact money: amounts are integer cents everywhere; Decimal only at the edges."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

CENTS_PER_UNIT = 100


def parse_amount(text: str) -> int:
    """Parse a decimal amount such as ``"100000.00"`` into integer cents.

    Refuses anything that is not an exact, non-negative amount of cents.
    """
    try:
        value = Decimal(text.strip().replace(",", "").replace("_", ""))
    except InvalidOperation:
        raise ValueError(f"not an amount of money: {text!r}") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"not a non-negative amount of money: {text!r}")
    cents = value * CENTS_PER_UNIT
    if cents != cents.to_integral_value():
        raise ValueError(f"amount has fractions of a cent: {text!r}")
    return int(cents)


def format_cents(cents: int) -> str:
    """Render integer cents as ``1234.56`` (a minus sign for negatives)."""
    sign = "-" if cents < 0 else ""
    units, rest = divmod(abs(cents), CENTS_PER_UNIT)
    return f"{sign}{units}.{rest:02d}"
