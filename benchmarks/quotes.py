"""Quote throughput of a worker answering from its cache, against the same worker relaying every quote.

Two real deployments run side by side (``twistd papertrader-master``, each
with its local worker, TLS on every link, an update an hour so no update
comes during a measurement): one as shipped, whose worker answers
GetAssetValue from its quote cache, and one whose worker was started with
``PAPERTRADER_QUOTE_CACHE=off`` (see `papertrader.worker.cache`), which makes
it pass every GetAssetValue on to the master as RelayedGetAssetValue and
wait for the answer -- what every quote cost before the cache, and what a
cache miss costs now.  That is the baseline: the same clients, the same
request and the same answer, over the same two hops when relayed; the only
difference is whether the worker answers itself.

C client connections each keep W quote requests in flight, N requests in
all, cycling over a few symbols; each measurement runs R times (default 3),
alternating the two deployments, and the best of each is reported with the
ratio cached / relayed.  On Linux the CPU time each process used during the
best round is reported too, per request.  Run it from a source checkout::

    python benchmarks/quotes.py [--quotes N] [--connections C] [--window W] [--rounds R]

Set PAPERTRADER_BENCH_KEEP=1 to keep (and print) the temporary directory with
the logs; on failure their ends are printed anyway.
"""

from __future__ import annotations

import argparse
import os
import signal
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

from common import (  # noqa: E402  (benchmarks/common.py, beside this script)
    CPU,
    HOST,
    BenchmarkError,
    child_env,
    child_of,
    clean_up,
    connect_retrying,
    positive,
    run_measurement,
    show_logs,
    wait_for_file,
)
from twisted.internet.defer import Deferred, inlineCallbacks  # noqa: E402

from papertrader import tls  # noqa: E402
from papertrader.client.library import PaperTraderClient  # noqa: E402
from papertrader.worker.cache import QUOTE_CACHE_ENV  # noqa: E402

SYMBOLS = ("AAPL", "MSFT", "KO", "GOOGL", "AMZN")


def _spawn_master(workdir: str, name: str, cache: bool) -> tuple[subprocess.Popen, str]:
    """Start a master (and its local worker) in ``workdir/name``; its worker answers quotes from its cache
    only if ``cache``.  Returns the process and its data directory."""
    base = os.path.join(workdir, name)
    data = os.path.join(base, "data")
    os.makedirs(base)
    env = child_env()
    if not cache:
        env[QUOTE_CACHE_ENV] = "off"  # inherited by the local worker the master starts
    with open(os.path.join(base, "master.out"), "ab") as out:
        process = subprocess.Popen(
            [
                sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "--logfile", os.path.join(base, "master.log"),
                "papertrader-master",
                "--data-dir", data,
                "--listen", f"tcp:0:interface={HOST}",
                "--worker-listen", f"tcp:0:interface={HOST}",
                "--directory-listen", f"tcp:0:interface={HOST}",
                "--update-interval", "3600",
                "--bcrypt-cost", "4",
            ],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    return process, data


class _Run:
    """One measurement: N quotes over C connections, W in flight on each; ``done`` fires with the seconds."""

    def __init__(self, clients: Sequence[PaperTraderClient], quotes: int, window: int) -> None:
        self.clients = clients
        self.remaining = quotes
        self.window = window
        self.outstanding = 0
        self.sent = 0
        self.failures = 0
        self.first_failure: str | None = None
        self.done: Deferred[float] = Deferred()
        self._started = 0.0

    def start(self) -> Deferred[float]:
        self._started = time.perf_counter()
        for client in self.clients:
            for _ in range(self.window):
                self._send(client)
        return self.done

    def _send(self, client: PaperTraderClient) -> None:
        if self.remaining <= 0 or self.failures:
            if self.outstanding == 0 and not self.done.called:
                self._finish()
            return
        self.remaining -= 1
        self.outstanding += 1
        symbol = SYMBOLS[self.sent % len(SYMBOLS)]
        self.sent += 1
        client.quote(symbol).addCallbacks(self._answered, self._failed, (client, symbol), None, (client,))

    def _answered(self, answer: dict[str, Any], client: PaperTraderClient, symbol: str) -> None:
        if answer.get("symbol") != symbol or not isinstance(answer.get("price_cents"), int):
            self._failure(f"unexpected answer for {symbol}: {answer!r}")
        self.outstanding -= 1
        self._send(client)

    def _failed(self, failure: Any, client: PaperTraderClient) -> None:
        self._failure(f"{failure.type.__name__}: {failure.getErrorMessage()}")
        self.outstanding -= 1
        self._send(client)

    def _failure(self, why: str) -> None:
        self.failures += 1
        if self.first_failure is None:
            self.first_failure = why

    def _finish(self) -> None:
        elapsed = time.perf_counter() - self._started
        if self.failures:
            self.done.errback(BenchmarkError(f"{self.failures} quotes failed; first: {self.first_failure}"))
        else:
            self.done.callback(elapsed)


@inlineCallbacks
def _benchmark(reactor: Any, targets: dict[str, tuple[int, str, int]], options: argparse.Namespace) -> Any:
    """Connect to both workers, measure them alternately, print the results."""
    me = os.getpid()
    connected: dict[str, tuple[list[PaperTraderClient], dict[str, int | None]]] = {}
    for name, (port, ca, master_pid) in targets.items():
        clients = []
        for _ in range(options.connections):
            clients.append((yield connect_retrying(reactor, port, ca)))
        processes = {"client": me, "worker": child_of(master_pid), "master": master_pid}
        connected[name] = (clients, processes)
    best = {name: 0.0 for name in connected}
    cpu_of_best = {name: "" for name in connected}
    for round_number in range(1, options.rounds + 1):
        for name, (clients, processes) in connected.items():
            cpu = CPU(processes)
            cpu.start()
            elapsed = yield _Run(clients, options.quotes, options.window).start()
            cpu.stop()
            rate = options.quotes / elapsed if elapsed > 0 else float("inf")
            if rate > best[name]:
                best[name], cpu_of_best[name] = rate, cpu.per_order(options.quotes).replace("/order", "/quote")
            print(f"  round {round_number}: {name} {rate:.0f} quotes/s ({elapsed:.2f} s)", file=sys.stderr)
    for clients, _ in connected.values():
        for client in clients:
            client.close()
    print(
        f"cached (worker answers): {best['cached']:.0f} quotes/s "
        f"({options.quotes} quotes, {options.connections} connections, window {options.window})"
    )
    print(f"relayed baseline (worker asks the master): {best['relayed']:.0f} quotes/s")
    print(f"ratio: {best['cached'] / best['relayed']:.2f}")
    for name, text in cpu_of_best.items():
        if text:
            print(f"cpu {name}: {text}")


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Cached quote throughput against quotes relayed to the master.")
    parser.add_argument("--quotes", type=positive, default=20000, help="quotes per measurement (20000)")
    parser.add_argument("--connections", type=positive, default=4, help="client connections (4)")
    parser.add_argument("--window", type=positive, default=64, help="requests in flight per connection (64)")
    parser.add_argument("--rounds", type=positive, default=3, help="measurements of each; the best counts (3)")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> None:
    """Start both deployments, measure, clean up whatever happens."""
    options = _parse(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # clean up on SIGTERM too
    workdir = tempfile.mkdtemp(prefix="papertrader-bench-")
    processes: list[subprocess.Popen] = []
    try:
        targets: dict[str, tuple[int, str, int]] = {}
        for name, cache in (("cached", True), ("relayed", False)):
            master, data = _spawn_master(workdir, name, cache)
            processes.append(master)
            address = wait_for_file(os.path.join(data, "worker-local-1.address"), master)
            _, port = tls.split_address(address, 0)
            targets[name] = (port, os.path.join(data, "tls", "ca.pem"), master.pid)
        run_measurement(lambda reactor: _benchmark(reactor, targets, options))
    except BaseException:
        show_logs(workdir)
        raise
    finally:
        clean_up(processes, workdir)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
