"""Client management and the account authorization tunnel (spec 3.2.3, 3.2.4).

Each client connection gets a `ClientLocator`: it stamps every command with
the time it was received and the client's address, relays it to the master,
and remembers which user the connection belongs to so the worker can push
that user's order updates.  `MasterPushes` receives the master's pushes.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, returnValue, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.protocols import amp

from papertrader.errors import PaperTraderError, PurchaseFailed, SellFailed, ServiceUnavailable, SessionInvalid
from papertrader.protocol import (
    MAX_CLIENT_ORDER_ID_LENGTH,
    MAX_QUANTITY_LENGTH,
    MAX_SYMBOL_LENGTH,
    MAX_TOKEN_LENGTH,
    RELAYED,
    ChangePassword,
    ClientOrder,
    GetAssetValue,
    Login,
    LoginWithToken,
    Logout,
    LogoutEverywhere,
    OrderRequest,
    OrderResult,
    OrderUpdate,
    OrderUpdates,
    Ping,
    PlacedOrder,
    PlaceOrders,
    PriceTick,
    PurchaseAsset,
    SellAsset,
)
from papertrader.timestamps import iso
from papertrader.wire import AnswersHeartbeats, GuardedAMP, GuardedFactory
from papertrader.worker.cache import QuoteCache
from papertrader.worker.upstream import MasterLink, OrderBatcher

_RELAYED_BY_NAME = {command.commandName: command for command in RELAYED}


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
        _refresh_timeout(connection)

    def user_of(self, connection: amp.AMP) -> str | None:
        """The user ``connection`` acts for, if any."""
        return self._user_of.get(connection)

    def detach(self, connection: amp.AMP) -> None:
        username = self._user_of.pop(connection, None)
        if username is not None:
            users = self.by_user.get(username, set())
            users.discard(connection)
            if not users:
                self.by_user.pop(username, None)
            _refresh_timeout(connection)

    def push_tick(self, tick: int, as_of: str, prices: list[dict[str, Any]]) -> None:
        for connection in list(self.connections):
            connection.callRemote(PriceTick, tick=tick, as_of=as_of, prices=prices)

    def push_updates(self, updates: list[dict[str, Any]]) -> None:
        for update in updates:
            for connection in list(self.by_user.get(update["username"], ())):
                connection.callRemote(OrderUpdate, **update)


def _refresh_timeout(connection: amp.AMP) -> None:
    refresh = getattr(connection, "refresh_timeout", None)
    if refresh is not None:
        refresh()


class MasterPushes(AnswersHeartbeats):
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

    @Ping.responder
    def ping(self) -> dict:
        return {}


class ClientLocator(AnswersHeartbeats):
    """Answers one client connection by relaying to the master.

    Every client command in `RELAYED` is passed on with the envelope; the
    responders below add what the worker itself does for some of them.
    """

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

    def relay(self, command: type[amp.Command], **arguments: Any) -> Deferred:
        """Pass ``command`` on to the master as its relayed twin, stamped with the envelope."""
        return self.link.call(RELAYED[command], **arguments, **self._envelope())

    def locateResponder(self, name: bytes) -> Any:
        responder = super().locateResponder(name)
        if responder is None and name in _RELAYED_BY_NAME:
            command = _RELAYED_BY_NAME[name]
            responder = self._wrapWithSerialization(partial(self.relay, command), command)
        return responder

    @Login.responder
    @inlineCallbacks
    def login(self, username: str, password: str, remember: bool | None = None) -> Any:
        answer = yield self.relay(Login, username=username, password=password, remember=bool(remember))
        self.clients.attach(self.connection, answer["username"])
        returnValue(answer)

    @LoginWithToken.responder
    @inlineCallbacks
    def login_with_token(self, token: str) -> Any:
        answer = yield self.relay(LoginWithToken, token=token)
        self.clients.attach(self.connection, answer["username"])
        returnValue(answer)

    @Logout.responder
    @inlineCallbacks
    def logout(self, token: str) -> Any:
        answer = yield self.relay(Logout, token=token)
        self.clients.detach(self.connection)
        returnValue(answer)

    @LogoutEverywhere.responder
    @inlineCallbacks
    def logout_everywhere(self, token: str) -> Any:
        answer = yield self.relay(LogoutEverywhere, token=token)
        self.clients.detach(self.connection)
        returnValue(answer)

    @ChangePassword.responder
    @inlineCallbacks
    def change_password(self, token: str, old_password: str, new_password: str) -> Any:
        answer = yield self.relay(ChangePassword, token=token, old_password=old_password, new_password=new_password)
        self.clients.detach(self.connection)
        returnValue(answer)

    @GetAssetValue.responder
    def asset_value(self, symbol: str) -> Any:
        symbol = symbol.strip().upper()
        cached = self.cache.quote(symbol)
        if cached is not None:
            return succeed(cached)
        return self.relay(GetAssetValue, symbol=symbol)

    @PurchaseAsset.responder
    def purchase(self, token: str, symbol: str, quantity: str, client_order_id: str | None = None) -> Any:
        return self._order("buy", PurchaseFailed, token, symbol, quantity, client_order_id)

    @SellAsset.responder
    def sell(self, token: str, symbol: str, quantity: str, client_order_id: str | None = None) -> Any:
        return self._order("sell", SellFailed, token, symbol, quantity, client_order_id)

    def _order(
        self,
        side: str,
        failed: type[Exception],
        token: str,
        symbol: str,
        quantity: str,
        client_order_id: str | None,
    ) -> Deferred:
        # The hottest path of the worker: plain callbacks, no coroutine per order.
        self._check_session_token(token)
        if self.link.connection is None:
            raise ServiceUnavailable("the master server is not reachable right now; order not accepted")
        order = self._order_request(side, failed, token, symbol, quantity, client_order_id, self._envelope())
        return self.batcher.submit(order).addCallback(self._order_result)

    @staticmethod
    def _check_session_token(token: str) -> None:
        if len(token) > MAX_TOKEN_LENGTH or not token.isascii():
            raise SessionInvalid("session is not valid; log in again")

    @staticmethod
    def _order_request(
        side: str,
        failed: type[Exception],
        token: str,
        symbol: str,
        quantity: str,
        client_order_id: str | None,
        envelope: dict[str, str],
    ) -> OrderRequest:
        """The order to send on, or ``failed`` if a field cannot be one (bounded, plain-ASCII fields keep
        every SubmitOrders batch far below AMP's 64 KiB)."""
        if len(symbol) > MAX_SYMBOL_LENGTH or not symbol.isascii():
            raise failed(f"unknown symbol {symbol[:MAX_SYMBOL_LENGTH]!r}")
        if len(quantity) > MAX_QUANTITY_LENGTH or not quantity.isascii():
            raise failed("quantity must be a whole number of shares")
        if client_order_id is not None and (
            len(client_order_id) > MAX_CLIENT_ORDER_ID_LENGTH or not client_order_id.isascii()
        ):
            raise failed(f"client order id must be ASCII of at most {MAX_CLIENT_ORDER_ID_LENGTH} characters")
        return OrderRequest(
            side, token, symbol, quantity, envelope["received_at"], envelope["client_address"], client_order_id
        )

    @PlaceOrders.responder
    def place_orders(self, token: str, orders: list[ClientOrder]) -> Deferred:
        """Send every order of the batch on, stamped once; answer each on its own."""
        self._check_session_token(token)
        if self.link.connection is None:
            raise ServiceUnavailable("the master server is not reachable right now; orders not accepted")
        envelope = self._envelope()
        answers = []
        for order in orders:
            failed = PurchaseFailed if order.side == "buy" else SellFailed
            try:
                request = self._order_request(
                    order.side, failed, token, order.symbol, order.quantity, order.client_order_id, envelope
                )
            except PaperTraderError as e:
                answers.append(succeed(PlacedOrder.refused(e)))
                continue
            answers.append(self.batcher.submit(request).addCallbacks(self._placed, self._not_placed))
        return gatherResults(answers).addCallback(self._batch_answer)

    def _placed(self, result: OrderResult) -> PlacedOrder:
        error = result.error()
        if error is not None:
            return PlacedOrder.refused(error)
        self.clients.attach(self.connection, result.username)
        return PlacedOrder(order_id=result.order_id)

    @staticmethod
    def _not_placed(failure: Any) -> PlacedOrder:
        failure.trap(PaperTraderError)
        return PlacedOrder.refused(failure.value)

    @staticmethod
    def _batch_answer(results: list[PlacedOrder]) -> dict[str, Any]:
        # A batch whose orders all found the session invalid is refused as a whole, like a single order.
        if results and all(r.code == "SESSION_INVALID" for r in results):
            raise results[0].error()
        return {"results": results}

    def _order_result(self, result: OrderResult) -> dict[str, int]:
        error = result.error()
        if error is not None:
            raise error
        self.clients.attach(self.connection, result.username)
        return {"order_id": result.order_id}


class ClientAMP(GuardedAMP):
    """One client's connection: guarded (see `papertrader.wire`), registered while it lasts.

    A connection with a session may stay quiet longer than one without.
    """

    locator: ClientLocator

    def idle_timeout(self) -> float | None:
        if self.locator.clients.user_of(self) is not None:
            return self.timeouts.session_idle
        return self.timeouts.idle

    def connectionMade(self) -> None:
        super().connectionMade()
        self.locator.address = self.peer
        self.locator.clients.connected(self)

    def connectionLost(self, reason: Any) -> None:
        self.locator.clients.disconnected(self)
        super().connectionLost(reason)


class ClientFactory(GuardedFactory):
    """Builds a `ClientAMP`, with a fresh locator from ``new_locator``, for each client connection."""

    protocol = ClientAMP
