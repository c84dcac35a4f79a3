"""What thousands of idle clients cost a worker: memory per connection, and the reactor's stalls per update.

A real deployment (``twistd papertrader-master`` with its local worker, TLS on
every link, an update every ``--update-interval`` seconds) runs with the
worker's stall monitor on (``PAPERTRADER_STALL_MONITOR``, see
`papertrader.stalls`): after every price update the worker logs the longest
time its reactor was kept from a due call since the previous one.  A separate
process (this script again, hidden sub-command ``_clients``) then opens N TLS
connections to the worker (default 10,000); 90% subscribe to all prices, 5% to
two symbols and 5% to none, and all of them read what they are pushed and
otherwise stay idle.

Per run it reports:

* **RSS per connection** of the worker process: (RSS with the clients - RSS
  before them) / N, in KiB (target <= 40 KiB);
* **longest stall per update** in the worker with the clients connected (the
  worst of ``--ticks`` updates; target <= 50 ms), and the same measured in the
  same run before any client connected (the baseline), with their ratio.

It runs ``--runs`` times (default 3) with a fresh deployment each time and
prints min / median / max of each figure.  Run it from a source checkout::

    python benchmarks/idle_clients.py [--clients N] [--runs R] [--ticks T] [--update-interval S]

Both the worker and the client process hold N descriptors: the soft
``ulimit -n`` is raised to the hard limit if needed, and the script stops if
that is still too few.  Set PAPERTRADER_BENCH_KEEP=1 to keep (and print) the
temporary directories with the logs.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import child_of, positive  # noqa: E402  (benchmarks/common.py, beside this script)
from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults, inlineCallbacks  # noqa: E402
from twisted.internet.protocol import Factory  # noqa: E402

from papertrader import tls  # noqa: E402
from papertrader.client.library import ClientAMP  # noqa: E402
from papertrader.protocol import Subscribe  # noqa: E402
from papertrader.stalls import STALL_MONITOR_ENV  # noqa: E402

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
# The stall monitor's sampling interval in the worker, seconds.
SAMPLE_INTERVAL = 0.005
# Updates skipped after start-up and after the clients connected, before measuring.
WARM_UP_TICKS = 2
TARGET_KIB_PER_CONNECTION = 40.0
TARGET_STALL_MS = 50.0
_REPORT = re.compile(r"stall report: update (\d+) longest_stall_ms=([0-9.]+) clients=(\d+)")


class BenchmarkError(Exception):
    """The benchmark could not run."""


# ---------------------------------------------------------------- the client process


@inlineCallbacks
def _run_clients(reactor: Any, host: str, port: int, ca: str, count: int, concurrency: int) -> Any:
    """Open ``count`` TLS connections, subscribe them, print ``ready N``, then idle until SIGTERM."""
    options = tls.client_options(host, ca)
    connections: list[ClientAMP] = []
    ticks = [0]

    @inlineCallbacks
    def open_one(index: int) -> Any:
        endpoint = tls.tls_client_endpoint(reactor, host, port, options, STARTUP_TIMEOUT)
        connection = yield endpoint.connect(Factory.forProtocol(ClientAMP))
        yield connection.when_handshake_done()
        connection.locator.on_price_tick = lambda tick: ticks.__setitem__(0, ticks[0] + 1)
        if index % 20 == 0:
            yield connection.callRemote(Subscribe, prices=[])  # none: a first command, as the worker requires
        elif index % 20 == 1:
            yield connection.callRemote(Subscribe, prices=["AAPL", "MSFT"])
        else:
            yield connection.callRemote(Subscribe, all_prices=True)
        connections.append(connection)

    limit = DeferredSemaphore(concurrency)
    started = time.monotonic()
    yield gatherResults([limit.run(open_one, i) for i in range(count)], consumeErrors=True)
    print(f"ready {len(connections)} in {time.monotonic() - started:.1f} s", flush=True)
    stopped: Deferred[None] = Deferred()
    reactor.addSystemEventTrigger("before", "shutdown", lambda: print(f"ticks received {ticks[0]}", flush=True))
    yield stopped  # until SIGTERM stops the reactor


# ---------------------------------------------------------------- processes


def _child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


def _spawn(args: Sequence[str], log_path: str, **env: str) -> subprocess.Popen:
    """Start ``python args...`` in its own session, output to ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, *args],
            env=_child_env(**env),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM ``process`` and wait; kill its process group if it does not stop in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _wait(what: str, check: Any, processes: Sequence[subprocess.Popen], timeout: float) -> Any:
    """Poll ``check()`` until it returns something true; fail if a process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise BenchmarkError(f"{process.args[1:3]} exited with {process.returncode} while waiting for {what}")
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise BenchmarkError(f"{what} did not happen within {timeout:.0f} s")


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _reports(log_path: str) -> list[tuple[int, float, int]]:
    """The worker's stall reports so far: (update, longest stall in ms, connected clients)."""
    return [(int(t), float(ms), int(c)) for t, ms, c in _REPORT.findall(_read(log_path))]


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchmarkError(f"no VmRSS for process {pid}")


def _show_logs(workdir: str, lines: int = 15) -> None:
    for folder, _, files in sorted(os.walk(workdir)):
        for name in sorted(files):
            if name.endswith((".log", ".out")):
                path = os.path.join(folder, name)
                tail = _read(path).splitlines()[-lines:]
                if tail:
                    print(f"--- {os.path.relpath(path, workdir)} (last {len(tail)} lines)", file=sys.stderr)
                    print("\n".join(tail), file=sys.stderr)


def _raise_descriptor_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard) if hard != resource.RLIM_INFINITY else needed,
                                                    hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        raise BenchmarkError(f"ulimit -n is {soft}; {needed} descriptors are needed (lower --clients)")


# ---------------------------------------------------------------- one run


def _one_run(options: argparse.Namespace, number: int) -> dict[str, float]:
    workdir = tempfile.mkdtemp(prefix="papertrader-idle-")
    data = os.path.join(workdir, "data")
    worker_log = os.path.join(data, "logs", "worker-local-1.log")
    clients_out = os.path.join(workdir, "clients.out")
    processes: list[subprocess.Popen] = []
    ok = False
    try:
        master = _spawn(
            [
                "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "--logfile", os.path.join(workdir, "master.log"),
                "papertrader-master",
                "--data-dir", data,
                "--listen", f"tcp:0:interface={HOST}",
                "--worker-listen", f"tcp:0:interface={HOST}",
                "--update-interval", str(options.update_interval),
                "--bcrypt-cost", "4",
                "--max-connections", str(options.clients + 100),
                "--handshake-timeout", "120",
                "--idle-timeout", "86400",
            ],
            os.path.join(workdir, "master.out"),
            **{STALL_MONITOR_ENV: str(SAMPLE_INTERVAL)},
        )
        processes.append(master)
        address_file = os.path.join(data, "worker-local-1.address")
        address = _wait("the worker's address", lambda: _read(address_file).strip(), processes, STARTUP_TIMEOUT)
        host, port = address.rsplit(":", 1)
        worker = _wait("the worker process", lambda: child_of(master.pid), processes, STARTUP_TIMEOUT)

        # Baseline: no clients.
        _wait("the first updates", lambda: len(_reports(worker_log)) >= WARM_UP_TICKS, processes, STARTUP_TIMEOUT)
        start = len(_reports(worker_log))
        timeout = options.ticks * options.update_interval * 5 + STARTUP_TIMEOUT
        _wait("the baseline updates", lambda: len(_reports(worker_log)) >= start + options.ticks, processes, timeout)
        baseline = [r for r in _reports(worker_log)[start : start + options.ticks] if r[2] == 0]
        rss_before = _rss_kib(worker)

        clients = _spawn(
            [os.path.abspath(__file__), "_clients", host, port, os.path.join(data, "tls", "ca.pem"),
             str(options.clients), str(options.concurrency)],
            clients_out,
        )
        processes.append(clients)
        _wait("the clients' connections", lambda: "ready" in _read(clients_out), processes, options.connect_timeout)
        connected = int(re.search(r"ready (\d+)", _read(clients_out)).group(1))
        if connected != options.clients:
            raise BenchmarkError(f"only {connected} of {options.clients} clients connected")
        start = len(_reports(worker_log)) + WARM_UP_TICKS
        _wait("the loaded updates", lambda: len(_reports(worker_log)) >= start + options.ticks, processes, timeout)
        loaded = [r for r in _reports(worker_log)[start : start + options.ticks] if r[2] >= options.clients]
        rss_after = _rss_kib(worker)
        if len(loaded) < options.ticks or len(baseline) < options.ticks:
            raise BenchmarkError(f"clients dropped during the measurement: {_reports(worker_log)[-options.ticks:]}")
        _stop(clients)
        received = re.search(r"ticks received (\d+)", _read(clients_out))
        ok = True
    finally:
        for process in reversed(processes):
            _stop(process)
        if not ok:
            _show_logs(workdir)
        if os.environ.get("PAPERTRADER_BENCH_KEEP"):
            print(f"  logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    result = {
        "kib_per_connection": (rss_after - rss_before) / options.clients,
        "stall_ms": max(r[1] for r in loaded),
        "baseline_stall_ms": max(r[1] for r in baseline),
        "median_stall_ms": statistics.median(r[1] for r in loaded),
    }
    result["stall_ratio"] = result["stall_ms"] / max(result["baseline_stall_ms"], 1e-3)
    print(
        f"  run {number}: worker RSS {rss_before / 1024:.0f} MiB -> {rss_after / 1024:.0f} MiB, "
        f"{result['kib_per_connection']:.1f} KiB per connection; longest stall per update "
        f"{result['stall_ms']:.1f} ms (median {result['median_stall_ms']:.1f} ms) with {options.clients} clients, "
        f"{result['baseline_stall_ms']:.1f} ms with none; ticks received by the clients: "
        f"{received.group(1) if received else '?'}",
        file=sys.stderr,
        flush=True,
    )
    return result


# ---------------------------------------------------------------- main


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Memory and reactor stalls of a worker with many idle TLS clients.")
    parser.add_argument("--clients", type=positive, default=10_000, help="idle client connections (10000)")
    parser.add_argument("--runs", type=positive, default=3, help="runs, each with a fresh deployment (3)")
    parser.add_argument("--ticks", type=positive, default=10, help="updates measured in each phase (10)")
    parser.add_argument("--update-interval", type=float, default=1.0, help="seconds between updates (1)")
    parser.add_argument("--concurrency", type=positive, default=50, help="handshakes the clients run at once (50)")
    parser.add_argument("--connect-timeout", type=float, default=900.0, help="seconds allowed to connect them all")
    return parser.parse_args(argv)


def _spread(values: list[float], unit: str) -> str:
    return f"min {min(values):.1f} / median {statistics.median(values):.1f} / max {max(values):.1f} {unit}"


def main(argv: Sequence[str]) -> None:
    if argv[:1] == ["_clients"]:
        host, port, ca, count, concurrency = argv[1:6]
        task.react(lambda reactor: _run_clients(reactor, host, int(port), ca, int(count), int(concurrency)))
        return
    options = _parse(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # clean up on SIGTERM too
    _raise_descriptor_limit(options.clients + 200)
    print(
        f"{options.clients} idle TLS clients on one worker, updates every {options.update_interval} s, "
        f"{options.ticks} updates measured per phase, {options.runs} runs",
        file=sys.stderr,
    )
    results = [_one_run(options, number) for number in range(1, options.runs + 1)]

    def column(key: str) -> list[float]:
        return [result[key] for result in results]

    kib = column("kib_per_connection")
    stall = column("stall_ms")
    print(f"worker RSS per connection: {_spread(kib, 'KiB')} (target <= {TARGET_KIB_PER_CONNECTION:.0f} KiB; "
          f"ratio to target, median {statistics.median(kib) / TARGET_KIB_PER_CONNECTION:.2f})")
    print(f"longest reactor stall per update, {options.clients} clients: {_spread(stall, 'ms')} "
          f"(target <= {TARGET_STALL_MS:.0f} ms)")
    print(f"longest reactor stall per update, no clients (baseline): {_spread(column('baseline_stall_ms'), 'ms')}")
    print(f"stall ratio clients / baseline: {_spread(column('stall_ratio'), 'x')}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except BenchmarkError as e:
        print(f"idle_clients: {e}", file=sys.stderr)
        raise SystemExit(1) from None
