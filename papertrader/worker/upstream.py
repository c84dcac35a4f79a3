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
from twisted.protocols import amp
from twisted.python.failure import Failure

from papertrader import __version__
from papertrader.assets import MAX_ASSETS
from papertrader.errors import ServiceUnavailable, expected_or_unavailable
from papertrader.eventlog import EventLogger
from papertrader.protocol import MAX_ORDER_BATCH, ListAssets, SubmitOrders, WorkerHello
from papertrader.worker.cache import QuoteCache

MASTER_UNREACHABLE = "the master server is not reachable right now; try again shortly"
# Times the asset list is read again when a price update came between its pages.
ASSET_LIST_ATTEMPTS = 3


class _MasterAMP(amp.AMP):
    """The worker's side of the master connection."""

    link: MasterLink

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
    ) -> None:
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
        connection = _MasterAMP(locator=self._pushes)
        connection.link = self
        return connection

    @inlineCallbacks
    def _handshake(self, connection: _MasterAMP) -> Any:
        answer = yield connection.callRemote(WorkerHello, name=self.name, version=__version__)
        self.update_interval = answer["update_interval"]
        for _ in range(ASSET_LIST_ATTEMPTS):
            assets, ticks = yield self._read_asset_list(connection)
            if len(ticks) == 1:
                break
        # Pages of different updates (every attempt raced one): the oldest tick, so the next update replaces all.
        tick, as_of = min(ticks, key=lambda t: t[0])
        self.cache.load(assets, tick, as_of)
        self.connection = connection
        self.log.info("connected to the master as {name}", name=self.name)

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
        self._pending: list[tuple[dict[str, str], Deferred]] = []
        self._scheduled: Any = None

    def submit(self, order: dict[str, str]) -> Deferred[dict[str, Any]]:
        """Queue ``order`` for the next batch; fires with its result row."""
        d: Deferred[dict[str, Any]] = Deferred()
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
    def _answer(answer: dict[str, Any], batch: list[tuple[dict, Deferred]]) -> None:
        for (_, d), result in zip(batch, answer["results"]):
            d.callback(result)

    @staticmethod
    def _fail(failure: Failure, batch: list[tuple[dict, Deferred]]) -> None:
        failure = expected_or_unavailable(
            failure, "the order could not be passed to the master; not accepted", MasterLink.log
        )
        for _, d in batch:
            d.errback(failure)
