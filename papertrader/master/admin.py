"""The master's side of the admin socket: what ``papertrader-admin`` may do, and its responders.

`WorkerAdmin` is the domain: it puts together the connected workers
(`WorkerRegistry`, its `ConnectedWorker` records) and the stored
registrations (`WorkerRegistrations`) into the rows and answers the admin
tool shows, and carries out its changes (a disabled or removed worker is
disconnected).  `AdminLocator` only translates the admin Commands to it and
its failures to declared errors; `AdminAMP`/`AdminFactory` are the bounded
connections of the UNIX socket (see `papertrader.admin.unixsocket`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.protocols import amp
from twisted.python.failure import Failure

from papertrader.admin.protocol import (
    MAX_KEY_BYTES,
    MAX_NETWORK_LENGTH,
    MAX_NETWORKS,
    MAX_NETWORKS_TEXT,
    MAX_WORKER_NAME,
    WORKER_ROWS_PER_PAGE,
    AddWorker,
    DisableWorker,
    EnableWorker,
    KickWorker,
    ListAllWorkers,
    RemoveWorker,
    WorkerInfo,
)
from papertrader.errors import (
    AdminRefused,
    PaperTraderError,
    ServiceUnavailable,
    UnknownWorker,
    WorkerExists,
    WorkerKeyRejected,
    WorkerNotConnected,
)
from papertrader.eventlog import EventLogger
from papertrader.master.workers import STATUS_TIMEOUT, ConnectedWorker, WorkerRegistry
from papertrader.paging import BadCursor, page_of_sequence
from papertrader.timestamps import iso
from papertrader.wire import GuardedAMP, GuardedFactory

# Admin connections held at once (one administrator rarely needs more than one).
MAX_ADMIN_CONNECTIONS = 16
KICK_REASON = "the administrator disconnected this worker"


def _when(value: Any) -> str | None:
    """An instant as ISO text (the clock's seconds, or text already)."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return iso(value)
    return str(value)


def _networks(registered: Any) -> list[str]:
    return [str(network) for network in (getattr(registered, "networks", None) or ())]


def worker_row(name: str, registered: Any | None, record: ConnectedWorker | None) -> dict[str, Any]:
    """What the admin tool lists of one worker: stored facts if it is registered, tracked ones if connected."""
    row: dict[str, Any] = {"name": name, "registered": registered is not None, "connected": record is not None}
    if registered is not None:
        row["enabled"] = bool(registered.enabled)
        row["fingerprint"] = registered.fingerprint
        networks = ",".join(_networks(registered))
        if len(networks) > MAX_NETWORKS_TEXT:
            networks = networks[: MAX_NETWORKS_TEXT - 3] + "..."
        if networks:
            row["networks"] = networks
    if record is not None:
        row["address"] = record.address
        if record.client_address is not None:
            row["client_address"] = record.client_address
        row["version"] = record.version
        row["connected_since"] = _when(record.connected_since)
        if record.clients is not None:
            row["clients"] = record.clients
        row["commands_forwarded"] = record.commands_forwarded
        if record.last_heartbeat is not None:
            row["last_heartbeat"] = _when(record.last_heartbeat)
    return row


def stored_row(registered: Any) -> dict[str, Any]:
    """A registration as AddWorker answers it."""
    return {
        "name": registered.name,
        "uuid": str(registered.uuid),
        "fingerprint": registered.fingerprint,
        "networks": _networks(registered),
        "enabled": bool(registered.enabled),
        "added_at": _when(registered.added_at) or "",
    }


def check_name(name: str) -> None:
    """AdminRefused for text that cannot be a worker's name."""
    if not name or len(name) > MAX_WORKER_NAME or not name.isprintable():
        raise AdminRefused(f"a worker name is 1-{MAX_WORKER_NAME} printable characters")


class WorkerAdmin:
    """The workers as the administrator sees them: connected ones (tracked) and registered ones (stored).

    ``registrations`` is the stored registry of allowed workers
    (`papertrader.master.registration.WorkerRegistrations`: `find`, `list`, `add`,
    `set_enabled`, `remove`); without one, only
    connected workers are known and the changes to the registry are refused.
    """

    log = EventLogger()

    def __init__(
        self, registry: WorkerRegistry, registrations: Any | None = None, status_timeout: float = STATUS_TIMEOUT
    ) -> None:
        self.registry = registry
        self.registrations = registrations
        self.status_timeout = status_timeout

    # ------------------------------------------------------------ reading

    def _registered(self) -> Deferred[list[Any]]:
        if self.registrations is None:
            return succeed([])
        return maybeDeferred(self.registrations.list)

    def _one_registered(self, name: str) -> Deferred[Any]:
        if self.registrations is None:
            return succeed(None)
        return maybeDeferred(self.registrations.find, name)

    @inlineCallbacks
    def workers(self) -> Any:
        """Every worker the master knows (registered or connected), as list rows, by name."""
        registered = {worker.name: worker for worker in (yield self._registered())}
        connected = {record.name: record for record in self.registry.connected()}
        names = sorted({*registered, *connected})
        return [worker_row(name, registered.get(name), connected.get(name)) for name in names]

    @inlineCallbacks
    def info(self, name: str) -> Any:
        """One worker's row, its stored identity, and the live figures it gives when asked."""
        check_name(name)
        registered = yield self._one_registered(name)
        record = self.registry.get(name)
        if registered is None and record is None:
            raise UnknownWorker(f"no worker named {name!r} is registered or connected")
        answer = worker_row(name, registered, record)
        if registered is not None:
            stored = stored_row(registered)
            answer.update(uuid=stored["uuid"], all_networks=stored["networks"], added_at=stored["added_at"])
        if record is None:
            answer["live_error"] = "not connected"
        else:
            try:
                answer["live"] = yield self.registry.status(name, self.status_timeout)
            except PaperTraderError as e:
                answer["live_error"] = str(e)
        return answer

    # ------------------------------------------------------------ changing

    def _registrations(self) -> Any:
        if self.registrations is None:
            raise AdminRefused("this master keeps no registry of workers")
        return self.registrations

    @inlineCallbacks
    def add(self, name: str, key: str, networks: Iterable[str] = ()) -> Any:
        """Register worker ``name`` with its armored public ``key`` and allowed ``networks``."""
        check_name(name)
        networks = list(networks)
        if len(key.encode("utf-8")) > MAX_KEY_BYTES:
            raise AdminRefused(f"the key is longer than {MAX_KEY_BYTES} bytes; export the public key only")
        if len(networks) > MAX_NETWORKS or any(len(n) > MAX_NETWORK_LENGTH for n in networks):
            raise AdminRefused(f"at most {MAX_NETWORKS} networks of at most {MAX_NETWORK_LENGTH} characters")
        registered = yield self._registrations().add(name, key, networks)
        row = stored_row(registered)
        self.log.info(
            "the administrator registered worker {name} (key {fingerprint}, networks {networks})",
            name=name, fingerprint=row["fingerprint"], networks=",".join(row["networks"]) or "any",
        )
        return row

    @inlineCallbacks
    def _registered_or_unknown(self, name: str) -> Any:
        check_name(name)
        registered = yield maybeDeferred(self._registrations().find, name)
        if registered is None:
            raise UnknownWorker(f"no worker named {name!r} is registered")
        return registered

    @inlineCallbacks
    def set_enabled(self, name: str, enabled: bool) -> Any:
        """Enable or disable registered worker ``name``; a disabled one that is connected is disconnected."""
        yield self._registered_or_unknown(name)
        yield self.registrations.set_enabled(name, enabled)
        self.log.info("the administrator {what} worker {name}", what="enabled" if enabled else "disabled", name=name)
        disconnected = False if enabled else (yield self._disconnect(name))
        return {"name": name, "enabled": enabled, "disconnected": disconnected}

    @inlineCallbacks
    def remove(self, name: str) -> Any:
        """Forget registered worker ``name``; if it is connected, it is disconnected."""
        yield self._registered_or_unknown(name)
        yield self.registrations.remove(name)
        self.log.info("the administrator removed worker {name}", name=name)
        disconnected = yield self._disconnect(name)
        return {"name": name, "disconnected": disconnected}

    @inlineCallbacks
    def kick(self, name: str) -> Any:
        """Boot worker ``name`` off now (its clients are told to go to the other workers); UnknownWorker if it
        is not connected.  It may connect again (after its back-off)."""
        check_name(name)
        if not (yield self._disconnect(name)):
            raise UnknownWorker(f"no worker named {name!r} is connected")
        answer: dict[str, Any] = {"name": name, "disconnected": True}
        registered = yield self._one_registered(name)
        if registered is not None:
            answer["enabled"] = bool(registered.enabled)
        return answer

    @inlineCallbacks
    def _disconnect(self, name: str) -> Any:
        """Kick worker ``name`` if it is connected (`WorkerRegistry.kick`); whether it was."""
        if self.registry.get(name) is None:
            return False
        try:
            yield self.registry.kick(name, KICK_REASON)
        except WorkerNotConnected:
            return False  # it went away meanwhile
        return True


def _answered(responder: Callable[..., Any]) -> Callable[..., Any]:
    """Answer every failure with a declared error: the admin errors as they are, another domain error as
    AdminRefused with its reason, anything else (a bug, the database) as ServiceUnavailable (logged)."""

    @functools.wraps(responder)
    def answered(self: AdminLocator, *args: Any, **kwargs: Any) -> Deferred:
        return maybeDeferred(responder, self, *args, **kwargs).addErrback(_declared)

    return answered


def _declared(failure: Failure) -> Failure:
    if failure.check(UnknownWorker, AdminRefused, ServiceUnavailable, WorkerExists, WorkerKeyRejected):
        return failure
    if failure.check(PaperTraderError):
        return Failure(AdminRefused(str(failure.value)))
    AdminLocator.log.failure("an admin request failed", failure)
    return Failure(ServiceUnavailable("the master could not complete the request; see its log"))


class AdminLocator(amp.CommandLocator):
    """Answers one admin connection (the socket's permissions already decided who may connect)."""

    log = EventLogger()

    def __init__(self, admin: WorkerAdmin) -> None:
        self.admin = admin
        self.connection: AdminAMP | None = None

    @ListAllWorkers.responder
    @_answered
    @inlineCallbacks
    def list_workers(self, cursor: str | None = None) -> Any:
        rows = yield self.admin.workers()
        try:
            page = page_of_sequence(rows, WORKER_ROWS_PER_PAGE, cursor)
        except BadCursor:
            raise AdminRefused("the list of workers changed, or this cursor is not from it; list again") from None
        return page.answer("workers")

    @WorkerInfo.responder
    @_answered
    def worker_info(self, name: str) -> Deferred:
        return self.admin.info(name)

    @AddWorker.responder
    @_answered
    def add_worker(self, name: str, key: str, networks: list[str] | None = None) -> Deferred:
        return self.admin.add(name, key, networks or ())

    @EnableWorker.responder
    @_answered
    def enable_worker(self, name: str) -> Deferred:
        return self.admin.set_enabled(name, True)

    @DisableWorker.responder
    @_answered
    def disable_worker(self, name: str) -> Deferred:
        return self.admin.set_enabled(name, False)

    @RemoveWorker.responder
    @_answered
    def remove_worker(self, name: str) -> Deferred:
        return self.admin.remove(name)

    @KickWorker.responder
    @_answered
    def kick_worker(self, name: str) -> Deferred:
        return self.admin.kick(name)


class AdminAMP(GuardedAMP):
    """One connection to the admin socket: bounded like every other (boxes, bad requests, timeouts)."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.peer = "the admin socket"
        self._arm(self.timeouts.handshake, "sent no command within")


class AdminFactory(GuardedFactory):
    """Builds an `AdminAMP`, with a fresh locator, for each connection to the admin socket."""

    protocol = AdminAMP
