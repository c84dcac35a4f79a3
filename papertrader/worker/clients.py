"""Client management and the account authorization tunnel (spec 3.2.3, 3.2.4).

Each client connection gets a `ClientLocator`: it stamps every command with
the time it was received and the client's address, relays it to the master,
and remembers which user the connection belongs to so the worker can push
that user's order updates.  `MasterPushes` receives the master's pushes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, returnValue, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.protocols import amp

from papertrader.errors import PurchaseFailed, SellFailed, ServiceUnavailable, SessionInvalid
from papertrader.eventlog import EventLogger
from papertrader.protocol import (
    MAX_QUANTITY_LENGTH,
    MAX_SYMBOL_LENGTH,
    MAX_TOKEN_LENGTH,
    OUTCOME_QUEUED,
    OUTCOME_SESSION_INVALID,
    OUTCOME_UNAVAILABLE,
    GetAssetValue,
    GetUserPortfolio,
    GetUserTransactionHistory,
    ListOrders,
    Login,
    LoginWithToken,
    Logout,
    OrderUpdate,
    OrderUpdates,
    PriceTick,
    PurchaseAsset,
    Register,
    RelayedGetAssetValue,
    RelayedGetUserPortfolio,
    RelayedGetUserTransactionHistory,
    RelayedListOrders,
    RelayedLogin,
    RelayedLoginWithToken,
    RelayedLogout,
    RelayedRegister,
    SellAsset,
)
from papertrader.timestamps import iso
from papertrader.worker.cache import QuoteCache
from papertrader.worker.upstream import MasterLink, OrderBatcher


class ClientRegistry:
    """Connected clients, and which user each is logged in as."""

    def __init__(self) -> None:
        self.connections: set[amp.AMP] = set()
        self.by_user: dict[str, set[amp.AMP]] = {}
        self._user_of: dict[amp.AMP, str] = {}

    def connected(self, connection: amp.AMP) -> None:
        self.connections.add(connection)

    def disconnected(self, connection: amp.AMP) -> None:
        self.connections.discard(connection)
        self.detach(connection)

    def attach(self, connection: amp.AMP, username: str) -> None:
        """Note that ``connection`` acts for ``username``."""
        if self._user_of.get(connection) == username or connection not in self.connections:
            return
        self.detach(connection)
        self._user_of[connection] = username
        self.by_user.setdefault(username, set()).add(connection)

    def detach(self, connection: amp.AMP) -> None:
        username = self._user_of.pop(connection, None)
        if username is not None:
            users = self.by_user.get(username, set())
            users.discard(connection)
            if not users:
                self.by_user.pop(username, None)

    def push_tick(self, tick: int, as_of: str, prices: list[dict[str, Any]]) -> None:
        for connection in list(self.connections):
            connection.callRemote(PriceTick, tick=tick, as_of=as_of, prices=prices)

    def push_updates(self, updates: list[dict[str, Any]]) -> None:
        for update in updates:
            for connection in list(self.by_user.get(update["username"], ())):
                connection.callRemote(OrderUpdate, **update)


class MasterPushes(amp.CommandLocator):
    """What the master pushes to this worker: prices and order outcomes."""

    def __init__(self, cache: QuoteCache, clients: ClientRegistry) -> None:
        self.cache = cache
        self.clients = clients

    @PriceTick.responder
    def price_tick(self, tick: int, as_of: str, prices: list[dict[str, Any]]) -> dict:
        self.cache.update(tick, as_of, prices)
        self.clients.push_tick(tick, as_of, prices)
        return {}

    @OrderUpdates.responder
    def order_updates(self, updates: list[dict[str, Any]]) -> dict:
        self.clients.push_updates(updates)
        return {}


class ClientLocator(amp.CommandLocator):
    """Answers one client connection by relaying to the master."""

    def __init__(
        self,
        clock: IReactorTime,
        link: MasterLink,
        batcher: OrderBatcher,
        cache: QuoteCache,
        clients: ClientRegistry,
    ) -> None:
        self.clock = clock
        self.link = link
        self.batcher = batcher
        self.cache = cache
        self.clients = clients
        self.connection: amp.AMP | None = None
        self.address = "unknown"

    def _envelope(self) -> dict[str, str]:
        return {"received_at": iso(self.clock.seconds()), "client_address": self.address}

    @Register.responder
    def register(self, username: str, email: str, password: str) -> Any:
        return self.link.call(
            RelayedRegister, username=username, email=email, password=password, **self._envelope()
        )

    @Login.responder
    @inlineCallbacks
    def login(self, username: str, password: str, remember: bool | None = None) -> Any:
        answer = yield self.link.call(
            RelayedLogin, username=username, password=password, remember=bool(remember), **self._envelope()
        )
        self.clients.attach(self.connection, answer["username"])
        returnValue(answer)

    @LoginWithToken.responder
    @inlineCallbacks
    def login_with_token(self, token: str) -> Any:
        answer = yield self.link.call(RelayedLoginWithToken, token=token, **self._envelope())
        self.clients.attach(self.connection, answer["username"])
        returnValue(answer)

    @Logout.responder
    @inlineCallbacks
    def logout(self, token: str) -> Any:
        answer = yield self.link.call(RelayedLogout, token=token, **self._envelope())
        self.clients.detach(self.connection)
        returnValue(answer)

    @GetAssetValue.responder
    def asset_value(self, symbol: str) -> Any:
        symbol = symbol.strip().upper()
        cached = self.cache.quote(symbol)
        if cached is not None:
            return succeed(cached)
        return self.link.call(RelayedGetAssetValue, symbol=symbol, **self._envelope())

    @PurchaseAsset.responder
    def purchase(self, token: str, symbol: str, quantity: str) -> Any:
        return self._order("buy", PurchaseFailed, token, symbol, quantity)

    @SellAsset.responder
    def sell(self, token: str, symbol: str, quantity: str) -> Any:
        return self._order("sell", SellFailed, token, symbol, quantity)

    def _order(self, side: str, failed: type[Exception], token: str, symbol: str, quantity: str) -> Deferred:
        # The hottest path of the worker: plain callbacks, no coroutine per order.
        # Bounded, plain-ASCII fields keep every SubmitOrders batch far below AMP's 64 KiB.
        if len(token) > MAX_TOKEN_LENGTH or not token.isascii():
            raise SessionInvalid("session is not valid; log in again")
        if len(symbol) > MAX_SYMBOL_LENGTH or not symbol.isascii():
            raise failed(f"unknown symbol {symbol[:MAX_SYMBOL_LENGTH]!r}")
        if len(quantity) > MAX_QUANTITY_LENGTH or not quantity.isascii():
            raise failed("quantity must be a whole number of shares")
        if self.link.connection is None:
            raise ServiceUnavailable("the master server is not reachable right now; order not accepted")
        order = {"side": side, "token": token, "symbol": symbol, "quantity": quantity, **self._envelope()}
        return self.batcher.submit(order).addCallback(self._order_result, failed)

    def _order_result(self, result: dict[str, Any], failed: type[Exception]) -> dict[str, int]:
        outcome = result["outcome"]
        if outcome == OUTCOME_QUEUED:
            self.clients.attach(self.connection, result["username"])
            return {"order_id": result["order_id"]}
        if outcome == OUTCOME_SESSION_INVALID:
            raise SessionInvalid(result["reason"])
        if outcome == OUTCOME_UNAVAILABLE:
            raise ServiceUnavailable(result["reason"])
        raise failed(result["reason"])

    @ListOrders.responder
    def list_orders(self, token: str, cursor: str | None = None) -> Any:
        return self.link.call(RelayedListOrders, token=token, cursor=cursor, **self._envelope())

    @GetUserPortfolio.responder
    def portfolio(self, token: str) -> Any:
        return self.link.call(RelayedGetUserPortfolio, token=token, **self._envelope())

    @GetUserTransactionHistory.responder
    def history(self, token: str, cursor: str | None = None) -> Any:
        return self.link.call(
            RelayedGetUserTransactionHistory, token=token, cursor=cursor, **self._envelope()
        )


# A client may not send more than this without completing an AMP box.
MAX_PENDING_BYTES = 1024 * 1024


class _ClientAMP(amp.AMP):
    """One client's connection; registers and unregisters itself.

    AMP puts no bound on the number of keys in a box, so a client that keeps
    sending without ever ending a box would grow the worker's memory without
    end: such a connection is cut.
    """

    log = EventLogger()
    locator: ClientLocator
    _pending_bytes = 0

    def dataReceived(self, data: bytes) -> None:
        self._pending_bytes += len(data)
        if self._pending_bytes > MAX_PENDING_BYTES:
            self.log.warn("client {address} sent an oversized box; closing", address=self.locator.address)
            self.transport.abortConnection()
            return
        super().dataReceived(data)

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        self._pending_bytes = 0
        super().ampBoxReceived(box)

    def connectionMade(self) -> None:
        super().connectionMade()
        peer = self.transport.getPeer()
        self.locator.address = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        self.locator.clients.connected(self)

    def connectionLost(self, reason: Any) -> None:
        self.locator.clients.disconnected(self)
        super().connectionLost(reason)


class ClientFactory(Factory):
    """Builds the AMP protocol, with a fresh locator from ``new_locator``, for each client connection."""

    def __init__(self, new_locator: Callable[[], ClientLocator]) -> None:
        self.new_locator = new_locator

    def buildProtocol(self, addr: Any) -> amp.AMP:
        locator = self.new_locator()
        connection = _ClientAMP(locator=locator)
        locator.connection = connection
        return connection
