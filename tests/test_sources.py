"""HTTP price sources against providers served from 127.0.0.1: answers, refusals, timeouts, limits, quotas."""

from __future__ import annotations

import datetime
import json
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, urlparse

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from papertrader.config import load_master_config
from papertrader.master.market import MAX_STALE_REASON, Quote, SimulatedPriceSource
from papertrader.master.service import build_price_source, log_price_source
from papertrader.master.sources import (
    BUDGET_SPENT,
    AlphaVantage,
    Finnhub,
    HttpPriceSource,
    RequestBudget,
    decimal_cents,
    quota_problems,
)

KEY = "sekret-key-4711"
HANG = "hang"
HOLD = "hold"


def finnhub_quote(price: Any, t: int = 1_700_000_000) -> bytes:
    """A Finnhub quote answer with ``price`` written as given (a JSON number's text)."""
    return b'{"c": %s, "h": 1, "l": 1, "o": 1, "pc": 1, "t": %d}' % (str(price).encode(), t)


def global_quote(price: str, day: str = "2024-01-02") -> bytes:
    """An Alpha Vantage GLOBAL_QUOTE answer."""
    return json.dumps(
        {"Global Quote": {"01. symbol": "X", "05. price": price, "07. latest trading day": day}}
    ).encode()


class FakeProvider(Resource):
    """A provider that answers each symbol as the test says, counting requests and those in flight.

    An answer is ``(status, body)``; `HANG` never answers; `HOLD` answers
    ``held_answer`` once the test calls `release`.
    """

    isLeaf = True

    def __init__(self, answers: dict[str, Any], held_answer: tuple[int, bytes] = (200, b"")) -> None:
        super().__init__()
        self.answers = answers
        self.held_answer = held_answer
        self.requests: list[dict[str, list[str]]] = []
        self.paths: list[str] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.held: list[Any] = []
        self.arrivals: list[Deferred[None]] = []
        self.lost: list[Deferred[None]] = []

    def next_arrival(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.arrivals.append(d)
        return d

    def render_GET(self, request: Any) -> Any:
        try:
            return self._answer(request)
        finally:
            waiting, self.arrivals = self.arrivals, []
            for d in waiting:
                d.callback(None)

    def _answer(self, request: Any) -> Any:
        url = urlparse(request.uri.decode())
        args = parse_qs(url.query)
        self.paths.append(url.path)
        self.requests.append(args)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        request.notifyFinish().addErrback(self._lost)
        answer = self.answers[args["symbol"][0]]
        if answer == HANG:
            return NOT_DONE_YET
        if answer == HOLD:
            self.held.append(request)
            return NOT_DONE_YET
        self.in_flight -= 1
        status, body = answer
        request.setResponseCode(status)
        if status == 200 and body.startswith(b"chunked:"):
            for _ in range(100):
                request.write(b"x" * 1024)
            request.finish()
            return NOT_DONE_YET
        return body

    def release(self) -> None:
        """Answer the oldest held request."""
        request = self.held.pop(0)
        self.in_flight -= 1
        status, body = self.held_answer
        request.setResponseCode(status)
        request.write(body)
        request.finish()

    def _lost(self, reason: Any) -> None:
        """The connection was lost before the answer was sent (the client gave up)."""
        self.in_flight -= 1
        lost, self.lost = self.lost, []
        for d in lost:
            d.callback(None)


class HttpSourceTestMixin:
    """Serves a `FakeProvider` on 127.0.0.1 and builds sources asking it, timed by a `Clock`."""

    def serve(self, answers: dict[str, Any], **kw: Any) -> FakeProvider:
        self.provider = FakeProvider(answers, **kw)
        site = Site(self.provider)
        site.timeOut = None  # no idle timer left behind
        site.log = lambda request: None  # no access log: its lines hold the key, sent on purpose
        self.connections = WrappingFactory(site)
        port = reactor.listenTCP(0, self.connections, interface="127.0.0.1")
        self.addCleanup(self.closed)
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        return self.provider

    @inlineCallbacks
    def closed(self) -> Any:
        """Wait (a bounded while) until the server's side of every connection has closed."""
        for _ in range(500):
            if not self.connections.protocols:
                return
            yield deferLater(reactor, 0.01, lambda: None)

    def source(self, provider: Any, symbols: list[str], clock: Clock | None = None, **kw: Any) -> HttpPriceSource:
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.clock = clock or Clock()
        return HttpPriceSource(
            provider, symbols, HTTPClient(Agent(reactor, pool=pool)), self.clock, KEY, base_url=self.base, **kw
        )


class FinnhubTests(HttpSourceTestMixin, TestCase):
    """Finnhub's quote API: prices from ``c`` in exact cents, ``t`` the quote's time, every failure a reason."""

    timeout = 30

    @inlineCallbacks
    def test_answers(self) -> Any:
        """Good quotes are exact cents at Finnhub's time; each kind of bad answer is that symbol's short reason."""
        provider = self.serve(
            {
                "AAPL": (200, finnhub_quote("189.5")),
                "MSFT": (200, finnhub_quote("1.005", 1_700_000_100)),  # a float would make 100.49999... cents
                "KO": (200, finnhub_quote(60, 1_700_000_200)),
                "NOPE": (200, b'{"c": 0, "d": null, "dp": null, "h": 0, "l": 0, "o": 0, "pc": 0, "t": 0}'),
                "LIMIT": (429, b'{"error": "API limit reached. Please try again later."}'),
                "BROKEN": (500, b"oops"),
                "GARBLED": (200, b'{"c": 189.5, "t": '),
                "LIST": (200, b"[1, 2]"),
                "NOTIME": (200, b'{"c": 189.5}'),
                "ZERO": (200, finnhub_quote(0)),
                "NEG": (200, finnhub_quote("-3.5")),
                "TEXT": (200, b'{"c": "12", "t": 1}'),
                "ERR": (200, b'{"error": "You don\'t have access to this resource."}'),
                "BIG": (200, b"[" + b"1," * 40_000 + b"1]"),
                "CHUNKS": (200, b"chunked:"),
            }
        )
        source = self.source(Finnhub(), list(provider.answers))
        retrieval = yield source.fetch()
        self.assertEqual(
            retrieval.quotes,
            {
                "AAPL": Quote(18_950, 1_700_000_000),
                "MSFT": Quote(101, 1_700_000_100),
                "KO": Quote(6_000, 1_700_000_200),
            },
        )
        self.assertEqual(
            retrieval.failures,
            {
                "NOPE": "unknown symbol at Finnhub",
                "LIMIT": "HTTP 429 (rate limited)",
                "BROKEN": "HTTP 500",
                "GARBLED": "malformed answer",
                "LIST": "malformed answer",
                "NOTIME": "malformed answer",
                "ZERO": "non-positive price",
                "NEG": "non-positive price",
                "TEXT": "malformed answer",
                "ERR": "refused by Finnhub",
                "BIG": "answer larger than 64 KiB",
                "CHUNKS": "answer larger than 64 KiB",
            },
        )
        for reason in retrieval.failures.values():
            self.assertLessEqual(len(reason), MAX_STALE_REASON)
        self.assertEqual(set(provider.paths), {"/api/v1/quote"})
        self.assertEqual({args["token"][0] for args in provider.requests}, {KEY})

    @inlineCallbacks
    def test_timeout_cancels(self) -> Any:
        """A provider that never answers: at the timeout on the clock the request is cancelled, the symbol
        fails with the timeout, and the other symbols are priced."""
        provider = self.serve({"AAPL": (200, finnhub_quote("1.25")), "SLOW": HANG})
        # One at a time: SLOW is asked for once AAPL's answer is in.
        source = self.source(Finnhub(), ["AAPL", "SLOW"], timeout=7.5, concurrency=1)
        arrived = provider.next_arrival()
        result = source.fetch()
        while len(provider.requests) < 2:
            yield arrived
            arrived = provider.next_arrival()
        lost = Deferred()
        provider.lost.append(lost)
        self.assertNoResult(result)
        self.clock.advance(7.4)
        self.assertNoResult(result)
        self.clock.advance(0.1)
        retrieval = yield result
        self.assertEqual(retrieval.quotes, {"AAPL": Quote(125, 1_700_000_000)})
        self.assertEqual(retrieval.failures, {"SLOW": "timed out after 7.5 s"})
        yield lost  # the server saw the connection dropped: the request was cancelled
        self.assertEqual(provider.in_flight, 0)

    @inlineCallbacks
    def test_connection_refused(self) -> Any:
        """Nobody listening: every symbol fails with ``connection refused``."""
        port = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        yield port.stopListening()
        retrieval = yield self.source(Finnhub(), ["AAPL", "KO"]).fetch()
        self.assertEqual(retrieval.quotes, {})
        self.assertEqual(retrieval.failures, {"AAPL": "connection refused", "KO": "connection refused"})

    @inlineCallbacks
    def test_concurrency_limit(self) -> Any:
        """With a limit of 3, the server never has more than 3 requests of one retrieval at once, and has 3."""
        symbols = [f"S{i}" for i in range(10)]
        provider = self.serve(dict.fromkeys(symbols, HOLD), held_answer=(200, finnhub_quote("2.00")))
        source = self.source(Finnhub(), symbols, concurrency=3)
        arrived = provider.next_arrival()
        result = source.fetch()
        answered = 0
        while answered < len(symbols):
            if len(provider.held) < 3 and len(provider.requests) < len(symbols):
                yield arrived
                arrived = provider.next_arrival()
                continue
            provider.release()
            answered += 1
        retrieval = yield result
        self.assertEqual(retrieval.quotes, {s: Quote(200, 1_700_000_000) for s in symbols})
        self.assertEqual(provider.most_in_flight, 3)

    @inlineCallbacks
    def test_minute_budget(self) -> Any:
        """Beyond the budget no request is sent and those symbols fail; they go first next time; it refills
        after a minute on the clock."""
        symbols = ["A", "B", "C", "D", "E"]
        provider = self.serve({s: (200, finnhub_quote("3.00")) for s in symbols})
        source = self.source(Finnhub(), symbols, requests_per_minute=3, concurrency=1)
        first = yield source.fetch()
        self.assertEqual(sorted(first.quotes), ["A", "B", "C"])
        self.assertEqual(first.failures, {"D": BUDGET_SPENT, "E": BUDGET_SPENT})
        self.assertEqual(len(provider.requests), 3)

        self.clock.advance(59)
        spent = yield source.fetch()
        self.assertEqual((spent.quotes, set(spent.failures)), ({}, set(symbols)))
        self.assertEqual(len(provider.requests), 3)

        self.clock.advance(1)
        refilled = yield source.fetch()
        self.assertEqual(sorted(refilled.quotes), ["A", "D", "E"])
        self.assertEqual(len(provider.requests), 6)
        self.assertEqual([args["symbol"][0] for args in provider.requests[3:]], ["D", "E", "A"])

    @inlineCallbacks
    def test_key_never_logged(self) -> Any:
        """The key is sent to the provider, but no log event of a retrieval (failures included) holds it."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        provider = self.serve({"AAPL": (200, finnhub_quote("1.00")), "BAD": (500, b""), "SLOW": HANG})
        source = self.source(Finnhub(), ["AAPL", "BAD", "SLOW"], concurrency=1)
        result = source.fetch()
        while len(provider.requests) < 3:
            yield provider.next_arrival()
        self.clock.advance(10)
        retrieval = yield result
        self.assertEqual(set(retrieval.failures), {"BAD", "SLOW"})
        self.assertEqual({args["token"][0] for args in provider.requests}, {KEY})
        self.assertNotIn(KEY, repr(source))
        for event in events:
            self.assertNotIn(KEY, formatEvent(event))
            self.assertNotIn(KEY, repr(event))
        for reason in retrieval.failures.values():
            self.assertNotIn(KEY, reason)


class AlphaVantageTests(HttpSourceTestMixin, TestCase):
    """Alpha Vantage's GLOBAL_QUOTE: text prices in exact cents, refusals in HTTP 200 answers, a daily budget."""

    timeout = 30

    @inlineCallbacks
    def test_answers(self) -> Any:
        """Good quotes, and every refusal, empty quote, bad status and bad answer as that symbol's reason."""
        provider = self.serve(
            {
                "AAPL": (200, global_quote("189.5000", "2024-01-02")),
                "KO": (200, global_quote("60.0050", "2024-07-01")),
                "NOTE": (
                    200,
                    b'{"Note": "Thank you for using Alpha Vantage! API call frequency is 5 calls per minute."}'
                ),
                "INFO": (200, b'{"Information": "Our standard API rate limit is 25 requests per day."}'),
                "PREMIUM": (200, b'{"Information": "This is a premium endpoint."}'),
                "ERR": (200, b'{"Error Message": "Invalid API call. Please retry or visit the documentation."}'),
                "EMPTY": (200, b'{"Global Quote": {}}'),
                "LIMIT": (429, b""),
                "BROKEN": (500, b""),
                "GARBLED": (200, b"<html>Service Unavailable</html>"),
                "NOPRICE": (200, b'{"Global Quote": {"01. symbol": "X", "07. latest trading day": "2024-01-02"}}'),
                "NODAY": (200, b'{"Global Quote": {"01. symbol": "NODAY", "05. price": "1.0000"}}'),
                "BADDAY": (200, global_quote("1.0000", "yesterday")),
                "BADPRICE": (200, global_quote("n/a")),
                "ZERO": (200, global_quote("0.0000")),
                "NEG": (200, global_quote("-1.5000")),
            }
        )
        source = self.source(AlphaVantage(), list(provider.answers))
        self.clock.advance(2_000_000_000)  # long after those trading days
        retrieval = yield source.fetch()
        close_2024_01_02 = int(datetime.datetime(2024, 1, 2, 21, 0, tzinfo=datetime.timezone.utc).timestamp())
        close_2024_07_01 = int(datetime.datetime(2024, 7, 1, 20, 0, tzinfo=datetime.timezone.utc).timestamp())
        self.assertEqual(
            retrieval.quotes, {"AAPL": Quote(18_950, close_2024_01_02), "KO": Quote(6_001, close_2024_07_01)}
        )
        self.assertEqual(
            retrieval.failures,
            {
                "NOTE": "refused: over the API limit",
                "INFO": "refused: over the API limit",
                "PREMIUM": "refused by Alpha Vantage",
                "ERR": "refused: invalid request or key",
                "EMPTY": "unknown symbol at Alpha Vantage",
                "LIMIT": "HTTP 429 (rate limited)",
                "BROKEN": "HTTP 500",
                "GARBLED": "malformed answer",
                "NOPRICE": "malformed answer",
                "NODAY": "malformed answer",
                "BADDAY": "malformed answer",
                "BADPRICE": "malformed answer",
                "ZERO": "non-positive price",
                "NEG": "non-positive price",
            },
        )
        self.assertEqual(set(provider.paths), {"/query"})
        for args in provider.requests:
            self.assertEqual((args["function"], args["apikey"]), (["GLOBAL_QUOTE"], [KEY]))

    @inlineCallbacks
    def test_day_in_progress(self) -> Any:
        """The quote of a trading day still open is timed now, not at the close to come."""
        self.serve({"AAPL": (200, global_quote("10.00", "2024-01-02"))})
        source = self.source(AlphaVantage(), ["AAPL"])
        now = datetime.datetime(2024, 1, 2, 15, 0, tzinfo=datetime.timezone.utc).timestamp()
        self.clock.advance(now)
        retrieval = yield source.fetch()
        self.assertEqual(retrieval.quotes, {"AAPL": Quote(1_000, int(now))})

    @inlineCallbacks
    def test_day_budget(self) -> Any:
        """A daily budget is not refilled by a minute, only by a day."""
        self.serve({s: (200, global_quote("1.00")) for s in "ABC"})
        source = self.source(AlphaVantage(), list("ABC"), requests_per_minute=60, requests_per_day=2)
        first = yield source.fetch()
        self.assertEqual((sorted(first.quotes), first.failures), (["A", "B"], {"C": BUDGET_SPENT}))
        self.clock.advance(3600)
        later = yield source.fetch()
        self.assertEqual(later.quotes, {})
        self.clock.advance(86_400 - 3600)
        next_day = yield source.fetch()
        self.assertEqual(sorted(next_day.quotes), ["A", "C"])


class RequestBudgetTests(SynchronousTestCase):
    """The budget counts requests over sliding windows of the clock."""

    def test_sliding_minute(self) -> None:
        """Two a minute: a third waits until the first is a minute old, not for a new calendar minute."""
        clock = Clock()
        budget = RequestBudget(clock, 2, None)
        self.assertTrue(budget.take())
        clock.advance(30)
        self.assertTrue(budget.take())
        self.assertFalse(budget.take())
        clock.advance(29.9)
        self.assertFalse(budget.take())
        clock.advance(0.1)
        self.assertTrue(budget.take())
        self.assertFalse(budget.take())

    def test_unlimited(self) -> None:
        """No limits: every request is allowed."""
        budget = RequestBudget(Clock(), None, None)
        self.assertTrue(all(budget.take() for _ in range(10_000)))


class QuotaTests(SynchronousTestCase):
    """The start-up check: does the asset list at the update interval fit the provider's quota?"""

    def test_alpha_vantage_free_quota(self) -> None:
        """20 assets every 60 s on Alpha Vantage's 25 a day: the interval is too short, by how much and how long."""
        av = AlphaVantage()
        problems = quota_problems(av.name, 20, 60.0, av.requests_per_minute, av.requests_per_day)
        self.assertEqual(
            problems,
            [
                "Alpha Vantage: 20 assets every 60 s need 28,800 requests a day; the quota is 25: the interval "
                "must be at least 69,120 s (19 h 12 min), 1,152 times longer"
            ],
        )
        self.assertEqual(quota_problems(av.name, 20, 69_120.0, 60, 25), [])

    def test_finnhub(self) -> None:
        """Finnhub's 60 a minute: 20 assets at 60 s fit; 20 at 10 s and 100 at any interval do not."""
        fh = Finnhub()
        self.assertEqual(quota_problems(fh.name, 20, 60.0, fh.requests_per_minute, fh.requests_per_day), [])
        [fast] = quota_problems(fh.name, 20, 10.0, 60, None)
        self.assertIn("20 assets every 10 s need 120 requests a minute; the quota is 60", fast)
        self.assertIn("at least 20 s (20 s), 2 times longer", fast)
        [many] = quota_problems(fh.name, 100, 60.0, 60, None)
        self.assertIn("100 assets need 100 requests at every update; the quota is 60 a minute", many)
        self.assertIn("at most 60 of them", many)

    def test_factor_with_fraction(self) -> None:
        """A factor that is not whole is shown to two decimals at most."""
        [problem] = quota_problems("Alpha Vantage", 24, 60.0, None, 25)
        self.assertIn("at least 82,944 s (23 h 2 min), 1,382.4 times longer", problem)


class DecimalCentsTests(SynchronousTestCase):
    """Provider prices become cents exactly, without floats."""

    def test_exact(self) -> None:
        """Digits beyond a float's precision still round correctly, half up to the cent."""
        self.assertEqual(decimal_cents("189.5000"), 18_950)
        self.assertEqual(decimal_cents(Decimal("0.125")), 13)
        self.assertEqual(decimal_cents("1.004999999999999999999"), 100)
        self.assertEqual(decimal_cents("123456789012345678901234567890.01"), 12345678901234567890123456789001)

    def test_refused(self) -> None:
        """Zero, negative, below a cent, infinite and non-numbers are refused."""
        for text in ("0", "-1", "0.004", "inf", "NaN", "abc", ""):
            self.assertRaises(ValueError, decimal_cents, text)


class BuildPriceSourceTests(SynchronousTestCase):
    """The master builds the configured source, and warns at start when a provider's quota is too small."""

    def build(self, overrides: dict[str, str]) -> tuple[Any, list[str]]:
        events: list[dict[str, Any]] = []
        config = load_master_config(None, overrides, {})
        source, pool = build_price_source(config, reactor)
        log_price_source(config, Logger(observer=events.append))
        return source, [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]

    def test_simulated_default(self) -> None:
        """Without price_source the market is simulated."""
        source, warnings = self.build({})
        self.assertIsInstance(source, SimulatedPriceSource)
        self.assertEqual(warnings, [])

    def test_alpha_vantage_quota_warning(self) -> None:
        """The 24 sample assets every 60 s on Alpha Vantage's free quota: one warning saying by how much."""
        source, warnings = self.build({"price_source": "alphavantage", "price_api_key": KEY})
        self.assertIsInstance(source, HttpPriceSource)
        self.assertIsInstance(source.provider, AlphaVantage)
        self.assertEqual(
            warnings,
            [
                "price quota exceeded: Alpha Vantage: 24 assets every 60 s need 34,560 requests a day; the quota is "
                "25: the interval must be at least 82,944 s (23 h 2 min), 1,382.4 times longer"
            ],
        )

    def test_finnhub_within_quota(self) -> None:
        """The sample assets every 60 s fit Finnhub's free quota; configured limits replace the provider's."""
        source, warnings = self.build({"price_source": "finnhub", "price_api_key": KEY})
        self.assertEqual(warnings, [])
        _, warnings = self.build({"price_source": "finnhub", "price_api_key": KEY, "price_requests_per_minute": "10"})
        [warning] = warnings
        self.assertIn("the quota is 10 a minute", warning)
        _, warnings = self.build({"price_source": "alphavantage", "price_api_key": KEY, "price_requests_per_day": "0"})
        self.assertEqual(warnings, [])
