"""Price sources beyond the simulated market (spec 3.1.6): a replayed CSV and HTTP quote providers.

`ReplayPriceSource` answers the prices of a CSV of history, one time step per
retrieval.  `HttpPriceSource` asks a provider (`Finnhub`, `AlphaVantage`) for
each asset's quote over HTTP, a bounded number at once, each within a timeout,
and never more often than the provider's quota allows.  Both answer a
`Retrieval` and never fail as a whole: each symbol they cannot price gets a
short reason (at most `MAX_STALE_REASON` characters).

Prices are decimal text turned into integer cents exactly (`decimal_cents`),
never through a float.
"""

from __future__ import annotations

import calendar
import csv
import datetime
import json
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from decimal import ROUND_HALF_UP, Context, Decimal, InvalidOperation
from typing import Any, Protocol
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import attr
import treq
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from papertrader.assets import Asset
from papertrader.eventlog import EventLogger
from papertrader.master.market import MAX_STALE_REASON, Quote, Retrieval
from papertrader.money import parse_amount

log = EventLogger()

# The largest answer read from a provider; a quote is a few hundred bytes.
MAX_ANSWER_BYTES = 64 * 1024
# A replay file holds at most this many rows (each a symbol's price at one time).
MAX_REPLAY_ROWS = 2_000_000
MINUTE = 60.0
DAY = 86_400.0

REPLAY_FINISHED = "replay finished"
BUDGET_SPENT = "request budget spent"
MALFORMED = "malformed answer"
NON_POSITIVE = "non-positive price"


def _reason(text: str) -> str:
    """A failure reason cut to what a stale symbol may carry."""
    return text if len(text) <= MAX_STALE_REASON else text[: MAX_STALE_REASON - 3] + "..."


_CENT = Decimal("0.01")
_WIDE = Context(prec=80)


def decimal_cents(value: Decimal | str) -> int:
    """A positive decimal price (a `Decimal` or its text) in integer cents, rounded half up to the cent.

    Exact: no float is involved.  Raises ValueError for anything that is not a
    finite amount, and for amounts that are not positive once rounded.
    """
    try:
        number = value if isinstance(value, Decimal) else Decimal(value.strip().replace(",", "").replace("_", ""))
    except (InvalidOperation, AttributeError):
        raise ValueError(f"not a price: {value!r}") from None
    if not number.is_finite():
        raise ValueError(f"not a price: {value!r}")
    if number <= 0:
        raise ValueError(f"price must be positive, got {value}")
    try:
        rounded = number.quantize(_CENT, rounding=ROUND_HALF_UP, context=_WIDE)
    except InvalidOperation:
        raise ValueError(f"price is too large: {value}") from None
    cents = parse_amount(format(rounded, "f"))
    if cents <= 0:
        raise ValueError(f"price is below one cent: {value}")
    return cents


# ------------------------------------------------------------------ replay


@attr.s(frozen=True, auto_attribs=True)
class ReplayStep:
    """The prices of one time of a replay file: seconds since the epoch, and cents by symbol."""

    at: int
    prices: Mapping[str, int]

    def label(self) -> str:
        """The time as a date (midnight UTC) or a UTC date and time, for reasons and logs."""
        moment = datetime.datetime.fromtimestamp(self.at, datetime.timezone.utc)
        if moment.time() == datetime.time(0):
            return moment.strftime("%Y-%m-%d")
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@attr.s(frozen=True, auto_attribs=True)
class Replay:
    """A parsed replay file: its time steps in order, and the symbols it holds that are not assets."""

    origin: str
    steps: tuple[ReplayStep, ...]
    ignored: tuple[str, ...] = ()


def parse_time(text: str) -> int:
    """An ISO date (``2024-01-02``, midnight UTC) or date-time (UTC unless it has a zone) in epoch seconds."""
    text = text.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an ISO date or date-time: {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return calendar.timegm(moment.utctimetuple())


def parse_replay(lines: Iterable[str], origin: str, assets: Mapping[str, Asset]) -> tuple[Replay | None, list[str]]:
    """Parse a replay CSV (a header row, then rows) into its time steps.

    Columns (any case, in any order, others ignored): ``time`` (or ``date``),
    ``symbol``, and either ``price`` or ``open,high,low,close`` (the close is
    the price).  Returns the replay (None if there were problems) and every
    problem found, so a caller can report them all.
    """
    reader = csv.reader(lines)
    try:
        header = [name.strip().lower() for name in next(reader)]
    except StopIteration:
        return None, [f"{origin}: empty file"]
    except csv.Error as e:
        return None, [f"{origin}:1: {e}"]
    columns = {name: index for index, name in reversed(list(enumerate(header)))}
    time_column = "time" if "time" in columns else "date"
    missing = [name for name in (time_column, "symbol") if name not in columns]
    if "price" in columns:
        price_columns = ("price",)
    else:
        price_columns = ("open", "high", "low", "close")
        absent = [name for name in price_columns if name not in columns]
        if absent:
            missing.append("price (or " + ", ".join(absent) + ")")
    if missing:
        return None, [f"{origin}: missing column(s): {', '.join(missing)}"]

    problems: list[str] = []
    by_time: dict[int, dict[str, int]] = {}
    ignored: set[str] = set()
    rows = 0
    try:
        for row in reader:
            where = f"{origin}:{reader.line_num}"
            if not row or all(not cell.strip() for cell in row):
                continue
            rows += 1
            if rows > MAX_REPLAY_ROWS:
                problems.append(f"{origin}: more than {MAX_REPLAY_ROWS} rows; split the file")
                break
            if len(row) < len(header):
                problems.append(f"{where}: {len(row)} fields, the header names {len(header)}")
                continue
            symbol = row[columns["symbol"]].strip().upper()
            try:
                at = parse_time(row[columns[time_column]])
            except ValueError as e:
                problems.append(f"{where}: {e}")
                continue
            cents: dict[str, int] = {}
            for name in price_columns:
                try:
                    cents[name] = decimal_cents(row[columns[name]])
                except ValueError as e:
                    problems.append(f"{where}: {name}: {e}")
            if len(cents) < len(price_columns):
                continue
            if symbol not in assets:
                ignored.add(symbol)
                continue
            step = by_time.setdefault(at, {})
            if symbol in step:
                problems.append(f"{where}: a second price of {symbol} at {row[columns[time_column]].strip()}")
                continue
            step[symbol] = cents[price_columns[-1]]
    except csv.Error as e:
        problems.append(f"{origin}:{reader.line_num}: {e}")
    if not by_time and not problems:
        if ignored:
            problems.append(f"{origin}: no prices of listed assets (only of {', '.join(sorted(ignored)[:10])})")
        else:
            problems.append(f"{origin}: no prices")
    if problems:
        return None, problems
    steps = tuple(ReplayStep(at, by_time[at]) for at in sorted(by_time))
    return Replay(origin, steps, tuple(sorted(ignored))), []


def load_replay(path: str, assets: Mapping[str, Asset]) -> tuple[Replay | None, list[str]]:
    """Read and parse the replay file at ``path`` (file work: call it off the reactor, or before it runs)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return parse_replay(f, path, assets)
    except (OSError, UnicodeDecodeError) as e:
        return None, [f"price_replay_file: cannot read {path}: {e}"]


class ReplayPriceSource:
    """Replays a CSV of historical prices: each retrieval answers the next time step's prices.

    A listed asset without a row at a step fails with ``no replay price at
    DATE``; after the last step the replay starts again if ``loop``, else every
    asset fails with ``replay finished``.  Symbols of the file that are not
    assets were ignored when it was parsed; they are logged once, at the first retrieval.
    """

    def __init__(self, replay: Replay, assets: Mapping[str, Asset], loop: bool = False) -> None:
        self._replay = replay
        self._symbols = tuple(assets)
        self._loop = loop
        self._next = 0
        self._announced = False

    def _announce(self) -> None:
        """Say once (at the first retrieval, when the log is running) what is replayed and what is ignored."""
        self._announced = True
        replay = self._replay
        if replay.ignored:
            shown = ", ".join(replay.ignored[:20]) + (" ..." if len(replay.ignored) > 20 else "")
            log.warn(
                "replay file {origin}: ignoring {count} symbol(s) not in the asset list: {symbols}",
                origin=replay.origin,
                count=len(replay.ignored),
                symbols=shown,
            )
        log.info(
            "replaying {count} time steps of {origin}, {first} to {last}{looping}",
            count=len(replay.steps),
            origin=replay.origin,
            first=replay.steps[0].label(),
            last=replay.steps[-1].label(),
            looping=", looping" if self._loop else "",
        )

    def fetch(self) -> Deferred[Retrieval]:
        if not self._announced:
            self._announce()
        steps = self._replay.steps
        if self._next >= len(steps):
            if not self._loop:
                return succeed(Retrieval(failures={symbol: REPLAY_FINISHED for symbol in self._symbols}))
            self._next = 0
        step = steps[self._next]
        self._next += 1
        log.info(
            "replay step {number} of {count}: prices of {when}",
            number=self._next,
            count=len(steps),
            when=step.label(),
        )
        quotes: dict[str, Quote] = {}
        failures: dict[str, str] = {}
        missing = _reason(f"no replay price at {step.label()}")
        for symbol in self._symbols:
            cents = step.prices.get(symbol)
            if cents is None:
                failures[symbol] = missing
            else:
                quotes[symbol] = Quote(cents, step.at)
        return succeed(Retrieval(quotes, failures))


# ------------------------------------------------------------------ HTTP providers


class Provider(Protocol):
    """One provider's HTTP API: where to ask for a symbol's quote, and what an answer means."""

    name: str
    default_url: str
    # The free plan's limits (None: none).
    requests_per_minute: int | None
    requests_per_day: int | None
    # Requests in flight at once unless configured.
    concurrency: int

    def url(self, base: str, symbol: str, key: str) -> str:
        """The URL asking for ``symbol``'s quote."""

    def parse(self, status: int, body: bytes, now: float) -> Quote | str:
        """The quote an answer holds, or a short reason why it holds none."""


def _status_reason(status: int) -> str:
    if status == 429:
        return "HTTP 429 (rate limited)"
    if status == 401:
        return "HTTP 401 (API key refused)"
    if status == 403:
        return "HTTP 403 (access refused)"
    return f"HTTP {status}"


def _answer(status: int, body: bytes) -> dict[str, Any] | str:
    """The JSON object of a provider's answer (numbers as Decimal), or the reason it holds none."""
    if status != 200:
        return _status_reason(status)
    try:
        answer = json.loads(body.decode("utf-8"), parse_float=Decimal)
    except ValueError:
        return MALFORMED
    return answer if isinstance(answer, dict) else MALFORMED


def _price(value: Any) -> int | str:
    """Cents of a provider's price (a JSON number or decimal text), or a reason."""
    if isinstance(value, bool) or not isinstance(value, (int, Decimal, str)):
        return MALFORMED
    number = Decimal(value) if isinstance(value, int) else value
    if isinstance(number, str):
        try:
            number = Decimal(number.strip())
        except InvalidOperation:
            return MALFORMED
    if not number.is_finite():
        return MALFORMED
    if number <= 0:
        return NON_POSITIVE
    try:
        return decimal_cents(number)
    except ValueError:
        return "price below one cent" if number < 1 else MALFORMED


class Finnhub:
    """Finnhub's quote API: ``GET /api/v1/quote?symbol=S&token=K`` answers ``{"c": price, "t": time, ...}``.

    An unknown symbol answers all zeros; over the limit, HTTP 429.
    """

    name = "Finnhub"
    default_url = "https://finnhub.io"
    requests_per_minute: int | None = 60
    requests_per_day: int | None = None
    concurrency = 4

    def url(self, base: str, symbol: str, key: str) -> str:
        return f"{base.rstrip('/')}/api/v1/quote?{urlencode({'symbol': symbol, 'token': key})}"

    def parse(self, status: int, body: bytes, now: float) -> Quote | str:
        answer = _answer(status, body)
        if isinstance(answer, str):
            return answer
        if "error" in answer:
            return "refused by Finnhub"
        if "c" not in answer or "t" not in answer:
            return MALFORMED
        price, when = answer["c"], answer["t"]
        if isinstance(when, bool) or not isinstance(when, (int, type(None))):
            return MALFORMED
        if isinstance(price, bool) or not isinstance(price, (int, Decimal)):
            return MALFORMED
        if price == 0 and not when:
            return "unknown symbol at Finnhub"
        cents = _price(price)
        if isinstance(cents, str):
            return cents
        return Quote(cents, when if when else None)


# When a US trading day's prices are final: 16:00 in New York (the zone's data is a dependency: tzdata).
_CLOSE = datetime.time(16, 0, tzinfo=ZoneInfo("America/New_York"))


def _close_of(day: datetime.date) -> int:
    """The epoch seconds of ``day``'s US market close (16:00 New York)."""
    return int(datetime.datetime.combine(day, _CLOSE).timestamp())


class AlphaVantage:
    """Alpha Vantage's ``GLOBAL_QUOTE``: ``GET /query?function=GLOBAL_QUOTE&symbol=S&apikey=K``.

    Answers ``{"Global Quote": {"05. price": "189.5000", "07. latest trading
    day": "2024-01-02", ...}}`` (text fields).  Over the limit it answers HTTP
    200 with ``{"Note": ...}`` or ``{"Information": ...}``; a refused call
    ``{"Error Message": ...}``; an unknown symbol an empty ``Global Quote``.
    The quote's time is the trading day's close (16:00 New York), or now if
    that is still to come (the price of a day in progress).
    """

    name = "Alpha Vantage"
    default_url = "https://www.alphavantage.co"
    # 25 a day, and about one a second: one request at a time.
    requests_per_minute: int | None = 60
    requests_per_day: int | None = 25
    concurrency = 1

    def url(self, base: str, symbol: str, key: str) -> str:
        query = urlencode({"function": "GLOBAL_QUOTE", "symbol": symbol, "apikey": key})
        return f"{base.rstrip('/')}/query?{query}"

    def parse(self, status: int, body: bytes, now: float) -> Quote | str:
        answer = _answer(status, body)
        if isinstance(answer, str):
            return answer
        if "Note" in answer:
            return "refused: over the API limit"
        if "Information" in answer:
            text = str(answer["Information"]).lower()
            limited = "limit" in text or "per day" in text or "per minute" in text
            return "refused: over the API limit" if limited else "refused by Alpha Vantage"
        if "Error Message" in answer:
            return "refused: invalid request or key"
        quote = answer.get("Global Quote")
        if not isinstance(quote, dict):
            return MALFORMED
        if not quote:
            return "unknown symbol at Alpha Vantage"
        price, day = quote.get("05. price"), quote.get("07. latest trading day")
        if not isinstance(price, str) or not isinstance(day, str):
            return MALFORMED
        try:
            date = datetime.date.fromisoformat(day.strip())
        except ValueError:
            return MALFORMED
        cents = _price(price)
        if isinstance(cents, str):
            return cents
        return Quote(cents, min(_close_of(date), int(now)))


PROVIDERS: dict[str, type[Finnhub] | type[AlphaVantage]] = {"finnhub": Finnhub, "alphavantage": AlphaVantage}
# Environment variables holding the API key, the first set wins (after the configuration's price_api_key).
KEY_VARIABLES = {
    "finnhub": ("PAPERTRADER_PRICE_API_KEY", "FINNHUB_API_KEY"),
    "alphavantage": ("PAPERTRADER_PRICE_API_KEY", "ALPHAVANTAGE_API_KEY"),
}


class RequestBudget:
    """How many requests may still be sent: at most ``per_minute`` in any minute and ``per_day`` in any day.

    Measured on ``clock`` over sliding windows of the requests sent (None: no limit).
    """

    def __init__(self, clock: IReactorTime, per_minute: int | None, per_day: int | None) -> None:
        self._clock = clock
        self._windows = [(MINUTE, limit, deque()) for limit in (per_minute,) if limit] + [
            (DAY, limit, deque()) for limit in (per_day,) if limit
        ]

    def take(self) -> bool:
        """Count one request if the budget allows it now; False (and nothing counted) if not."""
        now = self._clock.seconds()
        for length, limit, sent in self._windows:
            while sent and sent[0] <= now - length:
                sent.popleft()
            if len(sent) >= limit:
                return False
        for _, _, sent in self._windows:
            sent.append(now)
        return True


class _TooLarge(Exception):
    """An answer was longer than MAX_ANSWER_BYTES."""


def _failure_reason(failure: Failure, timeout: float) -> str:
    """A short reason for a request that got no usable answer (never the URL: it holds the key)."""
    if failure.check(TimeoutError):
        return _reason(f"timed out after {timeout:g} s")
    if failure.check(_TooLarge):
        return f"answer larger than {MAX_ANSWER_BYTES // 1024} KiB"
    if failure.check(net_error.ConnectionRefusedError):
        return "connection refused"
    if failure.check(net_error.DNSLookupError):
        return "DNS lookup failed"
    if failure.check(net_error.ConnectError):
        return "connection failed"
    return _reason(f"request failed ({type(failure.value).__name__})")


class HttpPriceSource:
    """Asks a provider for each asset's quote over HTTP (treq), within the provider's quota.

    ``client`` is a `treq.client.HTTPClient`; ``clock`` measures timeouts and
    the request budget.  At most ``concurrency`` requests are in flight; each
    gets ``timeout`` seconds (then it is cancelled) and its answer is read up
    to `MAX_ANSWER_BYTES`.  A request the budget does not allow is not sent:
    its symbol fails with ``request budget spent``, and the next retrieval
    starts with the symbols left out, so every asset gets its turn.
    """

    def __init__(
        self,
        provider: Finnhub | AlphaVantage,
        symbols: Sequence[str],
        client: Any,
        clock: IReactorTime,
        api_key: str,
        *,
        base_url: str = "",
        concurrency: int = 4,
        timeout: float = 10.0,
        requests_per_minute: int | None = None,
        requests_per_day: int | None = None,
    ) -> None:
        self.provider = provider
        self._symbols = list(symbols)
        self._client = client
        self._clock = clock
        self._key = api_key
        self._base = base_url or provider.default_url
        self._semaphore = DeferredSemaphore(concurrency)
        self._timeout = timeout
        self.budget = RequestBudget(clock, requests_per_minute, requests_per_day)
        self._start = 0

    def __repr__(self) -> str:
        return f"<HttpPriceSource {self.provider.name} at {self._base}>"  # never the key

    def fetch(self) -> Deferred[Retrieval]:
        count = len(self._symbols)
        order = self._symbols[self._start :] + self._symbols[: self._start]
        results: dict[str, Quote | str] = {}
        sent = [0]

        def one(symbol: str) -> Deferred[None]:
            if not self.budget.take():
                results[symbol] = BUDGET_SPENT
                return succeed(None)
            sent[0] += 1
            return self._ask(symbol).addCallback(lambda result: results.update({symbol: result}))

        def done(_: Any) -> Retrieval:
            if count:
                self._start = (self._start + sent[0]) % count
            quotes = {s: r for s, r in results.items() if isinstance(r, Quote)}
            failures = {s: r for s, r in results.items() if not isinstance(r, Quote)}
            return Retrieval(quotes, failures)

        waiting = [self._semaphore.run(one, symbol) for symbol in order]
        return DeferredList(waiting, consumeErrors=True).addCallback(done)

    def _ask(self, symbol: str) -> Deferred[Quote | str]:
        """One symbol's quote or reason; never fails."""
        url = self.provider.url(self._base, symbol, self._key)
        d = self._client.get(url, headers={"Accept": ["application/json"]})
        d.addCallback(self._read)
        # Cancelling the request fails it as the agent sees fit: whatever it says, it timed out.
        d.addTimeout(self._timeout, self._clock, onTimeoutCancel=lambda result, timeout: Failure(TimeoutError()))
        d.addCallback(self._parse)
        d.addErrback(self._failed, symbol)
        return d

    def _failed(self, failure: Failure, symbol: str) -> str:
        reason = _failure_reason(failure, self._timeout)
        if reason.startswith("request failed"):
            # Unexpected: say what it was, but never the request (its URL holds the key).
            log.warn(
                "{provider}: request for {symbol} failed: {error}",
                provider=self.provider.name,
                symbol=symbol,
                error=type(failure.value).__name__,
            )
        return reason

    def _parse(self, answer: tuple[int, bytes]) -> Quote | str:
        result = self.provider.parse(answer[0], answer[1], self._clock.seconds())
        return result if isinstance(result, Quote) else _reason(result)

    def _read(self, response: Any) -> Deferred[tuple[int, bytes]]:
        """The status and body of a response, the body read up to MAX_ANSWER_BYTES."""
        length = response.length
        if isinstance(length, int) and length > MAX_ANSWER_BYTES:
            response.deliverBody(_Discard())
            raise _TooLarge()
        parts: list[bytes] = []
        size = [0]

        def collect(data: bytes) -> None:
            size[0] += len(data)
            if size[0] > MAX_ANSWER_BYTES:
                raise _TooLarge()
            parts.append(data)

        return treq.collect(response, collect).addCallback(lambda _: (response.code, b"".join(parts)))


class _Discard:
    """Drops an answer's body and its connection."""

    def makeConnection(self, transport: Any) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        pass


# ------------------------------------------------------------------ the quota check


def _count(number: float) -> str:
    return f"{number:,.0f}" if number == int(number) else f"{number:,.2f}".rstrip("0")


def _duration(seconds: float) -> str:
    """``69120`` -> ``19 h 12 min``; whole units only, largest first."""
    seconds = int(math.ceil(seconds))
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{v} {u}" for v, u in ((days, "d"), (hours, "h"), (minutes, "min"), (secs, "s")) if v]
    return " ".join(parts[:2]) or "0 s"


def quota_problems(
    provider: str, assets: int, interval: float, per_minute: int | None, per_day: int | None
) -> list[str]:
    """What is wrong with asking ``provider`` for ``assets`` quotes every ``interval`` seconds under a quota.

    One sentence per quota exceeded: how many requests are needed, the quota,
    and the shortest interval that keeps within it (how many times longer).
    Empty when the interval is long enough.
    """
    problems = []
    for window, limit, unit in ((MINUTE, per_minute, "minute"), (DAY, per_day, "day")):
        if not limit:
            continue
        if assets > limit:
            problems.append(
                f"{provider}: {assets} assets need {assets:,} requests at every update; the quota is {limit:,} "
                f"a {unit}: however long the interval, an update prices at most {limit:,} of them"
            )
            continue
        updates = window / interval
        needed = assets * max(1.0, updates)
        if needed <= limit:
            continue
        shortest = math.ceil(assets * window / limit)
        problems.append(
            f"{provider}: {assets} assets every {_count(interval)} s need {_count(needed)} requests a {unit}; "
            f"the quota is {limit:,}: the interval must be at least {shortest:,} s ({_duration(shortest)}), "
            f"{_count(round(shortest / interval, 2))} times longer"
        )
    return problems
