"""The event log system: caller capture, entry format, the memory bound, ordered writes, and no loss at the end.

The last tests run real child processes (plain Python, a reactor, twistd) that
hold entries in memory and are then ended by SIGTERM or by an unhandled
exception; the entries must all be in the file afterwards.
"""

from __future__ import annotations

import inspect
import os
import re
import signal
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

import papertrader
from papertrader.eventlog import (
    BufferedFileLogObserver,
    EventLogger,
    EventLogService,
    format_entry,
    install,
    short_path,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(papertrader.__file__)))
NOON = datetime(2026, 11, 25, 10, 0, 0, 123456, tzinfo=timezone.utc).timestamp()
ENTRY_START = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00 \[")


def next_line() -> int:
    """The number of the line after the caller's."""
    frame = inspect.currentframe()
    assert frame is not None and frame.f_back is not None
    return frame.f_back.f_lineno + 1


def read_entries(path: str) -> list[str]:
    """The entries of a log file: each starts a line; continuation lines are indented."""
    if not os.path.exists(path):
        return []
    entries: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f.read().splitlines():
            if ENTRY_START.match(line):
                entries.append(line)
            else:
                assert line.startswith("    "), f"unindented continuation line {line!r}"
                entries[-1] += "\n" + line
    return entries


def numbers(path: str) -> list[int]:
    """The N of every ``entry N`` message in the file, in file order."""
    return [int(m.group(1)) for m in (re.search(r": entry (\d+)$", e) for e in read_entries(path)) if m]


class Chatty:
    """Logs through an `EventLogger` class attribute, as the services do."""

    log = EventLogger()

    def work(self) -> int:
        line = next_line()
        self.log.info("working on {what}", what="orders")
        return line

    def fail(self) -> int:
        try:
            {}["missing"]
        except KeyError:
            line = next_line()
            self.log.failure("settlement failed")
        return line

    def fail_handled(self) -> int:
        line = next_line()
        with self.log.failuresHandled("tick failed"):
            raise KeyError("AAPL")
        return line


class CallerTests(SynchronousTestCase):
    """`EventLogger` records the file, function and line that logged, not the logger's own."""

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        Chatty.log = EventLogger(observer=self.events.append)

    def test_direct_call(self) -> None:
        """A call on a module-style logger records this test's file, function and line."""
        log = EventLogger(observer=self.events.append)
        line = next_line()
        log.info("hello {name}", name="world")
        [event] = self.events
        self.assertEqual(os.path.abspath(event["log_file"]), os.path.abspath(__file__))
        self.assertEqual(event["log_function"], "test_direct_call")
        self.assertEqual(event["log_line"], line)

    def test_class_attribute(self) -> None:
        """Through the class attribute descriptor the caller is the method; the namespace is the class."""
        line = Chatty().work()
        [event] = self.events
        self.assertEqual((event["log_function"], event["log_line"]), ("work", line))
        self.assertEqual(event["log_namespace"], f"{__name__}.Chatty")

    def test_failure(self) -> None:
        """``log.failure`` goes through one more Logger method; the caller is still the except block."""
        line = Chatty().fail()
        [event] = self.events
        self.assertEqual((event["log_function"], event["log_line"]), ("fail", line))
        self.assertIsInstance(event["log_failure"].value, KeyError)

    def test_failures_handled(self) -> None:
        """``with log.failuresHandled(...)`` reports the ``with`` statement's line."""
        line = Chatty().fail_handled()
        [event] = self.events
        self.assertEqual((event["log_function"], event["log_line"]), ("fail_handled", line))

    def test_every_level(self) -> None:
        """Every level method records the caller."""
        log = EventLogger(observer=self.events.append)
        lines = []
        for method in (log.debug, log.info, log.warn, log.error, log.critical):
            lines.append(next_line())
            method("at {name}", name=method.__name__)
        self.assertEqual([e["log_line"] for e in self.events], lines)
        self.assertEqual({e["log_function"] for e in self.events}, {"test_every_level"})

    def test_plain_logger_has_no_caller(self) -> None:
        """Twisted's own loggers carry no caller; their entries show the namespace instead."""
        Logger(namespace="twisted.internet.base", observer=self.events.append).info("Main loop terminated.")
        [event] = self.events
        self.assertNotIn("log_file", event)
        event["log_time"] = NOON
        self.assertEqual(
            format_entry(event), "2026-11-25T10:00:00.123456+00:00 [info] twisted.internet.base: Main loop terminated."
        )


class FormatTests(SynchronousTestCase):
    """`format_entry`: time, level, where, and the formatted message on one line; tracebacks indented below."""

    def logged(self, emit: Callable[[EventLogger], None]) -> dict[str, Any]:
        events: list[dict[str, Any]] = []
        emit(EventLogger(observer=events.append))
        [event] = events
        event["log_time"] = NOON
        return event

    def test_message_with_fields(self) -> None:
        """Fields are formatted into the message; the time is ISO 8601 UTC with microseconds."""
        line = next_line()
        event = self.logged(lambda log: log.warn("order {id} for {user} at {price}", id=7, user="alice", price="$1.50"))
        self.assertEqual(
            format_entry(event),
            f"2026-11-25T10:00:00.123456+00:00 [warn] test_eventlog.py:{line} <lambda>: order 7 for alice at $1.50",
        )

    def test_multi_line_message(self) -> None:
        """A message with line breaks stays one entry: its later lines are indented."""
        event = self.logged(lambda log: log.info("first\nsecond"))
        first, second = format_entry(event).split("\n")
        self.assertTrue(first.endswith(": first"))
        self.assertEqual(second, "    second")

    def test_failure_with_traceback(self) -> None:
        """A failure's traceback follows its line, indented, naming where it was raised."""

        def settle() -> None:
            raise ZeroDivisionError("no price")

        def emit(log: EventLogger) -> None:
            try:
                settle()
            except ZeroDivisionError:
                log.failure("settlement of {count} orders failed", count=3)

        first, *rest = format_entry(self.logged(emit)).split("\n")
        self.assertRegex(first, r"^2026-11-25T10:00:00\.123456\+00:00 \[critical\] test_eventlog\.py:\d+ emit: ")
        self.assertTrue(first.endswith(": settlement of 3 orders failed"))
        self.assertTrue(all(line.startswith("    ") for line in rest))
        traceback = "\n".join(rest)
        self.assertIn("Traceback", traceback)
        self.assertIn("in settle", traceback)
        self.assertIn("ZeroDivisionError: no price", traceback)

    def test_short_path(self) -> None:
        """Paths are cut to the last ``papertrader`` folder, else to the file name."""
        self.assertEqual(
            short_path("/srv/venv/lib/python3.11/site-packages/papertrader/master/service.py"),
            "papertrader/master/service.py",
        )
        self.assertEqual(short_path("/home/u/papertrader/papertrader/worker/cache.py"), "papertrader/worker/cache.py")
        self.assertEqual(short_path("/home/u/papertrader.py"), "papertrader.py")
        self.assertEqual(short_path("/work/main/tests/test_eventlog.py"), "test_eventlog.py")


class MemoryBoundTests(SynchronousTestCase):
    """The observer never holds more than ``capacity`` entries; full buffers go to the file in order."""

    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp(), "events.log")
        self.observer = BufferedFileLogObserver(self.path, capacity=7)
        self.log = EventLogger(observer=self.observer)

    def test_never_more_than_capacity(self) -> None:
        """Over 1000 events at most 7 are held; the file holds exactly the written ones, then all after flush."""
        for n in range(1000):
            self.log.info("entry {n}", n=n)
            self.assertLessEqual(self.observer.in_memory, 7)
            self.assertEqual(self.observer.in_memory, (n + 1) % 7)
        self.assertEqual(numbers(self.path), list(range(994)))
        self.observer.flush()
        self.assertEqual(self.observer.in_memory, 0)
        self.assertEqual(numbers(self.path), list(range(1000)))

    def test_flush_when_empty(self) -> None:
        """Flushing with nothing held writes nothing."""
        self.observer.flush()
        self.assertFalse(os.path.exists(self.path))

    def test_capacity_must_be_positive(self) -> None:
        """A capacity below one is refused."""
        self.assertRaises(ValueError, BufferedFileLogObserver, self.path, 0)

    def test_stop_buffering_writes_through(self) -> None:
        """After `stop_buffering` each entry is in the file at once."""
        self.log.info("entry {n}", n=0)
        self.observer.stop_buffering()
        self.assertEqual(numbers(self.path), [0])
        self.log.info("entry {n}", n=1)
        self.assertEqual(self.observer.in_memory, 0)
        self.assertEqual(numbers(self.path), [0, 1])


class DeferredRunner:
    """A thread runner that only queues the writes, so the test decides when they run."""

    def __init__(self) -> None:
        self.jobs: list[Callable[[], None]] = []

    def __call__(self, job: Callable[[], None]) -> None:
        self.jobs.append(job)

    def run(self) -> None:
        jobs, self.jobs = self.jobs, []
        for job in jobs:
            job()


class HandOffTests(SynchronousTestCase):
    """Full buffers handed to a thread runner leave memory at once and reach the file in order."""

    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp(), "events.log")
        self.runner = DeferredRunner()
        self.observer = BufferedFileLogObserver(self.path, capacity=5, run_in_thread=self.runner)
        self.log = EventLogger(observer=self.observer)

    def log_entries(self, numbers: range) -> None:
        for n in numbers:
            self.log.info("entry {n}", n=n)
            self.assertLessEqual(self.observer.in_memory, 5)

    def test_handed_off_entries_are_not_held(self) -> None:
        """Handed-off entries are not counted in memory; nothing is written on the logging thread."""
        self.log_entries(range(12))
        self.assertEqual((self.observer.in_memory, self.observer.handed_off), (2, 10))
        self.assertEqual(len(self.runner.jobs), 1)  # one pending write takes every batch handed off
        self.assertFalse(os.path.exists(self.path))
        self.runner.run()
        self.assertEqual(self.observer.handed_off, 0)
        self.assertEqual(numbers(self.path), list(range(10)))

    def test_late_write_takes_every_batch_in_order(self) -> None:
        """A write that runs late writes every batch handed off meanwhile, oldest first."""
        self.log_entries(range(12))
        self.log_entries(range(12, 24))
        self.assertEqual((self.observer.in_memory, self.observer.handed_off), (4, 20))
        self.runner.run()
        self.assertEqual(numbers(self.path), list(range(20)))
        self.log_entries(range(24, 31))
        self.assertEqual((self.observer.in_memory, self.observer.handed_off), (1, 10))
        self.runner.run()
        self.observer.flush()
        self.assertEqual(numbers(self.path), list(range(31)))

    def test_flush_writes_handed_off_first(self) -> None:
        """A flush before the queued write runs writes everything in order; the late write adds nothing."""
        self.log_entries(range(13))
        self.observer.flush()
        self.assertEqual(numbers(self.path), list(range(13)))
        self.runner.run()
        self.assertEqual(numbers(self.path), list(range(13)))

    def test_write_failure_keeps_entries(self) -> None:
        """A failed write is reported once and its entries stay handed off, to be written by a later write."""
        os.makedirs(self.path)  # a folder where the file should be
        observer = BufferedFileLogObserver(self.path, capacity=1, run_in_thread=lambda job: job())
        publisher = LogPublisher(observer)
        self.patch(BufferedFileLogObserver, "log", Logger(observer=publisher))
        log = EventLogger(observer=publisher)
        log.info("entry {n}", n=0)
        log.info("entry {n}", n=1)
        self.assertEqual(observer.in_memory, 0)
        self.assertEqual(observer.handed_off, 3)  # two entries and the one report, which did not loop
        os.rmdir(self.path)
        log.info("entry {n}", n=2)
        self.assertEqual(observer.handed_off, 0)
        entries = read_entries(self.path)
        self.assertEqual(numbers(self.path), [0, 1, 2])
        self.assertIn("could not write the event log", entries[1])
        self.assertIn("IsADirectoryError", entries[1])


class ThreadedWriteTests(TestCase):
    """With the reactor's thread pool as the runner, the file still ends up complete and in order."""

    @inlineCallbacks
    def test_real_threads(self) -> Any:
        """1000 events, capacity 7, writes on real threads: at most 7 held, and every entry in order."""
        path = os.path.join(self.mktemp(), "events.log")
        writes: list[Deferred[Any]] = []

        def in_thread(job: Callable[[], None]) -> Deferred[Any]:
            d = threads.deferToThread(job)
            writes.append(d)
            return d

        observer = BufferedFileLogObserver(path, capacity=7, run_in_thread=in_thread)
        log = EventLogger(observer=observer)
        for n in range(1000):
            log.info("entry {n}", n=n)
            self.assertLessEqual(observer.in_memory, 7)
        yield gatherResults(writes)
        observer.flush()
        self.assertEqual(numbers(path), list(range(1000)))


class CrashHookTests(SynchronousTestCase):
    """`install` chains to the previous SIGTERM handler and excepthook, and flushes first."""

    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp(), "events.log")
        self.observer = BufferedFileLogObserver(self.path, capacity=100)
        self.log = EventLogger(observer=self.observer)
        self.signals: list[tuple[int, list[int]]] = []
        original = signal.signal(signal.SIGTERM, self.previous_handler)
        self.addCleanup(signal.signal, signal.SIGTERM, original)
        self.patch(sys, "excepthook", self.previous_hook)
        self.hooked: list[tuple[type[BaseException], list[int]]] = []

    def previous_handler(self, signum: int, frame: Any) -> None:
        self.signals.append((signum, numbers(self.path)))

    def previous_hook(self, kind: type[BaseException], value: BaseException, tb: Any) -> None:
        self.hooked.append((kind, numbers(self.path)))

    def install(self) -> None:
        self.addCleanup(install(self.observer))

    def test_sigterm_flushes_then_passes_on(self) -> None:
        """SIGTERM writes what is held, then reaches the previous handler; uninstalling restores it."""
        self.install()
        for n in range(3):
            self.log.info("entry {n}", n=n)
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        self.assertEqual(self.signals, [(signal.SIGTERM, [0, 1, 2])])

    def test_handler_goes_in_front_of_the_reactors(self) -> None:
        """Given a reactor not yet running, the handler is set again once it runs, in front of the reactor's own."""

        class StartingReactor:
            running = False

            def __init__(self) -> None:
                self.when_running: list[Callable[[], None]] = []

            def callWhenRunning(self, function: Callable[[], None]) -> str:
                self.when_running.append(function)
                return "trigger"

            def removeSystemEventTrigger(self, trigger: str) -> None:
                raise ValueError("already fired")

        starting = StartingReactor()
        uninstall = install(self.observer, starting)
        self.addCleanup(uninstall)
        signal.signal(signal.SIGTERM, self.previous_handler)  # what the reactor does as it starts
        [when_running] = starting.when_running
        when_running()
        for n in range(3):
            self.log.info("entry {n}", n=n)
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        self.assertEqual(self.signals, [(signal.SIGTERM, [0, 1, 2])])
        uninstall()
        self.assertEqual(signal.getsignal(signal.SIGTERM), self.previous_handler)

    def test_uninstall_restores(self) -> None:
        """Undoing `install` puts back the previous handler and hook."""
        uninstall = install(self.observer)
        self.assertIsNot(sys.excepthook, self.previous_hook)
        uninstall()
        self.assertEqual(signal.getsignal(signal.SIGTERM), self.previous_handler)
        self.assertEqual(sys.excepthook, self.previous_hook)

    def test_signal_while_writing(self) -> None:
        """A SIGTERM that interrupts a write is handled once the write is done: nothing doubled or lost."""
        observer = BufferedFileLogObserver(self.path, capacity=2)
        self.addCleanup(install(observer))
        log = EventLogger(observer=observer)
        append = observer._append_to_file

        def interrupted_append(batch: list[str]) -> None:
            self.patch(observer, "_append_to_file", append)  # one interruption is enough
            append(batch[:1])
            log.info("entry {n}", n=99)  # a handler logging inside the observer must not deadlock
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
            self.assertEqual(self.signals, [])
            append(batch[1:])

        self.patch(observer, "_append_to_file", interrupted_append)
        log.info("entry {n}", n=0)
        log.info("entry {n}", n=1)
        self.assertEqual(self.signals, [(signal.SIGTERM, [0, 1, 99])])

    def test_unhandled_exception(self) -> None:
        """An unhandled exception is logged as critical where it was raised, flushed, then passed on."""
        self.install()
        self.log.info("entry {n}", n=0)
        try:
            line = next_line()
            raise RuntimeError("boom")
        except RuntimeError:
            sys.excepthook(*sys.exc_info())
        self.assertEqual(self.hooked, [(RuntimeError, [0])])
        crash = read_entries(self.path)[-1]
        self.assertIn(f"[critical] test_eventlog.py:{line} test_unhandled_exception: unhandled exception", crash)
        self.assertIn("RuntimeError: boom", crash)


class ServiceTests(SynchronousTestCase):
    """`EventLogService` routes a publisher into the observer and writes everything when stopped."""

    def test_start_and_stop(self) -> None:
        """Started it receives events; stopped it has written them, writes later ones at once and unhooks."""
        original = signal.getsignal(signal.SIGTERM)
        self.addCleanup(signal.signal, signal.SIGTERM, original)
        self.patch(sys, "excepthook", sys.excepthook)
        hook = sys.excepthook
        path = os.path.join(self.mktemp(), "events.log")
        publisher = LogPublisher()
        events = EventLogService(BufferedFileLogObserver(path, capacity=100), publisher=publisher)
        log = EventLogger(observer=publisher)
        events.startService()
        self.addCleanup(lambda: events.running and events.stopService())
        self.assertIsNot(sys.excepthook, hook)
        log.info("entry {n}", n=0)
        self.assertEqual(numbers(path), [])
        events.stopService()
        self.assertEqual(numbers(path), [0])
        log.info("entry {n}", n=1)
        self.assertEqual(numbers(path), [0, 1])
        self.assertIs(sys.excepthook, hook)
        self.assertEqual(signal.getsignal(signal.SIGTERM), original)
        events.startService()  # a restart buffers again, without doubling entries
        log.info("entry {n}", n=2)
        events.stopService()
        self.assertEqual(numbers(path), [0, 1, 2])


class Child(ProcessProtocol):
    """A child process: ``ready`` fires when it prints ``ready``, ``ended`` with how it ended."""

    def __init__(self) -> None:
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[Any] = Deferred()
        self.stdout = b""
        self.stderr = b""

    def outReceived(self, data: bytes) -> None:
        self.stdout += data
        if b"ready\n" in self.stdout and not self.ready.called:
            self.ready.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Any) -> None:
        if not self.ready.called:
            self.ready.errback(AssertionError(f"the child ended before it was ready:\n{self.stderr.decode()}"))
        self.ended.callback(reason.value)


PLAIN_SCRIPT = """
import signal, sys
from twisted.logger import globalLogBeginner
from papertrader.eventlog import BufferedFileLogObserver, EventLogger, install

observer = BufferedFileLogObserver(sys.argv[1], capacity=10000)
globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
install(observer)
log = EventLogger()
for n in range(int(sys.argv[2])):
    log.info("entry {n}", n=n)
if sys.argv[3] == "raise":
    raise RuntimeError("boom")
if sys.argv[3] == "wait":
    print("ready", flush=True)
    while True:
        signal.pause()
"""

REACTOR_SCRIPT = """
import sys
from twisted.internet import reactor
from papertrader.eventlog import BufferedFileLogObserver, EventLogger, EventLogService

observer = BufferedFileLogObserver(sys.argv[1], capacity=10000, run_in_thread=reactor.callInThread)
events = EventLogService(observer, reactor)
log = EventLogger()

def started():
    events.startService()
    for n in range(500):
        log.info("entry {n}", n=n)
    print("ready", flush=True)

reactor.callWhenRunning(started)
reactor.addSystemEventTrigger("before", "shutdown", events.stopService)
reactor.run()
"""

TAC_FILE = """
import os
from twisted.application import service
from twisted.internet import reactor
from papertrader.eventlog import BufferedFileLogObserver, EventLogger, EventLogService


class Chatty(service.Service):
    log = EventLogger()

    def startService(self):
        super().startService()
        for n in range(500):
            self.log.info("entry {n}", n=n)
        reactor.callWhenRunning(os.write, 1, b"ready\\n")


application = service.Application("eventlog-test")
observer = BufferedFileLogObserver(os.environ["EVENT_LOG"], capacity=10000, run_in_thread=reactor.callInThread)
EventLogService(observer, reactor).setServiceParent(application)
Chatty().setServiceParent(application)
"""


class ProcessEndTests(TestCase):
    """Real processes holding entries in memory lose none of them however they end."""

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.path = os.path.join(self.base, "events.log")

    def spawn(self, *args: str) -> Child:
        child = Child()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
        env["EVENT_LOG"] = self.path
        process = reactor.spawnProcess(child, sys.executable, [sys.executable, *args], env=env, path=self.base)
        self.addCleanup(lambda: child.ended if child.ended.called else self.kill(process, child))
        return child

    def kill(self, process: Any, child: Child) -> Deferred[Any]:
        process.signalProcess("KILL")
        return child.ended

    @inlineCallbacks
    def terminate_when_ready(self, child: Child) -> Any:
        """Wait for ``ready``, send SIGTERM, and fire with how the child ended."""
        yield child.ready
        self.assertEqual(numbers(self.path), [])  # all 500 are still only in memory
        child.transport.signalProcess("TERM")
        reason = yield child.ended
        return reason

    @inlineCallbacks
    def test_sigterm_plain_process(self) -> Any:
        """Without a reactor the SIGTERM handler writes the entries, then the default action ends the process."""
        child = self.spawn("-c", PLAIN_SCRIPT, self.path, "500", "wait")
        reason = yield self.terminate_when_ready(child)
        self.assertIsInstance(reason, ProcessTerminated)
        self.assertEqual(reason.signal, signal.SIGTERM, child.stderr.decode())
        self.assertEqual(numbers(self.path), list(range(500)))

    @inlineCallbacks
    def test_sigterm_reactor_process(self) -> Any:
        """Under a running reactor SIGTERM writes the entries, then the reactor stops cleanly."""
        child = self.spawn("-c", REACTOR_SCRIPT, self.path)
        reason = yield self.terminate_when_ready(child)
        self.assertIsInstance(reason, ProcessDone, child.stderr.decode())
        self.assertEqual(numbers(self.path), list(range(500)))
        self.assertIn("Main loop terminated.", read_entries(self.path)[-1])

    @inlineCallbacks
    def test_sigterm_twistd(self) -> Any:
        """Under twistd the entries and twistd's last words reach the file before it re-raises SIGTERM."""
        with open(os.path.join(self.base, "events.tac"), "w", encoding="utf-8") as f:
            f.write(TAC_FILE)
        child = self.spawn(
            "-c", "from twisted.scripts.twistd import run; run()",
            "--nodaemon", "--pidfile=", "--no_save", "--logfile", os.path.join(self.base, "twistd.log"),
            "--python", "events.tac",
        )
        reason = yield self.terminate_when_ready(child)
        self.assertIsInstance(reason, ProcessTerminated)
        self.assertEqual(reason.signal, signal.SIGTERM, child.stderr.decode())
        self.assertEqual(numbers(self.path), list(range(500)))
        self.assertIn("Server Shut Down.", read_entries(self.path)[-1])

    @inlineCallbacks
    def test_unhandled_exception(self) -> Any:
        """An exception at top level: all 50 entries, then the crash with its traceback; the exit code is not 0."""
        child = self.spawn("-c", PLAIN_SCRIPT, self.path, "50", "raise")
        child.ready.addErrback(lambda _: None)
        reason = yield child.ended
        self.assertIsInstance(reason, ProcessTerminated)
        self.assertEqual(reason.exitCode, 1)
        self.assertIn(b"RuntimeError: boom", child.stderr)
        self.assertEqual(numbers(self.path), list(range(50)))
        crash = read_entries(self.path)[-1]
        self.assertIn("[critical] <string>:13 <module>: unhandled exception", crash)
        self.assertIn("RuntimeError: boom", crash)

    @inlineCallbacks
    def test_normal_exit(self) -> Any:
        """A process that simply ends writes what it held at exit."""
        child = self.spawn("-c", PLAIN_SCRIPT, self.path, "50", "exit")
        child.ready.addErrback(lambda _: None)
        reason = yield child.ended
        self.assertIsInstance(reason, ProcessDone, child.stderr.decode())
        self.assertEqual(numbers(self.path), list(range(50)))
