"""Big pushes in slices: queued jobs run a bounded number of steps per reactor turn.

A price tick for 10,000 connections, or the order updates of 100,000 settled
orders, is too much work for one reactor turn: everything else (orders,
answers, heartbeats) would wait behind it.  `SlicedWork` runs such jobs a
bounded number of steps at a time, in the order they were queued, with the
other events of the reactor in between.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterator
from typing import Any

from twisted.internet.interfaces import IReactorTime

from papertrader.eventlog import EventLogger


class SlicedWork:
    """Runs queued jobs (iterators: each ``next()`` is one step) at most ``steps_per_turn`` steps a reactor turn.

    Jobs run one after the other, in the order they were added.  A job added
    with a ``supersedes`` key replaces the queued or unfinished job with the
    same key (say, the previous price tick's fan-out: its remaining steps are
    dropped, the new one reaches everyone).
    """

    log = EventLogger()

    def __init__(self, clock: IReactorTime, steps_per_turn: int) -> None:
        if steps_per_turn < 1:
            raise ValueError("steps_per_turn must be at least 1")
        self._clock = clock
        self.steps_per_turn = steps_per_turn
        self._jobs: deque[tuple[Hashable | None, Iterator[Any]]] = deque()
        self._scheduled: Any = None

    @property
    def pending(self) -> int:
        """Jobs queued or unfinished."""
        return len(self._jobs)

    def add(self, job: Iterator[Any], supersedes: Hashable | None = None) -> None:
        """Queue ``job``; its first steps run in a later reactor turn, never during this call."""
        if supersedes is not None:
            self._jobs = deque((key, queued) for key, queued in self._jobs if key != supersedes)
        self._jobs.append((supersedes, job))
        if self._scheduled is None:
            self._scheduled = self._clock.callLater(0, self._run)

    def _run(self) -> None:
        self._scheduled = None
        steps = 0
        while self._jobs and steps < self.steps_per_turn:
            _, job = self._jobs[0]
            try:
                next(job)
            except StopIteration:
                self._jobs.popleft()
                continue
            except Exception:
                # One broken job must not stop the pushes queued after it.
                self.log.failure("a sliced job failed; dropping the rest of it")
                self._jobs.popleft()
                continue
            steps += 1
        if self._jobs:
            self._scheduled = self._clock.callLater(0, self._run)
