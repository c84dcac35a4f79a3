"""The Twisted client library: a connection to a worker with one method per command.

Pushed price ticks and order updates are handed to callbacks the caller sets.
A connection gets its user's order updates once logged in; price ticks only
after `PaperTraderClient.subscribe` asked for them.  `papertrader.client.session`
builds on it: a session that moves to another worker when its worker goes away.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet import threads
from twisted.internet.defer import Deferred, fail, inlineCallbacks, returnValue, succeed
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from papertrader import tls
from papertrader.errors import BadRequest, DataFailed, ServiceUnavailable
from papertrader.protocol import (
    MAX_CLIENT_BATCH,
    ChangePassword,
    ClientOrder,
    GetAssetInfo,
    GetAssetValue,
    GetMarketStatus,
    GetPriceHistory,
    GetUserPortfolio,
    GetUserTransactionHistory,
    GoAway,
    Heartbeat,
    ListOrders,
    Login,
    LoginWithToken,
    Logout,
    LogoutEverywhere,
    OrderUpdates,
    Ping,
    PlacedOrder,
    PlaceOrders,
    PriceTick,
    PurchaseAsset,
    Register,
    SellAsset,
    Subscribe,
)

# Order requests one connection keeps in flight; orders placed beyond that wait and go together in a PlaceOrders.
MAX_ORDER_REQUESTS_IN_FLIGHT = 4
# How many times `PaperTraderClient.portfolio` starts again when the portfolio changes between its pages.
PORTFOLIO_ATTEMPTS = 5
# How many times `PaperTraderClient.price_history` starts again when a price update came between its pages,
# and the most pages it reads in one go (the longest history has a few hundred).
HISTORY_ATTEMPTS = 5
MAX_HISTORY_PAGES = 10_000


range_ = range  # `price_history` has an argument of that name


class RequestTimedOut(ConnectionClosed):
    """A request had no answer in time, so its connection was dropped (the worker, or the way to it, is gone).

    A ConnectionClosed like any lost connection: what was in flight may or may
    not have been done.
    """


def new_client_order_ids(count: int, now: float | None = None) -> list[str]:
    """``count`` new time-ordered UUIDs (version 7, RFC 9562) as text, from one read of the system's randomness.

    The first 48 bits are the time (``now``, default the current time) in
    milliseconds and 74 are random.  Ids made one after another sort near
    each other, so the master's index of client order ids (by user) grows at
    one end: random (version 4) ids landed all over it, and every batch of
    orders rewrote pages throughout.
    """
    millis = int((time.time() if now is None else now) * 1000) & 0xFFFF_FFFF_FFFF
    stamp = f"{millis:012x}"
    head = f"{stamp[:8]}-{stamp[8:]}-7"
    digits = os.urandom(10 * count).hex()
    ids = []
    for start in range(0, 20 * count, 20):
        r = digits[start : start + 20]
        ids.append(f"{head}{r[:3]}-{_UUID_VARIANT[r[3]]}{r[4:7]}-{r[7:19]}")
    return ids


# The first digit of a UUID's fourth group: its top two bits are the variant, 10.
_UUID_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


class _Pushes(amp.CommandLocator):
    def __init__(self) -> None:
        self.on_order_update: Callable[[dict[str, Any]], None] | None = None
        self.on_price_tick: Callable[[dict[str, Any]], None] | None = None
        self.on_go_away: Callable[[str, list[dict[str, str]]], None] | None = None

    @GoAway.responder
    def go_away(self, reason: str, workers: list[dict[str, str]]) -> dict:
        if self.on_go_away is not None:
            self.on_go_away(reason, workers)
        return {}

    @OrderUpdates.responder
    def order_updates(self, settled_at: str, updates: list[dict[str, Any]]) -> dict:
        if self.on_order_update is not None:
            for update in updates:
                self.on_order_update({**update, "settled_at": settled_at})
        return {}

    @PriceTick.responder
    def price_tick(self, **tick: Any) -> dict:
        if self.on_price_tick is not None:
            # ``stale`` always there: the symbols (of those asked for) whose price is the last good one, and why.
            self.on_price_tick({**tick, "stale": tick.get("stale") or {}})
        return {}


class PaperTraderClient:
    """A logged-in (or not yet) connection to a PaperTrader worker."""

    def __init__(self, connection: amp.AMP, pushes: _Pushes) -> None:
        self.connection = connection
        self.token: str | None = None
        self._on_order_update: Callable[[dict[str, Any]], None] | None = None
        self._on_price_tick: Callable[[dict[str, Any]], None] | None = None
        self._settled: dict[int, dict[str, Any]] = {}
        self._waiting: dict[int, list[Deferred]] = {}
        self._keep_alive: LoopingCall | None = None
        self.max_requests_in_flight = MAX_ORDER_REQUESTS_IN_FLIGHT
        # Seconds a request may wait for its answer before the connection is dropped (None: for ever),
        # timed on ``clock``; see `set_request_timeout`.
        self.request_timeout: float | None = None
        self.clock: IReactorTime | None = None
        self._in_flight = 0
        self._queued: list[tuple[ClientOrder, Deferred]] = []
        # The price ticks the caller asked for ("all" or symbols), and the ones
        # asked for only while orders wait for settlement (see wait_for_settlement).
        self._wanted: str | tuple[str, ...] = ()
        self._watching: str | tuple[str, ...] = ()
        self._order_symbols: dict[int, str] = {}
        self._closed: list[Deferred[Failure]] = []
        self._pushes = pushes
        pushes.on_order_update = self._order_update
        pushes.on_price_tick = self._price_tick
        if isinstance(connection, ClientAMP):
            connection.on_lost = self._lost

    def set_request_timeout(self, clock: IReactorTime, seconds: float | None) -> None:
        """Drop the connection (abort it) when a request has had no answer for ``seconds`` on ``clock``.

        A worker whose network link was cut sends no FIN or RST: without this a
        request would wait for ever.  Every request in flight then fails with
        ConnectionClosed, the one that waited too long with `RequestTimedOut`.
        """
        self.clock, self.request_timeout = clock, seconds

    def _call(self, command: type[amp.Command], **arguments: Any) -> Deferred:
        """``callRemote``, within the request timeout if one is set."""
        d = self.connection.callRemote(command, **arguments)
        if self.request_timeout is None:
            return d
        return self._timed(d, command, self.request_timeout)

    def _timed(self, d: Deferred, command: type[amp.Command], seconds: float) -> Deferred:
        clock = self.clock
        if clock is None:
            return d
        expired = False

        def give_up() -> None:
            nonlocal expired
            expired = True
            if self.connection.transport is not None:
                self.connection.transport.abortConnection()

        timer = clock.callLater(seconds, give_up)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if expired and isinstance(result, Failure) and result.check(ConnectionClosed):
                name = command.commandName.decode("ascii")
                raise RequestTimedOut(
                    f"no answer to {name} from the worker within {seconds:g} s: the connection was dropped "
                    "(the request may or may not have taken effect)"
                )
            return result

        return d.addBoth(done)

    def ping(self, timeout: float | None = None) -> Deferred[bool]:
        """Ask the worker to answer at once (Ping; the worker answers it itself, without the master).

        Fires True on the answer, False if the worker does not know Ping (a
        worker from before it).  No answer within ``timeout`` seconds (default:
        the request timeout) drops the connection, as for any request.
        """
        seconds = self.request_timeout if timeout is None else timeout
        d = self.connection.callRemote(Ping)
        if seconds is not None:
            d = self._timed(d, Ping, seconds)

        def unknown(failure: Failure) -> bool:
            failure.trap(BadRequest, amp.UnhandledCommand)
            return False

        return d.addCallbacks(lambda _: True, unknown)

    def on_order_update(self, callback: Callable[[dict[str, Any]], None] | None) -> None:
        """Call ``callback(update)`` whenever one of this user's orders settles or is rejected."""
        self._on_order_update = callback

    def on_price_tick(self, callback: Callable[[dict[str, Any]], None] | None) -> None:
        """Call ``callback(tick)`` on every price update pushed (see `subscribe`)."""
        self._on_price_tick = callback

    def on_go_away(self, callback: Callable[[str, list[dict[str, str]]], None] | None) -> None:
        """Call ``callback(reason, workers)`` when the worker says it is closing this connection (it was kicked)
        and names the workers to go to instead."""
        self._pushes.on_go_away = callback

    def subscribe(self, prices: str | Iterable[str] | None) -> Deferred[dict[str, Any]]:
        """Choose the price ticks pushed to this connection: ``"all"``, a list of symbols, or None for none.

        A new connection gets none; each call replaces the last choice.  Fires
        with the worker's answer (``prices``, ``all_prices``); an unknown symbol
        or more than MAX_SUBSCRIBED_SYMBOLS fail with DataFailed.
        """
        if prices == "all":
            wanted: str | tuple[str, ...] = "all"
        elif prices is None:
            wanted = ()
        elif isinstance(prices, str):
            raise ValueError(f'prices must be "all", a list of symbols or None, got {prices!r}')
        else:
            wanted = tuple(prices)
        self._wanted = wanted
        return self._send_subscription()

    def _send_subscription(self) -> Deferred[dict[str, Any]]:
        prices = self._wanted or self._watching
        if prices == "all":
            return self._call(Subscribe, all_prices=True)
        return self._call(Subscribe, prices=list(prices))

    def wait_for_settlement(self, order_id: int) -> Deferred[dict[str, Any]]:
        """Fires with the order's update once it has settled or been rejected.

        The pushed update usually says so; a missed push (say the worker lost the
        master during that update) is made up for by looking the order up after
        the next price tick.  Fails with ConnectionClosed if the connection ends first.
        """
        if order_id in self._settled:
            return succeed(self._settled[order_id])
        d: Deferred[dict[str, Any]] = Deferred()
        self._waiting.setdefault(order_id, []).append(d)
        self._watch_ticks(order_id)
        return d

    def _watch_ticks(self, order_id: int) -> None:
        """Make sure price ticks come while orders wait: the look-up after a missed push needs them.

        One symbol's ticks are enough (the order's own, when this connection
        placed it); the caller's `on_price_tick` is not told of them.
        """
        if self._wanted or self._watching:
            return
        symbol = self._order_symbols.get(order_id)
        self._watching = (symbol,) if symbol is not None else "all"
        self._send_subscription().addErrback(lambda _: None)

    def _order_update(self, update: dict[str, Any]) -> None:
        self._settled[update["order_id"]] = update
        self._order_symbols.pop(update["order_id"], None)
        for d in self._waiting.pop(update["order_id"], []):
            d.callback(update)
        if self._watching and not self._waiting:
            self._watching = ()
            if self.connection.transport is not None:
                self._send_subscription().addErrback(lambda _: None)
        if self._on_order_update is not None:
            self._on_order_update(update)

    def _price_tick(self, tick: dict[str, Any]) -> None:
        if self._waiting and self.token:
            self.orders_page().addCallbacks(self._look_up_waiting, lambda _: None)
        if self._wanted and self._on_price_tick is not None:
            self._on_price_tick(tick)

    def _look_up_waiting(self, answer: dict[str, Any]) -> None:
        for order in answer["orders"]:
            if order["order_id"] in self._waiting and order["status"] != "queued":
                self._order_update({**order, "price_cents": order.get("price_cents")})

    def when_closed(self) -> Deferred[Failure]:
        """Fires with the reason once the connection has closed."""
        d: Deferred[Failure] = Deferred()
        if self.connection.transport is None:
            d.callback(Failure(ConnectionClosed("the connection is closed")))
        else:
            self._closed.append(d)
        return d

    def _lost(self, reason: Failure) -> None:
        closed, self._closed = self._closed, []
        for d in closed:
            d.callback(reason)
        if self._keep_alive is not None and self._keep_alive.running:
            self._keep_alive.stop()
        waiting, self._waiting = self._waiting, {}
        for ds in waiting.values():
            for d in ds:
                d.errback(ConnectionClosed("the connection closed before the order settled"))

    def register(self, username: str, email: str, password: str) -> Deferred:
        return self._call(Register, username=username, email=email, password=password)

    @inlineCallbacks
    def login(self, username: str, password: str, remember: bool = False) -> Any:
        answer = yield self._call(
            Login, username=username, password=password, remember=remember
        )
        self.token = answer["token"]
        returnValue(answer)

    @inlineCallbacks
    def login_with_token(self, token: str) -> Any:
        answer = yield self._call(LoginWithToken, token=token)
        self.token = token
        returnValue(answer)

    @inlineCallbacks
    def logout(self) -> Any:
        answer = yield self._call(Logout, token=self.token or "")
        self.token = None
        returnValue(answer)

    @inlineCallbacks
    def logout_everywhere(self) -> Any:
        """End every session of this user (every device); fires with the answer, ``sessions`` ended."""
        answer = yield self._call(LogoutEverywhere, token=self.token or "")
        self.token = None
        returnValue(answer)

    @inlineCallbacks
    def change_password(self, old_password: str, new_password: str) -> Any:
        """Change the password; every session ends, this one too, so log in again afterwards."""
        answer = yield self._call(
            ChangePassword, token=self.token or "", old_password=old_password, new_password=new_password
        )
        self.token = None
        returnValue(answer)

    def quote(self, symbol: str) -> Deferred:
        """The latest price of ``symbol`` (``symbol``, ``name``, ``exchange``, ``price_cents``, ``as_of``, and
        ``stale``, the reason, when the latest retrieval failed and the price is the last good one)."""
        return self._call(GetAssetValue, symbol=symbol)

    def asset_info(self, symbol: str) -> Deferred[dict[str, Any]]:
        """What the asset list says of ``symbol`` (``name``, ``exchange``, ``sector``, ``industry``,
        ``currency``) and its price as `quote` gives it (``price_cents``, ``as_of``, ``stale``: absent while
        it has none).  An unknown symbol: DataFailed."""
        return self._call(GetAssetInfo, symbol=symbol)

    def market_status(self) -> Deferred[dict[str, Any]]:
        """Whether the market is open (``open``, ``always_open``), the server's ``now``, the next opening or
        closing (``next_change``: absent when always open), ``time_zone``, ``hours`` and ``days``; all times
        ISO 8601 in the market's time zone."""
        return self._call(GetMarketStatus)

    def price_history_page(self, symbol: str, range: str, cursor: str | None = None) -> Deferred[dict[str, Any]]:
        """One page of ``symbol``'s OHLC bars over ``range`` (one of HISTORY_RANGES), oldest first, paged
        like `orders_page`."""
        return self._call(GetPriceHistory, symbol=symbol, range=range, cursor=cursor)

    @inlineCallbacks
    def price_history(self, symbol: str, range: str) -> Any:
        """Every bar of ``symbol``'s history over ``range``, oldest first, read page by page: ``symbol``,
        ``range``, ``bar_seconds``, ``bars`` and ``as_of``.

        The pages of one reading are of one price update; if a page is
        refused because an update came meanwhile, the reading starts again
        from the first page (at most HISTORY_ATTEMPTS times).  An unknown
        symbol or range: DataFailed.
        """
        for attempt in range_(HISTORY_ATTEMPTS):
            first = yield self.price_history_page(symbol, range)
            bars = list(first["bars"])
            cursor = first.get("next_cursor")
            pages = 1
            try:
                while cursor is not None and pages < MAX_HISTORY_PAGES:
                    page = yield self.price_history_page(symbol, range, cursor)
                    bars.extend(page["bars"])
                    cursor = page.get("next_cursor")
                    pages += 1
            except DataFailed:
                if attempt + 1 == HISTORY_ATTEMPTS:
                    raise
                continue
            if cursor is not None:
                raise DataFailed(f"the history of {symbol} has more than {MAX_HISTORY_PAGES} pages")
            answer = {key: first[key] for key in ("symbol", "range", "bar_seconds")}
            returnValue({**answer, "as_of": first.get("as_of"), "bars": bars})

    def buy(self, symbol: str, quantity: int | str, client_order_id: str | None = None) -> Deferred:
        """Queue a market buy; fires with ``{"order_id": ...}`` once it is stored.

        Every order carries a client order id (a new time-ordered UUID unless given): sending
        the same order again with the same id -- say after the connection was
        lost before the answer came -- returns the original order, never a second.
        """
        return self._order(PurchaseAsset, symbol, quantity, client_order_id)

    def sell(self, symbol: str, quantity: int | str, client_order_id: str | None = None) -> Deferred:
        """Queue a market sell; see `buy` for ``client_order_id``."""
        return self._order(SellAsset, symbol, quantity, client_order_id)

    def _order(self, command: type[amp.Command], symbol: str, quantity: int | str, client_order_id: str | None) -> Any:
        # Sent at once while few requests are in flight; beyond that, orders wait
        # and go together as one PlaceOrders when an answer comes back.
        client_order_id = client_order_id or new_client_order_ids(1)[0]
        if self._in_flight < self.max_requests_in_flight and not self._queued:
            self._in_flight += 1
            d = self._call(
                command, token=self.token or "", symbol=symbol, quantity=str(quantity), client_order_id=client_order_id
            )
            d.addBoth(self._request_done)
        else:
            side = "buy" if command is PurchaseAsset else "sell"
            d = Deferred()
            self._queued.append((ClientOrder(side, symbol, str(quantity), client_order_id), d))
        return d.addCallback(self._placed, symbol.strip().upper())

    def _placed(self, answer: dict[str, Any], symbol: str) -> dict[str, Any]:
        if answer["order_id"] not in self._settled:
            self._order_symbols[answer["order_id"]] = symbol
        return answer

    def _request_done(self, result: Any) -> Any:
        self._in_flight -= 1
        self._send_queued()
        return result

    def _send_queued(self) -> None:
        while self._queued and self._in_flight < self.max_requests_in_flight:
            batch, self._queued = self._queued[:MAX_CLIENT_BATCH], self._queued[MAX_CLIENT_BATCH:]
            self._in_flight += 1
            self._call(
                PlaceOrders, token=self.token or "", orders=[order for order, _ in batch]
            ).addBoth(self._batch_answered, batch)

    def _batch_answered(self, answer: Any, batch: list[tuple[ClientOrder, Deferred]]) -> None:
        self._in_flight -= 1
        if isinstance(answer, Failure):
            for _, d in batch:
                d.errback(answer)
        else:
            results = answer["results"]
            for index, (_, d) in enumerate(batch):
                result = results[index] if index < len(results) else None
                if result is None:
                    d.errback(ServiceUnavailable("the worker gave no answer for this order; check it and retry"))
                elif result.order_id is not None:
                    d.callback({"order_id": result.order_id})
                else:
                    d.errback(result.error())
        self._send_queued()

    def place_orders(self, orders: list[dict[str, Any]]) -> Deferred[list[PlacedOrder]]:
        """Send several orders (``side``, ``symbol``, ``quantity``, optional ``client_order_id``) in one message.

        Fires with one `PlacedOrder` per order, in order: ``order_id`` if it was
        queued, ``error()`` if it was refused.  At most MAX_CLIENT_BATCH orders.
        """
        ids = new_client_order_ids(len(orders))
        rows = [
            ClientOrder(o["side"], o["symbol"], str(o["quantity"]), o.get("client_order_id") or new_id)
            for o, new_id in zip(orders, ids)
        ]
        return self._call(PlaceOrders, token=self.token or "", orders=rows).addCallback(
            lambda answer: answer["results"]
        )

    def orders(self, limit: int | None = None) -> Deferred[dict[str, Any]]:
        """The newest ``limit`` orders (None: every one), read page by page, as ``{"orders": [...]}``."""
        return self._rows(self.orders_page, "orders", limit)

    def orders_page(self, cursor: str | None = None) -> Deferred[dict[str, Any]]:
        """One page of orders, newest first: ``orders``, ``page``, ``pages`` and ``next_cursor`` but on the last.

        Without ``cursor`` the first page; pass ``next_cursor`` for the next.
        """
        return self._call(ListOrders, token=self.token or "", cursor=cursor)

    @inlineCallbacks
    def portfolio(self) -> Any:
        """Cash, every position and the total, read page by page (``username``, ``cash_cents``, ``positions``,
        ``total_cents``, ``as_of``).

        The pages of one reading are of one portfolio at one tick; if it
        changes while they are read, the reading starts again (a few times).
        """
        for attempt in range(PORTFOLIO_ATTEMPTS):
            first = yield self.portfolio_page()
            positions = list(first["positions"])
            cursor = first.get("next_cursor")
            try:
                while cursor is not None:
                    page = yield self.portfolio_page(cursor)
                    positions.extend(page["positions"])
                    cursor = page.get("next_cursor")
            except DataFailed:
                if attempt + 1 == PORTFOLIO_ATTEMPTS:
                    raise
                continue
            keys = ("username", "cash_cents", "total_cents", "as_of")
            returnValue({**{key: first[key] for key in keys}, "positions": positions})

    def portfolio_page(self, cursor: str | None = None) -> Deferred[dict[str, Any]]:
        """One page of the portfolio, paged like `orders_page`; each page also carries the cash and the total."""
        return self._call(GetUserPortfolio, token=self.token or "", cursor=cursor)

    def history(self, limit: int | None = None) -> Deferred[dict[str, Any]]:
        """The newest ``limit`` settled trades (None: every one), read page by page, as ``{"transactions": [...]}``."""
        return self._rows(self.history_page, "transactions", limit)

    def history_page(self, cursor: str | None = None) -> Deferred[dict[str, Any]]:
        """One page of settled trades, newest first, paged like `orders_page`."""
        return self._call(GetUserTransactionHistory, token=self.token or "", cursor=cursor)

    @inlineCallbacks
    def _rows(self, fetch_page: Callable[[str | None], Deferred], key: str, limit: int | None) -> Any:
        """The rows under ``key`` of the pages of one listing, up to ``limit`` (None: all)."""
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        rows: list[dict[str, Any]] = []
        cursor = None
        while limit is None or len(rows) < limit:
            page = yield fetch_page(cursor)
            rows.extend(page[key])
            cursor = page.get("next_cursor")
            if cursor is None:
                break
        returnValue({key: rows[:limit]})

    def heartbeat(self) -> None:
        """Tell the worker this connection is still wanted (a quiet logged-in connection is closed after a while)."""
        self.connection.callRemote(Heartbeat)

    def keep_alive(self, clock: Any, interval: float = 60.0) -> LoopingCall:
        """Send a heartbeat every ``interval`` seconds until the connection closes; returns the loop."""
        loop = LoopingCall(self.heartbeat)
        loop.clock = clock
        loop.start(interval, now=False).addErrback(lambda _: None)
        self._keep_alive = loop
        return loop

    def close(self) -> None:
        """Close the connection (if it is still open)."""
        if self.connection.transport is not None:
            self.connection.transport.loseConnection()


class TLSHandshakeFailed(Exception):
    """The TLS handshake with the server failed (untrusted or mismatched certificate)."""


@implementer(IHandshakeListener)
class ClientAMP(amp.AMP):
    """The client side of a worker connection, which can tell when TLS is up."""

    def __init__(self) -> None:
        super().__init__(locator=_Pushes())
        self.on_lost: Callable[[Failure], None] | None = None
        self._handshake_result: Failure | None | bool = False
        self._handshake_waiters: list[Deferred[None]] = []

    def when_handshake_done(self) -> Deferred[None]:
        """Fires once the TLS handshake succeeded; fails with TLSHandshakeFailed if it did not."""
        if self._handshake_result is None:
            return succeed(None)
        if isinstance(self._handshake_result, Failure):
            return fail(self._handshake_result)
        d: Deferred[None] = Deferred()
        self._handshake_waiters.append(d)
        return d

    def _handshake_finished(self, result: Failure | None) -> None:
        if self._handshake_result is not False:
            return
        self._handshake_result = result
        waiters, self._handshake_waiters = self._handshake_waiters, []
        for d in waiters:
            if result is None:
                d.callback(None)
            else:
                d.errback(result)

    def handshakeCompleted(self) -> None:
        self._handshake_finished(None)

    def connectionLost(self, reason: Any) -> None:
        self._handshake_finished(
            Failure(TLSHandshakeFailed(f"TLS handshake failed: {reason.getErrorMessage()}"))
        )
        super().connectionLost(reason)
        if self.on_lost is not None:
            self.on_lost(reason)


def client_from_connection(connection: amp.AMP) -> PaperTraderClient:
    """Wrap an already-connected `ClientAMP`."""
    return PaperTraderClient(connection, connection.locator)


@inlineCallbacks
def connect(
    reactor: Any, host: str, port: int, ca_path: str, timeout: float = 30.0, request_timeout: float | None = None
) -> Any:
    """Connect to the worker at ``host:port`` over TLS, trusting only ``ca_path``.

    Fires once the TLS handshake (with hostname verification) succeeded; a
    server that does not complete it within ``timeout`` seconds is given up on.
    ``request_timeout``, if given, is the connection's (`PaperTraderClient.set_request_timeout`).
    """
    options = yield threads.deferToThread(tls.client_options, host, ca_path)
    endpoint = tls.tls_client_endpoint(reactor, host, port, options, timeout)
    connection = yield endpoint.connect(Factory.forProtocol(ClientAMP))
    give_up = reactor.callLater(timeout, connection.transport.abortConnection)
    try:
        yield connection.when_handshake_done()
    finally:
        if give_up.active():
            give_up.cancel()
    client = client_from_connection(connection)
    if request_timeout is not None:
        client.set_request_timeout(reactor, request_timeout)
    returnValue(client)
