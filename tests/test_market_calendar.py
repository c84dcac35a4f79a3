"""Tests for L{papertrader.market_calendar}, its configuration, GetMarketStatus and ``papertrader market``."""

from __future__ import annotations

import datetime
import os
from typing import Any
from zoneinfo import ZoneInfo

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from papertrader.client.cli import build_parser, market_text
from papertrader.config import MasterConfig, load_master_config
from papertrader.market_calendar import (
    TradingCalendar,
    describe_days,
    parse_days,
    parse_holidays,
    parse_hours,
    parse_time_zone,
)
from tests.processes import RunningDeployment
from tests.support import Deployment
from tests.test_config import ConfigTestMixin
from tests.test_session import A1, A2, TwoWorkers

UTC = datetime.timezone.utc
NEW_YORK = ZoneInfo("America/New_York")


def utc(*parts: int) -> float:
    """Epoch seconds of a UTC date-time."""
    return datetime.datetime(*parts, tzinfo=UTC).timestamp()


def new_york(*parts: int) -> float:
    """Epoch seconds of a New York wall-clock date-time."""
    return datetime.datetime(*parts, tzinfo=NEW_YORK).timestamp()


def describe(calendar: TradingCalendar) -> tuple[str, str, str]:
    """A calendar's hours, trading days and time zone, as it gives them."""
    return calendar.hours, calendar.trading_days, calendar.zone_name


class SessionTests(SynchronousTestCase):
    """The NYSE-like default calendar: 09:30-16:00 America/New_York, Monday to Friday."""

    def setUp(self) -> None:
        self.calendar = TradingCalendar()

    def test_boundaries(self) -> None:
        """Open from the opening instant (included) to the closing instant (excluded)."""
        # Wednesday 2026-12-02, New York standard time (UTC-5).
        opening, closing = new_york(2026, 12, 2, 9, 30), new_york(2026, 12, 2, 16, 0)
        self.assertEqual(opening, utc(2026, 12, 2, 14, 30))
        self.assertFalse(self.calendar.is_open(opening - 1))
        self.assertTrue(self.calendar.is_open(opening))
        self.assertTrue(self.calendar.is_open(closing - 1))
        self.assertFalse(self.calendar.is_open(closing))

    def test_next_change(self) -> None:
        """Before the opening the next change is the opening; during the session, the closing."""
        opening, closing = new_york(2026, 12, 2, 9, 30), new_york(2026, 12, 2, 16, 0)
        self.assertEqual(self.calendar.next_change(new_york(2026, 12, 2, 3, 0)), (opening, True))
        self.assertEqual(self.calendar.next_change(opening), (closing, False))
        self.assertEqual(self.calendar.next_change(closing), (new_york(2026, 12, 3, 9, 30), True))

    def test_weekend(self) -> None:
        """Saturday and Sunday are closed; after Friday's close the next change is Monday's opening."""
        for day in (5, 6):
            self.assertFalse(self.calendar.is_open(new_york(2026, 12, day, 12, 0)), day)
        self.assertEqual(
            self.calendar.next_change(new_york(2026, 12, 4, 16, 0)), (new_york(2026, 12, 7, 9, 30), True)
        )
        self.assertEqual(self.calendar.session_end(new_york(2026, 12, 5, 12, 0)), new_york(2026, 12, 7, 16, 0))

    def test_holiday(self) -> None:
        """A holiday has no session: Thanksgiving's noon is closed, and Wednesday's close leads to Friday."""
        calendar = TradingCalendar(holidays=frozenset({datetime.date(2026, 11, 26)}))
        self.assertTrue(self.calendar.is_open(new_york(2026, 11, 26, 12, 0)))
        self.assertFalse(calendar.is_open(new_york(2026, 11, 26, 12, 0)))
        self.assertEqual(calendar.next_change(new_york(2026, 11, 25, 16, 0)), (new_york(2026, 11, 27, 9, 30), True))
        self.assertEqual(calendar.session_end(new_york(2026, 11, 26, 12, 0)), new_york(2026, 11, 27, 16, 0))

    def test_many_holidays(self) -> None:
        """Holidays covering weeks of trading days are skipped all the same."""
        first = datetime.date(2026, 12, 1)
        holidays = frozenset(first + datetime.timedelta(days=n) for n in range(40))
        calendar = TradingCalendar(holidays=holidays)
        # 2027-01-10 is a Sunday: the first session is Monday the 11th.
        self.assertEqual(calendar.session_start(new_york(2026, 12, 1, 0, 0)), new_york(2027, 1, 11, 9, 30))

    def test_spring_forward(self) -> None:
        """Across the March change (2026-03-08) the session stays 09:30-16:00 local: 14:30Z before, 13:30Z after."""
        self.assertEqual(self.calendar.session(utc(2026, 3, 6, 15, 0)), (utc(2026, 3, 6, 14, 30), utc(2026, 3, 6, 21)))
        self.assertEqual(
            self.calendar.next_change(utc(2026, 3, 6, 21, 0)), (utc(2026, 3, 9, 13, 30), True)
        )
        self.assertEqual(self.calendar.session_end(utc(2026, 3, 9, 13, 30)), utc(2026, 3, 9, 20, 0))
        self.assertFalse(self.calendar.is_open(utc(2026, 3, 9, 20, 30)))

    def test_fall_back(self) -> None:
        """Across the November change (2026-11-01) the session moves from 13:30Z-20:00Z to 14:30Z-21:00Z."""
        self.assertEqual(
            self.calendar.session(utc(2026, 10, 30, 19, 0)), (utc(2026, 10, 30, 13, 30), utc(2026, 10, 30, 20))
        )
        self.assertEqual(self.calendar.next_change(utc(2026, 10, 30, 20, 0)), (utc(2026, 11, 2, 14, 30), True))
        self.assertFalse(self.calendar.is_open(utc(2026, 11, 2, 14, 0)))
        self.assertTrue(self.calendar.is_open(utc(2026, 11, 2, 20, 30)))

    def test_hours_in_a_gap(self) -> None:
        """A session swallowed by the spring-forward gap (02:30-03:00 on 2026-03-08) does not happen."""
        calendar = TradingCalendar(opening=datetime.time(2, 30), closing=datetime.time(3, 0), days=parse_days("sun"))
        saturday = new_york(2026, 3, 7, 12, 0)
        self.assertEqual(calendar.next_change(saturday), (new_york(2026, 3, 15, 2, 30), True))
        self.assertEqual(calendar.session_end(saturday), new_york(2026, 3, 15, 3, 0))
        self.assertEqual(calendar.session_end(new_york(2026, 3, 1, 2, 45)), new_york(2026, 3, 1, 3, 0))

    def test_session_end(self) -> None:
        """The end of the session in progress, or of the next one when the market is closed (at the close too)."""
        today_close = new_york(2026, 12, 2, 16, 0)
        self.assertEqual(self.calendar.session_end(new_york(2026, 12, 2, 7, 0)), today_close)
        self.assertEqual(self.calendar.session_end(new_york(2026, 12, 2, 11, 0)), today_close)
        self.assertEqual(self.calendar.session_end(today_close), new_york(2026, 12, 3, 16, 0))
        self.assertEqual(self.calendar.session_start(new_york(2026, 12, 2, 11, 0)), new_york(2026, 12, 2, 9, 30))

    def test_other_zone_and_days(self) -> None:
        """Another exchange: London, Monday and Wednesday only, 08:00-16:30 (BST in summer)."""
        calendar = TradingCalendar(
            time_zone=ZoneInfo("Europe/London"),
            opening=datetime.time(8, 0),
            closing=datetime.time(16, 30),
            days=parse_days("mon,wed"),
        )
        # Tuesday 2026-06-02: next is Wednesday 08:00 BST = 07:00Z.
        self.assertEqual(calendar.next_change(utc(2026, 6, 2, 12, 0)), (utc(2026, 6, 3, 7, 0), True))
        self.assertEqual(calendar.isoformat(utc(2026, 6, 3, 7, 0)), "2026-06-03T08:00:00+01:00")
        self.assertEqual(describe(calendar), ("08:00-16:30", "mon,wed", "Europe/London"))

    def test_always_open(self) -> None:
        """A market that never closes: open at any instant, no next change, no session end."""
        calendar = TradingCalendar.around_the_clock()
        for at in (utc(2026, 12, 5, 3, 0), utc(2026, 12, 2, 21, 0)):
            self.assertTrue(calendar.is_open(at))
            self.assertIsNone(calendar.next_change(at))
            self.assertIsNone(calendar.session_end(at))
            self.assertEqual(calendar.status(at).next_change, None)

    def test_status(self) -> None:
        """status() gathers the instant, open or not, and the next change."""
        at = new_york(2026, 12, 2, 10, 0)
        status = self.calendar.status(at)
        self.assertEqual((status.at, status.open, status.next_change), (at, True, new_york(2026, 12, 2, 16, 0)))
        self.assertEqual(self.calendar.isoformat(status.next_change), "2026-12-02T16:00:00-05:00")

    def test_close_before_open_refused(self) -> None:
        """A calendar whose closing is not after its opening cannot be built."""
        self.assertRaises(ValueError, TradingCalendar, opening=datetime.time(16), closing=datetime.time(9, 30))
        self.assertRaises(ValueError, TradingCalendar, days=frozenset())


class ParsingTests(SynchronousTestCase):
    """The text forms of hours, weekdays, holidays and time zones."""

    def test_hours(self) -> None:
        """HH:MM-HH:MM with the closing after the opening; anything else refused with the reason."""
        self.assertEqual(parse_hours(" 9:30 - 16:00 "), (datetime.time(9, 30), datetime.time(16, 0)))
        for text, reason in (
            ("16:00-09:30", "close after it opens"),
            ("09:30-09:30", "close after it opens"),
            ("9-16", "HH:MM-HH:MM"),
            ("09:30-25:00", "00-23"),
            ("09:60-16:00", "minutes 00-59"),
        ):
            self.assertIn(reason, str(self.assertRaises(ValueError, parse_hours, text)), text)

    def test_days(self) -> None:
        """Days and ranges, short or full names; unknown days and backward ranges refused."""
        self.assertEqual(parse_days("mon-fri"), frozenset(range(5)))
        self.assertEqual(parse_days("Sunday, mon - tue"), frozenset({6, 0, 1}))
        self.assertIn("unknown weekday", str(self.assertRaises(ValueError, parse_days, "mon,funday")))
        self.assertIn("forward", str(self.assertRaises(ValueError, parse_days, "fri-mon")))
        self.assertIn("at least one", str(self.assertRaises(ValueError, parse_days, " , ")))
        self.assertEqual(describe_days(parse_days("sat,mon-wed,fri")), "mon-wed,fri-sat")

    def test_holidays(self) -> None:
        """Dates separated by commas, spaces or lines, with comments; a bad date is named."""
        self.assertEqual(
            parse_holidays(["2026-12-25, 2027-01-01 # new year\n", "# none\n", "2027-01-18"]),
            frozenset({datetime.date(2026, 12, 25), datetime.date(2027, 1, 1), datetime.date(2027, 1, 18)}),
        )
        self.assertIn("'2026-13-01'", str(self.assertRaises(ValueError, parse_holidays, ["2026-13-01"])))

    def test_time_zone(self) -> None:
        """A zone the system's database knows; an unknown or empty name refused."""
        self.assertEqual(parse_time_zone("America/New_York"), NEW_YORK)
        for text in ("Mars/Olympus_Mons", "", "../etc"):
            self.assertIn("unknown time zone", str(self.assertRaises(ValueError, parse_time_zone, text)))


class ConfigTests(ConfigTestMixin, SynchronousTestCase):
    """The market_* settings of the deployment's configuration."""

    def test_defaults(self) -> None:
        """NYSE hours; around the clock for the simulated market, the calendar for a provider's prices."""
        calendar = MasterConfig(assets={}, assets_file="").calendar()
        self.assertTrue(calendar.always_open)
        self.assertEqual(describe(calendar), ("09:30-16:00", "mon-fri", "America/New_York"))
        provider = MasterConfig(assets={}, assets_file="", price_source="finnhub").calendar()
        self.assertFalse(provider.always_open)
        forced = MasterConfig(assets={}, assets_file="", market_always_open=False).calendar()
        self.assertFalse(forced.always_open)

    def test_settings(self) -> None:
        """Every key read from the file, holidays from the list and the file together."""
        path = self.config_file(
            "market_always_open = no\nmarket_hours = 08:00-16:30\nmarket_timezone = Europe/London\n"
            "market_days = mon-thu\nmarket_holidays = 2026-12-25\nmarket_holidays_file = holidays.txt\n"
        )
        self.write(os.path.join(os.path.dirname(path), "holidays.txt"), "# UK\n2026-12-28\n2027-01-01\n")
        calendar = load_master_config(path, {}).calendar()
        self.assertFalse(calendar.always_open)
        self.assertEqual(describe(calendar), ("08:00-16:30", "mon-thu", "Europe/London"))
        self.assertEqual(
            calendar.holidays,
            frozenset({datetime.date(2026, 12, 25), datetime.date(2026, 12, 28), datetime.date(2027, 1, 1)}),
        )

    def test_problems(self) -> None:
        """Bad settings are each reported, naming the key."""
        problems = self.problems(
            self.config_file(
                "market_hours = 16:00-09:30\nmarket_timezone = Nowhere/Land\nmarket_days = mon-fry\n"
                "market_holidays = 2026-02-30\nmarket_always_open = sometimes\nmarket_holidays_file = none.txt\n"
            )
        )
        for key in ("market_hours", "market_timezone", "market_days", "market_holidays", "market_always_open"):
            self.assertTrue(any(p.startswith(key + ":") for p in problems), (key, problems))
        self.assertTrue(any(p.startswith("market_holidays_file: cannot read") for p in problems), problems)

    def test_bad_holidays_file(self) -> None:
        """A holidays file with a bad date is refused, naming the file and the date."""
        path = self.config_file("market_holidays_file = holidays.txt\n")
        self.write(os.path.join(os.path.dirname(path), "holidays.txt"), "2026-12-25\nchristmas\n")
        (problem,) = self.problems(path)
        self.assertIn("holidays.txt", problem)
        self.assertIn("'christmas'", problem)


class GetMarketStatusTests(SynchronousTestCase):
    """GetMarketStatus from a client, through a worker, answered by the master from its calendar."""

    def test_closed(self) -> None:
        """Before the opening (03:00 in New York) the market is closed and opens at 09:30 local time."""
        deployment = Deployment(self.mktemp(), calendar=TradingCalendar())
        now = deployment.clock.seconds()
        self.assertEqual(TradingCalendar().local(now).hour, 3)
        status = deployment.result(deployment.client().market_status())
        self.assertEqual(
            status,
            {
                "open": False,
                "always_open": False,
                "now": TradingCalendar().isoformat(now),
                "next_change": "2027-01-15T09:30:00-05:00",
                "time_zone": "America/New_York",
                "hours": "09:30-16:00",
                "days": "mon-fri",
            },
        )

    def test_open(self) -> None:
        """During a session the answer is open, with the closing as the next change."""
        calendar = TradingCalendar(opening=datetime.time(1, 0), closing=datetime.time(5, 0))
        deployment = Deployment(self.mktemp(), calendar=calendar)
        status = deployment.result(deployment.client().market_status())
        self.assertTrue(status["open"])
        self.assertEqual(status["next_change"], "2027-01-15T05:00:00-05:00")

    def test_always_open(self) -> None:
        """A market that never closes: open, no next change."""
        deployment = Deployment(self.mktemp(), calendar=TradingCalendar.around_the_clock("America/New_York"))
        status = deployment.result(deployment.client().market_status())
        self.assertTrue(status["open"])
        self.assertTrue(status["always_open"])
        self.assertIsNone(status.get("next_change"))


class SessionMarketStatusTests(TwoWorkers):
    """The reconnecting session asks for the market status, on another worker when its own dies."""

    def test_failover(self) -> None:
        """The status comes through the first worker, then, once it has crashed, through the second."""
        d = self.deployment
        session = self.session([A1, A2])
        first = d.result(session.market_status())
        self.assertEqual(session.address, A1)
        self.w1.crash()
        second = d.result(session.market_status())
        self.assertEqual(session.address, A2)
        self.assertEqual((first["open"], first["always_open"]), (True, True))
        self.assertEqual(second, first)


class MarketTextTests(SynchronousTestCase):
    """What ``papertrader market`` prints."""

    def status(self, **changes: Any) -> dict[str, Any]:
        return {
            "open": True,
            "always_open": False,
            "now": "2026-12-02T13:45:00-05:00",
            "next_change": "2026-12-02T16:00:00-05:00",
            "time_zone": "America/New_York",
            "hours": "09:30-16:00",
            "days": "mon-fri",
            **changes,
        }

    def test_open(self) -> None:
        """Open: the sessions, the closing and how far off it is."""
        self.assertEqual(
            market_text(self.status()),
            "market open (hours 09:30-16:00 mon-fri America/New_York); "
            "closes at 2026-12-02T16:00:00-05:00 (in 2 h 15 min)",
        )

    def test_closed(self) -> None:
        """Closed over a weekend: the opening, days and hours away."""
        text = market_text(
            self.status(open=False, now="2026-12-04T16:00:00-05:00", next_change="2026-12-07T09:30:00-05:00")
        )
        self.assertTrue(text.startswith("market closed (hours "), text)
        self.assertTrue(text.endswith("opens at 2026-12-07T09:30:00-05:00 (in 2 d 17 h)"), text)

    def test_soon_and_always(self) -> None:
        """Under a minute away says so; a market that never closes says that alone."""
        self.assertIn("(in less than a minute)", market_text(self.status(now="2026-12-02T15:59:30-05:00")))
        self.assertEqual(
            market_text(self.status(always_open=True, next_change=None)), "market open around the clock"
        )

    def test_command(self) -> None:
        """``papertrader market`` is a command taking the common options."""
        args = build_parser().parse_args(["market", "--json"])
        self.assertEqual((args.command, args.json), ("market", True))


class MarketEndToEndTests(TestCase):
    """``papertrader market`` against a real master and worker."""

    timeout = 240

    @inlineCallbacks
    def test_market(self) -> Any:
        """A deployment on the NYSE calendar answers what the calendar says at the master's own time."""
        d = RunningDeployment(self.mktemp(), "--market-always-open", "no", "--market-holidays", "2026-12-25")
        self.addCleanup(d.stop)
        yield d.start()
        status = yield d.cli_json("market")
        calendar = TradingCalendar(holidays=frozenset({datetime.date(2026, 12, 25)}))
        now = datetime.datetime.fromisoformat(status["now"]).timestamp()
        change = calendar.next_change(now)
        self.assertEqual(status["open"], calendar.is_open(now))
        self.assertEqual(status["next_change"], calendar.isoformat(change[0]))
        self.assertFalse(status["always_open"])
        self.assertEqual(
            (status["time_zone"], status["hours"], status["days"]), ("America/New_York", "09:30-16:00", "mon-fri")
        )
        code, out, err = yield d.cli("market")
        self.assertEqual((code, err), (0, ""))
        self.assertRegex(
            out, r"^market (open|closed) \(hours 09:30-16:00 mon-fri America/New_York\); (closes|opens) at "
        )
