"""Assets buy & sell (spec 3.1.7): order validation, the queue and its settlement.

The rules are pure functions over plain values; `OrderDesk` batches incoming
orders into group commits and `settle_orders` clears the queue once per price
update.  Nothing here knows about AMP or SQL.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from papertrader.money import format_cents

BUY = "buy"
SELL = "sell"
SIDES = (BUY, SELL)
MAX_CLIENT_ORDER_ID = 64
_CLIENT_ORDER_ID = re.compile(r"[A-Za-z0-9._:-]+")


def parse_quantity(text: str, maximum: int) -> int:
    """A whole number of shares between 1 and ``maximum``, or ValueError saying why."""
    cleaned = text.strip()
    if not cleaned.lstrip("+-").isdigit():
        raise ValueError(f"quantity must be a whole number of shares, got {text!r}")
    quantity = int(cleaned)
    if quantity < 1:
        raise ValueError(f"quantity must be at least 1, got {quantity}")
    if quantity > maximum:
        raise ValueError(f"quantity must be at most {maximum}, got {quantity}")
    return quantity


def parse_client_order_id(text: str) -> str:
    """A client's name for an order: 1 to 64 of ``A-Z a-z 0-9 . _ : -``, or ValueError saying why."""
    if not 1 <= len(text) <= MAX_CLIENT_ORDER_ID:
        raise ValueError(f"client order id must be 1 to {MAX_CLIENT_ORDER_ID} characters long, got {len(text)}")
    if not _CLIENT_ORDER_ID.fullmatch(text):
        raise ValueError(
            f"client order id may contain only letters, digits and . _ : - characters, got {text!r}"
        )
    return text


@attr.s(frozen=True, auto_attribs=True)
class NewOrder:
    """An order that passed the stateless checks, ready for the funds check and the queue."""

    user_id: int
    username: str
    side: str
    symbol: str
    quantity: int
    received_at: str
    client_address: str
    worker: str
    client_order_id: str | None = None

    def same_as(self, side: str, symbol: str, quantity: int) -> bool:
        """Whether this order asks for what an order stored under its client order id asked for."""
        return (self.side, self.symbol, self.quantity) == (side, symbol, quantity)


@attr.s(frozen=True, auto_attribs=True)
class ClientOrderIdReused:
    """The outcome of queueing an order whose client order id the account used for a different order."""

    order_id: int
    reason: str


# What queueing one order comes to: its id, the reason it was refused, or a reused client order id.
QueueOutcome = int | str | ClientOrderIdReused


@attr.s(auto_attribs=True)
class AccountState:
    """A user's cash and shares, less what their queued orders already claim."""

    cash_cents: int
    holdings: dict[str, int]
    queued_buy_cents: int = 0
    queued_sell_shares: dict[str, int] = attr.Factory(dict)

    def copy(self) -> AccountState:
        return AccountState(
            self.cash_cents, dict(self.holdings), self.queued_buy_cents, dict(self.queued_sell_shares)
        )


def refuse_reason(account: AccountState, order: NewOrder, price_cents: int) -> str | None:
    """Why ``order`` cannot be queued for ``account`` at ``price_cents``; None if it can.

    Queued orders reserve cash and shares at the current price, so a user cannot
    queue more than they own; settlement checks again at the fill price.
    """
    if order.side == BUY:
        cost = order.quantity * price_cents
        available = account.cash_cents - account.queued_buy_cents
        if cost > available:
            return (
                f"insufficient cash: {order.quantity} {order.symbol} cost about "
                f"{format_cents(cost)}, {format_cents(max(available, 0))} available"
            )
        account.queued_buy_cents += cost
        return None
    held = account.holdings.get(order.symbol, 0) - account.queued_sell_shares.get(order.symbol, 0)
    if order.quantity > held:
        return f"not enough shares: selling {order.quantity} {order.symbol}, {max(held, 0)} held"
    account.queued_sell_shares[order.symbol] = (
        account.queued_sell_shares.get(order.symbol, 0) + order.quantity
    )
    return None


@attr.s(frozen=True, auto_attribs=True)
class QueuedOrder:
    """An order waiting in the queue for the next price update."""

    order_id: int
    user_id: int
    username: str
    side: str
    symbol: str
    quantity: int


@attr.s(frozen=True, auto_attribs=True)
class Settlement:
    """What happened to one queued order at a tick."""

    order: QueuedOrder
    filled: bool
    price_cents: int | None
    total_cents: int | None = None
    cash_after_cents: int | None = None
    reason: str | None = None

    @property
    def status(self) -> str:
        return "filled" if self.filled else "rejected"


def settle_orders(
    orders: Iterable[QueuedOrder],
    cash: dict[int, int],
    holdings: dict[tuple[int, str], int],
    prices: Mapping[str, int],
) -> list[Settlement]:
    """Settle ``orders`` in queue order at ``prices``, updating ``cash`` and ``holdings``.

    A buy needs enough cash and a sell enough shares at the moment it is
    reached; anything else is rejected with its reason.  An order in a symbol
    without a price (its latest retrieval failed: it is stale) gets no
    settlement: it stays queued for an update that prices it.
    """
    results = []
    for order in orders:
        price = prices.get(order.symbol)
        if price is None:
            continue
        total = price * order.quantity
        key = (order.user_id, order.symbol)
        if order.side == BUY:
            if cash[order.user_id] < total:
                results.append(
                    Settlement(
                        order,
                        False,
                        price,
                        reason=f"insufficient cash at fill price: needs {format_cents(total)}, "
                        f"has {format_cents(cash[order.user_id])}",
                    )
                )
                continue
            cash[order.user_id] -= total
            holdings[key] = holdings.get(key, 0) + order.quantity
        else:
            held = holdings.get(key, 0)
            if held < order.quantity:
                results.append(
                    Settlement(
                        order,
                        False,
                        price,
                        reason=f"not enough shares: selling {order.quantity}, holding {held}",
                    )
                )
                continue
            cash[order.user_id] += total
            holdings[key] = held - order.quantity
        results.append(Settlement(order, True, price, total, cash[order.user_id]))
    return results


@attr.s(auto_attribs=True)
class _Pending:
    orders: list[NewOrder]
    result: Deferred


class OrderDesk:
    """Collects orders arriving in the same reactor turn and queues them in one commit.

    ``commit(orders)`` stores a batch in one transaction and returns, for each
    order, its `QueueOutcome`.  While one commit runs, new
    orders gather for the next: under load, batches grow and commits stay few.
    """

    def __init__(
        self,
        clock: IReactorTime,
        commit: Callable[[list[NewOrder]], Deferred[list[QueueOutcome]]],
        max_batch: int = 5000,
    ) -> None:
        self._clock = clock
        self._commit = commit
        self._max_batch = max_batch
        self._pending: list[_Pending] = []
        self._scheduled: Any = None
        self._committing = False

    def place(self, order: NewOrder) -> Deferred[QueueOutcome]:
        """Queue ``order``; fires with its id once durable, or with a refusal reason."""
        return self.place_many([order]).addCallback(lambda results: results[0])

    def place_many(self, orders: list[NewOrder]) -> Deferred[list[QueueOutcome]]:
        """Queue ``orders`` together; fires with, per order, its id or a refusal reason."""
        d: Deferred[list[QueueOutcome]] = Deferred()
        self._pending.append(_Pending(list(orders), d))
        self._schedule()
        return d

    def _schedule(self) -> None:
        if self._committing or self._scheduled is not None or not self._pending:
            return
        self._scheduled = self._clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._scheduled = None
        batch: list[_Pending] = []
        size = 0
        while self._pending and (not batch or size + len(self._pending[0].orders) <= self._max_batch):
            pending = self._pending.pop(0)
            batch.append(pending)
            size += len(pending.orders)
        self._committing = True
        d = self._commit([order for pending in batch for order in pending.orders])

        def done(results: list[QueueOutcome]) -> None:
            start = 0
            for pending in batch:
                pending.result.callback(results[start : start + len(pending.orders)])
                start += len(pending.orders)

        def failed(failure: Any) -> None:
            for pending in batch:
                pending.result.errback(failure)

        def finished(_: object) -> None:
            self._committing = False
            self._schedule()

        d.addCallbacks(done, failed).addBoth(finished)
