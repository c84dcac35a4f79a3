"""The master's AMP responders: one `MasterLocator` per worker connection.

Each responder translates a worker's command into a call on the `Exchange`
and back; errors raised by the domain are declared on the commands, so they
reach the worker (and from there the client) intact.  Nothing but the
handshake (WorkerHello, WorkerProof: see `papertrader.master.handshake`) is
answered before it succeeds: any other command is refused and the connection
closed.  After it, both sides send Heartbeats and a link silent for two
intervals is closed.  The worker's `ConnectedWorker` record counts the relayed
commands and orders answered for it, and notes each Heartbeat (with the
clients the worker reports).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import attr
from twisted.internet.defer import Deferred, fail, inlineCallbacks, maybeDeferred, returnValue, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.protocols import amp

from papertrader.errors import (
    BadRequest,
    DataFailed,
    LoginFailed,
    PaperTraderError,
    ServiceUnavailable,
    WorkerRefused,
    expected_or_unavailable,
)
from papertrader.eventlog import EventLogger
from papertrader.market_calendar import TradingCalendar
from papertrader.master.exchange import Exchange, group_of_one
from papertrader.master.handshake import NONCE_LIFETIME, Handshake
from papertrader.master.registration import WorkerRegistrations
from papertrader.master.workers import ConnectedWorker, WorkerRegistry
from papertrader.paging import BadCursor, page_of_sequence
from papertrader.protocol import (
    ASSETS_PER_PAGE,
    MAX_ORDER_BATCH,
    WIRE_CODES,
    Heartbeat,
    ListAssets,
    OrderGroup,
    OrderRequest,
    OrderResult,
    RelayedChangePassword,
    RelayedGetAssetInfo,
    RelayedGetAssetValue,
    RelayedGetMarketStatus,
    RelayedGetPriceHistory,
    RelayedGetUserPortfolio,
    RelayedGetUserTransactionHistory,
    RelayedListOrders,
    RelayedLogin,
    RelayedLoginWithToken,
    RelayedLogout,
    RelayedLogoutEverywhere,
    RelayedRegister,
    ServedUsers,
    SubmitOrders,
    WorkerHello,
    WorkerProof,
)
from papertrader.timestamps import iso
from papertrader.tls import peer_common_name
from papertrader.wire import AnswersHeartbeats, BoundedWrites, GuardedFactory

# What a worker may leave unread past its full buffer before it is cut off: far
# more than the order updates of a large settlement (100,000 orders: about 10 MiB).
MAX_WORKER_UNSENT_BYTES = 64 * 1024 * 1024


def _guarded(responder: Callable[..., Any]) -> Callable[..., Any]:
    """Run a responder only after the handshake, and declare every failure it can have.

    Domain errors pass as they are; anything else (a database error, a bug) is
    logged and answered as ServiceUnavailable, which every command declares, so
    it never drops the worker's whole connection.
    """

    @functools.wraps(responder)
    def guarded(self: MasterLocator, *args: Any, **kwargs: Any) -> Deferred:
        return maybeDeferred(_after_handshake, self, responder, *args, **kwargs).addErrback(
            expected_or_unavailable, "the master could not complete the request; try again later", MasterLocator.log
        )

    return guarded


def _forwarded(responder: Callable[..., Any]) -> Callable[..., Any]:
    """Count a relayed client command in the worker's record once it is answered (either way)."""

    @functools.wraps(responder)
    def counted(self: MasterLocator, *args: Any, **kwargs: Any) -> Deferred:
        return responder(self, *args, **kwargs).addBoth(self._count_forwarded, 1)

    return counted


def _after_handshake(locator: MasterLocator, responder: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    locator._worker_name()
    return responder(locator, *args, **kwargs)


class MasterLocator(AnswersHeartbeats):
    """Answers one worker."""

    log = EventLogger()

    def __init__(
        self,
        exchange: Exchange,
        registry: WorkerRegistry,
        update_interval: float,
        certified_name: Callable[[Any], str | None] = peer_common_name,
        heartbeat_interval: float = 10.0,
        registrations: WorkerRegistrations | None = None,
        clock: IReactorTime | None = None,
        nonce_lifetime: float = NONCE_LIFETIME,
        calendar: TradingCalendar | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        # The deployment's trading calendar (GetMarketStatus); by default a market that never closes.
        self.calendar = TradingCalendar.around_the_clock() if calendar is None else calendar
        self.exchange = exchange
        self.registry = registry
        self.update_interval = update_interval
        self.heartbeat_interval = heartbeat_interval
        self.certified_name = certified_name
        self.connection: WorkerAMP | None = None
        self.worker: str | None = None
        # What the registry tracks about this worker, once its handshake is done.
        self.record: ConnectedWorker | None = None
        self.version: str | None = None
        self.client_address: str | None = None
        self.handshake = None if registrations is None else Handshake(registrations, clock, nonce_lifetime)

    def _worker_name(self) -> str:
        if self.worker is None:
            raise ServiceUnavailable("this worker has not completed its handshake")
        return self.worker

    def _count_forwarded(self, result: Any, count: int) -> Any:
        if self.record is not None:
            self.record.forwarded(count)
        return result

    @Heartbeat.responder
    def heartbeat(self, clients: int | None = None) -> dict:
        """Note when the worker was last heard from, and how many clients it says it has."""
        if self.record is not None:
            self.record.heard(self.registry.now(), clients)
        return {}

    # ------------------------------------------------------------ handshake

    @WorkerHello.responder
    @inlineCallbacks
    def hello(self, name: str, version: str, client_address: str | None = None) -> Any:
        # The TLS layer already required a certificate issued by this deployment's
        # CA, whose common name must be the worker's name; the worker's OpenPGP
        # key, registered with the master, proves the rest (see Handshake).
        handshake = self._handshake()
        self.version = version[:64]
        self.client_address = None if client_address is None else client_address[:300]
        try:
            if self.certified_name(self.connection.transport) != name:
                handshake.refuse(f"this certificate is not for a worker named {name!r}")
            nonce = yield handshake.hello(name, self._source_host())
        except WorkerRefused as e:
            self._refused(name, e)
        returnValue({"nonce": nonce})

    @WorkerProof.responder
    @inlineCallbacks
    def proof(self, signature: str) -> Any:
        handshake = self._handshake()
        name = handshake.name or "?"
        try:
            yield handshake.proof(signature, self._source_host())
        except WorkerRefused as e:
            self._refused(name, e)
        try:
            self.record = yield self.registry.claim(
                name, self.connection, self.heartbeat_interval, version=self.version or "",
                client_address=self.client_address,
            )
        except WorkerRefused as e:
            self._refused(name, e)
        self.worker = name
        self.connection.start_heartbeats(self.heartbeat_interval)
        self.registry.publish(name, self.connection, self.client_address)
        self.log.info(
            "worker {name} (version {version}, key {fingerprint}) connected from {address}; clients reach it at "
            "{client_address}",
            name=name,
            version=self.version,
            fingerprint=handshake.worker.fingerprint,
            address=self.connection.peer,
            client_address=self.client_address or "an address it did not say",
        )
        returnValue(
            {
                "update_interval": self.update_interval,
                "heartbeat_interval": self.heartbeat_interval,
                "order_groups": True,
            }
        )

    def _handshake(self) -> Handshake:
        if self.handshake is None:
            self._refused("?", WorkerRefused("this master takes no workers"))
        return self.handshake

    def _source_host(self) -> str | None:
        transport = self.connection.transport
        return None if transport is None else getattr(transport.getPeer(), "host", None)

    def _refused(self, name: str, refusal: WorkerRefused) -> None:
        """Log why worker ``name`` was refused (within the peer log budget), close its connection once
        the answer is written, and raise ``refusal``."""
        if self.handshake is not None:
            self.handshake.abandon()
        self.connection.note(
            "warn", "refused worker {name} connecting from {peer}: {reason}", name=name[:64], reason=str(refusal)
        )
        self.connection.clock.callLater(0, self.connection.close)
        raise refusal

    def refuse_early(self, box: amp.AmpBox) -> Deferred:
        """Answer a command that came before the handshake succeeded with a declared refusal, and close."""
        command = box[amp.COMMAND].decode("ascii", "replace")[:64]
        self.connection.note(
            "warn", "{peer} sent {command} before completing the worker handshake; closing the connection",
            command=command,
        )
        if self.handshake is not None:
            self.handshake.abandon()
        self.connection.clock.callLater(0, self.connection.close)
        if amp.ASK not in box:
            return succeed(None)
        reason = f"{command} refused: this worker has not completed its handshake (WorkerHello, WorkerProof)"
        return fail(amp.RemoteAmpError(WIRE_CODES[ServiceUnavailable], reason))

    # ------------------------------------------------------------ accounts

    @RelayedRegister.responder
    @_forwarded
    @_guarded
    @inlineCallbacks
    def register(self, username: str, email: str, password: str, received_at: str, client_address: str) -> Any:
        name = yield self.exchange.accounts.register(username, email, password, client_address)
        self.log.info(
            "account {username} registered by {address} via worker {worker} at {received_at}",
            username=name,
            address=client_address,
            worker=self.worker,
            received_at=received_at,
        )
        returnValue({"username": name})

    @RelayedLogin.responder
    @_forwarded
    @_guarded
    @inlineCallbacks
    def login(
        self, username: str, password: str, received_at: str, client_address: str, remember: bool = False
    ) -> Any:
        try:
            session = yield self.exchange.accounts.login(username, password, bool(remember), client_address)
        except LoginFailed:
            self.connection.note(
                "info",
                "failed login as {username} by {address} via worker {worker}",
                username=username[:64],
                address=client_address[:64],
                worker=self.worker,
            )
            raise
        self.registry.serves(self.connection, session.username)
        returnValue(
            {"token": session.token, "username": session.username, "expires_at": iso(session.expires_at)}
        )

    @RelayedLogoutEverywhere.responder
    @_forwarded
    @_guarded
    @inlineCallbacks
    def logout_everywhere(self, token: str, received_at: str, client_address: str) -> Any:
        ended = yield self.exchange.accounts.logout_everywhere(token)
        returnValue({"sessions": ended})

    @RelayedChangePassword.responder
    @_forwarded
    @_guarded
    @inlineCallbacks
    def change_password(
        self, token: str, old_password: str, new_password: str, received_at: str, client_address: str
    ) -> Any:
        ended = yield self.exchange.accounts.change_password(token, old_password, new_password, client_address)
        self.log.info(
            "password changed by {address} via worker {worker}; {count} sessions ended",
            address=client_address,
            worker=self.worker,
            count=ended,
        )
        returnValue({"sessions": ended})

    @RelayedLoginWithToken.responder
    @_forwarded
    @_guarded
    @inlineCallbacks
    def login_with_token(self, token: str, received_at: str, client_address: str) -> Any:
        session = yield self.exchange.accounts.authenticate(token)
        self.registry.serves(self.connection, session.username)
        returnValue({"username": session.username, "expires_at": iso(session.expires_at)})

    @RelayedLogout.responder
    @_forwarded
    @_guarded
    @inlineCallbacks
    def logout(self, token: str, received_at: str, client_address: str) -> Any:
        yield self.exchange.accounts.logout(token)
        returnValue({})

    # ------------------------------------------------------------ market data

    @ListAssets.responder
    @_guarded
    def list_assets(self, cursor: str | None = None) -> dict[str, Any]:
        board = self.exchange.board
        try:
            page = page_of_sequence(list(board.assets.values()), ASSETS_PER_PAGE, cursor)
        except BadCursor:
            raise DataFailed("this cursor is not from the asset list; list again from the first page") from None
        assets = []
        for asset in page.rows:
            row = {
                "symbol": asset.symbol,
                "name": asset.name,
                "exchange": asset.exchange,
                "sector": asset.sector,
                "industry": asset.industry,
                "currency": asset.currency,
            }
            if asset.symbol in board.prices:
                row["price_cents"] = board.prices[asset.symbol]
                if asset.symbol in board.failing:
                    row["stale"] = board.failing[asset.symbol]
            assets.append(row)
        answer: dict[str, Any] = {**attr.evolve(page, rows=assets).answer("assets"), "tick": board.tick}
        if board.as_of is not None:
            answer["as_of"] = board.as_of
        return answer

    @RelayedGetAssetValue.responder
    @_forwarded
    @_guarded
    def asset_value(self, symbol: str, received_at: str, client_address: str) -> dict[str, Any]:
        return self.exchange.asset_value(symbol)

    @RelayedGetAssetInfo.responder
    @_forwarded
    @_guarded
    def asset_info(self, symbol: str, received_at: str, client_address: str) -> dict[str, Any]:
        return self.exchange.asset_info(symbol)

    @RelayedGetPriceHistory.responder
    @_forwarded
    @_guarded
    def price_history(
        self, symbol: str, range: str, received_at: str, client_address: str, cursor: str | None = None
    ) -> Any:
        return self.exchange.price_history(symbol, range, cursor)

    @RelayedGetMarketStatus.responder
    @_forwarded
    @_guarded
    def market_status(self, received_at: str, client_address: str) -> dict[str, Any]:
        calendar = self.calendar
        status = calendar.status(self.clock.seconds())
        answer: dict[str, Any] = {
            "open": status.open,
            "always_open": calendar.always_open,
            "now": calendar.isoformat(status.at),
            "time_zone": calendar.zone_name,
            "hours": calendar.hours,
            "days": calendar.trading_days,
        }
        if status.next_change is not None:
            answer["next_change"] = calendar.isoformat(status.next_change)
        return answer

    # ------------------------------------------------------------ orders

    @SubmitOrders.responder
    @_guarded
    def submit_orders(self, orders: list[OrderRequest], groups: list[OrderGroup] | None = None) -> Any:
        worker = self._worker_name()
        groups = [*(group_of_one(request) for request in orders), *(groups or ())]
        if sum(len(group.orders) for group in groups) > MAX_ORDER_BATCH:
            raise BadRequest(f"a SubmitOrders batch holds at most {MAX_ORDER_BATCH} orders in all")
        count = sum(len(group.orders) for group in groups)
        return self.exchange.submit_groups(groups, worker).addBoth(self._count_forwarded, count).addCallback(
            self._order_results
        )

    def _order_results(self, results: list[Any]) -> dict[str, Any]:
        rows = [_result(result) for result in results]
        for username in {row.username for row in rows if row.username is not None}:
            self.registry.serves(self.connection, username)
        return {"results": rows}

    @ServedUsers.responder
    @_guarded
    def served_users(self, usernames: list[str]) -> dict[str, Any]:
        for username in usernames:
            self.registry.serves(self.connection, username)
        return {}

    @RelayedListOrders.responder
    @_forwarded
    @_guarded
    @inlineCallbacks
    def list_orders(self, token: str, received_at: str, client_address: str, cursor: str | None = None) -> Any:
        page = yield self.exchange.orders(token, cursor)
        returnValue(page.answer("orders"))

    @RelayedGetUserPortfolio.responder
    @_forwarded
    @_guarded
    def portfolio(self, token: str, received_at: str, client_address: str, cursor: str | None = None) -> Any:
        return self.exchange.portfolio(token, cursor)

    @RelayedGetUserTransactionHistory.responder
    @_forwarded
    @_guarded
    @inlineCallbacks
    def history(self, token: str, received_at: str, client_address: str, cursor: str | None = None) -> Any:
        page = yield self.exchange.history(token, cursor)
        returnValue(page.answer("transactions"))


def _result(result: Any) -> OrderResult:
    """One order's outcome from the exchange as a row of the SubmitOrders answer."""
    if isinstance(result, PaperTraderError):
        return OrderResult.refused(result)
    order_id, username = result
    return OrderResult.queued(order_id, username)


_HANDSHAKE_COMMANDS = frozenset({WorkerHello.commandName, WorkerProof.commandName})


class WorkerAMP(BoundedWrites):
    """A worker's connection: guarded, kept alive by heartbeats, and in the registry while it lasts.

    A worker that stops reading its pushes is cut off once ``max_unsent_bytes``
    wait past its full buffer (then it reconnects and says again whom it serves).
    """

    locator: MasterLocator
    max_unsent_bytes = MAX_WORKER_UNSENT_BYTES

    def established(self) -> bool:
        return self.locator.worker is not None

    def idle_timeout(self) -> float | None:
        return 2 * self.locator.heartbeat_interval

    def dispatchCommand(self, box: amp.AmpBox) -> Deferred:
        # Until the handshake succeeds the master answers nothing else.
        if not self.established() and box[amp.COMMAND] not in _HANDSHAKE_COMMANDS:
            return self.locator.refuse_early(box)
        return super().dispatchCommand(box)

    def connectionLost(self, reason: Any) -> None:
        locator = self.locator
        if locator.handshake is not None:
            locator.handshake.abandon()
        if locator.worker is not None:
            locator.registry.remove(locator.worker, self)
        super().connectionLost(reason)


class MasterFactory(GuardedFactory):
    """Builds a `WorkerAMP`, with a fresh locator from ``new_locator``, for each worker connection."""

    protocol = WorkerAMP
