"""The event log system (spec 3.1.4, 3.2.5): when, where and what, kept in memory and written to a file in batches.

`EventLogger` is a `twisted.logger.Logger` whose events also carry the file,
function and line that logged them. `BufferedFileLogObserver` formats every
event into one entry, holds at most ``capacity`` entries in memory (the
``log_memory_entries`` setting, spec 2.3.3) and, when that many are held, hands
them all to a writer (a thread in production) that appends them to the file
in order. `install` and `EventLogService` make sure the entries still held in
memory reach the file however the process ends: service stop, SIGTERM, an
unhandled exception or a normal exit.

An entry is one line, followed for failures by the traceback on indented lines::

    2026-11-25T10:00:00.123456+00:00 [info] papertrader/master/service.py:123 _start: message text

Events from plain Twisted loggers carry no caller; their namespace is written
in its place.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from types import FrameType, TracebackType
from typing import Any

from twisted.application import service
from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

# Frames in these files belong to the logging machinery, never to the caller.
_MACHINERY_FILES = (
    os.path.join("twisted", "logger", "_logger.py"),
    os.path.join("papertrader", "eventlog.py"),
)
_INDENT = "    "


def _caller_frame() -> FrameType | None:
    """The innermost frame outside the logging machinery."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.endswith(_MACHINERY_FILES):
        frame = frame.f_back
    return frame


class EventLogger(Logger):
    """A drop-in `twisted.logger.Logger` whose events say where they were logged.

    Adds ``log_file``, ``log_function`` and ``log_line`` of the code that called
    ``info``, ``warn``, ``error``, ``failure``, ``critical`` or ``debug``.
    """

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        frame = _caller_frame()
        if frame is not None:
            kwargs.setdefault("log_file", frame.f_code.co_filename)
            kwargs.setdefault("log_function", frame.f_code.co_name)
            kwargs.setdefault("log_line", frame.f_lineno)
        super().emit(level, format, **kwargs)


def short_path(path: str) -> str:
    """``path`` from its last ``papertrader`` folder on (``papertrader/master/service.py``), else its file name."""
    parts = path.replace("\\", "/").split("/")
    for index in range(len(parts) - 2, -1, -1):
        if parts[index] == "papertrader":
            return "/".join(parts[index:])
    return parts[-1]


def _indented(text: str) -> str:
    return "".join(f"\n{_INDENT}{line}".rstrip() for line in text.splitlines())


def format_entry(event: dict[str, Any]) -> str:
    """One log entry for ``event``, without the final newline.

    Continuation lines (a multi-line message, a failure's traceback) are
    indented, so every line that starts an entry starts with its timestamp.
    """
    when = event.get("log_time")
    stamp = datetime.fromtimestamp(time.time() if when is None else when, tz=timezone.utc)
    level_name = getattr(event.get("log_level"), "name", None) or "-"
    if "log_file" in event:
        origin = f"{short_path(str(event['log_file']))}:{event.get('log_line', '?')} {event.get('log_function', '?')}"
    else:
        origin = str(event.get("log_namespace", "-"))
    first, *rest = formatEvent(event).split("\n")
    entry = f"{stamp.isoformat(timespec='microseconds')} [{level_name}] {origin}: {first}"
    if rest:
        entry += _indented("\n".join(rest))
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        try:
            entry += _indented(failure.getTraceback())
        except Exception as e:  # a broken failure must not lose the entry
            entry += _indented(f"(traceback unavailable: {e!r})")
    return entry


class _ThreadState(threading.local):
    """Per thread: how deep it is inside the observer's locked sections, and what it must do on leaving."""

    def __init__(self) -> None:
        self.depth = 0
        self.postponed: list[Callable[[], None]] = []


@implementer(ILogObserver)
class BufferedFileLogObserver:
    """Formats events into entries; holds at most ``capacity`` in memory, then appends them all to ``path``.

    ``run_in_thread(write)`` runs the write of a full buffer (its result is
    ignored; the write reports its own errors): pass ``reactor.callInThread``
    in production so the reactor never waits on the disk; without it the write
    happens in the logging thread.
    Entries handed to the writer no longer count as held in memory. Writes are
    serialised and always take the oldest batch first, so the file keeps the
    order of the events whichever thread writes and in whatever order the
    runner runs the writes. `flush` writes everything at once, synchronously.

    A signal handler or a finaliser that logs while its thread is inside the
    observer would deadlock on the observer's own lock; such re-entrant calls
    are postponed until the thread leaves instead.
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        capacity: int,
        run_in_thread: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.path = path
        self.capacity = capacity
        self.buffering = True
        self._run_in_thread = run_in_thread
        self._buffer: list[str] = []
        self._handed_off: deque[list[str]] = deque()
        self._write_scheduled = False
        self._write_failing = False
        self._memory_lock = threading.Lock()
        self._file_lock = threading.Lock()
        self._thread = _ThreadState()

    @property
    def in_memory(self) -> int:
        """How many entries are held in memory, not yet handed to the writer."""
        return len(self._buffer)

    @property
    def handed_off(self) -> int:
        """How many entries the writer has been given but not yet written."""
        return sum(len(batch) for batch in tuple(self._handed_off))

    def __call__(self, event: dict[str, Any]) -> None:
        entry = format_entry(event)
        if self._thread.depth > 0:
            self._thread.postponed.append(lambda: self._hold(entry))
        else:
            self._hold(entry)

    def flush(self) -> None:
        """Write every entry held or handed off to the file now, in this thread (shutdown, signals, crashes)."""
        if self._thread.depth > 0:
            self._thread.postponed.append(self.flush)
            return
        with self._guarded(self._memory_lock):
            if self._buffer:
                self._handed_off.append(self._buffer)
                self._buffer = []
        self._write_handed_off()

    def stop_buffering(self) -> None:
        """Flush, then write each later entry at once: the process is ending and may not say goodbye."""
        self.buffering = False
        self.flush()

    def flush_then(self, then: Callable[[], None]) -> None:
        """Flush, then call ``then``; safe to call from a signal handler.

        If the signal interrupted this thread inside the observer (its locks
        held, a batch half written), both happen as soon as it leaves instead.
        """
        if self._thread.depth > 0:
            self._thread.postponed.append(lambda: (self.flush(), then()))
            return
        self.flush()
        then()

    def _hold(self, entry: str) -> None:
        with self._guarded(self._memory_lock):
            self._buffer.append(entry)
            hand_off = len(self._buffer) >= self.capacity or not self.buffering
            if hand_off:
                self._handed_off.append(self._buffer)
                self._buffer = []
        if not hand_off:
            return
        if self.buffering and self._run_in_thread is not None:
            self._schedule_write()
        else:
            self._write_handed_off()

    @contextmanager
    def _guarded(self, lock: threading.Lock) -> Iterator[None]:
        # The depth is raised before taking the lock and lowered after releasing
        # it, so a re-entrant call that sees depth 0 cannot hold up the thread.
        state = self._thread
        state.depth += 1
        try:
            with lock:
                yield
        finally:
            state.depth -= 1
            while state.depth == 0 and state.postponed:
                state.postponed.pop(0)()

    def _schedule_write(self) -> None:
        with self._guarded(self._memory_lock):
            if self._write_scheduled:
                return
            self._write_scheduled = True
        assert self._run_in_thread is not None
        self._run_in_thread(self._write_in_thread)

    def _write_in_thread(self) -> None:
        try:
            self._write_handed_off(scheduled=True)
        except Exception:
            # Reported once per run of failures: the report is itself an entry
            # whose write could fail, and must not start a loop.
            if not self._write_failing:
                self._write_failing = True
                self.log.failure(
                    "could not write the event log to {path}; its entries are kept until a write succeeds",
                    path=self.path,
                )
        else:
            self._write_failing = False

    def _write_handed_off(self, scheduled: bool = False) -> None:
        """Append the handed-off batches to the file, oldest first; a batch leaves memory once written."""
        try:
            with self._guarded(self._file_lock):
                while True:
                    with self._guarded(self._memory_lock):
                        if not self._handed_off:
                            if scheduled:
                                self._write_scheduled = False
                            return
                        batch = self._handed_off[0]
                    self._append_to_file(batch)
                    with self._guarded(self._memory_lock):
                        self._handed_off.popleft()
        except BaseException:
            if scheduled:
                with self._guarded(self._memory_lock):
                    self._write_scheduled = False
            raise

    def _append_to_file(self, batch: list[str]) -> None:
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        with open(self.path, "a", encoding="utf-8", errors="backslashreplace") as f:
            f.write("".join(entry + "\n" for entry in batch))
            f.flush()


def _flush_or_complain(observer: BufferedFileLogObserver) -> None:
    try:
        observer.flush()
    except Exception as e:
        # sys.stderr may itself be routed into the log; the original is not.
        print(f"papertrader: could not write the event log to {observer.path}: {e}", file=sys.__stderr__)


def _pass_signal_on(previous: Any, signum: int, frame: FrameType | None) -> None:
    """Do what would have happened without us: the previous handler, or the default action."""
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _crash_event(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> dict[str, Any]:
    """A critical event for an unhandled exception, placed where it was raised."""
    event: dict[str, Any] = {
        "log_level": LogLevel.critical,
        "log_namespace": __name__,
        "log_format": "unhandled exception, the process is ending",
        "log_time": time.time(),
        "log_failure": Failure(value, kind, tb),
    }
    if tb is not None:
        while tb.tb_next is not None:
            tb = tb.tb_next
        event.update(
            log_file=tb.tb_frame.f_code.co_filename, log_function=tb.tb_frame.f_code.co_name, log_line=tb.tb_lineno
        )
    return event


def install(observer: BufferedFileLogObserver, reactor: Any = None) -> Callable[[], None]:
    """Flush ``observer`` however the process ends; returns a function that undoes this.

    - at a normal exit (`atexit`);
    - on an unhandled exception (`sys.excepthook`), after logging it as critical;
    - on SIGTERM, then passing the signal on to the previous handler, or to the
      default action that ends the process. A reactor replaces the SIGTERM
      handler when it starts, so given a ``reactor`` that is not yet running
      the handler is installed again once it runs, in front of the reactor's.
      (Under twistd the reactor's handler then stops the services, and
      `EventLogService.stopService` flushes too.)

    Signal handlers can only be set from the main thread; elsewhere that part is skipped.
    """
    undo: list[Callable[[], None]] = []

    def flush_at_exit() -> None:
        _flush_or_complain(observer)

    atexit.register(flush_at_exit)
    undo.append(lambda: atexit.unregister(flush_at_exit))

    previous_hook = sys.excepthook

    def excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        try:
            observer(_crash_event(kind, value, tb))
        finally:
            _flush_or_complain(observer)
            previous_hook(kind, value, tb)

    sys.excepthook = excepthook

    def restore_hook() -> None:
        if sys.excepthook is excepthook:
            sys.excepthook = previous_hook

    undo.append(restore_hook)

    def hook_sigterm() -> None:
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            observer.flush_then(lambda: _pass_signal_on(previous, signum, frame))

        signal.signal(signal.SIGTERM, on_sigterm)

        def restore() -> None:
            if signal.getsignal(signal.SIGTERM) is on_sigterm:
                signal.signal(signal.SIGTERM, previous)

        undo.append(restore)

    if threading.current_thread() is threading.main_thread():
        hook_sigterm()
        if reactor is not None and not reactor.running:
            trigger = reactor.callWhenRunning(hook_sigterm)

            def forget_trigger() -> None:
                try:
                    reactor.removeSystemEventTrigger(trigger)
                except (ValueError, KeyError):
                    pass  # already fired

            undo.append(forget_trigger)

    def uninstall() -> None:
        while undo:
            undo.pop()()

    return uninstall


class EventLogService(service.Service):
    """Routes the process's log events into ``observer`` while running, and loses none of them at the end.

    Start it before the services whose events it should capture (make it the
    first child): it adds the observer to ``publisher`` and `install`s the
    crash hooks. Stopping it writes everything held and switches the observer
    to writing each later entry at once, so the reactor's and twistd's last
    words reach the file too, even when twistd ends by re-raising SIGTERM.
    """

    def __init__(
        self,
        observer: BufferedFileLogObserver,
        reactor: Any = None,
        publisher: LogPublisher = globalLogPublisher,
    ) -> None:
        self.observer = observer
        self.reactor = reactor
        self.publisher = publisher
        self._uninstall: Callable[[], None] | None = None

    def startService(self) -> None:
        self.observer.buffering = True
        self.publisher.removeObserver(self.observer)  # no duplicates after a restart
        self.publisher.addObserver(self.observer)
        self._uninstall = install(self.observer, self.reactor)
        super().startService()

    def stopService(self) -> None:
        super().stopService()
        self.observer.stop_buffering()
        if self._uninstall is not None:
            self._uninstall()
            self._uninstall = None
