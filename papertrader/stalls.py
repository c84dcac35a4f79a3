"""How long the reactor was kept from running its due calls: a stall monitor for benchmarks.

Off unless the environment sets ``PAPERTRADER_STALL_MONITOR`` to a number of
seconds (the sampling interval, e.g. ``0.005``).  A worker started so logs one
line per price update (``stall report: ...``) with the longest stall since the
previous update: what its clients waited at worst for anything at all.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime

from papertrader.eventlog import EventLogger

STALL_MONITOR_ENV = "PAPERTRADER_STALL_MONITOR"


def interval_from_environment(environ: dict[str, str] | None = None) -> float | None:
    """The sampling interval ``PAPERTRADER_STALL_MONITOR`` asks for, or None (off, or not a positive number)."""
    text = (os.environ if environ is None else environ).get(STALL_MONITOR_ENV, "")
    try:
        interval = float(text)
    except ValueError:
        return None
    return interval if interval > 0 else None


class StallMonitor:
    """Schedules a call every ``interval`` seconds and notes how late each one ran: the reactor's stalls."""

    log = EventLogger()

    def __init__(self, clock: IReactorTime, interval: float, clients: Callable[[], int] = lambda: 0) -> None:
        self._clock = clock
        self.interval = interval
        self._clients = clients
        self.longest = 0.0
        self._due = 0.0
        self._call: Any = None
        self._period: int | None = None
        # The longest garbage collection in the period: a stall the reactor cannot help.
        self.longest_gc = 0.0
        self._gc_started: float | None = None

    def start(self) -> None:
        self._due = self._clock.seconds() + self.interval
        self._call = self._clock.callLater(self.interval, self._beat)
        gc.callbacks.append(self._collecting)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._collecting in gc.callbacks:
            gc.callbacks.remove(self._collecting)

    def _collecting(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            self.longest_gc = max(self.longest_gc, time.perf_counter() - self._gc_started)
            self._gc_started = None

    def _beat(self) -> None:
        now = self._clock.seconds()
        self.longest = max(self.longest, now - self._due)
        self._due = now + self.interval
        self._call = self._clock.callLater(self.interval, self._beat)

    def update_arrived(self, tick: int) -> None:
        """Report the longest stall since the previous update's arrival (its push happened then), and start anew."""
        if self._period is not None:
            self.log.info(
                "stall report: update {tick} longest_stall_ms={ms:.3f} clients={clients} longest_gc_ms={gc_ms:.3f}",
                tick=self._period,
                ms=self.longest * 1000,
                clients=self._clients(),
                gc_ms=self.longest_gc * 1000,
            )
        self._period = tick
        self.longest = 0.0
        self.longest_gc = 0.0
