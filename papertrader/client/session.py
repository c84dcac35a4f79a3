"""A reconnecting session: one user's work that outlives the worker it started on.

`Session` holds what a user's work needs beyond one connection -- the list of
workers, the session token, the price subscription, the orders being waited
for and the order requests in flight -- and a connection to one worker
(`PaperTraderClient`).  When that worker goes away (the connection is lost,
or the worker says GoAway because it was kicked) the session connects to
another worker from its list and resumes with LoginWithToken (the spec's
second login method), so the user does not log in again; it subscribes
again, reads the orders it waits for from the orders listing (their fills
may have been pushed while it was away) and sends again, with the same
client order ids, the order requests that were in flight (the master
deduplicates by client order id, so nothing is placed twice or lost).

A worker whose network link was cut sends no FIN or RST, so its connection
is not seen to end: each request has ``request_timeout`` seconds (on the
injected clock) for its answer, after which the connection is aborted and the
session moves on as if it had been lost (requests that are not safe to send
twice -- register, logout, password change -- fail with `RequestTimedOut`
instead of being sent again).  An idle session finds out through `keep_alive`,
which pings the worker (Ping, answered by the worker itself) and aborts the
connection when no answer comes within the interval.

The worker list comes from the master's directory listener (`read_directory`),
from each login answer, and from GoAway.  Workers are tried in list order
(the one in use first), a worker that sent GoAway last; when a whole round
fails the session waits (on the injected clock) and tries again, and after
``rounds`` rounds fails with `NoWorkerReachable`, naming each worker and why.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from OpenSSL.SSL import Error as TLSError
from twisted.internet.defer import Deferred, fail, inlineCallbacks, maybeDeferred, returnValue, succeed
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.python.failure import Failure

from papertrader import tls
from papertrader.client.library import (
    PaperTraderClient,
    RequestTimedOut,
    TLSHandshakeFailed,
    connect,
    new_client_order_ids,
)
from papertrader.errors import PaperTraderError, ServiceUnavailable, SessionInvalid
from papertrader.protocol import ListWorkers

DEFAULT_WORKER_PORT = 2049
DEFAULT_DIRECTORY_PORT = 2050
# Rounds over the whole worker list before giving up, and the waits between them (doubling).
CONNECT_ROUNDS = 3
FIRST_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0
# Seconds a request waits for its answer before its connection is given up on (and the request sent elsewhere).
REQUEST_TIMEOUT = 30.0
# Times one request is sent (on a worker each) before its failure is the caller's.
REQUEST_ATTEMPTS = 3
# Pages of the orders listing read when resuming, to find the fills of waited-for orders.
RECHECK_PAGES = 10
# Pages of the directory read at most (each holds a hundred or so workers).
DIRECTORY_PAGES = 100
# Settled orders remembered, for a `wait_for_settlement` that comes after the push.
REMEMBERED_SETTLEMENTS = 10_000

# What says "this worker cannot serve us now; another may": the connection could not be made or
# was lost, TLS failed, or the worker cannot reach the master.
WORKER_TROUBLE = (ConnectionClosed, ConnectError, TLSError, TLSHandshakeFailed, ServiceUnavailable)


class NoWorkerReachable(Exception):
    """No worker in the session's list could be reached (each was tried, with waits between rounds)."""


class DirectoryUnavailable(Exception):
    """The master's worker directory could not be read."""


def tls_connector(reactor: Any, ca_path: str, timeout: float = 30.0) -> Callable[[str], Deferred[PaperTraderClient]]:
    """Connects to a worker's ``HOST:PORT`` over TLS, trusting only the deployment's CA at ``ca_path``."""

    def connect_to(address: str) -> Deferred[PaperTraderClient]:
        try:
            host, port = tls.split_address(address, DEFAULT_WORKER_PORT)
        except ValueError as e:
            return fail(ConnectError(string=str(e)))
        return connect(reactor, host, port, ca_path, timeout)

    return connect_to


@inlineCallbacks
def read_directory(reactor: Any, address: str, ca_path: str, timeout: float = 30.0) -> Any:
    """Every page of the master's worker directory at ``address``: ``[{"name", "address"}, ...]``.

    DirectoryUnavailable if the listener cannot be reached; the master's
    declared errors (DataFailed if the list changed while it was read) pass as they are.
    """
    try:
        host, port = tls.split_address(address, DEFAULT_DIRECTORY_PORT)
        client = yield connect(reactor, host, port, ca_path, timeout)
    except (ValueError, ConnectError, TLSError, TLSHandshakeFailed) as e:
        raise DirectoryUnavailable(f"cannot reach the worker directory at {address}: {e}") from None
    try:
        workers: list[dict[str, str]] = []
        cursor = None
        for _ in range(DIRECTORY_PAGES):
            try:
                page = yield client.connection.callRemote(ListWorkers, cursor=cursor)
            except ConnectionClosed:
                raise DirectoryUnavailable(f"the worker directory at {address} closed the connection") from None
            workers.extend({"name": row["name"], "address": row["address"]} for row in page["workers"])
            cursor = page.get("next_cursor")
            if cursor is None:
                break
        returnValue(workers)
    finally:
        client.close()


class Session:
    """One user's session, kept across workers.  Its methods are `PaperTraderClient`'s.

    ``connector(address)`` connects to a worker (`tls_connector`); ``workers``
    are ``HOST:PORT`` addresses, tried in order.  ``token`` resumes an
    existing session.  ``clock`` times the waits between rounds of attempts
    and the ``request_timeout`` (seconds; None: wait for ever) each request
    has for its answer before its connection is aborted.
    """

    def __init__(
        self,
        clock: IReactorTime,
        connector: Callable[[str], Deferred[PaperTraderClient]],
        workers: Iterable[str],
        token: str | None = None,
        rounds: int = CONNECT_ROUNDS,
        request_attempts: int = REQUEST_ATTEMPTS,
        request_timeout: float | None = REQUEST_TIMEOUT,
    ) -> None:
        self._clock = clock
        self._connector = connector
        self.workers: list[str] = list(dict.fromkeys(workers))
        self.token = token
        self.username: str | None = None
        self.expires_at: str | None = None
        self.rounds = rounds
        self.request_attempts = request_attempts
        self.request_timeout = request_timeout
        self.client: PaperTraderClient | None = None
        self.address: str | None = None  # the worker in use (or last used)
        self.failovers = 0  # times the session moved on after losing its worker
        self._avoid: set[str] = set()
        self._connecting = False
        self._attempt: Deferred[Any] | None = None  # a connection being made, or a wait between rounds
        self._connect_waiters: list[Deferred[PaperTraderClient]] = []
        self._closed = False
        self._wanted: str | tuple[str, ...] = ()
        self._waiting: dict[int, list[Deferred[dict[str, Any]]]] = {}
        self._settled: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._in_flight = 0
        self._keep_alive: LoopingCall | None = None
        self._ping_timeout: float | None = None
        self._ping: Deferred[bool] | None = None  # the Ping waiting for its answer
        self._no_ping: PaperTraderClient | None = None  # a connection to a worker from before Ping
        self._given_up: list[Deferred[BaseException]] = []
        self._on_order_update: Callable[[dict[str, Any]], None] | None = None
        self._on_price_tick: Callable[[dict[str, Any]], None] | None = None
        self._on_worker: Callable[[str], None] | None = None

    # ------------------------------------------------------------ callbacks

    def on_order_update(self, callback: Callable[[dict[str, Any]], None] | None) -> None:
        """Call ``callback(update)`` when one of the user's orders settles or is rejected (once per order,
        whether it was pushed or found in the orders listing after a move to another worker)."""
        self._on_order_update = callback

    def on_price_tick(self, callback: Callable[[dict[str, Any]], None] | None) -> None:
        """Call ``callback(tick)`` on every price update pushed (see `subscribe`)."""
        self._on_price_tick = callback

    def on_worker(self, callback: Callable[[str], None] | None) -> None:
        """Call ``callback(address)`` each time the session starts using a worker (the first, or another)."""
        self._on_worker = callback

    # ------------------------------------------------------------ the worker list

    def learn_workers(self, rows: Sequence[dict[str, str]]) -> None:
        """Take a directory (``{"name", "address"}`` rows): the list becomes those workers, in that order;
        a worker not in it (the one in use, say) stays, last."""
        addresses = list(dict.fromkeys(row["address"] for row in rows if isinstance(row.get("address"), str)))
        if addresses:
            self.workers = addresses + [address for address in self.workers if address not in addresses]

    def _candidates(self) -> list[str]:
        preferred = [self.address] if self.address in self.workers and self.address not in self._avoid else []
        rest = [a for a in self.workers if a not in preferred and a not in self._avoid]
        return [*preferred, *rest, *[a for a in self.workers if a in self._avoid]]

    # ------------------------------------------------------------ being connected

    def _connected(self) -> Deferred[PaperTraderClient]:
        """The connection in use, or a new one (to the first worker that answers, resumed)."""
        if self._closed:
            return fail(ConnectionClosed("the session is closed"))
        if self.client is not None and self.client.connection.transport is not None:
            return succeed(self.client)
        d: Deferred[PaperTraderClient] = Deferred()
        self._connect_waiters.append(d)
        if not self._connecting:
            self._connecting = True
            self._establish().addBoth(self._established)
        return d

    def _established(self, result: Any) -> None:
        self._connecting = False
        self._attempt = None
        waiters, self._connect_waiters = self._connect_waiters, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
        if isinstance(result, Failure):
            self._give_up(result)

    @inlineCallbacks
    def _establish(self) -> Any:
        if not self.workers:
            raise NoWorkerReachable("no workers are known: give a worker's address or read the directory")
        problems: dict[str, str] = {}
        delay = FIRST_RETRY_DELAY
        for round_number in range(self.rounds):
            for address in self._candidates():
                if self._closed:
                    raise ConnectionClosed("the session is closed")
                try:
                    self._attempt = self._connector(address)
                    client = yield self._attempt
                except WORKER_TROUBLE as e:
                    problems[address] = _reason(e)
                    continue
                try:
                    yield self._take(client, address)
                except WORKER_TROUBLE as e:
                    problems[address] = _reason(e)
                    client.close()
                    continue
                except BaseException:
                    client.close()
                    raise
                returnValue(client)
            if round_number + 1 < self.rounds:
                self._attempt = deferLater(self._clock, delay, lambda: None)
                yield self._attempt
                delay = min(2 * delay, MAX_RETRY_DELAY)
        tried = "; ".join(f"{address}: {reason}" for address, reason in problems.items())
        raise NoWorkerReachable(f"no worker could be reached ({tried})")

    @inlineCallbacks
    def _take(self, client: PaperTraderClient, address: str) -> Any:
        """Make ``client`` (just connected to ``address``) the session's: resume the session on it,
        subscribe again, and catch up with the orders waited for."""
        client.set_request_timeout(self._clock, self.request_timeout)
        client.on_order_update(self._settle)
        client.on_price_tick(self._tick)
        client.on_go_away(lambda reason, workers: self._go_away(client, reason, workers))
        if self.token is not None:
            try:
                answer = yield client.login_with_token(self.token)
            except SessionInvalid:
                self.token = None
                raise
            self._logged_in(answer)
        if self._wanted:
            yield client.subscribe(self._wanted)
        if self._waiting:
            yield self._recheck(client)
        moved = self.address is not None and self.address != address
        self.client, self.address = client, address
        self._avoid.clear()
        client.when_closed().addBoth(self._lost, client)
        for order_id in list(self._waiting):
            self._watch(client, order_id)
        if moved:
            self.failovers += 1
        if self._on_worker is not None:
            self._on_worker(address)

    @inlineCallbacks
    def _recheck(self, client: PaperTraderClient) -> Any:
        """Read the newest orders until each waited-for one is found: those settled meanwhile are settled here."""
        cursor = None
        unseen = set(self._waiting)
        for _ in range(RECHECK_PAGES):
            page = yield client.orders_page(cursor)
            for order in page["orders"]:
                unseen.discard(order["order_id"])
                if order["order_id"] in self._waiting and order["status"] != "queued":
                    self._settle(dict(order))
            cursor = page.get("next_cursor")
            if cursor is None or not unseen:
                return

    def _watch(self, client: PaperTraderClient, order_id: int) -> None:
        # The connection looks the order up after each tick if its push was missed; if the
        # connection is lost first the failure is ignored here: the session resumes elsewhere.
        client.wait_for_settlement(order_id).addCallbacks(self._settle, lambda _: None)

    def _lost(self, reason: Failure, client: PaperTraderClient) -> None:
        if client is not self.client:
            return
        self._forget(client)
        if not self._closed and (self._waiting or self._wanted or self._keep_alive is not None):
            # Someone waits for pushes: move to another worker now rather than at the next request.
            self._connected().addErrback(lambda _: None)

    def _go_away(self, client: PaperTraderClient, reason: str, workers: list[dict[str, str]]) -> None:
        """The worker is closing the connection (it was kicked): take its list, and try it last."""
        self.learn_workers(workers)
        if client is self.client and self.address is not None:
            self._avoid.add(self.address)

    def _give_up(self, failure: Failure) -> None:
        waiting, self._waiting = self._waiting, {}
        for ds in waiting.values():
            for d in ds:
                d.errback(failure)
        given_up, self._given_up = self._given_up, []
        for d in given_up:
            d.callback(failure.value)

    def _forget(self, client: PaperTraderClient) -> None:
        """``client``'s worker is gone or cannot serve the session now: the next connection tries it last."""
        if client is self.client:
            self.client = None
            if self.address is not None:
                self._avoid.add(self.address)

    def _switch(self, client: PaperTraderClient) -> None:
        """Leave ``client``'s worker (it cannot serve the session now): the next request goes elsewhere."""
        self._forget(client)
        client.close()

    # ------------------------------------------------------------ requests

    @inlineCallbacks
    def _request(self, call: Callable[[PaperTraderClient], Deferred], retry: bool = True) -> Any:
        """``call(client)`` on the connection in use; if its worker fails it (or does not answer in time, see
        ``request_timeout``) and ``retry``, again on another."""
        last: Exception | None = None
        for _ in range(self.request_attempts if retry else 1):
            client = yield self._connected()
            try:
                result = yield maybeDeferred(call, client)
            except RequestTimedOut as e:
                if not retry:
                    raise RequestTimedOut(f"{e}; it is not sent again, as it is not safe to send twice") from None
                last = e
                self._forget(client)
                continue
            except WORKER_TROUBLE as e:
                last = e
                if isinstance(e, ServiceUnavailable):
                    self._switch(client)
                else:
                    self._forget(client)  # lost: the next attempt connects afresh, elsewhere first
                continue
            returnValue(result)
        raise last

    def _logged_in(self, answer: dict[str, Any]) -> None:
        self.username = answer.get("username", self.username)
        self.expires_at = answer.get("expires_at", self.expires_at)
        self.learn_workers(answer.get("workers") or [])

    def register(self, username: str, email: str, password: str) -> Deferred:
        return self._request(lambda c: c.register(username, email, password), retry=False)

    @inlineCallbacks
    def login(self, username: str, password: str, remember: bool = False) -> Any:
        """Log in with a password; the session keeps the token (and the workers the answer lists)."""
        self.token = None
        answer = yield self._request(lambda c: c.login(username, password, remember))
        self.token = answer["token"]
        self._logged_in(answer)
        returnValue(answer)

    @inlineCallbacks
    def resume(self, token: str | None = None) -> Any:
        """Log in with the session token (``token``, or the one held): LoginWithToken, on any worker."""
        if token is not None:
            self.token = token
        if self.token is None:
            raise SessionInvalid("not logged in")
        client = yield self._connected()  # a new connection logs in with the token itself
        if client.token != self.token:
            answer = yield client.login_with_token(self.token)
            self._logged_in(answer)
        returnValue({"username": self.username, "expires_at": self.expires_at})

    @inlineCallbacks
    def _ending(self, call: Callable[[PaperTraderClient], Deferred]) -> Any:
        client = yield self._connected()
        client.token = self.token
        try:
            answer = yield call(client)
        except RequestTimedOut as e:
            raise RequestTimedOut(f"{e}; it is not sent again, as it is not safe to send twice") from None
        self.token = None
        returnValue(answer)

    def logout(self) -> Deferred:
        return self._ending(lambda c: c.logout())

    def logout_everywhere(self) -> Deferred:
        return self._ending(lambda c: c.logout_everywhere())

    def change_password(self, old_password: str, new_password: str) -> Deferred:
        return self._ending(lambda c: c.change_password(old_password, new_password))

    def quote(self, symbol: str) -> Deferred:
        return self._request(lambda c: c.quote(symbol))

    def asset_info(self, symbol: str) -> Deferred:
        return self._request(lambda c: c.asset_info(symbol))

    def market_status(self) -> Deferred:
        return self._request(lambda c: c.market_status())

    def price_history(self, symbol: str, range: str) -> Deferred:
        """Every bar of the history (see `PaperTraderClient.price_history`), read again on another worker if
        its worker fails during the reading."""
        return self._request(lambda c: c.price_history(symbol, range))

    def price_history_page(self, symbol: str, range: str, cursor: str | None = None) -> Deferred:
        return self._request(lambda c: c.price_history_page(symbol, range, cursor))

    def buy(self, symbol: str, quantity: int | str, client_order_id: str | None = None) -> Deferred:
        """Queue a market buy; sent again (same client order id) on another worker if its worker fails it."""
        return self._order("buy", symbol, quantity, client_order_id)

    def sell(self, symbol: str, quantity: int | str, client_order_id: str | None = None) -> Deferred:
        """Queue a market sell; see `buy`."""
        return self._order("sell", symbol, quantity, client_order_id)

    @inlineCallbacks
    def _order(self, side: str, symbol: str, quantity: int | str, client_order_id: str | None) -> Any:
        client_order_id = client_order_id or new_client_order_ids(1)[0]
        self._in_flight += 1
        try:
            answer = yield self._request(
                lambda c: (c.buy if side == "buy" else c.sell)(symbol, quantity, client_order_id)
            )
        except WORKER_TROUBLE as e:
            raise ServiceUnavailable(
                f"{_reason(e)}; the order's outcome is unknown: send it again with client order id {client_order_id}"
            ) from None
        finally:
            self._in_flight -= 1
        returnValue(answer)

    def place_orders(self, orders: list[dict[str, Any]]) -> Deferred:
        """Several orders in one message (see `PaperTraderClient.place_orders`), sent again if its worker fails it."""
        ids = new_client_order_ids(len(orders))
        rows = [{**o, "client_order_id": o.get("client_order_id") or new_id} for o, new_id in zip(orders, ids)]
        return self._request(lambda c: c.place_orders(rows))

    def orders(self, limit: int | None = None) -> Deferred:
        return self._request(lambda c: c.orders(limit))

    def orders_page(self, cursor: str | None = None) -> Deferred:
        return self._request(lambda c: c.orders_page(cursor))

    def portfolio(self) -> Deferred:
        return self._request(lambda c: c.portfolio())

    def history(self, limit: int | None = None) -> Deferred:
        return self._request(lambda c: c.history(limit))

    def subscribe(self, prices: str | Iterable[str] | None) -> Deferred:
        """Choose the price ticks pushed (``"all"``, symbols, or None); chosen again on every worker it moves to."""
        if prices is None:
            wanted: str | tuple[str, ...] = ()
        elif prices == "all":
            wanted = "all"
        elif isinstance(prices, str):
            raise ValueError(f'prices must be "all", a list of symbols or None, got {prices!r}')
        else:
            wanted = tuple(prices)
        self._wanted = wanted
        return self._request(lambda c: c.subscribe(wanted or None))

    def _tick(self, tick: dict[str, Any]) -> None:
        if self._wanted and self._on_price_tick is not None:
            self._on_price_tick(tick)

    # ------------------------------------------------------------ settlement

    def wait_for_settlement(self, order_id: int) -> Deferred[dict[str, Any]]:
        """Fires with the order's update once it has settled or been rejected, whichever worker brings it;
        fails with NoWorkerReachable if the session loses every worker first."""
        if order_id in self._settled:
            return succeed(self._settled[order_id])
        d: Deferred[dict[str, Any]] = Deferred()
        self._waiting.setdefault(order_id, []).append(d)
        if self.client is not None and self.client.connection.transport is not None:
            self._watch(self.client, order_id)
        else:
            self._connected().addErrback(lambda _: None)  # resuming watches every waited-for order
        return d

    def _settle(self, update: dict[str, Any]) -> None:
        order_id = update["order_id"]
        if order_id in self._settled:
            return
        self._settled[order_id] = update
        if len(self._settled) > REMEMBERED_SETTLEMENTS:
            self._settled.popitem(last=False)
        for d in self._waiting.pop(order_id, []):
            d.callback(update)
        if self._on_order_update is not None:
            self._on_order_update(update)

    # ------------------------------------------------------------ staying connected

    def keep_alive(self, interval: float = 60.0) -> LoopingCall:
        """Ping the worker in use every ``interval`` seconds, and move to another worker at once if it goes away
        (not only at the next request).  Returns the loop.

        A Ping with no answer within the interval (or the request timeout, if
        shorter) aborts the connection: the worker, or the network on the way
        to it, is gone without a word.  Any box keeps the worker's idle timeout
        from closing the quiet connection; a worker from before Ping (it answers
        BAD_REQUEST or UNHANDLED) is sent Heartbeats instead, as it used to be.
        """
        if self._keep_alive is not None and self._keep_alive.running:
            self._keep_alive.stop()
        self._ping_timeout = interval if self.request_timeout is None else min(interval, self.request_timeout)
        loop = LoopingCall(self._heartbeat)
        loop.clock = self._clock
        loop.start(interval, now=False).addErrback(lambda _: None)
        self._keep_alive = loop
        return loop

    def _heartbeat(self) -> None:
        client = self.client
        if client is None or client.connection.transport is None:
            return
        if client is self._no_ping:
            client.heartbeat()
        elif self._ping is None:
            self._ping = client.ping(self._ping_timeout)
            self._ping.addBoth(self._pinged, client)

    def _pinged(self, result: bool | Failure, client: PaperTraderClient) -> None:
        # No answer in time aborted the connection: `_lost` moves the session on.
        self._ping = None
        if result is False:
            self._no_ping = client

    def when_given_up(self) -> Deferred[BaseException]:
        """Fires with the reason, an exception (NoWorkerReachable, most likely), once the session could
        reach no worker."""
        d: Deferred[BaseException] = Deferred()
        self._given_up.append(d)
        return d

    def close(self) -> None:
        """End the connection and stop moving between workers (the session token stays valid)."""
        self._closed = True
        if self._attempt is not None and not self._attempt.called:
            self._attempt.cancel()
        if self._keep_alive is not None and self._keep_alive.running:
            self._keep_alive.stop()
        if self.client is not None:
            self.client.close()


def _reason(error: BaseException) -> str:
    if isinstance(error, (PaperTraderError, RequestTimedOut)):
        return str(error)
    if isinstance(error, ConnectionClosed):
        return "the connection was lost"
    return str(error) or type(error).__name__
