"""Master server communication (spec 3.2.2): one reconnecting link to the master.

`MasterLink` keeps the connection up with `ClientService` and a backoff, does
the handshake in `_handshake` (the one place worker authentication lives),
and sends commands; `OrderBatcher` packs the orders arriving in one reactor
turn into SubmitOrders batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred, fail, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.protocols import amp
from twisted.python.failure import Failure

from papertrader import __version__
from papertrader.errors import ServiceUnavailable, expected_or_unavailable
from papertrader.eventlog import EventLogger
from papertrader.protocol import (
    MAX_ORDER_BATCH,
    Heartbeat,
    ListAssets,
    OrderRequest,
    OrderResult,
    SubmitOrders,
    WorkerHello,
)
from papertrader.wire import GuardedAMP, Timeouts
from papertrader.worker.cache import QuoteCache

MASTER_UNREACHABLE = "the master server is not reachable right now; try again shortly"
# Used when a master does not say how often to send heartbeats.
DEFAULT_HEARTBEAT_INTERVAL = 10.0


class _MasterAMP(GuardedAMP):
    """The worker's side of the master connection: guarded, and kept alive by heartbeats after the handshake."""

    link: MasterLink
    _heartbeats: LoopingCall | None = None
    _interval: float | None = None

    def established(self) -> bool:
        return self._interval is not None

    def idle_timeout(self) -> float | None:
        return None if self._interval is None else 2 * self._interval

    def start_heartbeats(self, interval: float) -> None:
        """Send a Heartbeat every ``interval`` seconds; a master silent for two is given up on."""
        self._interval = interval
        self._heartbeats = LoopingCall(self.callRemote, Heartbeat)
        self._heartbeats.clock = self.clock
        self._heartbeats.start(interval, now=False)
        self.refresh_timeout()

    def connectionLost(self, reason: Any) -> None:
        if self._heartbeats is not None and self._heartbeats.running:
            self._heartbeats.stop()
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
    ) -> None:
        self._clock = clock
        self._timeouts = timeouts
        self.name = name
        self.cache = cache
        self.connection: _MasterAMP | None = None
        self.update_interval: float | None = None
        self._pushes = pushes
        factory = Factory.forProtocol(self._build)
        self.service = ClientService(
            endpoint,
            factory,
            retryPolicy=backoffPolicy(initialDelay=0.5, maxDelay=15.0),
            clock=clock,
            prepareConnection=self._handshake,
        )

    def _build(self) -> _MasterAMP:
        connection = _MasterAMP(locator=self._pushes, clock=self._clock, timeouts=self._timeouts)
        connection.link = self
        return connection

    @inlineCallbacks
    def _handshake(self, connection: _MasterAMP) -> Any:
        answer = yield connection.callRemote(WorkerHello, name=self.name, version=__version__)
        self.update_interval = answer["update_interval"]
        connection.start_heartbeats(answer.get("heartbeat_interval") or DEFAULT_HEARTBEAT_INTERVAL)
        assets = yield connection.callRemote(ListAssets)
        self.cache.load(assets["assets"], assets["tick"], assets.get("as_of"))
        self.connection = connection
        self.log.info("connected to the master as {name}", name=self.name)

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


class OrderBatcher:
    """Sends the orders that arrive in one reactor turn as SubmitOrders batches."""

    def __init__(self, clock: IReactorTime, send: Callable[..., Deferred]) -> None:
        self._clock = clock
        self._send = send
        self._pending: list[tuple[OrderRequest, Deferred]] = []
        self._scheduled: Any = None

    def submit(self, order: OrderRequest) -> Deferred[OrderResult]:
        """Queue ``order`` for the next batch; fires with its result row."""
        d: Deferred[OrderResult] = Deferred()
        self._pending.append((order, d))
        if self._scheduled is None:
            self._scheduled = self._clock.callLater(0, self._flush)
        return d

    def _flush(self) -> None:
        self._scheduled = None
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), MAX_ORDER_BATCH):
            batch = pending[start : start + MAX_ORDER_BATCH]
            d = maybeDeferred(self._send, SubmitOrders, orders=[order for order, _ in batch])
            d.addCallbacks(self._answer, self._fail, callbackArgs=(batch,), errbackArgs=(batch,))

    @staticmethod
    def _answer(answer: dict[str, Any], batch: list[tuple[OrderRequest, Deferred]]) -> None:
        for (_, d), result in zip(batch, answer["results"]):
            d.callback(result)

    @staticmethod
    def _fail(failure: Failure, batch: list[tuple[OrderRequest, Deferred]]) -> None:
        failure = expected_or_unavailable(
            failure, "the order could not be passed to the master; not accepted", MasterLink.log
        )
        for _, d in batch:
            d.errback(failure)
