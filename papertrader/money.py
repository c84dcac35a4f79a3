"""Exact money: amounts are integer cents everywhere; Decimal only at the edges."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

CENTS_PER_UNIT = 100
# Amounts with more digits than this (in cents) are refused as absurd.
MAX_DIGITS = 40


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
    # Integer arithmetic on the digits: exact at any size, unlike Decimal's 28-digit context.
    _, digits, exponent = value.as_tuple()
    number = int("".join(map(str, digits)) or "0")
    exponent += 2  # units -> cents
    if len(digits) + exponent > MAX_DIGITS:
        raise ValueError(f"amount is too large: {text!r}")
    if exponent >= 0:
        return number * 10**exponent
    cents, rest = divmod(number, 10**-exponent)
    if rest:
        raise ValueError(f"amount has fractions of a cent: {text!r}")
    return cents


def format_cents(cents: int) -> str:
    """Render integer cents as ``1234.56`` (a minus sign for negatives)."""
    sign = "-" if cents < 0 else ""
    units, rest = divmod(abs(cents), CENTS_PER_UNIT)
    return f"{sign}{units}.{rest:02d}"
