"""Order acknowledgements while a storm of logins hits the same deployment.

A real master (bcrypt at the production cost, 12 by default) with one local
worker.  One client places orders one at a time and times each answer (the
order is then durably queued); this runs twice per round:

* **idle** -- nothing else happens;
* **storm** -- a separate process keeps U connections (default 20) logging in
  back to back (each login is one bcrypt check), retrying shortly on ``BUSY``.

Reported, min/median/max over the rounds: order-ack p50 and p99 in each phase,
the ratio storm p99 / idle p99 (target <= 2), and logins per second during the
storm against ``cores / bcrypt time`` (target >= 80 %), with the bcrypt time
measured in this run (the median of 5 checks at the same cost in this
process, before any load).  Also printed: how many logins were told BUSY.

Run it from a source checkout::

    python benchmarks/login_storm.py [--orders K] [--users U] [--rounds R] [--bcrypt-cost C]
        [--hashing-processes P] [--hashing-nice N]
"""

from __future__ import annotations

import argparse
import os
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

import bcrypt  # noqa: E402
from common import (  # noqa: E402  (benchmarks/common.py, beside this script)
    HOST,
    PASSWORD,
    SYMBOL,
    BenchmarkError,
    clean_up,
    connect_retrying,
    positive,
    run_measurement,
    show_logs,
    spawn,
    wait_for_file,
)
from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred, inlineCallbacks  # noqa: E402

from papertrader import tls  # noqa: E402
from papertrader.client.library import connect  # noqa: E402
from papertrader.errors import Busy  # noqa: E402


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value below which ``fraction`` of ``values`` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def bcrypt_seconds(cost: int, times: int = 5) -> float:
    """The median time of one bcrypt check at ``cost`` in this process."""
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(cost))
    taken = []
    for _ in range(times):
        started = time.perf_counter()
        bcrypt.checkpw(PASSWORD.encode(), hashed)
        taken.append(time.perf_counter() - started)
    return statistics.median(taken)


@inlineCallbacks
def _timed_orders(client: Any, count: int) -> Any:
    """Place ``count`` orders one after another; the seconds each took to be acknowledged."""
    taken = []
    for _ in range(count):
        started = time.perf_counter()
        answer = yield client.buy(SYMBOL, 1)
        taken.append(time.perf_counter() - started)
        if not isinstance(answer.get("order_id"), int):
            raise BenchmarkError(f"an order was not accepted: {answer!r}")
    return taken


def _describe(name: str, values: Sequence[float], unit: str = "ms", scale: float = 1000.0) -> str:
    return (
        f"{name}: min {min(values) * scale:.1f} / median {statistics.median(values) * scale:.1f} / "
        f"max {max(values) * scale:.1f} {unit}"
    )


@inlineCallbacks
def _benchmark(reactor: Any, port: int, ca: str, workdir: str, options: argparse.Namespace) -> Any:
    bcrypt_time = bcrypt_seconds(options.bcrypt_cost)
    cores = len(os.sched_getaffinity(0))
    probe = yield connect_retrying(reactor, port, ca)
    probe.close()
    trader = yield connect(reactor, HOST, port, ca)
    yield trader.register("trader", "trader@example.com", PASSWORD)
    yield trader.login("trader", PASSWORD)
    for n in range(options.users):
        yield trader.register(f"storm{n}", f"storm{n}@example.com", PASSWORD)
    yield _timed_orders(trader, 100)  # warm up

    results: dict[str, list[float]] = {key: [] for key in ("idle50", "idle99", "storm50", "storm99", "ratio", "rate")}
    busy_total = 0
    for round_number in range(1, options.rounds + 1):
        idle = yield _timed_orders(trader, options.orders)
        count_file = os.path.join(workdir, f"storm-{round_number}.count")
        storm = spawn(
            [__file__, "_storm", "--port", str(port), "--ca", ca, "--users", str(options.users),
             "--count-file", count_file],
            os.path.join(workdir, "storm.log"),
        )  # fmt: skip
        try:
            wait_for_file(count_file + ".ready", storm)
            storm_started = time.perf_counter()
            stormy = yield _timed_orders(trader, options.orders)
            stormed = time.perf_counter() - storm_started
        finally:
            storm.send_signal(signal.SIGTERM)
            storm.wait(30)
        # Logins counted over the whole storm, and how long it lasted.
        with open(count_file, encoding="ascii") as f:
            logins_text, busy_text, seconds_text = f.read().split()
        logins, busy, storm_seconds = int(logins_text), int(busy_text), float(seconds_text)
        busy_total += busy
        row = {
            "idle50": percentile(idle, 0.5),
            "idle99": percentile(idle, 0.99),
            "storm50": percentile(stormy, 0.5),
            "storm99": percentile(stormy, 0.99),
            "rate": logins / storm_seconds,
        }
        row["ratio"] = row["storm99"] / row["idle99"]
        for key, value in row.items():
            results[key].append(value)
        print(
            f"  round {round_number}: idle p50 {row['idle50'] * 1000:.1f} p99 {row['idle99'] * 1000:.1f} ms; "
            f"storm p50 {row['storm50'] * 1000:.1f} p99 {row['storm99'] * 1000:.1f} ms "
            f"({stormed:.1f} s of orders); {logins} logins in {storm_seconds:.1f} s, {busy} BUSY",
            file=sys.stderr,
        )
    trader.close()

    target_rate = 0.8 * cores / bcrypt_time
    print(f"bcrypt cost {options.bcrypt_cost}: {bcrypt_time * 1000:.0f} ms a check; {cores} cores; "
          f"{options.orders} orders a phase, {options.users} storming connections, {options.rounds} rounds")
    print(_describe("order ack p50 idle", results["idle50"]))
    print(_describe("order ack p99 idle", results["idle99"]))
    print(_describe("order ack p50 storm", results["storm50"]))
    print(_describe("order ack p99 storm", results["storm99"]))
    print(_describe("ratio p99 storm / idle (target <= 2)", results["ratio"], unit="", scale=1.0))
    print(_describe("logins/s during the storm", results["rate"], unit="/s", scale=1.0))
    print(f"  = {statistics.median(results['rate']) / target_rate:.2f} of 80% x cores / bcrypt time "
          f"({target_rate:.1f}/s; target >= 1.0); {statistics.median(results['rate']) * bcrypt_time:.2f} "
          f"bcrypt checks running on average; {busy_total} logins told BUSY in all")


# ---------------------------------------------------------------- the storm process


@inlineCallbacks
def _storm(reactor: Any, options: argparse.Namespace) -> Any:
    """Keep ``users`` connections logging in until SIGTERM; then write "logins busy seconds"."""
    clients = []
    for _ in range(options.users):
        clients.append((yield connect(reactor, HOST, options.port, options.ca)))
    counts = {"logins": 0, "busy": 0}
    stopping: list[bool] = []
    started = time.perf_counter()

    @inlineCallbacks
    def keep_logging_in(client: Any, username: str) -> Any:
        while not stopping:
            try:
                yield client.login(username, PASSWORD)
                counts["logins"] += 1
            except Busy:
                counts["busy"] += 1
                yield task.deferLater(reactor, 0.05, lambda: None)

    done: Deferred[None] = Deferred()

    def finish() -> None:
        stopping.append(True)
        elapsed = time.perf_counter() - started
        with open(options.count_file + ".tmp", "w", encoding="ascii") as f:
            f.write(f"{counts['logins']} {counts['busy']} {elapsed:.3f}\n")
        os.replace(options.count_file + ".tmp", options.count_file)
        done.callback(None)

    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(finish))
    for n, client in enumerate(clients):
        keep_logging_in(client, f"storm{n}")
    with open(options.count_file + ".ready", "w", encoding="ascii") as f:
        f.write("ready\n")
    yield done


# ---------------------------------------------------------------- main


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description="Order acks during a storm of logins.")
    parser.add_argument("--orders", type=positive, default=3000, help="orders timed in each phase (3000)")
    parser.add_argument("--users", type=positive, default=20, help="connections logging in during the storm (20)")
    parser.add_argument("--rounds", type=positive, default=3, help="idle + storm rounds (3)")
    parser.add_argument("--bcrypt-cost", type=int, default=12, help="the master's bcrypt cost (12)")
    parser.add_argument("--hashing-processes", type=int, default=0, help="the master's hashing_processes (0)")
    parser.add_argument("--hashing-nice", type=int, default=10, help="the master's hashing_nice (10)")
    options = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    workdir = tempfile.mkdtemp(prefix="papertrader-storm-")
    data = os.path.join(workdir, "data")
    master = None
    try:
        master = spawn(
            [
                "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "--logfile", os.path.join(workdir, "master.log"),
                "papertrader-master",
                "--data-dir", data,
                "--listen", f"tcp:0:interface={HOST}",
                "--worker-listen", f"tcp:0:interface={HOST}",
                "--update-interval", "3600",
                "--bcrypt-cost", str(options.bcrypt_cost),
                "--hashing-processes", str(options.hashing_processes),
                "--hashing-nice", str(options.hashing_nice),
                "--registrations-per-address-per-hour", "100000",
                "--login-address-failures-allowed", "100000",
                "--max-order-quantity", "1000000",
                "--starting-cash", "100000000000.00",
            ],
            os.path.join(workdir, "master.out"),
        )  # fmt: skip
        address = wait_for_file(os.path.join(data, "worker-local-1.address"), master)
        _, port = tls.split_address(address, 0)
        ca = os.path.join(data, "tls", "ca.pem")
        run_measurement(lambda reactor: _benchmark(reactor, port, ca, workdir, options))
    except BaseException:
        show_logs(workdir)
        raise
    finally:
        clean_up([master] if master is not None else [], workdir)


def _storm_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="login_storm.py _storm")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--count-file", required=True)
    options = parser.parse_args(argv)
    task.react(_storm, (options,))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_storm":
        _storm_main(sys.argv[2:])
    else:
        try:
            main(sys.argv[1:])
        except (BenchmarkError, subprocess.SubprocessError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
