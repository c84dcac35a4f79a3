"""The master's AMP responders: one `MasterLocator` per worker connection.

Each responder translates a worker's command into a call on the `Exchange`
and back; errors raised by the domain are declared on the commands, so they
reach the worker (and from there the client) intact.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import attr
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, returnValue
from twisted.internet.protocol import Factory
from twisted.protocols import amp

from papertrader.errors import (
    DataFailed,
    PaperTraderError,
    ServiceUnavailable,
    SessionInvalid,
    WorkerRefused,
    expected_or_unavailable,
)
from papertrader.eventlog import EventLogger
from papertrader.master.exchange import Exchange
from papertrader.master.workers import WorkerRegistry
from papertrader.paging import BadCursor, page_of_sequence
from papertrader.protocol import (
    ASSETS_PER_PAGE,
    OUTCOME_QUEUED,
    OUTCOME_REFUSED,
    OUTCOME_SESSION_INVALID,
    OUTCOME_UNAVAILABLE,
    ListAssets,
    RelayedGetAssetValue,
    RelayedGetUserPortfolio,
    RelayedGetUserTransactionHistory,
    RelayedListOrders,
    RelayedLogin,
    RelayedLoginWithToken,
    RelayedLogout,
    RelayedRegister,
    SubmitOrders,
    WorkerHello,
)
from papertrader.timestamps import iso
from papertrader.tls import peer_common_name


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


def _after_handshake(locator: MasterLocator, responder: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    locator._worker_name()
    return responder(locator, *args, **kwargs)


class MasterLocator(amp.CommandLocator):
    """Answers one worker."""

    log = EventLogger()

    def __init__(
        self,
        exchange: Exchange,
        registry: WorkerRegistry,
        update_interval: float,
        certified_name: Callable[[Any], str | None] = peer_common_name,
    ) -> None:
        self.exchange = exchange
        self.registry = registry
        self.update_interval = update_interval
        self.certified_name = certified_name
        self.connection: amp.AMP | None = None
        self.worker: str | None = None

    def _worker_name(self) -> str:
        if self.worker is None:
            raise ServiceUnavailable("this worker has not completed its handshake")
        return self.worker

    # ------------------------------------------------------------ handshake

    @WorkerHello.responder
    def hello(self, name: str, version: str) -> dict[str, Any]:
        # The TLS layer already required a certificate issued by this deployment's
        # CA; its common name must be the worker's name.  GPG verification of the
        # worker's key belongs here too.
        if not name or len(name) > 64:
            raise WorkerRefused("worker name must be 1-64 characters")
        if self.worker is not None:
            raise WorkerRefused("handshake already done")
        certified = self.certified_name(self.connection.transport)
        if certified != name:
            self.log.warn("refused worker {name}: its certificate names {certified!r}", name=name, certified=certified)
            raise WorkerRefused(f"this certificate is not for a worker named {name!r}")
        self.worker = name
        self.registry.add(name, self.connection)
        self.log.info("worker {name} (version {version}) connected", name=name, version=version)
        return {"update_interval": self.update_interval}

    # ------------------------------------------------------------ accounts

    @RelayedRegister.responder
    @_guarded
    @inlineCallbacks
    def register(self, username: str, email: str, password: str, received_at: str, client_address: str) -> Any:
        name = yield self.exchange.accounts.register(username, email, password)
        returnValue({"username": name})

    @RelayedLogin.responder
    @_guarded
    @inlineCallbacks
    def login(
        self, username: str, password: str, received_at: str, client_address: str, remember: bool = False
    ) -> Any:
        session = yield self.exchange.accounts.login(username, password, bool(remember))
        returnValue(
            {"token": session.token, "username": session.username, "expires_at": iso(session.expires_at)}
        )

    @RelayedLoginWithToken.responder
    @_guarded
    @inlineCallbacks
    def login_with_token(self, token: str, received_at: str, client_address: str) -> Any:
        session = yield self.exchange.accounts.authenticate(token)
        returnValue({"username": session.username, "expires_at": iso(session.expires_at)})

    @RelayedLogout.responder
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
    @_guarded
    def asset_value(self, symbol: str, received_at: str, client_address: str) -> dict[str, Any]:
        return self.exchange.asset_value(symbol)

    # ------------------------------------------------------------ orders

    @SubmitOrders.responder
    @_guarded
    def submit_orders(self, orders: list[dict[str, str]]) -> Any:
        worker = self._worker_name()
        return self.exchange.submit_orders(orders, worker).addCallback(
            lambda results: {"results": [_outcome(result) for result in results]}
        )

    @RelayedListOrders.responder
    @_guarded
    @inlineCallbacks
    def list_orders(self, token: str, received_at: str, client_address: str, cursor: str | None = None) -> Any:
        page = yield self.exchange.orders(token, cursor)
        returnValue(page.answer("orders"))

    @RelayedGetUserPortfolio.responder
    @_guarded
    def portfolio(self, token: str, received_at: str, client_address: str) -> Any:
        return self.exchange.portfolio(token)

    @RelayedGetUserTransactionHistory.responder
    @_guarded
    @inlineCallbacks
    def history(self, token: str, received_at: str, client_address: str, cursor: str | None = None) -> Any:
        page = yield self.exchange.history(token, cursor)
        returnValue(page.answer("transactions"))


def _outcome(result: Any) -> dict[str, Any]:
    """One order's result as a row of the SubmitOrders answer."""
    if isinstance(result, SessionInvalid):
        return {"outcome": OUTCOME_SESSION_INVALID, "reason": str(result)}
    if isinstance(result, ServiceUnavailable):
        return {"outcome": OUTCOME_UNAVAILABLE, "reason": str(result)}
    if isinstance(result, PaperTraderError):
        return {"outcome": OUTCOME_REFUSED, "reason": str(result)}
    order_id, username = result
    return {"outcome": OUTCOME_QUEUED, "order_id": order_id, "username": username}


class MasterFactory(Factory):
    """Builds an AMP connection, with a fresh locator from ``new_locator``, for each worker."""

    def __init__(self, new_locator: Callable[[], MasterLocator]) -> None:
        self.new_locator = new_locator

    def buildProtocol(self, addr: Any) -> amp.AMP:
        locator = self.new_locator()
        connection = _WorkerAMP(locator=locator)
        locator.connection = connection
        return connection


class _WorkerAMP(amp.AMP):
    """A worker's connection; leaves the registry when it closes."""

    def connectionLost(self, reason: Any) -> None:
        locator = self.locator
        if locator.worker is not None:
            locator.registry.remove(locator.worker, self)
        super().connectionLost(reason)
