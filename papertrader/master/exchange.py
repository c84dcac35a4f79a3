"""The master's domain: what each request means, independent of AMP.

`Exchange` ties accounts, the order desk, the price board and the database
together; the AMP responders in `papertrader.master.protocol` only translate.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, returnValue
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from papertrader.assets import Asset
from papertrader.errors import (
    DataFailed,
    OrderConflict,
    PaperTraderError,
    PurchaseFailed,
    SellFailed,
    ServiceUnavailable,
    expected_or_unavailable,
)
from papertrader.eventlog import EventLogger
from papertrader.master.accounts import Accounts
from papertrader.master.database import CHUNK_ORDERS, Database, HistoryPage, OpenTick, SettledChunk
from papertrader.master.market import HISTORY_BARS, PriceBoard, PriceSource, Retrieval
from papertrader.master.trading import (
    BUY,
    SIDES,
    AccountState,
    ClientOrderIdReused,
    NewOrder,
    OrderDesk,
    QueueOutcome,
    Settlement,
    parse_client_order_id,
    parse_quantity,
    refuse_reason,
    settle_orders,
)
from papertrader.paging import BadCursor, Page, decode_cursor, encode_cursor, page_count
from papertrader.protocol import (
    BARS_PER_PAGE,
    HISTORY_RANGES,
    MAX_SYMBOL_LENGTH,
    ORDERS_PER_PAGE,
    POSITIONS_PER_PAGE,
    TRANSACTIONS_PER_PAGE,
    ClientOrder,
    OrderGroup,
    OrderRequest,
)
from papertrader.timestamps import iso

# (tick, as_of, the latest good price of every symbol priced so far, the stale ones' reasons)
TickListener = Callable[[int, str, dict[str, int], dict[str, str]], None]
SettledListener = Callable[[int, str, list[Settlement]], None]


class Exchange:
    """Accepts orders into the queue and settles the queue on every price update."""

    log = EventLogger()

    def __init__(
        self,
        database: Database,
        accounts: Accounts,
        board: PriceBoard,
        source: PriceSource,
        clock: IReactorTime,
        max_order_quantity: int,
        chunk_orders: int = CHUNK_ORDERS,
    ) -> None:
        self._db = database
        self.accounts = accounts
        self.board = board
        self._source = source
        self._clock = clock
        self._max_quantity = max_order_quantity
        self._chunk_orders = chunk_orders
        self._desk = OrderDesk(clock, self._commit_orders)
        # Funds checks between updates: account states by user id, valid for one generation.
        self._accounts: dict[int, AccountState] = {}
        self._generation = 0
        self._settling = False
        self._ticking = False
        self._tick_listeners: list[TickListener] = []
        self._settled_listeners: list[SettledListener] = []

    def on_tick(self, listener: TickListener) -> None:
        """Call ``listener(tick, as_of, prices, stale)`` after every settled update (its orders' outcomes
        went to the `on_settled` listeners chunk by chunk): ``prices`` the latest good price of every
        symbol priced so far, ``stale`` why those whose latest retrieval failed did."""
        self._tick_listeners.append(listener)

    def on_settled(self, listener: SettledListener) -> None:
        """Call ``listener(tick, as_of, settlements)`` as each chunk of an update's queue is committed.

        Its outcomes are stored, so they may be told at once instead of after the
        whole update: the order updates of a large settlement then travel while
        the rest of it settles.
        """
        self._settled_listeners.append(listener)

    # ------------------------------------------------------------ orders

    def submit_orders(self, requests: list[OrderRequest], worker: str) -> Deferred[list[Any]]:
        """`submit_groups` for orders that each carry their own token and envelope (a group of one each)."""
        return self.submit_groups([group_of_one(request) for request in requests], worker)

    @inlineCallbacks
    def submit_groups(self, groups: list[OrderGroup], worker: str) -> Any:
        """Validate a batch of orders and queue the valid ones durably, together.

        Fires with, per order (those of each group in turn), either
        ``(order_id, username)`` or the `PaperTraderError` saying why it was not
        queued (SessionInvalid, PurchaseFailed/SellFailed, OrderConflict,
        ServiceUnavailable).  An order repeating one already stored under
        its client order id gets that order's id and stores nothing.
        """
        sessions: dict[str, Any] = {}
        for token in {group.token for group in groups}:
            session = self.accounts.cached_session(token)
            if session is None:
                try:
                    session = yield self.accounts.authenticate(token)
                except PaperTraderError as e:
                    session = e
                except Exception:
                    self.log.failure("database failure while checking a session")
                    session = ServiceUnavailable("the database is unavailable; order not accepted")
            sessions[token] = session

        results: list[Any] = []
        valid: list[tuple[int, NewOrder]] = []
        for group in groups:
            session = sessions[group.token]
            if isinstance(session, Exception):
                results.extend([session] * len(group.orders))
                continue
            for order in group.orders:
                try:
                    new = self._new_order(order, group, session, worker)
                except PaperTraderError as e:
                    results.append(e)
                else:
                    valid.append((len(results), new))
                    results.append(None)
        if valid:
            try:
                outcomes = yield self._desk.place_many([order for _, order in valid])
            except PaperTraderError as e:
                outcomes = [e] * len(valid)
            for (index, order), outcome in zip(valid, outcomes):
                if isinstance(outcome, int):
                    results[index] = (outcome, order.username)
                elif isinstance(outcome, str):
                    results[index] = _failure_for(order.side)(outcome)
                elif isinstance(outcome, ClientOrderIdReused):
                    results[index] = OrderConflict(outcome.reason)
                else:
                    results[index] = outcome
        return results

    @inlineCallbacks
    def submit_order(
        self,
        side: str,
        token: str,
        symbol: str,
        quantity: str,
        received_at: str,
        client_address: str,
        worker: str,
        client_order_id: str | None = None,
    ) -> Any:
        """One order through `submit_orders`; fires with ``(order_id, username)`` or fails with the reason."""
        request = OrderRequest(side, token, symbol, quantity, received_at, client_address, client_order_id)
        [result] = yield self.submit_orders([request], worker)
        if isinstance(result, Exception):
            raise result
        return result

    def _new_order(self, order: ClientOrder, group: OrderGroup, session: Any, worker: str) -> NewOrder:
        """The checks that need no database: side, symbol, quantity, client order id, a current price."""
        side = order.side
        failed = _failure_for(side)
        if side not in SIDES:
            raise failed(f"unknown order side {side!r}")
        symbol = order.symbol.strip().upper()
        if symbol not in self.board.assets:
            raise failed(f"unknown symbol {symbol!r}")
        try:
            quantity = parse_quantity(order.quantity, self._max_quantity)
        except ValueError as e:
            raise failed(str(e)) from None
        client_order_id = order.client_order_id
        if client_order_id is not None:
            try:
                client_order_id = parse_client_order_id(client_order_id)
            except ValueError as e:
                raise failed(str(e)) from None
        if symbol not in self.board.prices:
            raise failed("the market has no price yet; try again after the next update")
        return NewOrder(
            session.user_id,
            session.username,
            side,
            symbol,
            quantity,
            group.received_at,
            group.client_address,
            worker,
            client_order_id,
        )

    def _commit_orders(self, orders: list[NewOrder]) -> Deferred[list[QueueOutcome]]:
        """Store a batch, checking funds against the cached account states where there are some.

        The master is the only writer of orders, so between two updates the
        states it computed stay right; every update (or failure) forgets them.
        """
        generation = self._generation
        if self._settling:
            known: dict[int, AccountState] = {}
        else:
            # One copy per user, not per order: a batch holds many orders of few users.
            users = {o.user_id for o in orders}
            known = {user_id: self._accounts[user_id].copy() for user_id in users if user_id in self._accounts}
        d = self._db.queue_orders(orders, self.board.prices, refuse_reason, iso(self._clock.seconds()), known)

        def stored(answer: tuple[list[QueueOutcome], dict[int, AccountState]]) -> list[QueueOutcome]:
            results, states = answer
            if generation == self._generation and not self._settling:
                self._accounts.update(states)
            return results

        def failed(failure: Failure) -> None:
            for order in orders:
                self._accounts.pop(order.user_id, None)
            return self._unavailable(failure, "order not accepted")

        return d.addCallbacks(stored, failed)

    def _forget_account_states(self) -> None:
        self._accounts.clear()
        self._generation += 1

    def _unavailable(self, failure: Failure, what: str) -> Failure:
        return expected_or_unavailable(failure, f"the database is unavailable; {what}", self.log)

    # ------------------------------------------------------------ reading

    def asset_value(self, symbol: str) -> dict[str, Any]:
        """The latest price of ``symbol`` (GetAssetValue), with ``stale`` if its latest retrieval failed."""
        symbol, asset = self._asset(symbol)
        if symbol not in self.board.prices:
            raise DataFailed("the market has no price yet; try again after the next update")
        answer = {"symbol": symbol, "name": asset.name, "exchange": asset.exchange}
        answer.update(self._price_of(symbol))
        return answer

    def asset_info(self, symbol: str) -> dict[str, Any]:
        """What the asset list says of ``symbol`` and its latest price, if any (GetAssetInfo)."""
        symbol, asset = self._asset(symbol)
        answer = {
            "symbol": symbol,
            "name": asset.name,
            "exchange": asset.exchange,
            "sector": asset.sector,
            "industry": asset.industry,
            "currency": asset.currency,
        }
        if symbol in self.board.prices:
            answer.update(self._price_of(symbol))
        return answer

    def _asset(self, symbol: str) -> tuple[str, Asset]:
        symbol = symbol.strip().upper()
        asset = self.board.assets.get(symbol)
        if asset is None:
            raise DataFailed(f"unknown symbol {symbol[:MAX_SYMBOL_LENGTH]!r}")
        return symbol, asset

    def _price_of(self, symbol: str) -> dict[str, Any]:
        """``price_cents``, ``as_of`` (the update that brought it) and, if stale, ``stale`` of a priced symbol."""
        latest = self.board.latest.get(symbol)
        answer: dict[str, Any] = {
            "price_cents": self.board.prices[symbol],
            "as_of": latest.as_of if latest is not None else self.board.as_of,
        }
        reason = self.board.failing.get(symbol)
        if reason is not None:
            answer["stale"] = reason
        return answer

    @inlineCallbacks
    def price_history(self, symbol: str, range: str, cursor: str | None = None) -> Any:
        """A page of ``symbol``'s price history over ``range`` (GetPriceHistory's answer): OHLC bars,
        oldest first, over the range up to its latest market time.

        The cursor holds the next page's number, the tick and market time the
        reading is pinned at, the start of the last bar sent and a fingerprint
        of the symbol and range: the pages of one reading hold the history as
        of its first page (`Database.price_history`).  An unknown symbol or
        range, or a cursor not of this reading: DataFailed.
        """
        symbol, _ = self._asset(symbol)
        if range not in HISTORY_BARS:
            raise DataFailed(f"unknown history range {range[:20]!r}; one of {', '.join(HISTORY_RANGES)}")
        span, bar = HISTORY_BARS[range]
        fingerprint = zlib.crc32(f"{symbol} {range}".encode())
        position = None
        if cursor is not None:
            try:
                page, tick, latest, after, fingerprinted = decode_cursor(cursor, 5)
            except BadCursor:
                raise DataFailed("malformed price history cursor; read it again from the first page") from None
            if fingerprinted != fingerprint:
                raise DataFailed("this cursor is not from this price history; read it again from the first page")
            position = (page, tick, latest, after)
        reading: HistoryPage = yield self._read(self._db.price_history(symbol, span, bar, BARS_PER_PAGE, position))
        answer: dict[str, Any] = {
            "symbol": symbol,
            "range": range,
            "bar_seconds": bar,
            "bars": [
                {
                    "start": iso(b.start),
                    "open_cents": b.open_cents,
                    "high_cents": b.high_cents,
                    "low_cents": b.low_cents,
                    "close_cents": b.close_cents,
                }
                for b in reading.bars
            ],
            "page": reading.page,
            "pages": reading.pages,
        }
        if reading.latest is not None:
            answer["as_of"] = iso(reading.latest)
        if reading.after is not None:
            answer["next_cursor"] = encode_cursor(
                reading.page + 1, reading.tick, reading.latest, reading.after, fingerprint
            )
        returnValue(answer)

    @inlineCallbacks
    def orders(self, token: str, cursor: str | None = None) -> Any:
        """A `Page` of the user's orders, newest first (``cursor`` None: the first page)."""
        session = yield self.accounts.authenticate(token)
        page = yield self._read(self._db.list_orders(session.user_id, ORDERS_PER_PAGE, _position(cursor)))
        returnValue(page)

    @inlineCallbacks
    def portfolio(self, token: str, cursor: str | None = None) -> Any:
        """A page of the user's positions (by symbol) valued at the latest prices, with the cash and the total.

        The cursor names the next page, the tick and a fingerprint of the
        holdings: a page asked for after either changed is refused with
        DataFailed, so the pages of one reading always add up.
        """
        expected = None if cursor is None else _portfolio_position(cursor)
        session = yield self.accounts.authenticate(token)
        cash, holdings = yield self._read(self._db.portfolio(session.user_id))
        tick = self.board.tick
        fingerprint = zlib.crc32(repr((cash, sorted(holdings.items()))).encode("ascii"))
        positions = []
        for symbol, quantity in sorted(holdings.items()):
            price = self.board.prices.get(symbol, 0)
            positions.append(
                {"symbol": symbol, "quantity": quantity, "price_cents": price, "value_cents": price * quantity}
            )
        pages = page_count(len(positions), POSITIONS_PER_PAGE)
        page = 1
        if expected is not None:
            page, cursor_tick, cursor_fingerprint = expected
            if (cursor_tick, cursor_fingerprint) != (tick, fingerprint) or not 2 <= page <= pages:
                raise DataFailed("the portfolio changed since its first page; read it again from the first page")
        start = (page - 1) * POSITIONS_PER_PAGE
        answer = {
            "username": session.username,
            "cash_cents": cash,
            "positions": positions[start : start + POSITIONS_PER_PAGE],
            "total_cents": cash + sum(p["value_cents"] for p in positions),
            "as_of": self.board.as_of or "",
            "page": page,
            "pages": pages,
        }
        if page < pages:
            answer["next_cursor"] = encode_cursor(page + 1, tick, fingerprint)
        returnValue(answer)

    @inlineCallbacks
    def history(self, token: str, cursor: str | None = None) -> Any:
        """A `Page` of the user's settled trades, newest first (``cursor`` None: the first page)."""
        session = yield self.accounts.authenticate(token)
        page: Page = yield self._read(self._db.history(session.user_id, TRANSACTIONS_PER_PAGE, _position(cursor)))
        returnValue(page)

    def _read(self, d: Deferred) -> Deferred:
        return d.addErrback(self._unavailable, "try again later")

    # ------------------------------------------------------------ the market loop

    @inlineCallbacks
    def resume(self) -> Any:
        """Restore the latest recorded prices, so quotes work before the first new update."""
        latest = yield self._db.latest_prices()
        if latest is not None:
            tick, as_of, prices = latest
            self.board.restore(tick, as_of, prices)
            resume_from = getattr(self._source, "resume_from", None)
            if resume_from is not None:
                resume_from(dict(self.board.prices))

    @inlineCallbacks
    def tick(self) -> Any:
        """Retrieve prices, settle the whole queue at the fresh ones, then tell the listeners.

        The tick records only the prices retrieved fresh (none: it settles
        nothing, but is recorded all the same and its listeners told, so the
        stale state reaches the workers); queued orders in the other symbols
        stay queued for a later tick that prices them.  The board then keeps
        the last good price of each symbol whose retrieval failed and marks it
        stale (`PriceBoard.update`).

        A tick left unsettled earlier (the master was killed mid-way, or a
        chunk failed) is finished first, at its own prices and time, and its
        listeners told; only then are new prices recorded.  The queue settles
        in chunks (`Database.settle_queue`), so orders keep being stored and
        acknowledged meanwhile; they belong to the next tick.

        Errors are logged, never raised: the loop that calls this must keep going,
        and an unsettled queue is simply settled at the next update.
        """
        if self._ticking:
            self.log.warn("the previous price update is still settling; skipping this one")
            return
        self._ticking = True
        # Cached account states are wrong once settlement starts: forget them
        # now, and take no new ones until it has finished.
        self._settling = True
        self._forget_account_states()
        try:
            unsettled = yield self._db.unsettled_ticks()
            for tick in unsettled:
                self.log.info(
                    "finishing update {tick} of {as_of}, left unsettled: {count} orders at its own prices",
                    tick=tick.tick_id,
                    as_of=tick.as_of,
                    count=tick.orders,
                )
                yield self._settle(tick, self._clock.seconds())
            retrieval = yield self._source.fetch()
            started = self._clock.seconds()
            now = iso(started)
            prices, quoted_at, failures = self._fresh(retrieval, int(started))
            self.log.info(
                "new prices as of {now} ({fresh} fresh, {failed} failed); settling the order queue",
                now=now,
                fresh=len(prices),
                failed=len(failures),
            )
            tick = yield self._db.begin_tick(prices, now, quoted_at)
            yield self._settle(tick, started, failures)
        except Exception:
            self.log.failure("price update failed; the queue stays for the next one")
        finally:
            self._settling = False
            self._forget_account_states()
            self._ticking = False

    def _fresh(self, retrieval: Retrieval, now: int) -> tuple[dict[str, int], dict[str, int], dict[str, str]]:
        """The fresh prices of listed assets in ``retrieval``, their market times (``now`` where it
        gives none) and the failures; a price that is not a positive integer counts as a failure."""
        prices: dict[str, int] = {}
        quoted_at: dict[str, int] = {}
        failures = {symbol: reason for symbol, reason in retrieval.failures.items() if symbol in self.board.assets}
        for symbol, quote in retrieval.quotes.items():
            if symbol not in self.board.assets:
                continue
            if not isinstance(quote.price_cents, int) or quote.price_cents <= 0:
                failures[symbol] = "not a positive price"
                continue
            prices[symbol] = quote.price_cents
            quoted_at[symbol] = now if quote.quoted_at is None else int(quote.quoted_at)
            failures.pop(symbol, None)
        return prices, quoted_at, failures

    @inlineCallbacks
    def _settle(self, tick: OpenTick, started: float, failures: dict[str, str] | None = None) -> Any:
        """Settle ``tick``'s queue chunk by chunk, publish its prices and tell the listeners.

        ``failures`` are the retrieval's (None: a tick recorded earlier, being
        finished: only its prices are published).  The time logged is the
        database's part, from ``started`` (before the tick was recorded).
        """
        progress = [0]

        def committed(chunk: SettledChunk) -> None:
            progress[0] += len(chunk.settlements)
            if chunk.settlements:
                for settled in self._settled_listeners:
                    try:
                        settled(tick.tick_id, tick.as_of, chunk.settlements)
                    except Exception:
                        self.log.failure("settlement listener failed")
            if not chunk.done:
                self.log.info(
                    "update {tick}: {settled} of {count} orders settled so far",
                    tick=tick.tick_id,
                    settled=progress[0],
                    count=tick.orders,
                )

        settlements = yield self._db.settle_queue(tick, settle_orders, self._chunk_orders, committed)
        if tick.tick_id >= self.board.tick:
            self.board.update(tick.tick_id, tick.as_of, tick.prices, tick.quoted_at, failures)
        self.log.info(
            "update {tick}: {count} orders settled in {seconds:.3f} s",
            tick=tick.tick_id,
            count=len(settlements),
            seconds=self._clock.seconds() - started,
        )
        prices, stale = dict(self.board.prices), self.board.stale
        for listener in self._tick_listeners:
            try:
                listener(tick.tick_id, tick.as_of, prices, stale)
            except Exception:
                self.log.failure("tick listener failed")


def group_of_one(request: OrderRequest) -> OrderGroup:
    """A SubmitOrders row of a worker that sends no groups, as a group of one order."""
    order = ClientOrder(request.side, request.symbol, request.quantity, request.client_order_id)
    return OrderGroup(request.token, request.received_at, request.client_address, [order])


def _failure_for(side: str) -> type[PaperTraderError]:
    return PurchaseFailed if side == BUY else SellFailed


def _portfolio_position(cursor: str) -> tuple[int, int, int]:
    """The (page, tick, fingerprint) a portfolio cursor holds; DataFailed if it holds none."""
    try:
        page, tick, fingerprint = decode_cursor(cursor, 3)
    except BadCursor:
        raise DataFailed("malformed portfolio cursor; read it again from the first page") from None
    return page, tick, fingerprint


def _position(cursor: str | None) -> tuple[int, int, int] | None:
    """The (top, after, page) a list cursor holds; DataFailed if it holds none."""
    if cursor is None:
        return None
    try:
        top, after, page = decode_cursor(cursor, 3)
    except BadCursor:
        raise DataFailed("malformed list cursor; list again from the first page") from None
    return top, after, page
