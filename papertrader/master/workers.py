"""Worker management (spec 3.1.5): the registry of connected workers, and local workers.

The registry holds one `ConnectedWorker` record per worker name: its
connection and what the master tracks about it (addresses, version, when it
connected, clients, commands forwarded, last heartbeat).  A second connection
under a name that is already connected is refused while the old one answers a
ping.  The registry also knows which users each connection serves, so that an
order update goes only to the workers that can have a client waiting for it,
keeps the worker directory (`papertrader.master.directory`) and pushes it to
every worker when it changes, and kicks a worker (`WorkerRegistry.kick`).
`LocalWorkers` runs ``twistd papertrader-worker`` child processes so that one
command starts a whole single-machine deployment.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import attr
from twisted.application import service
from twisted.internet import protocol
from twisted.internet.defer import Deferred, fail, gatherResults, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorProcess, IReactorTime

from papertrader.errors import ServiceUnavailable, WorkerNotConnected, WorkerRefused, expected_or_unavailable
from papertrader.eventlog import EventLogger
from papertrader.master.directory import Directory
from papertrader.master.trading import Settlement
from papertrader.protocol import (
    MAX_UPDATE_BYTES,
    MAX_UPDATES_PER_BOX,
    BootOff,
    OrderUpdates,
    Ping,
    PriceTick,
    WorkerDirectory,
    WorkerStatus,
    check_worker_address,
    pack_update,
    pack_updates,
    push_bytes,
)
from papertrader.slices import SlicedWork
from papertrader.wire import BoundedWrites

if TYPE_CHECKING:
    from papertrader.master.exchange import Exchange

# Settled orders routed (and their updates packed) in one reactor turn.
ROUTE_SLICE = 2000
# Longest version text kept for a worker (what it says is cut to this).
MAX_VERSION_LENGTH = 64
# Seconds a worker has to answer WorkerStatus.
STATUS_TIMEOUT = 10.0


@attr.s(auto_attribs=True, eq=False)
class ConnectedWorker:
    """One connected worker: its connection, and what the master tracks about it.

    Times are the injected clock's seconds.  ``clients`` is what the worker
    last reported (None until it does: a worker from before the report).
    """

    name: str
    connection: BoundedWrites
    address: str
    """Where the connection comes from (``HOST:PORT``)."""
    client_address: str | None
    """The ``HOST:PORT`` clients reach the worker on, as it said in its hello."""
    version: str
    connected_since: float
    clients: int | None = None
    commands_forwarded: int = 0
    last_heartbeat: float | None = None

    def forwarded(self, count: int = 1) -> None:
        """Count ``count`` relayed commands or orders the master answered for this worker."""
        self.commands_forwarded += count

    def heard(self, now: float, clients: int | None = None) -> None:
        """A Heartbeat arrived at ``now``, saying (if it did) how many clients the worker has."""
        self.last_heartbeat = now
        if clients is not None and clients >= 0:
            self.clients = clients


# Seconds a kicked worker has to tell its clients before the master closes its connection anyway.
BOOT_OFF_TIMEOUT = 10.0

class WorkerRegistry:
    """Connected workers by name (`ConnectedWorker` records), and what the master pushes to them.

    A name belongs to one live connection.  A second connection under a name
    that is taken is refused while the first answers a Ping; only a dead one
    (no answer within the ping timeout) is replaced.
    """

    log = EventLogger()

    def __init__(self, clock: IReactorTime | None = None, slice_size: int = ROUTE_SLICE) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self._clock = clock
        self.workers: dict[str, ConnectedWorker] = {}
        self._claiming: set[str] = set()
        # Which connections serve which users (learned from logins, orders and ServedUsers), both ways.
        self._serving: dict[str, set[BoundedWrites]] = {}
        self._users_of: dict[BoundedWrites, set[str]] = {}
        self.work = SlicedWork(clock, slice_size)
        self.directory = Directory()
        self.directory.on_change(self._push_directory)
        # The connections that take WorkerDirectory pushes: those whose hello gave a client address
        # (a worker from before the directory would count each push as a bad request).
        self._directory_readers: set[BoundedWrites] = set()

    def now(self) -> float:
        """The registry's clock, in seconds."""
        return self._clock.seconds()

    @inlineCallbacks
    def claim(
        self,
        name: str,
        connection: BoundedWrites,
        ping_timeout: float,
        version: str = "",
        client_address: str | None = None,
    ) -> Any:
        """Register ``connection`` as worker ``name``, firing with its new `ConnectedWorker` record;
        WorkerRefused if a live connection holds the name."""
        if name in self._claiming:
            raise WorkerRefused(f"another connection is claiming the name {name!r} right now")
        held = self.workers.get(name)
        old = None if held is None else held.connection
        if old is not None and old is not connection:
            self._claiming.add(name)
            try:
                alive = yield self._answers_ping(old, ping_timeout)
            finally:
                self._claiming.discard(name)
            if alive and self._holder(name) is old:
                raise WorkerRefused(
                    f"a worker named {name!r} is already connected (from {getattr(old, 'peer', 'elsewhere')}) "
                    "and answering; use another name"
                )
            if self._holder(name) is old:
                self.log.warn("worker {name}'s old connection does not answer; replacing it", name=name)
                del self.workers[name]
            if old.transport is not None:
                old.transport.abortConnection()
        if connection.transport is None:
            # It ended while the old one was being pinged: it must not hold the name.
            raise WorkerRefused("the connection ended during the handshake")
        if self._holder(name) not in (None, connection):
            raise WorkerRefused(f"another connection took the name {name!r} meanwhile")
        try:
            usable = None if client_address is None else check_worker_address(client_address)
        except ValueError:
            usable = None  # the worker is accepted, but clients are not told about it (see `publish`)
        record = ConnectedWorker(
            name=name,
            connection=connection,
            address=getattr(connection, "peer", "unknown"),
            client_address=usable,
            version=version[:MAX_VERSION_LENGTH],
            connected_since=self.now(),
        )
        self.workers[name] = record
        return record

    def _holder(self, name: str) -> BoundedWrites | None:
        record = self.workers.get(name)
        return None if record is None else record.connection

    def get(self, name: str) -> ConnectedWorker | None:
        """The record of the worker connected as ``name``, if one is."""
        return self.workers.get(name)

    def connected(self) -> list[ConnectedWorker]:
        """Every connected worker's record, by name."""
        return [self.workers[name] for name in sorted(self.workers)]

    def status(self, name: str, timeout: float = STATUS_TIMEOUT) -> Deferred[dict[str, Any]]:
        """Ask connected worker ``name`` for its live figures (WorkerStatus); fails with the reason."""
        record = self.workers.get(name)
        if record is None:
            return fail(ServiceUnavailable(f"worker {name!r} is not connected"))
        d = record.connection.callRemote(WorkerStatus)
        d.addTimeout(timeout, self._clock)
        return d.addErrback(expected_or_unavailable, f"worker {name!r} did not answer with its figures")

    def _answers_ping(self, connection: BoundedWrites, timeout: float) -> Deferred[bool]:
        d = connection.callRemote(Ping)
        d.addTimeout(timeout, self._clock)
        return d.addCallbacks(lambda _: True, lambda _: False)

    def remove(self, name: str, connection: BoundedWrites) -> None:
        """Forget ``connection`` (it ended): its name, if it still holds it, and the users it served."""
        self._directory_readers.discard(connection)
        for username in self._users_of.pop(connection, ()):
            connections = self._serving.get(username)
            if connections is not None:
                connections.discard(connection)
                if not connections:
                    del self._serving[username]
        if self._holder(name) is connection:
            del self.workers[name]
            self.directory.discard(name)
            self.log.info("worker {name} disconnected", name=name)

    # ------------------------------------------------------------ the directory, and kicking

    def publish(self, name: str, connection: BoundedWrites, client_address: str | None) -> None:
        """List worker ``name`` (just accepted on ``connection``) in the directory at ``client_address``,
        and send it the directory, now and whenever it changes.  A worker without a usable client
        address is not listed; one that gave none (from before the directory) is sent nothing."""
        if self._holder(name) is not connection or client_address is None:
            return
        self._directory_readers.add(connection)
        try:
            self.directory.set(name, client_address)
        except ValueError as e:
            self.log.warn("worker {name} is not listed for clients: {reason}", name=name, reason=e)
        connection.write(self._directory_push())  # the others got it if the list changed; this one now

    def _directory_push(self) -> bytes:
        return push_bytes(WorkerDirectory, workers=self.directory.sample())

    def _push_directory(self) -> None:
        data = self._directory_push()
        for connection in list(self._directory_readers):
            connection.write(data)

    def kick(self, name: str, reason: str, timeout: float = BOOT_OFF_TIMEOUT) -> Deferred[int | None]:
        """Boot worker ``name`` off now: unlist it, have it tell its clients to go to the other workers
        (BootOff, then GoAway to each client), then close its connection.

        Fires with how many clients the worker told (None if it did not answer
        within ``timeout``: it is closed anyway), or fails with
        WorkerNotConnected.  The worker reconnects after its refusal back-off.
        """
        record = self.workers.get(name)
        if record is None:
            return fail(WorkerNotConnected(f"no worker named {name!r} is connected"))
        connection = record.connection
        self.log.info("kicking worker {name}: {reason}", name=name, reason=reason)
        self.directory.discard(name)
        d = connection.callRemote(BootOff, reason=reason[:1000], workers=self.directory.sample(without=name))
        d.addTimeout(timeout, self._clock)

        def told(answer: Any) -> int | None:
            clients = answer.get("clients") if isinstance(answer, dict) else None
            if clients is None:
                self.log.warn("worker {name} did not confirm its boot-off; closing it anyway", name=name)
            if connection.transport is not None:
                connection.close()
            return clients

        return d.addBoth(told)

    def serves(self, connection: BoundedWrites, username: str) -> None:
        """Note that ``connection`` (a worker) has a client acting for ``username``.

        Kept until the connection ends: a user who logged out there costs a wasted push, no more.
        """
        if connection.transport is None:
            return  # it ended already: nothing would forget it
        users = self._users_of.setdefault(connection, set())
        if username not in users:
            users.add(username)
            self._serving.setdefault(username, set()).add(connection)

    def serving(self, username: str) -> set[BoundedWrites]:
        """The worker connections that serve ``username``."""
        return set(self._serving.get(username, ()))

    def follow(self, exchange: Exchange) -> None:
        """Push the order outcomes of ``exchange`` as each chunk of a settlement is committed, and
        its prices once the update has settled."""
        exchange.on_settled(self.push_updates)
        exchange.on_tick(self.broadcast_tick)

    def broadcast_tick(
        self, tick: int, as_of: str, prices: dict[str, int], stale: dict[str, str] | None = None
    ) -> None:
        """Push the new prices (and which are stale, and why) to every worker, encoded once for all of them."""
        self.work.add(self._tick_writes(tick, as_of, prices, stale or {}))

    def push_updates(self, tick: int, as_of: str, settlements: Sequence[Settlement]) -> None:
        """Push each order outcome to the workers serving its user: packed into compact boxes, each
        user's together, a slice of orders per reactor turn."""
        if settlements:
            self.work.add(self._update_writes(as_of, settlements))

    def _tick_writes(self, tick: int, as_of: str, prices: dict[str, int], stale: dict[str, str]) -> Iterator[None]:
        rows = [{"symbol": symbol, "price_cents": cents} for symbol, cents in prices.items()]
        extra = {"stale": stale} if stale else {}
        data = push_bytes(PriceTick, tick=tick, as_of=as_of, prices=rows, **extra)
        for record in list(self.workers.values()):
            record.connection.write(data)
            yield None

    def _update_writes(self, settled_at: str, settlements: Sequence[Settlement]) -> Iterator[None]:
        # Each worker's rows gathered user by user first, then packed in that order: a
        # worker passes each box on as one push per user in it, so a user's updates
        # spread over every box (a settlement interleaves users) made as many pushes
        # for each user as there were boxes -- 100,000 orders of 1,000 users: some
        # 90,000 tiny pushes instead of about 1,000.
        rows: dict[BoundedWrites, dict[str, list[bytes]]] = {}
        for settlement in settlements:
            username = settlement.order.username
            connections = self._serving.get(username)
            if connections:
                row = _packed(settlement)
                for connection in connections:
                    rows.setdefault(connection, {}).setdefault(username, []).append(row)
            yield None
        for connection, users in rows.items():
            box = _UpdateBox()
            for user_rows in users.values():
                for row in user_rows:
                    if not box.fits(row):
                        box.send(connection, settled_at)
                    box.add(row)
                    yield None
            box.send(connection, settled_at)
            yield None


class _UpdateBox:
    """The packed order updates gathering for one worker, sent when the next would not fit."""

    def __init__(self) -> None:
        self.rows: list[bytes] = []
        self.size = 0

    def fits(self, row: bytes) -> bool:
        return len(self.rows) < MAX_UPDATES_PER_BOX and self.size + len(row) + 1 <= MAX_UPDATE_BYTES

    def add(self, row: bytes) -> None:
        self.rows.append(row)
        self.size += len(row) + 1

    def send(self, connection: BoundedWrites, settled_at: str) -> None:
        if self.rows and connection.transport is not None:
            connection.write(push_bytes(OrderUpdates, settled_at=settled_at, updates=pack_updates(self.rows)))
        self.rows = []
        self.size = 0


def _packed(settlement: Settlement) -> bytes:
    order = settlement.order
    return pack_update(
        order.username,
        order.order_id,
        order.side,
        order.symbol,
        order.quantity,
        settlement.status,
        settlement.price_cents,
        settlement.reason,
    )


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
