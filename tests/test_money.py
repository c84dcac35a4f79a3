"""Tests for L{papertrader.money}: exact parsing and formatting of amounts."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from papertrader.money import CENTS_PER_UNIT, format_cents, parse_amount


class ParseAmountTests(SynchronousTestCase):
    """
    L{parse_amount} turns decimal text into an exact number of integer cents
    and refuses anything that is not such an amount.
    """

    def test_wholeAndCents(self) -> None:
        """A typical amount with two decimals becomes the exact number of cents."""
        self.assertEqual(parse_amount("100000.00"), 10_000_000)
        self.assertEqual(parse_amount("189.50"), 18_950)
        self.assertEqual(parse_amount("0.01"), 1)

    def test_resultIsInt(self) -> None:
        """The result is a plain L{int}, not a float or a Decimal."""
        self.assertIs(type(parse_amount("12.34")), int)

    def test_noDecimals(self) -> None:
        """An amount without a decimal point is taken as whole units."""
        self.assertEqual(parse_amount("42"), 42 * CENTS_PER_UNIT)
        self.assertEqual(parse_amount("0"), 0)

    def test_oneDecimal(self) -> None:
        """A single decimal is tenths of a unit."""
        self.assertEqual(parse_amount("0.1"), 10)
        self.assertEqual(parse_amount("2.5"), 250)

    def test_sumIsExact(self) -> None:
        """C{0.1 + 0.2} summed via cents is exactly C{0.3}, unlike binary floats."""
        self.assertNotEqual(0.1 + 0.2, 0.3)
        self.assertEqual(parse_amount("0.1") + parse_amount("0.2"), parse_amount("0.3"))
        self.assertEqual(parse_amount("0.1") + parse_amount("0.2"), 30)

    def test_manySmallAmountsAreExact(self) -> None:
        """Adding a cent ten thousand times gives exactly one hundred units."""
        total = sum(parse_amount("0.01") for _ in range(10_000))
        self.assertEqual(total, parse_amount("100.00"))

    def test_trailingZeroesAccepted(self) -> None:
        """Extra zero decimals do not count as fractions of a cent."""
        self.assertEqual(parse_amount("1.2300"), 123)

    def test_surroundingWhitespace(self) -> None:
        """Leading and trailing whitespace is ignored."""
        self.assertEqual(parse_amount("  5.25\n"), 525)

    def test_groupingSeparators(self) -> None:
        """Thousands separators (commas and underscores) are ignored."""
        self.assertEqual(parse_amount("1,000.50"), 100_050)
        self.assertEqual(parse_amount("1_000_000"), 100_000_000)

    def test_exponent(self) -> None:
        """Scientific notation that is a whole number of cents is accepted."""
        self.assertEqual(parse_amount("1e2"), 10_000)
        self.assertEqual(parse_amount("5E-2"), 5)

    def test_negativeZero(self) -> None:
        """Minus zero is zero, not a refusal."""
        self.assertEqual(parse_amount("-0.00"), 0)

    def test_largeAmountExact(self) -> None:
        """An amount far beyond float precision is still exact."""
        self.assertEqual(parse_amount("123456789012345678.91"), 12345678901234567891)

    def test_fractionOfACentRefused(self) -> None:
        """More precision than a cent is refused rather than rounded."""
        for text in ["0.001", "1.005", "100.999", "0.0001", "1e-3"]:
            exc = self.assertRaises(ValueError, parse_amount, text)
            self.assertIn("fractions of a cent", str(exc))
            self.assertIn(repr(text), str(exc))

    def test_hugeAmountWithFractionOfACentRefused(self) -> None:
        """A fraction of a cent is refused even when the amount has more than 28 digits."""
        self.assertRaises(ValueError, parse_amount, "10000000000000000000000000.001")

    def test_hugeAmountNotRounded(self) -> None:
        """An amount with more than 28 digits is either exact or refused, never silently rounded."""
        text = "12345678901234567890123456789.12"
        try:
            cents = parse_amount(text)
        except ValueError:
            return
        self.assertEqual(cents, 1234567890123456789012345678912)

    def test_negativeRefused(self) -> None:
        """Negative amounts are refused."""
        for text in ["-1", "-0.01", "-100000.00"]:
            exc = self.assertRaises(ValueError, parse_amount, text)
            self.assertIn("non-negative", str(exc))

    def test_nonFiniteRefused(self) -> None:
        """NaN and infinities are refused."""
        for text in ["NaN", "nan", "sNaN", "inf", "Infinity", "-inf"]:
            self.assertRaises(ValueError, parse_amount, text)

    def test_garbageRefused(self) -> None:
        """Text that is not a number at all is refused with a message quoting it."""
        for text in ["", "   ", "abc", "12abc", "1.2.3", "$5", "5 EUR", "1 000", "0x10"]:
            exc = self.assertRaises(ValueError, parse_amount, text)
            self.assertIn("not an amount of money", str(exc))


class FormatCentsTests(SynchronousTestCase):
    """
    L{format_cents} renders integer cents with exactly two decimals.
    """

    def test_typical(self) -> None:
        """Whole units and cents are separated by a dot."""
        self.assertEqual(format_cents(123_456), "1234.56")
        self.assertEqual(format_cents(10_000_000), "100000.00")

    def test_zero(self) -> None:
        """Zero is C{0.00}."""
        self.assertEqual(format_cents(0), "0.00")

    def test_smallValues(self) -> None:
        """Amounts below one unit keep a leading zero and two decimals."""
        self.assertEqual(format_cents(1), "0.01")
        self.assertEqual(format_cents(9), "0.09")
        self.assertEqual(format_cents(10), "0.10")
        self.assertEqual(format_cents(99), "0.99")
        self.assertEqual(format_cents(100), "1.00")

    def test_negative(self) -> None:
        """Negative amounts get one leading minus sign, also below one unit."""
        self.assertEqual(format_cents(-1), "-0.01")
        self.assertEqual(format_cents(-99), "-0.99")
        self.assertEqual(format_cents(-100), "-1.00")
        self.assertEqual(format_cents(-123_456), "-1234.56")

    def test_large(self) -> None:
        """Amounts beyond float precision are rendered exactly."""
        self.assertEqual(format_cents(12345678901234567891), "123456789012345678.91")

    def test_roundTrip(self) -> None:
        """Formatting then parsing gives back the same number of cents."""
        for cents in [0, 1, 5, 10, 99, 100, 101, 18_950, 10_000_000, 987_654_321]:
            self.assertEqual(parse_amount(format_cents(cents)), cents)
