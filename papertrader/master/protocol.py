"""The master's AMP responders: one `MasterLocator` per worker connection.

Each responder translates a worker's command into a call on the `Exchange`
and back; errors raised by the domain are declared on the commands, so they
reach the worker (and from there the client) intact.  Nothing but WorkerHello
is answered before the handshake; after it, both sides send Heartbeats and a
link silent for two intervals is closed.  The worker's `ConnectedWorker`
record counts the relayed commands and orders answered for it, and notes each
Heartbeat (with the clients the worker reports).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import attr
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, returnValue

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
from papertrader.master.exchange import Exchange, group_of_one
from papertrader.master.workers import ConnectedWorker, WorkerRegistry
from papertrader.paging import BadCursor, page_of_sequence
from papertrader.protocol import (
    ASSETS_PER_PAGE,
    MAX_ORDER_BATCH,
    Heartbeat,
    ListAssets,
    OrderGroup,
    OrderRequest,
    OrderResult,
    RelayedChangePassword,
    RelayedGetAssetValue,
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
    ) -> None:
        self.exchange = exchange
        self.registry = registry
        self.update_interval = update_interval
        self.heartbeat_interval = heartbeat_interval
        self.certified_name = certified_name
        self.connection: WorkerAMP | None = None
        self.worker: str | None = None
        # What the registry tracks about this worker, once its handshake is done.
        self.record: ConnectedWorker | None = None
        self._hello_running = False

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
        # CA; its common name must be the worker's name.  GPG verification of the
        # worker's key belongs here too.
        if not name or len(name) > 64:
            raise WorkerRefused("worker name must be 1-64 characters")
        if self.worker is not None or self._hello_running:
            raise WorkerRefused("handshake already done")
        certified = self.certified_name(self.connection.transport)
        if certified != name:
            self._refuse(name, f"this certificate is not for a worker named {name!r}")
        self._hello_running = True
        try:
            self.record = yield self.registry.claim(
                name, self.connection, self.heartbeat_interval, version=version, client_address=client_address
            )
        except WorkerRefused as e:
            self._refuse(name, str(e))
        finally:
            self._hello_running = False
        self.worker = name
        self.connection.start_heartbeats(self.heartbeat_interval)
        self.registry.publish(name, self.connection, client_address)
        self.log.info(
            "worker {name} (version {version}) connected from {address}",
            name=name,
            version=version,
            address=self.connection.peer,
        )
        returnValue(
            {
                "update_interval": self.update_interval,
                "heartbeat_interval": self.heartbeat_interval,
                "order_groups": True,
            }
        )

    def _refuse(self, name: str, reason: str) -> None:
        self.connection.note(
            "warn", "refused worker {name} connecting from {peer}: {reason}", name=name[:64], reason=reason
        )
        raise WorkerRefused(reason)

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
            }
            if asset.symbol in board.prices:
                row["price_cents"] = board.prices[asset.symbol]
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

    def connectionLost(self, reason: Any) -> None:
        locator = self.locator
        if locator.worker is not None:
            locator.registry.remove(locator.worker, self)
        super().connectionLost(reason)


class MasterFactory(GuardedFactory):
    """Builds a `WorkerAMP`, with a fresh locator from ``new_locator``, for each worker connection."""

    protocol = WorkerAMP
