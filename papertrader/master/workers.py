"""Worker management (spec 3.1.5): the registry of connected workers, and local workers.

The registry keys connections by worker name; a second connection under a
name that is already connected is refused while the old one answers a ping.
`LocalWorkers` runs ``twistd papertrader-worker`` child processes so that one
command starts a whole single-machine deployment.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterable
from typing import Any

from twisted.application import service
from twisted.internet import protocol
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.protocols import amp

from papertrader.errors import WorkerRefused
from papertrader.eventlog import EventLogger
from papertrader.master.trading import Settlement
from papertrader.protocol import MAX_UPDATE_BATCH, OrderUpdates, Ping, PriceTick


class WorkerRegistry:
    """Connected workers by name, and what the master pushes to them.

    A name belongs to one live connection.  A second connection under a name
    that is taken is refused while the first answers a Ping; only a dead one
    (no answer within the ping timeout) is replaced.
    """

    log = EventLogger()

    def __init__(self, clock: IReactorTime | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self._clock = clock
        self.workers: dict[str, amp.AMP] = {}
        self._claiming: set[str] = set()

    @inlineCallbacks
    def claim(self, name: str, connection: amp.AMP, ping_timeout: float) -> Any:
        """Register ``connection`` as worker ``name``; WorkerRefused if a live connection holds the name."""
        if name in self._claiming:
            raise WorkerRefused(f"another connection is claiming the name {name!r} right now")
        old = self.workers.get(name)
        if old is not None and old is not connection:
            self._claiming.add(name)
            try:
                alive = yield self._answers_ping(old, ping_timeout)
            finally:
                self._claiming.discard(name)
            if alive and self.workers.get(name) is old:
                raise WorkerRefused(
                    f"a worker named {name!r} is already connected (from {getattr(old, 'peer', 'elsewhere')}) "
                    "and answering; use another name"
                )
            if self.workers.get(name) is old:
                self.log.warn("worker {name}'s old connection does not answer; replacing it", name=name)
                del self.workers[name]
            if old.transport is not None:
                old.transport.abortConnection()
        if connection.transport is None:
            # It ended while the old one was being pinged: it must not hold the name.
            raise WorkerRefused("the connection ended during the handshake")
        if name in self.workers and self.workers[name] is not connection:
            raise WorkerRefused(f"another connection took the name {name!r} meanwhile")
        self.workers[name] = connection

    def _answers_ping(self, connection: amp.AMP, timeout: float) -> Deferred[bool]:
        d = connection.callRemote(Ping)
        d.addTimeout(timeout, self._clock)
        return d.addCallbacks(lambda _: True, lambda _: False)

    def remove(self, name: str, connection: amp.AMP) -> None:
        if self.workers.get(name) is connection:
            del self.workers[name]
            self.log.info("worker {name} disconnected", name=name)

    def broadcast_tick(
        self, tick: int, as_of: str, prices: dict[str, int], settlements: list[Settlement]
    ) -> None:
        """Push the new prices and every order outcome to every worker."""
        updates = [_update(s, as_of) for s in settlements]
        for connection in list(self.workers.values()):
            connection.callRemote(
                PriceTick,
                tick=tick,
                as_of=as_of,
                prices=[{"symbol": s, "price_cents": c} for s, c in prices.items()],
            )
            for start in range(0, len(updates), MAX_UPDATE_BATCH):
                connection.callRemote(OrderUpdates, updates=updates[start : start + MAX_UPDATE_BATCH])


def _update(settlement: Settlement, as_of: str) -> dict[str, Any]:
    order = settlement.order
    update: dict[str, Any] = {
        "username": order.username,
        "order_id": order.order_id,
        "side": order.side,
        "symbol": order.symbol,
        "quantity": order.quantity,
        "status": settlement.status,
        "settled_at": as_of,
    }
    if settlement.price_cents is not None:
        update["price_cents"] = settlement.price_cents
    if settlement.reason is not None:
        update["reason"] = settlement.reason
    return update


class _ChildProtocol(protocol.ProcessProtocol):
    """Watches one worker process."""

    def __init__(self, owner: LocalWorkers, name: str) -> None:
        self.owner = owner
        self.name = name
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)
        self.owner._ended(self.name, reason)


class LocalWorkers(service.Service):
    """Runs worker processes on this machine and restarts any that die."""

    log = EventLogger()

    def __init__(
        self,
        reactor: IReactorProcess | IReactorTime,
        commands: Callable[[], Deferred[Iterable[tuple[str, list[str]]]]],
        restart_delay: float = 2.0,
    ) -> None:
        self._reactor = reactor
        self._get_commands = commands
        self._commands: dict[str, list[str]] = {}
        self._restart_delay = restart_delay
        self._children: dict[str, _ChildProtocol] = {}
        self._transports: dict[str, Any] = {}

    def startService(self) -> None:
        """Start every worker once ``commands()`` says how (it waits for the master's listener)."""
        super().startService()
        self._get_commands().addCallback(self._start_all)

    def _start_all(self, commands: Iterable[tuple[str, list[str]]]) -> None:
        self._commands = dict(commands)
        for name in self._commands:
            self._spawn(name)

    def _spawn(self, name: str) -> None:
        if not self.running:
            return
        child = _ChildProtocol(self, name)
        args = self._commands[name]
        self.log.info("starting local worker {name}", name=name)
        self._children[name] = child
        self._transports[name] = self._reactor.spawnProcess(
            child, sys.executable, [sys.executable, *args], env=_child_env(), childFDs={0: "w", 1: 1, 2: 2}
        )

    def _ended(self, name: str, reason: Any) -> None:
        self._transports.pop(name, None)
        if self.running:
            self.log.warn(
                "local worker {name} exited ({reason}); restarting", name=name, reason=reason.value
            )
            self._reactor.callLater(self._restart_delay, self._spawn, name)

    def stopService(self) -> Deferred:
        super().stopService()
        waits = []
        for name, transport in list(self._transports.items()):
            try:
                transport.signalProcess(signal.SIGTERM)
            except Exception:
                continue
            waits.append(self._children[name].ended)
        if not waits:
            return succeed(None)
        return gatherResults(waits)


def _child_env() -> dict[str, str]:
    """The master's environment, with this PaperTrader importable in the child."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env
