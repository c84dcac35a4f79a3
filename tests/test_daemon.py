"""The start-up outcome the master's and worker's services wait for."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from papertrader.daemon import StartUp


class StoppingReactor:
    """Records what `abort_start` asks of a reactor that is not running yet."""

    running = False

    def __init__(self) -> None:
        self.when_running: list[Any] = []

    def callWhenRunning(self, f: Any, *args: Any) -> None:
        self.when_running.append(f)


class StartUpTests(SynchronousTestCase):
    """`StartUp` tells every waiter once, and `ready` fires once whatever the waiters do."""

    def setUp(self) -> None:
        self.reactor = StoppingReactor()
        self.start_up = StartUp(self.reactor, "master")

    def test_waiters_then_ready(self) -> None:
        """Waiters before and after success get the result; ready fires with True."""
        early = self.start_up.when_done()
        self.start_up.succeeded("port 1234")
        self.assertEqual(self.successResultOf(early), "port 1234")
        self.assertEqual(self.successResultOf(self.start_up.when_done()), "port 1234")
        self.assertIs(self.successResultOf(self.start_up.ready), True)

    def test_waiter_fails_start_up(self) -> None:
        """A waiter that fails start-up while being told of success (its listener cannot listen) leaves ready
        fired once, with False, instead of raising AlreadyCalledError into start-up."""
        waiter = self.start_up.when_done()
        waiter.addCallback(lambda _: self.start_up.failed(Failure(OSError("address in use"))))
        self.start_up.succeeded("port 1234")
        self.successResultOf(waiter)
        self.assertIs(self.successResultOf(self.start_up.ready), False)
        self.assertEqual(len(self.reactor.when_running), 1)  # the process is stopping

    def test_failure_releases_waiters(self) -> None:
        """When start-up fails, every waiter is cancelled and the process is stopped."""
        waiter = self.start_up.when_done()
        self.start_up.failed(Failure(ValueError("no database")))
        self.failureResultOf(waiter, CancelledError)
        self.assertIs(self.successResultOf(self.start_up.ready), False)
        self.assertEqual(len(self.reactor.when_running), 1)
