"""Master server communication (spec 3.2.2): one reconnecting link to the master.

`MasterLink` keeps the connection up with `ClientService` and a backoff, does
the handshake in `_handshake` (the one place worker authentication lives),
and sends commands; `OrderBatcher` packs the orders arriving in one reactor
turn into SubmitOrders batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attr
from OpenSSL.SSL import Error as TLSError
from service_identity import VerificationError
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import CancelledError, Deferred, fail, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.protocols import amp
from twisted.python.failure import Failure

from papertrader import __version__
from papertrader.assets import MAX_ASSETS
from papertrader.errors import PaperTraderError, ServiceUnavailable, WorkerRefused, expected_or_unavailable
from papertrader.eventlog import EventLogger
from papertrader.gpg import GPGError, proof_statement
from papertrader.protocol import (
    MAX_ORDER_BATCH,
    MAX_SERVED_USERS_BATCH,
    MAX_VALUE_BYTES,
    ListAssets,
    OrderGroup,
    OrderRequest,
    OrderResult,
    ServedUsers,
    SubmitOrders,
    WorkerHello,
    WorkerProof,
    pack_order_groups,
    pack_order_requests,
)
from papertrader.wire import GuardedAMP, Timeouts
from papertrader.worker.cache import QuoteCache

MASTER_UNREACHABLE = "the master server is not reachable right now; try again shortly"
# Used when a master does not say how often to send heartbeats.
DEFAULT_HEARTBEAT_INTERVAL = 10.0

# A master that refused this worker (its answer, or its TLS handshake) will most
# likely refuse it again until someone changes a certificate or a name: wait long.
REFUSED_RETRY_DELAY = 30.0
REFUSED_MAX_RETRY_DELAY = 300.0
# Times the asset list is read again when a price update came between its pages.
ASSET_LIST_ATTEMPTS = 3


class _MasterAMP(GuardedAMP):
    """The worker's side of the master connection: guarded, and kept alive by heartbeats after the handshake."""

    link: MasterLink
    _interval: float | None = None

    def established(self) -> bool:
        return self._interval is not None

    def idle_timeout(self) -> float | None:
        return None if self._interval is None else 2 * self._interval

    def start_heartbeats(self, interval: float) -> None:
        """Send a Heartbeat every ``interval`` seconds; a master silent for two is given up on."""
        self._interval = interval
        super().start_heartbeats(interval)

    def heartbeat_arguments(self) -> dict[str, Any]:
        """Each Heartbeat tells the master how many clients this worker holds."""
        return {"clients": self.link.client_count()}

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self.link._lost(self)


class MasterLink:
    """The worker's connection to the master, kept up across restarts of either."""

    log = EventLogger()

    def __init__(
        self,
        clock: IReactorTime,
        endpoint: IStreamClientEndpoint,
        name: str,
        cache: QuoteCache,
        pushes: amp.CommandLocator,
        timeouts: Timeouts | None = None,
        served_users: Callable[[], Iterable[str]] = tuple,
        sign: Callable[[bytes], Deferred[str]] | None = None,
        client_address: Callable[[], str | None] = lambda: None,
        client_count: Callable[[], int] = lambda: 0,
    ) -> None:
        self._clock = clock
        self._sign = sign
        self._served_users = served_users
        self._client_address = client_address
        self.client_count = client_count
        self._timeouts = timeouts
        self.name = name
        self.cache = cache
        self.connection: _MasterAMP | None = None
        self.update_interval: float | None = None
        # Whether the master takes SubmitOrders groups (it says so in its WorkerHello answer).
        self.order_groups = False
        self._pushes = pushes
        self._refusals = 0  # handshakes in a row the master refused
        self._failed_handshakes = 0  # other handshakes in a row that failed
        self._retry_after_failure = backoffPolicy(initialDelay=0.5, maxDelay=15.0)
        self._retry_after_refusal = backoffPolicy(
            initialDelay=REFUSED_RETRY_DELAY, maxDelay=REFUSED_MAX_RETRY_DELAY, factor=2.0
        )
        factory = Factory.forProtocol(self._build)
        self.service = ClientService(
            endpoint,
            factory,
            retryPolicy=self._retry_delay,
            clock=clock,
            prepareConnection=self._handshake,
        )

    def _build(self) -> _MasterAMP:
        connection = _MasterAMP(locator=self._pushes, clock=self._clock, timeouts=self._timeouts)
        connection.link = self
        return connection

    def _retry_delay(self, attempt: int) -> float:
        """Seconds to wait before connecting again: long, and growing, after a refusal."""
        if self._refusals:
            return self._retry_after_refusal(self._refusals - 1)
        return self._retry_after_failure(attempt + self._failed_handshakes)

    def _handshake(self, connection: _MasterAMP) -> Deferred[None]:
        return self._greet(connection).addErrback(self._handshake_failed, connection)

    @inlineCallbacks
    def _greet(self, connection: _MasterAMP) -> Any:
        answer = yield connection.callRemote(
            WorkerHello, name=self.name, version=__version__, client_address=self._client_address()
        )
        if self._sign is None:
            raise GPGError("this worker has no OpenPGP key to sign the master's nonce with")
        signature = yield self._sign(proof_statement(self.name, answer["nonce"]))
        answer = yield connection.callRemote(WorkerProof, signature=signature)
        self.update_interval = answer["update_interval"]
        self.order_groups = bool(answer.get("order_groups"))
        connection.start_heartbeats(answer.get("heartbeat_interval") or DEFAULT_HEARTBEAT_INTERVAL)
        for _ in range(ASSET_LIST_ATTEMPTS):
            assets, ticks = yield self._read_asset_list(connection)
            if len(ticks) == 1:
                break
        # Pages of different updates (every attempt raced one): the oldest tick, so the next update replaces all.
        tick, as_of = min(ticks, key=lambda t: t[0])
        self.cache.load(assets, tick, as_of)
        yield self._tell_served_users(connection)
        self.connection = connection
        self._refusals = self._failed_handshakes = 0
        self.log.info("connected to the master as {name}", name=self.name)

    def _handshake_failed(self, failure: Failure, connection: _MasterAMP) -> Deferred[None] | None:
        """Say in one line why the handshake failed, and drop the connection.

        The failure is not passed on: ClientService keeps a connection whose
        preparation failed open, and its later loss then meets a state machine
        that does not expect it (automat's NoTransition).  Absorbed here, the
        connection counts as made and then lost, and ``_retry_delay`` decides
        when to try again.
        """
        if failure.check(CancelledError) and connection.transport is not None:
            # The service is stopping and finishes when this connection is lost;
            # a result from here as well would reach it stopped (NoTransition again).
            connection.transport.abortConnection()
            return Deferred()
        if connection.transport is not None:
            connection.transport.loseConnection()
        if failure.check(WorkerRefused):
            self._refusals += 1
            self.log.error("the master refused this worker: {reason}", reason=failure.getErrorMessage())
        elif failure.check(GPGError):
            self._refusals += 1
            self.log.error("could not sign the master's nonce: {reason}", reason=failure.getErrorMessage())
        elif failure.check(TLSError, VerificationError):
            self._refusals += 1
            self.log.error("TLS handshake with the master failed: {reason}", reason=_tls_reason(failure.value))
        else:
            self._failed_handshakes += 1
            self.log.warn("the handshake with the master failed: {reason}", reason=failure.getErrorMessage())
        return None
    @inlineCallbacks
    def _tell_served_users(self, connection: _MasterAMP) -> Any:
        """Tell the master whose sessions this worker holds, so their order updates reach it after a reconnect."""
        users = sorted(self._served_users())
        for start in range(0, len(users), MAX_SERVED_USERS_BATCH):
            try:
                yield connection.callRemote(ServedUsers, usernames=users[start : start + MAX_SERVED_USERS_BATCH])
            except PaperTraderError as e:
                # Not fatal: a user's next login or order teaches the master again.
                self.log.warn("could not tell the master which users this worker serves: {reason}", reason=e)
                return

    @inlineCallbacks
    def _read_asset_list(self, connection: _MasterAMP) -> Any:
        """Every page of ListAssets: the assets, and the (tick, as_of) of the prices the pages carry."""
        assets: list[dict[str, Any]] = []
        ticks: set[tuple[int, str | None]] = set()
        cursor = None
        while True:
            page = yield connection.callRemote(ListAssets, cursor=cursor)
            assets.extend(page["assets"])
            ticks.add((page["tick"], page.get("as_of")))
            cursor = page.get("next_cursor")
            if cursor is None:
                return assets, ticks
            if len(assets) >= MAX_ASSETS:
                raise ServiceUnavailable(f"the master lists more than {MAX_ASSETS} assets")

    def booted_off(self, reason: str) -> None:
        """The master kicked this worker (it closes the link next): reconnect only after the refusal back-off."""
        self._refusals += 1
        self.log.warn(
            "the master booted this worker off ({reason}); its clients were sent to the other workers; "
            "reconnecting after the refusal back-off (at least {delay:.0f} s)",
            reason=reason,
            delay=REFUSED_RETRY_DELAY,
        )

    def _lost(self, connection: _MasterAMP) -> None:
        if self.connection is connection:
            self.connection = None
            self.log.warn("lost the connection to the master; reconnecting")

    def call(self, command: type[amp.Command], **arguments: Any) -> Deferred:
        """Send ``command``; ServiceUnavailable if the master is not connected or the link drops."""
        if self.connection is None:
            return fail(ServiceUnavailable(MASTER_UNREACHABLE))
        return self.connection.callRemote(command, **arguments).addErrback(
            expected_or_unavailable, "lost contact with the master during the request; check its outcome and retry"
        )


def _tls_reason(error: Exception) -> str:
    """OpenSSL's reasons (``[(library, function, reason), ...]``) as one phrase; other errors as they print."""
    details = error.args[0] if error.args else None
    if isinstance(details, list) and details and all(isinstance(d, tuple) and d for d in details):
        return "; ".join(str(d[-1]) for d in details)
    return str(error) or type(error).__name__


class _Pending:
    """A group of orders waiting for the master's answers: answered once, when each order has its result."""

    __slots__ = ("group", "results", "unanswered", "done")

    def __init__(self, group: OrderGroup) -> None:
        self.group = group
        self.results: list[OrderResult | PaperTraderError | None] = [None] * len(group.orders)
        self.unanswered = len(group.orders)
        self.done: Deferred[list[OrderResult | PaperTraderError]] = Deferred()

    def answer(self, start: int, results: list[OrderResult | PaperTraderError]) -> None:
        """Results for the orders from ``start`` on; once every order has one, the group is answered."""
        self.results[start : start + len(results)] = results
        self.unanswered -= len(results)
        if self.unanswered == 0:
            self.done.callback(self.results)


# A part of a SubmitOrders batch: ``count`` orders of a group from its order ``start`` on.
_Segment = tuple[_Pending, int, int]


class OrderBatcher:
    """Sends the order groups that arrive in one reactor turn as SubmitOrders batches.

    A group (the orders of one PlaceOrders, or a single order) travels with
    its token and envelope once, and is answered once with a result per
    order: a group costs one Deferred however many orders it has.  A batch
    holds at most ``max_batch`` orders, and each of its values at most
    ``max_bytes`` (AMP's limit) once packed: a batch over it is sent as two
    halves instead, so no client's orders, however long their fields, can
    make a batch that fails for the others in it.  A group that does not fit
    is split across batches.  While ``master_takes_groups()`` is false (a
    master from before groups), each order travels as a row with its own
    token and envelope instead.
    """

    def __init__(
        self,
        clock: IReactorTime,
        send: Callable[..., Deferred],
        max_batch: int = MAX_ORDER_BATCH,
        master_takes_groups: Callable[[], bool] = lambda: True,
        max_bytes: int = MAX_VALUE_BYTES,
    ) -> None:
        self._clock = clock
        self._send = send
        self._max_batch = max_batch
        self._max_bytes = max_bytes
        self._master_takes_groups = master_takes_groups
        self._pending: list[_Pending] = []
        self._scheduled: Any = None

    def submit_group(self, group: OrderGroup) -> Deferred[list[OrderResult | PaperTraderError]]:
        """Queue ``group`` for the next batch; fires with, per order, its result row or the
        `PaperTraderError` saying why it could not be passed to the master (never fails)."""
        pending = _Pending(group)
        if not group.orders:
            pending.done.callback([])
            return pending.done
        self._pending.append(pending)
        if self._scheduled is None:
            self._scheduled = self._clock.callLater(0, self._flush)
        return pending.done

    def _flush(self) -> None:
        self._scheduled = None
        waiting, self._pending = self._pending, []
        segments: list[_Segment] = []
        size = 0
        for pending in waiting:
            orders = pending.group.orders
            start = 0
            while start < len(orders):
                count = min(len(orders) - start, self._max_batch - size)
                segments.append((pending, start, count))
                start += count
                size += count
                if size == self._max_batch:
                    self._send_batch(segments, size)
                    segments, size = [], 0
        if segments:
            self._send_batch(segments, size)

    def _send_batch(self, segments: list[_Segment], size: int) -> None:
        """Send the ``size`` orders of ``segments`` as one SubmitOrders, or as two halves if it would be too long."""
        groups = [
            pending.group
            if count == len(pending.group.orders)
            else attr.evolve(pending.group, orders=pending.group.orders[start : start + count])
            for pending, start, count in segments
        ]
        if self._master_takes_groups():
            value = pack_order_groups(groups)
            arguments = {"orders": [], "groups": value}
        else:
            rows = [
                OrderRequest(o.side, g.token, o.symbol, o.quantity, g.received_at, g.client_address, o.client_order_id)
                for g in groups
                for o in g.orders
            ]
            value = pack_order_requests(rows)
            arguments = {"orders": value}
        if len(value) > self._max_bytes and size > 1:
            first, second = _cut(segments, size // 2)
            self._send_batch(first, size // 2)
            self._send_batch(second, size - size // 2)
            return
        d = maybeDeferred(self._send, SubmitOrders, **arguments)
        d.addCallbacks(self._answer, self._fail, callbackArgs=(segments,), errbackArgs=(segments,))

    @staticmethod
    def _answer(answer: dict[str, Any], segments: list[_Segment]) -> None:
        results = answer["results"]
        offset = 0
        for pending, start, count in segments:
            part = results[offset : offset + count]
            if len(part) < count:
                missing = ServiceUnavailable("the master gave no answer for this order; check its outcome and retry")
                part = part + [missing] * (count - len(part))
            offset += count
            pending.answer(start, part)

    @staticmethod
    def _fail(failure: Failure, segments: list[_Segment]) -> None:
        failure = expected_or_unavailable(
            failure, "the order could not be passed to the master; not accepted", MasterLink.log
        )
        for pending, start, count in segments:
            pending.answer(start, [failure.value] * count)


def _cut(segments: list[_Segment], at: int) -> tuple[list[_Segment], list[_Segment]]:
    """``segments`` cut after their first ``at`` orders; a segment that straddles the cut, in two."""
    for index, (pending, start, count) in enumerate(segments):
        if at < count:
            rest = [(pending, start + at, count - at), *segments[index + 1 :]]
            return [*segments[:index], (pending, start, at)], rest
        at -= count
        if at == 0:
            return segments[: index + 1], segments[index + 1 :]
    return segments, []
