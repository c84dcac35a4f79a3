"""What the master and the worker share as daemons: refusing to start, clearly."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.python.failure import Failure

from papertrader.eventlog import EventLogger

# Exit status of a daemon that could not start.
EXIT_START_FAILED = 1

log = EventLogger()


def abort_start(reactor: Any, role: str, failure: Failure) -> None:
    """Log why ``role`` could not start, then stop the process with a non-zero exit status.

    twistd itself always exits 0 once its reactor stops, so the status is set by
    exiting right after the reactor's shutdown (services are stopped by then).
    """
    log.critical("the {role} could not start: {why}", role=role, why=_reason(failure))
    log.debug("start-up failure:\n{traceback}", traceback=failure.getTraceback())

    def stop() -> None:
        reactor.addSystemEventTrigger("after", "shutdown", os._exit, EXIT_START_FAILED)
        reactor.stop()

    if reactor.running:
        stop()
    else:
        reactor.callWhenRunning(stop)


def _reason(failure: Failure) -> str:
    message = failure.getErrorMessage()
    name = failure.type.__name__ if failure.type else "error"
    return f"{name}: {message}" if message else name


class StartUp:
    """The outcome of a daemon's start-up, for the services that must wait for it.

    Each waiter gets a Deferred of its own from `when_done`: it fires with
    start-up's result, or fails with CancelledError if start-up failed (the
    process is then stopping, through `abort_start`).  `ready` fires once
    start-up is over: with True if it succeeded, False if it failed (the
    reason is logged by `abort_start`).
    """

    def __init__(self, reactor: Any, role: str) -> None:
        self.reactor = reactor
        self.role = role
        self.ready: Deferred[bool] = Deferred()
        self._done = False
        self._result: Any = None
        self._waiting: list[Deferred[Any]] = []

    def when_done(self) -> Deferred[Any]:
        """Fires with start-up's result once it is done."""
        if self._done:
            return succeed(self._result)
        d: Deferred[Any] = Deferred()
        self._waiting.append(d)
        return d

    def succeeded(self, result: Any) -> None:
        self._done, self._result = True, result
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(result)
        if not self.ready.called:  # a waiter may already have failed start-up
            self.ready.callback(True)

    def failed(self, failure: Failure) -> None:
        """Release the waiters, then stop the process with the reason and exit status 1."""
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(CancelledError(f"the {self.role} could not start"))
        if not self.ready.called:
            self.ready.callback(False)
        abort_start(self.reactor, self.role, failure)
