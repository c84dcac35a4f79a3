"""The Twisted client library: a connection to a worker with one method per command.

Pushed price ticks and order updates are handed to callbacks the caller sets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import threads
from twisted.internet.defer import Deferred, inlineCallbacks, returnValue
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory
from twisted.protocols import amp
from zope.interface import implementer

from papertrader import tls
from papertrader.protocol import (
    GetAssetValue,
    GetUserPortfolio,
    GetUserTransactionHistory,
    ListOrders,
    Login,
    LoginWithToken,
    Logout,
    OrderUpdate,
    PriceTick,
    PurchaseAsset,
    Register,
    SellAsset,
)


class _Pushes(amp.CommandLocator):
    def __init__(self) -> None:
        self.on_order_update: Callable[[dict[str, Any]], None] | None = None
        self.on_price_tick: Callable[[dict[str, Any]], None] | None = None

    @OrderUpdate.responder
    def order_update(self, **update: Any) -> dict:
        if self.on_order_update is not None:
            self.on_order_update(update)
        return {}

    @PriceTick.responder
    def price_tick(self, **tick: Any) -> dict:
        if self.on_price_tick is not None:
            self.on_price_tick(tick)
        return {}


class PaperTraderClient:
    """A logged-in (or not yet) connection to a PaperTrader worker."""

    def __init__(self, connection: amp.AMP, pushes: _Pushes) -> None:
        self.connection = connection
        self._pushes = pushes
        self.token: str | None = None

    def on_order_update(self, callback: Callable[[dict[str, Any]], None] | None) -> None:
        """Call ``callback(update)`` whenever one of this user's orders settles or is rejected."""
        self._pushes.on_order_update = callback

    def on_price_tick(self, callback: Callable[[dict[str, Any]], None] | None) -> None:
        """Call ``callback(tick)`` on every price update."""
        self._pushes.on_price_tick = callback

    def register(self, username: str, email: str, password: str) -> Deferred:
        return self.connection.callRemote(Register, username=username, email=email, password=password)

    @inlineCallbacks
    def login(self, username: str, password: str, remember: bool = False) -> Any:
        answer = yield self.connection.callRemote(
            Login, username=username, password=password, remember=remember
        )
        self.token = answer["token"]
        returnValue(answer)

    @inlineCallbacks
    def login_with_token(self, token: str) -> Any:
        answer = yield self.connection.callRemote(LoginWithToken, token=token)
        self.token = token
        returnValue(answer)

    @inlineCallbacks
    def logout(self) -> Any:
        answer = yield self.connection.callRemote(Logout, token=self.token or "")
        self.token = None
        returnValue(answer)

    def quote(self, symbol: str) -> Deferred:
        return self.connection.callRemote(GetAssetValue, symbol=symbol)

    def buy(self, symbol: str, quantity: int | str) -> Deferred:
        return self.connection.callRemote(
            PurchaseAsset, token=self.token or "", symbol=symbol, quantity=str(quantity)
        )

    def sell(self, symbol: str, quantity: int | str) -> Deferred:
        return self.connection.callRemote(
            SellAsset, token=self.token or "", symbol=symbol, quantity=str(quantity)
        )

    def orders(self, limit: int | None = None) -> Deferred:
        return self.connection.callRemote(ListOrders, token=self.token or "", limit=limit)

    def portfolio(self) -> Deferred:
        return self.connection.callRemote(GetUserPortfolio, token=self.token or "")

    def history(self, limit: int | None = None) -> Deferred:
        return self.connection.callRemote(GetUserTransactionHistory, token=self.token or "", limit=limit)

    def close(self) -> None:
        self.connection.transport.loseConnection()


class TLSHandshakeFailed(Exception):
    """The TLS handshake with the server failed (untrusted or mismatched certificate)."""


@implementer(IHandshakeListener)
class ClientAMP(amp.AMP):
    """The client side of a worker connection; ``handshake`` fires once TLS is up."""

    def __init__(self) -> None:
        super().__init__(locator=_Pushes())
        self.handshake: Deferred[None] = Deferred()

    def handshakeCompleted(self) -> None:
        if not self.handshake.called:
            self.handshake.callback(None)

    def connectionLost(self, reason: Any) -> None:
        if not self.handshake.called:
            self.handshake.errback(TLSHandshakeFailed(f"TLS handshake failed: {reason.getErrorMessage()}"))
        super().connectionLost(reason)


def client_from_connection(connection: amp.AMP) -> PaperTraderClient:
    """Wrap an already-connected `ClientAMP`."""
    return PaperTraderClient(connection, connection.locator)


@inlineCallbacks
def connect(reactor: Any, host: str, port: int, ca_path: str) -> Any:
    """Connect to the worker at ``host:port`` over TLS, trusting only ``ca_path``.

    Fires once the TLS handshake (with hostname verification) succeeded.
    """
    options = yield threads.deferToThread(tls.client_options, host, ca_path)
    endpoint = tls.tls_client_endpoint(reactor, host, port, options)
    connection = yield endpoint.connect(Factory.forProtocol(ClientAMP))
    yield connection.handshake
    returnValue(client_from_connection(connection))
