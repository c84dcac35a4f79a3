"""Numbered pages of a list answer (the spec's "packet n of m"), sized by bytes.

Every list answer (history, orders, assets) carries ``page`` (1-based),
``pages`` (the total) and, except on the last page, ``next_cursor``, which the
next request passes back.  A page holds as many rows as fit `PAGE_BUDGET`
bytes when every row is as large as its fields allow: each text field of a row
is a `BoundedText` (cut to its maximum length when encoded) and each integer
is a database BIGINT, so the worst-case row is known and ``pages`` is exact.

A cursor is a short text of dot-separated numbers; `decode_cursor` refuses
anything else with `BadCursor`, which the caller answers with its command's
declared error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import attr
from twisted.protocols import amp

# Bytes of rows in one page: half of AMP's 64 KiB value limit, leaving room for the rest of the box.
PAGE_BUDGET = 32 * 1024
# Every integer in a list row is stored as a BIGINT; this one has the longest decimal form.
WORST_INTEGER = -(2**63)
# Longest character in UTF-8.
_WORST_CHARACTER = "\U0010ffff"
MAX_CURSOR_LENGTH = 100
_MAX_CURSOR_NUMBER = 2**63 - 1  # numbers go to the database as BIGINTs
_CURSOR = re.compile(r"^[0-9]{1,19}(\.[0-9]{1,19})*$")


class BoundedText(amp.Unicode):
    """Text of at most ``max_length`` characters (ASCII only if ``ascii``); longer text is cut when encoded.

    The bound is what makes the size of a page of rows known in advance.
    """

    def __init__(self, max_length: int, ascii: bool = False, optional: bool = False) -> None:
        super().__init__(optional=optional)
        self.max_length = max_length
        self.ascii = ascii

    def toString(self, inObject: str) -> bytes:
        text = inObject[: self.max_length]
        if self.ascii:
            return text.encode("ascii", "replace")
        return text.encode("utf-8", "replace")

    def worst_case(self) -> str:
        """The longest value this field can carry, in bytes."""
        return ("~" if self.ascii else _WORST_CHARACTER) * self.max_length


def page_fields() -> list[tuple[bytes, amp.Argument]]:
    """What every page answer carries besides its rows."""
    return [
        (b"page", amp.Integer()),
        (b"pages", amp.Integer()),
        (b"next_cursor", amp.Unicode(optional=True)),
    ]


def worst_case_row(fields: Sequence[tuple[bytes, amp.Argument]]) -> dict[str, Any]:
    """A row with every field at its longest; TypeError for a field whose size has no bound."""
    row: dict[str, Any] = {}
    for name, argument in fields:
        key = name.decode("ascii")
        if isinstance(argument, BoundedText):
            row[key] = argument.worst_case()
        elif type(argument) is amp.Integer:
            row[key] = WORST_INTEGER
        elif type(argument) is amp.Boolean:
            row[key] = False  # "False" is longer than "True"
        else:
            raise TypeError(f"field {key} has no size bound")
    return row


def encoded_size(fields: Sequence[tuple[bytes, amp.Argument]], rows: list[dict[str, Any]]) -> int:
    """How many bytes ``rows`` take as one AmpList value."""
    return len(amp.AmpList(list(fields)).toStringProto(rows, None))


def rows_per_page(fields: Sequence[tuple[bytes, amp.Argument]], budget: int = PAGE_BUDGET) -> int:
    """How many worst-case rows of ``fields`` fit in ``budget`` bytes (an AmpList's rows cost the sum of each)."""
    return max(1, budget // encoded_size(fields, [worst_case_row(fields)]))


def page_count(total: int, per_page: int) -> int:
    """Pages of a list of ``total`` rows; an empty list is one empty page."""
    return max(1, math.ceil(total / per_page))


class BadCursor(ValueError):
    """A cursor that is malformed, forged, or no longer matches the list it came from."""


def encode_cursor(*numbers: int) -> str:
    """A cursor holding ``numbers`` (non-negative)."""
    return ".".join(str(number) for number in numbers)


def decode_cursor(text: str, count: int) -> tuple[int, ...]:
    """The ``count`` numbers held by ``text``; BadCursor if it is not such a cursor."""
    if len(text) > MAX_CURSOR_LENGTH or not _CURSOR.match(text):
        raise BadCursor("malformed cursor")
    numbers = tuple(int(part) for part in text.split("."))
    if len(numbers) != count or max(numbers) > _MAX_CURSOR_NUMBER:
        raise BadCursor("malformed cursor")
    return numbers


@attr.s(frozen=True, auto_attribs=True)
class Page:
    """One page of a list: its rows, its number, how many pages there are, and the next page's cursor."""

    rows: list[dict[str, Any]]
    page: int
    pages: int
    next_cursor: str | None = None

    def answer(self, key: str) -> dict[str, Any]:
        """The AMP answer carrying this page's rows under ``key``."""
        answer: dict[str, Any] = {key: self.rows, "page": self.page, "pages": self.pages}
        if self.next_cursor is not None:
            answer["next_cursor"] = self.next_cursor
        return answer


def page_of_sequence(items: Sequence[Any], per_page: int, cursor: str | None) -> Page:
    """A page (whose rows are ``items``) of an in-memory list that does not change while it is read.

    The cursor holds the next page's number and the list's length; BadCursor
    if it does not fit this list.
    """
    pages = page_count(len(items), per_page)
    if cursor is None:
        page = 1
    else:
        page, length = decode_cursor(cursor, 2)
        if length != len(items) or not 2 <= page <= pages:
            raise BadCursor("this cursor does not belong to this list")
    start = (page - 1) * per_page
    next_cursor = encode_cursor(page + 1, len(items)) if page < pages else None
    return Page(list(items[start : start + per_page]), page, pages, next_cursor)
