"""The trading calendar: when the deployment's market is open (issue 10, "Trading calendar").

A `TradingCalendar` knows the exchange's local opening and closing times, its
time zone, the weekdays it trades and its holidays -- or that it never closes
(``always_open``: a simulated or replayed market may run around the clock).
Every instant is epoch seconds passed in; nothing here reads the clock or
touches a file.  Sessions are computed in the exchange's local time, so they
stay at 09:30-16:00 on both sides of a daylight-saving change.

A session runs from its opening instant (included) to its closing instant
(excluded): at 16:00:00 exactly the market is closed.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Iterator
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attr

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY_NAMES = {
    name: index
    for index, full in enumerate(("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"))
    for name in (full, full[:3])
}
DEFAULT_HOURS = "09:30-16:00"
DEFAULT_TIME_ZONE = "America/New_York"
DEFAULT_DAYS = "mon-fri"

_HOURS = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


def parse_hours(text: str) -> tuple[datetime.time, datetime.time]:
    """``HH:MM-HH:MM`` (opening, closing, local time; closing after opening the same day); ValueError if not."""
    match = _HOURS.match(text)
    if not match:
        raise ValueError(f"expected opening and closing times as HH:MM-HH:MM, got {text!r}")
    oh, om, ch, cm = (int(g) for g in match.groups())
    for hour, minute in ((oh, om), (ch, cm)):
        if hour > 23 or minute > 59:
            raise ValueError(f"not a time of day in {text!r}: hours are 00-23, minutes 00-59")
    opening, closing = datetime.time(oh, om), datetime.time(ch, cm)
    if closing <= opening:
        raise ValueError(f"the market must close after it opens, the same day: {text!r}")
    return opening, closing


def parse_time_zone(text: str) -> ZoneInfo:
    """An IANA time zone name such as America/New_York; ValueError if the system does not know it."""
    name = text.strip()
    try:
        if not name:
            raise ValueError
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {text!r} (expected an IANA name such as America/New_York)") from None


def parse_days(text: str) -> frozenset[int]:
    """Trading weekdays: a comma list of days (``mon``...``sun``) or ranges (``mon-fri``); ValueError if bad."""
    days: set[int] = set()
    for part in (p.strip().lower() for p in text.split(",")):
        if not part:
            continue
        ends = [_DAY_NAMES.get(e.strip()) for e in part.split("-")]
        if len(ends) > 2 or None in ends:
            raise ValueError(f"unknown weekday in {part!r} (expected mon ... sun, or a range such as mon-fri)")
        first, last = ends[0], ends[-1]
        if last < first:
            raise ValueError(f"a range of weekdays runs forward within one week, got {part!r}")
        days.update(range(first, last + 1))
    if not days:
        raise ValueError("at least one trading weekday is needed")
    return frozenset(days)


def parse_holidays(lines: Iterable[str]) -> frozenset[datetime.date]:
    """ISO dates (YYYY-MM-DD) separated by commas, spaces or lines; ``#`` starts a comment; ValueError if bad."""
    dates: set[datetime.date] = set()
    for line in lines:
        for word in re.split(r"[,\s]+", line.split("#", 1)[0]):
            if not word:
                continue
            try:
                dates.add(datetime.date.fromisoformat(word))
            except ValueError:
                raise ValueError(f"not a date (YYYY-MM-DD): {word!r}") from None
    return frozenset(dates)


def describe_days(days: frozenset[int]) -> str:
    """``mon-fri``, ``mon,wed,fri``: the trading weekdays as the configuration writes them."""
    runs: list[str] = []
    ordered = sorted(days)
    start = previous = ordered[0]
    for day in [*ordered[1:], None]:
        if day is not None and day == previous + 1:
            previous = day
            continue
        runs.append(WEEKDAYS[start] if start == previous else f"{WEEKDAYS[start]}-{WEEKDAYS[previous]}")
        if day is not None:
            start = previous = day
    return ",".join(runs)


@attr.s(frozen=True, auto_attribs=True)
class MarketStatus:
    """Whether the market is open at ``at``, and when that next changes (None: it never does)."""

    at: float
    open: bool
    next_change: float | None


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class TradingCalendar:
    """The sessions of one exchange, in its own time zone; see the module's docstring."""

    time_zone: ZoneInfo = attr.ib(factory=lambda: ZoneInfo(DEFAULT_TIME_ZONE))
    opening: datetime.time = datetime.time(9, 30)
    closing: datetime.time = datetime.time(16, 0)
    days: frozenset[int] = frozenset(range(5))
    holidays: frozenset[datetime.date] = frozenset()
    always_open: bool = False

    def __attrs_post_init__(self) -> None:
        if not self.always_open:
            if self.closing <= self.opening:
                raise ValueError("the market must close after it opens, the same day")
            if not self.days:
                raise ValueError("at least one trading weekday is needed")

    @classmethod
    def around_the_clock(cls, time_zone: str = "UTC") -> TradingCalendar:
        """A market that never closes (its times shown in ``time_zone``)."""
        return cls(time_zone=ZoneInfo(time_zone), always_open=True)

    # ------------------------------------------------------------ what it says of itself

    @property
    def hours(self) -> str:
        """``09:30-16:00``: the local opening and closing times."""
        return f"{self.opening.strftime('%H:%M')}-{self.closing.strftime('%H:%M')}"

    @property
    def trading_days(self) -> str:
        """``mon-fri``: the weekdays with a session."""
        return describe_days(self.days)

    @property
    def zone_name(self) -> str:
        return str(self.time_zone.key)

    def local(self, at: float) -> datetime.datetime:
        """``at`` as an aware date-time in the exchange's time zone."""
        return datetime.datetime.fromtimestamp(at, self.time_zone)

    def isoformat(self, at: float) -> str:
        """``at`` in ISO 8601 with the exchange's UTC offset, to the second (2026-12-02T16:00:00-05:00)."""
        return self.local(at).isoformat(timespec="seconds")

    # ------------------------------------------------------------ sessions

    def is_trading_day(self, day: datetime.date) -> bool:
        return day.weekday() in self.days and day not in self.holidays

    def _session_of(self, day: datetime.date) -> tuple[float, float]:
        opening = datetime.datetime.combine(day, self.opening, tzinfo=self.time_zone)
        closing = datetime.datetime.combine(day, self.closing, tzinfo=self.time_zone)
        return opening.timestamp(), closing.timestamp()

    def _sessions_from(self, day: datetime.date) -> Iterator[tuple[float, float]]:
        """Each session on or after ``day``, in order.  Every week has a trading weekday and the holidays
        are finite, so the search is bounded: a week more than the holidays could take out."""
        for offset in range(7 * (len(self.holidays) + 2)):
            candidate = day + datetime.timedelta(days=offset)
            if self.is_trading_day(candidate):
                opening, closing = self._session_of(candidate)
                # Hours inside a daylight-saving gap can leave no time between them: no session that day.
                if closing > opening:
                    yield opening, closing

    def session(self, at: float) -> tuple[float, float] | None:
        """(opening, closing) of the session in progress at ``at`` or, if none is, the next one.

        None when the market never closes.  A session is on one local day, so
        the search starts on ``at``'s local date (the day before too, for a
        time zone whose sessions could straddle a date change in UTC terms).
        """
        if self.always_open:
            return None
        for opening, closing in self._sessions_from(self.local(at).date() - datetime.timedelta(days=1)):
            if closing > at:
                return opening, closing
        raise AssertionError("no session found in a bounded search")  # pragma: no cover: see _sessions_from

    def session_start(self, after: float) -> float | None:
        """The opening of the session in progress at or next after ``after``; None when always open."""
        session = self.session(after)
        return None if session is None else session[0]

    def session_end(self, after: float) -> float | None:
        """The closing (epoch seconds) of the session in progress at or next after ``after``; None when
        the market never closes.  What a ``day`` order placed at ``after`` expires at."""
        session = self.session(after)
        return None if session is None else session[1]

    def is_open(self, at: float) -> bool:
        session = self.session(at)
        return session is None or session[0] <= at

    def next_change(self, at: float) -> tuple[float, bool] | None:
        """(instant, opens) of the next opening (True) or closing (False) after ``at``; None when always open."""
        session = self.session(at)
        if session is None:
            return None
        opening, closing = session
        return (opening, True) if at < opening else (closing, False)

    def status(self, at: float) -> MarketStatus:
        change = self.next_change(at)
        return MarketStatus(at=at, open=self.is_open(at), next_change=None if change is None else change[0])
