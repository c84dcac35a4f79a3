"""Client management and the account authorization tunnel (spec 3.2.3, 3.2.4).

Each client connection gets a `ClientLocator`: it stamps every command with
the time it was received and the client's address, relays it to the master,
and remembers which user the connection belongs to so the worker can push
that user's order updates; its login answers carry the worker directory.
When the master kicks the worker (BootOff), every client is told GoAway,
with the other workers, and its connection closed.  `MasterPushes` receives the master's pushes and
`ClientRegistry` passes them on: each push encoded once, written to the
connections that want it a slice at a time, and never piled up for a client
that does not read (`ClientAMP`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, returnValue, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.protocols import amp

from papertrader.errors import (
    DataFailed,
    PaperTraderError,
    PurchaseFailed,
    SellFailed,
    ServiceUnavailable,
    SessionInvalid,
)
from papertrader.protocol import (
    MAX_CLIENT_ORDER_ID_LENGTH,
    MAX_QUANTITY_LENGTH,
    MAX_SUBSCRIBED_SYMBOLS,
    MAX_SYMBOL_LENGTH,
    MAX_TOKEN_LENGTH,
    RELAYED,
    BootOff,
    ChangePassword,
    ClientOrder,
    GetAssetInfo,
    GetAssetValue,
    GetPriceHistory,
    GoAway,
    Login,
    LoginWithToken,
    Logout,
    LogoutEverywhere,
    OrderGroup,
    OrderResult,
    OrderUpdates,
    Ping,
    PlacedOrder,
    PlaceOrders,
    PriceTick,
    PurchaseAsset,
    SellAsset,
    Subscribe,
    WorkerDirectory,
    WorkerStatus,
    pack_prices,
    plain_text,
    price_fragments,
    push_bytes,
)
from papertrader.slices import SlicedWork
from papertrader.timestamps import iso
from papertrader.wire import AnswersHeartbeats, BoundedWrites, GuardedFactory
from papertrader.worker.cache import QuoteCache, check_range
from papertrader.worker.upstream import MasterLink, OrderBatcher

_RELAYED_BY_NAME = {command.commandName: command for command in RELAYED}

# A connection's price subscription: every price, or a set of symbols.
ALL_PRICES = "all"
Prices = str | frozenset[str]
# Connections written to (or pushes encoded) in one reactor turn.
PUSH_SLICE = 100
# Bytes a connection may be sent after its transport said "stop" (its buffer
# holds 64 KiB it could not send): past this, the client is not reading and is cut off.
MAX_UNSENT_BYTES = 256 * 1024


class ClientRegistry:
    """Connected clients: which user each is logged in as and which prices it wants, and the pushes to them.

    Each push is encoded once (per distinct price subscription) and the same
    bytes written to every connection that gets it, at most ``slice_size``
    connections a reactor turn.
    """

    def __init__(self, clock: IReactorTime | None = None, slice_size: int = PUSH_SLICE) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.connections: set[amp.AMP] = set()
        self.by_user: dict[str, set[amp.AMP]] = {}
        self._user_of: dict[amp.AMP, str] = {}
        self._prices: dict[amp.AMP, Prices] = {}
        self.work = SlicedWork(clock, slice_size)
        # Client commands and orders passed on to the master (for WorkerStatus).
        self.relayed = 0

    def connected(self, connection: amp.AMP) -> None:
        self.connections.add(connection)

    def disconnected(self, connection: amp.AMP) -> None:
        self.connections.discard(connection)
        self._prices.pop(connection, None)
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

    def sessions(self) -> int:
        """How many connections are logged in."""
        return len(self._user_of)

    def detach(self, connection: amp.AMP) -> None:
        username = self._user_of.pop(connection, None)
        if username is not None:
            users = self.by_user.get(username, set())
            users.discard(connection)
            if not users:
                self.by_user.pop(username, None)
            _refresh_timeout(connection)

    def subscribe(self, connection: amp.AMP, prices: Prices) -> None:
        """Push ``connection`` the price ticks of ``prices`` (ALL_PRICES, or symbols: none for no ticks)."""
        if connection not in self.connections:
            return
        if prices:
            self._prices[connection] = prices
        else:
            self._prices.pop(connection, None)

    def subscription(self, connection: amp.AMP) -> Prices:
        """What ``connection`` is subscribed to (an empty set: nothing)."""
        return self._prices.get(connection, frozenset())

    def push_tick(self, tick: int, as_of: str, prices: dict[str, int], stale: dict[str, str] | None = None) -> None:
        """Push the tick to every subscribed connection, with the stale reasons of the symbols it wants; an
        unfinished push of the previous tick is dropped."""
        self.work.add(self._tick_writes(tick, as_of, prices, stale or {}), supersedes=PriceTick)

    def _tick_writes(self, tick: int, as_of: str, prices: dict[str, int], stale: dict[str, str]) -> Iterator[None]:
        fragments = price_fragments(prices)
        encoded: dict[Prices, bytes | None] = {}
        for connection in list(self._prices):
            wanted = self._prices.get(connection)
            if wanted is None:
                continue  # gone, or unsubscribed, since the push began
            if wanted not in encoded:
                if wanted == ALL_PRICES:
                    pieces = list(fragments.values())
                    reasons = stale
                else:
                    pieces = [fragments[symbol] for symbol in sorted(wanted) if symbol in fragments]
                    reasons = {symbol: stale[symbol] for symbol in sorted(wanted) if symbol in stale}
                encoded[wanted] = (
                    push_bytes(PriceTick, tick=tick, as_of=as_of, prices=pack_prices(pieces), stale=reasons or None)
                    if pieces or reasons
                    else None
                )
            data = encoded[wanted]
            if data is not None:
                connection.send_push(data, droppable=True)
            yield None

    def push_updates(self, settled_at: str, updates: list[dict[str, Any]]) -> None:
        """Push each user's updates, in one box per user, to every connection of that user."""
        by_user: dict[str, list[dict[str, Any]]] = {}
        for update in updates:
            if update["username"] in self.by_user:
                by_user.setdefault(update["username"], []).append(update)
        if by_user:
            self.work.add(self._update_writes(settled_at, by_user))

    def go_away(self, reason: str, workers: list[dict[str, str]]) -> int:
        """Tell every client to go to one of ``workers`` (GoAway) and close its connection, a slice of
        connections per reactor turn; returns how many are told."""
        connections = list(self.connections)
        if connections:
            data = push_bytes(GoAway, reason=reason, workers=workers)
            self.work.add(self._goodbyes(data, connections))
        return len(connections)

    @staticmethod
    def _goodbyes(data: bytes, connections: list[amp.AMP]) -> Iterator[None]:
        for connection in connections:
            if connection.transport is not None:
                connection.send_push(data, droppable=False)
                connection.close()
            yield None

    def _update_writes(self, settled_at: str, by_user: dict[str, list[dict[str, Any]]]) -> Iterator[None]:
        for username, rows in by_user.items():
            connections = list(self.by_user.get(username, ()))
            if not connections:
                continue
            data = push_bytes(OrderUpdates, settled_at=settled_at, updates=rows)
            for connection in connections:
                connection.send_push(data, droppable=False)
                yield None


def _refresh_timeout(connection: amp.AMP) -> None:
    refresh = getattr(connection, "refresh_timeout", None)
    if refresh is not None:
        refresh()


class MasterPushes(AnswersHeartbeats):
    """What the master pushes to this worker (prices, order outcomes, the worker directory, BootOff), and
    what it asks (Ping, WorkerStatus).

    ``on_tick(tick)``, if given, is called after each new tick is passed on;
    ``on_boot_off(reason)`` when the master kicks this worker.  Uptime counts
    from when this was made (when the worker started).
    """

    def __init__(
        self,
        cache: QuoteCache,
        clients: ClientRegistry,
        on_tick: Callable[[int], None] | None = None,
        clock: IReactorTime | None = None,
        on_boot_off: Callable[[str], None] | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.cache = cache
        self.clients = clients
        self.on_tick = on_tick
        self.clock = clock
        self.started_at = clock.seconds()
        self.on_boot_off = on_boot_off

    @WorkerDirectory.responder
    def worker_directory(self, workers: list[dict[str, str]]) -> dict:
        self.cache.workers = workers
        return {}

    @BootOff.responder
    def boot_off(self, reason: str, workers: list[dict[str, str]]) -> dict[str, int]:
        if self.on_boot_off is not None:
            self.on_boot_off(reason)
        return {"clients": self.clients.go_away(reason, workers)}

    @PriceTick.responder
    def price_tick(
        self, tick: int, as_of: str, prices: list[dict[str, Any]], stale: dict[str, str] | None = None
    ) -> dict:
        if self.cache.update(tick, as_of, prices, stale):
            self.clients.push_tick(tick, as_of, self.cache.prices, self.cache.stale)
            if self.on_tick is not None:
                self.on_tick(tick)
        return {}

    @OrderUpdates.responder
    def order_updates(self, settled_at: str, updates: list[dict[str, Any]]) -> dict:
        self.clients.push_updates(settled_at, updates)
        return {}

    @Ping.responder
    def ping(self) -> dict:
        return {}

    @WorkerStatus.responder
    def status(self) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "clients": len(self.clients.connections),
            "sessions": self.clients.sessions(),
            "commands_relayed": self.clients.relayed,
            "uptime": max(0.0, self.clock.seconds() - self.started_at),
            "tick": self.cache.tick,
        }
        if self.cache.as_of is not None:
            answer["as_of"] = self.cache.as_of
        return answer


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
        self.clients.relayed += 1
        return self.link.call(RELAYED[command], **arguments, **self._envelope())

    @Ping.responder
    def ping(self) -> dict:
        """Answered here, without the master: a client asks it to know the worker and the way to it are alive
        (a cut network link sends no FIN or RST).  Like every box, it also restarts the idle countdown."""
        return {}

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
        returnValue(self._with_workers(answer))

    @LoginWithToken.responder
    @inlineCallbacks
    def login_with_token(self, token: str) -> Any:
        answer = yield self.relay(LoginWithToken, token=token)
        self.clients.attach(self.connection, answer["username"])
        returnValue(self._with_workers(answer))

    def _with_workers(self, answer: dict[str, Any]) -> dict[str, Any]:
        """A login answer with the worker directory, so the client knows where to go if this worker goes away."""
        if self.cache.workers:
            return {**answer, "workers": self.cache.workers}
        return answer

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

    @GetAssetInfo.responder
    def asset_info(self, symbol: str) -> Any:
        symbol = symbol.strip().upper()
        cached = self.cache.info(symbol)
        if cached is not None:
            return succeed(cached)
        return self.relay(GetAssetInfo, symbol=symbol)

    @GetPriceHistory.responder
    def price_history(self, symbol: str, range: str, cursor: str | None = None) -> Any:
        """From the history cache: the master is asked once per page per price update, however many ask."""
        symbol = symbol.strip().upper()
        range = check_range(range.strip().lower())
        if self.cache.known(symbol) is False:
            raise DataFailed(f"unknown symbol {symbol[:MAX_SYMBOL_LENGTH]!r}")
        return self.cache.history.get(
            (symbol, range, cursor),
            lambda: self.relay(GetPriceHistory, symbol=symbol, range=range, cursor=cursor),
        )

    @Subscribe.responder
    def subscribe(self, prices: list[str] | None = None, all_prices: bool | None = None) -> dict[str, Any]:
        if all_prices and prices:
            raise DataFailed("ask for all prices or list symbols, not both")
        if all_prices:
            self.clients.subscribe(self.connection, ALL_PRICES)
            return {"prices": [], "all_prices": True}
        if prices and len(prices) > MAX_SUBSCRIBED_SYMBOLS:
            raise DataFailed(
                f"at most {MAX_SUBSCRIBED_SYMBOLS} symbols may be listed, got {len(prices)}; "
                "subscribe to all prices instead"
            )
        symbols = sorted({symbol.strip().upper() for symbol in prices or ()})
        if symbols and not self.cache.assets:
            raise ServiceUnavailable("the worker has not loaded the asset list yet; try again shortly")
        unknown = [symbol for symbol in symbols if symbol not in self.cache.assets]
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise DataFailed(f"unknown symbol {unknown[0][:MAX_SYMBOL_LENGTH]!r}{more}")
        self.clients.subscribe(self.connection, frozenset(symbols))
        return {"prices": symbols, "all_prices": False}

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
        order = self._client_order(side, failed, symbol, quantity, client_order_id)
        envelope = self._envelope()
        group = OrderGroup(token, envelope["received_at"], envelope["client_address"], [order])
        self.clients.relayed += 1
        return self.batcher.submit_group(group).addCallback(self._order_result)

    @staticmethod
    def _check_session_token(token: str) -> None:
        if len(token) > MAX_TOKEN_LENGTH or not plain_text(token):
            raise SessionInvalid("session is not valid; log in again")

    @staticmethod
    def _client_order(
        side: str, failed: type[Exception], symbol: str, quantity: str, client_order_id: str | None
    ) -> ClientOrder:
        """The order to send on, or ``failed`` if a field cannot be one: bounded `plain_text` fields keep every
        SubmitOrders batch's size known from their lengths (a control character would cost six bytes)."""
        if len(symbol) > MAX_SYMBOL_LENGTH or not plain_text(symbol):
            raise failed(f"unknown symbol {symbol[:MAX_SYMBOL_LENGTH]!r}")
        if len(quantity) > MAX_QUANTITY_LENGTH or not plain_text(quantity):
            raise failed("quantity must be a whole number of shares")
        if client_order_id is not None and (
            len(client_order_id) > MAX_CLIENT_ORDER_ID_LENGTH or not plain_text(client_order_id)
        ):
            raise failed(
                f"client order id may contain only letters, digits and . _ : - characters, "
                f"at most {MAX_CLIENT_ORDER_ID_LENGTH}"
            )
        return ClientOrder(side, symbol, quantity, client_order_id)

    @PlaceOrders.responder
    def place_orders(self, token: str, orders: list[ClientOrder]) -> Deferred:
        """Send the batch on as one group, stamped once; answer each order on its own."""
        self._check_session_token(token)
        if self.link.connection is None:
            raise ServiceUnavailable("the master server is not reachable right now; orders not accepted")
        envelope = self._envelope()
        # Each ClientOrder was bounded to `plain_text` fields as it was received
        # (ClientOrder.from_wire): the checks of `_client_order` hold already.
        group = OrderGroup(token, envelope["received_at"], envelope["client_address"], orders)
        self.clients.relayed += len(orders)
        return self.batcher.submit_group(group).addCallback(self._group_placed)

    def _group_placed(self, results: list[OrderResult | PaperTraderError]) -> dict[str, Any]:
        placed: list[PlacedOrder] = []
        username = None
        for result in results:
            if isinstance(result, PaperTraderError):
                placed.append(PlacedOrder.refused(result))
            elif result.code is None:
                placed.append(PlacedOrder(order_id=result.order_id))
                username = result.username
            else:
                placed.append(PlacedOrder.refused(result.error()))
        if username is not None:
            # The orders of one PlaceOrders share a token, so a user.
            self.clients.attach(self.connection, username)
        return self._batch_answer(placed)

    @staticmethod
    def _batch_answer(results: list[PlacedOrder]) -> dict[str, Any]:
        # A batch whose orders all found the session invalid is refused as a whole, like a single order.
        if results and all(r.code == "SESSION_INVALID" for r in results):
            raise results[0].error()
        return {"results": results}

    def _order_result(self, results: list[OrderResult | PaperTraderError]) -> dict[str, int]:
        [result] = results
        if isinstance(result, PaperTraderError):
            raise result
        error = result.error()
        if error is not None:
            raise error
        self.clients.attach(self.connection, result.username)
        return {"order_id": result.order_id}


class ClientAMP(BoundedWrites):
    """One client's connection: guarded (see `papertrader.wire`), registered while it lasts.

    A connection with a session may stay quiet longer than one without.  While
    its transport's buffer is full price ticks are not written -- the latest
    one is sent once it drains -- and a client that still does not read after
    ``max_unsent_bytes`` more is cut off (`BoundedWrites`).
    """

    locator: ClientLocator
    max_unsent_bytes = MAX_UNSENT_BYTES
    _held_tick: bytes | None = None

    def idle_timeout(self) -> float | None:
        if self.locator.clients.user_of(self) is not None:
            return self.timeouts.session_idle
        return self.timeouts.idle

    def connectionMade(self) -> None:
        super().connectionMade()
        self.locator.address = self.peer
        self.locator.clients.connected(self)

    def connectionLost(self, reason: Any) -> None:
        self._held_tick = None
        self.locator.clients.disconnected(self)
        super().connectionLost(reason)

    def resumeProducing(self) -> None:
        super().resumeProducing()
        tick, self._held_tick = self._held_tick, None
        if tick is not None:
            self.send_push(tick, droppable=True)

    def stopProducing(self) -> None:
        self._held_tick = None

    def send_push(self, data: bytes, droppable: bool) -> None:
        """Write a push's bytes (encoded once for many connections); a ``droppable`` one waits while paused.

        Only the latest droppable push waits: it supersedes the ones before it.
        """
        if self.transport is None:
            return
        if droppable and self.paused:
            self._held_tick = data
            return
        self.write(data)


class ClientFactory(GuardedFactory):
    """Builds a `ClientAMP`, with a fresh locator from ``new_locator``, for each client connection."""

    protocol = ClientAMP
