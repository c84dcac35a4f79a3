"""Password hashing away from the reactor and the database: a bounded pool of child processes.

bcrypt is deliberately slow (about 0.25 s a hash at cost 12).  Run on the
reactor's thread pool it competed with the database thread, and a storm of
logins slowed every order; here it runs in child processes (by default one
fewer than the machine has cores, so the master's own process keeps one), and
at most ``max_pending`` hashes wait or run at once: past that a request fails
at once with the declared `Busy`, which tells the user to retry shortly,
instead of queueing without bound.

Each child is ``python -m papertrader.master.hashing``, started with
``spawnProcess``: it reads framed requests on its standard input and answers
on its standard output, one at a time, and exits when its standard input
closes -- so it ends with the master however the master ends (kill -9
included), and it inherits no other descriptor of the master's.  The children
run at a lower scheduling priority (``nice``, default 10): when the machine is
short of CPU the order path (master, workers, database) goes first and logins
take longer, instead of every order waiting behind a storm of logins.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import sys
from collections.abc import Callable
from typing import Any, BinaryIO

from twisted.internet import protocol
from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from papertrader.errors import Busy, ServiceUnavailable
from papertrader.eventlog import EventLogger

BUSY = "the server is busy checking passwords; try again in a few seconds"
_LENGTH = struct.Struct(">I")
# No request or answer comes near this; a longer frame means a broken child.
MAX_FRAME = 1024 * 1024


def default_processes() -> int:
    """One fewer than the cores this process may run on, and at least one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


class _Child(protocol.ProcessProtocol):
    """One hashing process, working on one request at a time."""

    def __init__(self, pool: HashingPool) -> None:
        self.pool = pool
        self.buffer = b""
        self.working: Deferred[Any] | None = None
        self.ended = False

    def ask(self, request: bytes, d: Deferred[Any]) -> None:
        self.working = d
        self.transport.write(_LENGTH.pack(len(request)) + request)

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self.buffer)
            if length > MAX_FRAME:
                self.transport.signalProcess("KILL")
                return
            if len(self.buffer) < _LENGTH.size + length:
                return
            frame = self.buffer[_LENGTH.size : _LENGTH.size + length]
            self.buffer = self.buffer[_LENGTH.size + length :]
            self._answered(frame)

    def _answered(self, frame: bytes) -> None:
        d, self.working = self.working, None
        ok, value = pickle.loads(frame)
        self.pool._idle(self)
        if d is not None:
            if ok:
                d.callback(value)
            else:
                d.errback(Failure(value))

    def errReceived(self, data: bytes) -> None:
        self.pool.log.warn("password hashing process: {text}", text=data.decode("utf-8", "replace")[:500])

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        d, self.working = self.working, None
        self.pool._ended(self)
        if d is not None:
            d.errback(ServiceUnavailable("the password checker stopped; try again"))


class HashingPool:
    """Runs picklable functions (``bcrypt.hashpw``, ``bcrypt.checkpw``) in child processes, a bounded number at once.

    `run` has the signature of ``deferToThread``, so `Accounts` takes it where
    tests pass a function that runs at once.
    """

    log = EventLogger()

    def __init__(
        self,
        reactor: Any,
        processes: int | None = None,
        max_pending: int | None = None,
        command: list[str] | None = None,
        nice: int = 10,
    ) -> None:
        self._reactor = reactor
        self.processes = processes or default_processes()
        self.max_pending = max_pending or 16 * self.processes
        self._command = command or [sys.executable, "-m", "papertrader.master.hashing", "--nice", str(nice)]
        self._children: list[_Child] = []
        self._idle_children: list[_Child] = []
        self._waiting: collections.deque[tuple[bytes, Deferred[Any]]] = collections.deque()
        self.pending = 0
        self._closed = False

    def run(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Fire with ``function(*args)`` computed in a child process; Busy at once if the pool is full."""
        if self._closed:
            return fail(ServiceUnavailable("the master is stopping"))
        if self.pending >= self.max_pending:
            return fail(Busy(BUSY))
        self.pending += 1
        d: Deferred[Any] = Deferred()
        d.addBoth(self._done)
        self._waiting.append((pickle.dumps((function, args)), d))
        self._start_children()
        self._dispatch()
        return d

    def _done(self, result: Any) -> Any:
        self.pending -= 1
        return result

    def _start_children(self) -> None:
        while len(self._children) < self.processes:
            child = _Child(self)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
            self._reactor.spawnProcess(child, self._command[0], self._command, env=env)
            self._children.append(child)
            self._idle_children.append(child)

    def _dispatch(self) -> None:
        while self._waiting and self._idle_children:
            child = self._idle_children.pop()
            request, d = self._waiting.popleft()
            child.ask(request, d)

    def _idle(self, child: _Child) -> None:
        if not child.ended:
            self._idle_children.append(child)
        self._dispatch()

    def _ended(self, child: _Child) -> None:
        if child in self._children:
            self._children.remove(child)
        if child in self._idle_children:
            self._idle_children.remove(child)
        if self._closed:
            return
        self.log.warn("a password hashing process ended; starting another")
        if self._waiting:
            self._start_children()
            self._dispatch()

    def close(self) -> None:
        """End the children (they exit when their input closes); what still waits fails as unavailable."""
        self._closed = True
        waiting, self._waiting = self._waiting, collections.deque()
        for _, d in waiting:
            d.errback(ServiceUnavailable("the master is stopping"))
        for child in list(self._children):
            child.transport.closeStdin()


def serve(requests: BinaryIO, answers: BinaryIO) -> None:
    """The child's loop: answer each framed ``(function, args)`` with ``(ok, result or exception)`` until EOF."""
    while True:
        header = requests.read(_LENGTH.size)
        if len(header) < _LENGTH.size:
            return
        (length,) = _LENGTH.unpack(header)
        function, args = pickle.loads(requests.read(length))
        try:
            answer = (True, function(*args))
        except Exception as e:
            answer = (False, e)
        frame = pickle.dumps(answer)
        answers.write(_LENGTH.pack(len(frame)) + frame)
        answers.flush()


def main(argv: list[str]) -> None:
    """A hashing child: ``[--nice N]`` lowers its priority by N, then it serves until its input ends."""
    if argv[:1] == ["--nice"]:
        os.nice(int(argv[1]))
    serve(sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main(sys.argv[1:])
