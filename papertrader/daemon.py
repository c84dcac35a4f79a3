"""What the master and the worker share as daemons: refusing to start, clearly."""

from __future__ import annotations

import os
from typing import Any

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
