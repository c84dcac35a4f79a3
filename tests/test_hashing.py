"""Password hashing in a bounded pool of child processes."""

from __future__ import annotations

import io
import os
from typing import Any

import bcrypt
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ProcessTerminated
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from papertrader.errors import Busy, ServiceUnavailable
from papertrader.master.hashing import HashingPool, default_processes, serve
from tests.support import PASSWORD, Deployment


class FakeChild:
    """The transport of a hashing child that answers only when the test says so."""

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.requests: list[bytes] = []
        self.stdin_closed = False
        protocol.makeConnection(self)

    def write(self, data: bytes) -> None:
        self.requests.append(data)

    def answer(self) -> None:
        """Run the oldest request as the real child would, and send its answer back."""
        answers = io.BytesIO()
        serve(io.BytesIO(self.requests.pop(0)), answers)
        self.protocol.outReceived(answers.getvalue())

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def die(self) -> None:
        self.protocol.processEnded(Failure(ProcessTerminated(signal=9)))


class FakeProcessReactor:
    """Records the hashing children a pool starts."""

    def __init__(self) -> None:
        self.children: list[FakeChild] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: Any = None) -> FakeChild:
        child = FakeChild(protocol)
        self.children.append(child)
        return child


class HashingPoolTests(SynchronousTestCase):
    """At most ``max_pending`` hashes wait or run; past that, Busy at once."""

    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.pool = HashingPool(self.reactor, 1, 2)

    def test_full_pool_is_busy(self) -> None:
        """With two pending, a third request fails with Busy at once; when one finishes there is room again."""
        first = self.pool.run(pow, 2, 10)
        second = self.pool.run(pow, 3, 2)
        self.assertIn("busy", str(self.failureResultOf(self.pool.run(pow, 1, 1), Busy).value))
        [child] = self.reactor.children
        self.assertEqual(len(child.requests), 1)  # one at a time per process; the other waits
        child.answer()
        self.assertEqual(self.successResultOf(first), 1024)
        child.answer()
        self.assertEqual(self.successResultOf(second), 9)
        self.assertEqual(self.pool.pending, 0)
        third = self.pool.run(pow, 2, 2)
        child.answer()
        self.assertEqual(self.successResultOf(third), 4)

    def test_errors_pass_through(self) -> None:
        """An exception raised in the child fails the Deferred with it, and frees the slot."""
        d = self.pool.run(int, "not a number")
        self.reactor.children[0].answer()
        self.failureResultOf(d, ValueError)
        self.assertEqual(self.pool.pending, 0)

    def test_child_dies(self) -> None:
        """If a child dies mid-request, that request fails as unavailable and a new child takes the rest."""
        first = self.pool.run(pow, 2, 2)
        second = self.pool.run(pow, 2, 3)
        self.reactor.children[0].die()
        self.failureResultOf(first, ServiceUnavailable)
        self.assertEqual(len(self.reactor.children), 2)
        self.reactor.children[1].answer()
        self.assertEqual(self.successResultOf(second), 8)

    def test_close(self) -> None:
        """Closing the pool closes each child's input (so it exits); what was still waiting fails."""
        self.pool.run(pow, 2, 2)
        waiting = self.pool.run(pow, 2, 3)
        self.pool.close()
        self.assertTrue(self.reactor.children[0].stdin_closed)
        self.failureResultOf(waiting, ServiceUnavailable)
        self.failureResultOf(self.pool.run(pow, 1, 1), ServiceUnavailable)

    def test_default_size(self) -> None:
        """By default one fewer process than cores (at least one), and 16 pending per process."""
        pool = HashingPool(self.reactor)
        self.assertEqual(pool.processes, default_processes())
        self.assertEqual(default_processes(), max(1, len(os.sched_getaffinity(0)) - 1))
        self.assertEqual(pool.max_pending, 16 * pool.processes)


class ChildProcessTests(TestCase):
    """The default pool runs the work in other processes, and hands the result back to the reactor."""

    @inlineCallbacks
    def test_runs_in_a_child_process(self) -> Any:
        """bcrypt runs in a process other than this one, with the right answers; the child ends with its input."""
        pool = HashingPool(reactor, 1, 4)
        pid = yield pool.run(os.getpid)
        self.assertNotEqual(pid, os.getpid())
        hashed = yield pool.run(bcrypt.hashpw, b"secret", bcrypt.gensalt(4))
        self.assertTrue((yield pool.run(bcrypt.checkpw, b"secret", hashed)))
        self.assertFalse((yield pool.run(bcrypt.checkpw, b"guess", hashed)))
        yield closed(pool)


    @inlineCallbacks
    def test_children_yield_to_the_order_path(self) -> Any:
        """The children run ``nice`` steps below the master, so a storm of logins cannot take the
        CPU from orders; by default 10."""
        pool = HashingPool(reactor, 1, 4, nice=5)
        niceness = yield pool.run(os.nice, 0)
        yield closed(pool)
        self.assertEqual(niceness, min(19, os.nice(0) + 5))
        self.assertEqual(HashingPool(reactor)._command[-2:], ["--nice", "10"])


def closed(pool: HashingPool) -> Deferred[None]:
    """Close ``pool``, whose one child is running; fires when the child has ended."""
    [child] = pool._children
    ended: Deferred[None] = Deferred()
    child.processEnded = lambda reason: ended.callback(None)  # type: ignore[method-assign]
    pool.close()  # as the master's death would: its end of the pipe closes
    return ended.addTimeout(60, reactor)


class BusyThroughTheWorkerTests(SynchronousTestCase):
    """A full hashing pool reaches the client as the declared BUSY error, and nothing else is refused."""

    def test_login_storm_gets_busy(self) -> None:
        """While one password is being checked (pool of one), a second login is told to retry; orders go on."""
        processes = FakeProcessReactor()
        pool = HashingPool(processes, 1, 1)
        deployment = Deployment(self.mktemp(), run_in_thread=pool.run)
        register = deployment.client().register("alice", "alice@example.com", PASSWORD)
        deployment.flush()
        [child] = processes.children
        child.answer()
        deployment.result(register)
        alice = deployment.client()
        login = alice.login("alice", PASSWORD)
        deployment.flush()
        child.answer()  # the first login makes the dummy hash for unknown users first
        deployment.flush()
        busy = self.assertRaises(Busy, deployment.result, deployment.client().login("alice", PASSWORD))
        self.assertIn("try again", str(busy))
        child.answer()
        self.assertEqual(deployment.result(login)["username"], "alice")
        self.assertIn("order_id", deployment.result(alice.buy("AAPL", 1)))
