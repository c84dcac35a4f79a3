"""The worker directory (spec 3.2.3): which workers clients may use, and the listener that tells them.

`Directory` holds the client address (``HOST:PORT``) of every connected,
enabled worker that gave one at its handshake; `WorkerRegistry` keeps it up to
date and pushes it to every worker when it changes (the workers pass it on in
their login answers).  `DirectoryLocator` answers the master's directory
listener, which clients reach over TLS with the deployment's CA (no client
certificate): it answers ListWorkers, in numbered pages, and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.protocols import amp

from papertrader.errors import DataFailed
from papertrader.paging import BadCursor, page_of_sequence
from papertrader.protocol import MAX_LISTED_WORKERS, WORKERS_PER_PAGE, ListWorkers, check_worker_address
from papertrader.wire import GuardedAMP, GuardedFactory


class Directory:
    """The client addresses of the workers clients may use, by worker name.

    ``on_change`` callbacks run after every change (not when a call changes nothing).
    """

    def __init__(self) -> None:
        self._addresses: dict[str, str] = {}
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def set(self, name: str, address: str) -> None:
        """List worker ``name`` at ``address`` (ValueError if it is not a HOST:PORT)."""
        check_worker_address(address)
        if self._addresses.get(name) != address:
            self._addresses[name] = address
            self._changed()

    def discard(self, name: str) -> None:
        """Stop listing worker ``name`` (if it is listed)."""
        if self._addresses.pop(name, None) is not None:
            self._changed()

    def address_of(self, name: str) -> str | None:
        return self._addresses.get(name)

    def entries(self) -> list[dict[str, str]]:
        """Every listed worker as ``{"name", "address"}``, by name."""
        return [{"name": name, "address": self._addresses[name]} for name in sorted(self._addresses)]

    def sample(self, without: str | None = None) -> list[dict[str, str]]:
        """What a push, a login answer or a GoAway carries: at most MAX_LISTED_WORKERS entries,
        without worker ``without``."""
        return [entry for entry in self.entries() if entry["name"] != without][:MAX_LISTED_WORKERS]

    def _changed(self) -> None:
        for callback in list(self._listeners):
            callback()


class DirectoryLocator(amp.CommandLocator):
    """Answers one client of the directory listener: ListWorkers, nothing else (anything else is a bad request)."""

    def __init__(self, directory: Directory) -> None:
        self.directory = directory
        self.connection: Any = None

    @ListWorkers.responder
    def list_workers(self, cursor: str | None = None) -> Any:
        try:
            page = page_of_sequence(self.directory.entries(), WORKERS_PER_PAGE, cursor)
        except BadCursor:
            raise DataFailed("the worker directory changed, or this cursor is not from it; list again") from None
        return page.answer("workers")


class DirectoryFactory(GuardedFactory):
    """Builds a guarded connection (timeouts, box limits, bounded logs) for each directory client."""

    protocol = GuardedAMP
