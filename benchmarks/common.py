"""What the benchmarks share: starting and stopping real processes, clients that wait for a worker, CPU time."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import task
from twisted.internet.defer import inlineCallbacks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from papertrader.client.library import connect  # noqa: E402

HOST = "127.0.0.1"
SYMBOL = "AAPL"
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
PASSWORD = "benchmark-password"


class BenchmarkError(Exception):
    """The benchmark could not run or an order was not accepted."""


# ---------------------------------------------------------------- processes


def child_env() -> dict[str, str]:
    """This environment with the checkout importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


def spawn(args: Sequence[str], log_path: str) -> subprocess.Popen:
    """Start ``python args...`` in its own session, output to ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, *args],
            env=child_env(),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(process: subprocess.Popen) -> None:
    """SIGTERM ``process`` and wait; kill its process group if it does not stop in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
            return
        except subprocess.TimeoutExpired:
            pass
    # The process group is the session started for this child (the master's includes its worker).
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def wait_for_file(path: str, process: subprocess.Popen, timeout: float = STARTUP_TIMEOUT) -> str:
    """Poll for ``path`` to exist and be non-empty; return its stripped text."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchmarkError(f"{process.args[1:3]} exited with {process.returncode}")
        try:
            with open(path, encoding="ascii") as f:
                text = f.read().strip()
        except FileNotFoundError:
            text = ""
        if text:
            return text
        time.sleep(0.05)
    raise BenchmarkError(f"{path} did not appear within {timeout:.0f} s")


def show_logs(workdir: str, lines: int = 15) -> None:
    """Print the end of every log in ``workdir`` to stderr (before the directory goes)."""
    for folder, _, files in sorted(os.walk(workdir)):
        for name in sorted(files):
            if name.endswith((".log", ".out")):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8", errors="replace") as f:
                    tail = f.readlines()[-lines:]
                if tail:
                    print(f"--- {os.path.relpath(path, workdir)} (last {len(tail)} lines)", file=sys.stderr)
                    sys.stderr.writelines(tail)


def write_port(path: str, port: int) -> None:
    """Write ``port`` to ``path`` atomically."""
    with open(path + ".tmp", "w", encoding="ascii") as f:
        f.write(f"{port}\n")
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------- clients


@inlineCallbacks
def connect_retrying(reactor: Any, port: int, ca: str, timeout: float = STARTUP_TIMEOUT) -> Any:
    """A client connected to ``HOST:port`` whose quotes work (the worker has its master)."""
    deadline = time.monotonic() + timeout
    client = None
    last = "nothing tried"
    while time.monotonic() < deadline:
        try:
            if client is None:
                client = yield connect(reactor, HOST, port, ca)
            yield client.quote(SYMBOL)
            return client
        except Exception as e:
            last = f"{type(e).__name__}: {e}"
            if client is not None:
                client.close()
                client = None
        yield task.deferLater(reactor, 0.2, lambda: None)
    raise BenchmarkError(f"the worker did not become ready within {timeout:.0f} s (last error: {last})")


@inlineCallbacks
def log_in(reactor: Any, port: int, ca: str, index: int) -> Any:
    """A new user, registered and logged in on its own connection."""
    client = yield connect(reactor, HOST, port, ca)
    username = f"bench{index}"
    yield client.register(username, f"{username}@example.com", PASSWORD)
    yield client.login(username, PASSWORD)
    return client


# ---------------------------------------------------------------- CPU time


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) used so far by process ``pid``; None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_of(parent: int, running: str = "") -> list[int]:
    """The pids of the child processes of ``parent`` whose command line contains ``running``."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    found = []
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                    if int(f.read().rpartition(")")[2].split()[1]) != parent:
                        continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if running.encode() in f.read():
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return found


def child_of(parent: int, running: str = "papertrader-worker") -> int | None:
    """The pid of a child process of ``parent`` running ``running`` (the master's local worker), if any."""
    found = children_of(parent, running)
    return found[0] if found else None


class CPU:
    """CPU seconds used by a set of named processes between `start` and `stop`."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid is not None}
        self._before: dict[str, float | None] = {}
        self.used: dict[str, float] = {}

    def start(self) -> None:
        self._before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> None:
        self.used = {}
        for name, pid in self.pids.items():
            before, after = self._before.get(name), cpu_seconds(pid)
            if before is not None and after is not None:
                self.used[name] = after - before

    def per_order(self, orders: int) -> str:
        """``total us/order (name us, ...)``, or "" when nothing was measured."""
        if not self.used:
            return ""
        parts = ", ".join(f"{name} {1e6 * seconds / orders:.0f}" for name, seconds in self.used.items())
        return f"{1e6 * sum(self.used.values()) / orders:.0f} us/order ({parts})"


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run_measurement(benchmark: Callable[[Any], Any]) -> None:
    """Run ``benchmark(reactor)`` under `task.react`; BenchmarkError if it failed."""
    try:
        task.react(benchmark)
    except SystemExit as e:
        if e.code:
            raise BenchmarkError("the benchmark failed") from None


def clean_up(processes: Sequence[subprocess.Popen], workdir: str) -> None:
    """Stop ``processes`` (the last started first) and remove ``workdir``, unless PAPERTRADER_BENCH_KEEP is set."""
    for process in reversed(processes):
        stop(process)
    if os.environ.get("PAPERTRADER_BENCH_KEEP"):
        print(f"kept {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
