"""Order throughput of a real PaperTrader deployment against a bare AMP/TLS relay.

Measures how many PurchaseAsset orders per second a master with one local
worker accepts (every answer an order id, i.e. the order is durably queued),
with C client connections each keeping a window of W calls in flight, M orders
in all.  The baseline, in the same run and on the same machine, is the least a
two-hop design can do: a "relay" process that forwards each PurchaseAsset over
one AMP/TLS connection to a "sink" process that answers it with a counter --
no batching, no validation, no database.  Clients reach the relay exactly as
they reach the worker (same library, connections, window and order count).

Run it from a source checkout::

    python benchmarks/orders.py [--orders N] [--connections C] [--window W] [--rounds R] [--batch B]

With ``--batch B`` each client sends its orders B to a PlaceOrders (the relay
baseline still gets one PurchaseAsset per order: it is the least a two-hop
design can do per order).

Each measurement runs R times (default 3), alternating deployment and relay,
and the best of each is reported along with the ratio papertrader / relay.
On Linux the CPU time each process used during the best round is reported
too, per order: on a machine with fewer free cores than busy processes the
throughput ratio is really a ratio of CPU cost, and these lines say where it
goes.  Set PAPERTRADER_BENCH_KEEP=1 to keep (and print) the temporary
directory with the master's and worker's logs; on failure their ends are
printed anyway.

The sink and relay are this script again, started with the hidden
sub-commands ``_sink`` and ``_relay``.
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
    SYMBOL,
    BenchmarkError,
    child_of,
    clean_up,
    connect_retrying,
    log_in,
    positive,
    run_measurement,
    show_logs,
    spawn,
    wait_for_file,
    write_port,
)
from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred, inlineCallbacks  # noqa: E402
from twisted.internet.protocol import Factory  # noqa: E402
from twisted.protocols import amp  # noqa: E402

from papertrader import tls  # noqa: E402
from papertrader.client.library import PaperTraderClient, connect  # noqa: E402
from papertrader.protocol import PurchaseAsset  # noqa: E402

# ---------------------------------------------------------------- processes


# ---------------------------------------------------------------- the baseline: sink and relay


class _Sink(amp.CommandLocator):
    """Answers every PurchaseAsset with the next number."""

    def __init__(self) -> None:
        self.last = 0

    @PurchaseAsset.responder
    def purchase(self, token: str, symbol: str, quantity: str, client_order_id: str | None = None) -> dict[str, int]:
        self.last += 1
        return {"order_id": self.last}


class _Relay(amp.CommandLocator):
    """Forwards each PurchaseAsset to the sink, one call per message."""

    def __init__(self, upstream: amp.AMP) -> None:
        self.upstream = upstream

    @PurchaseAsset.responder
    def purchase(self, token: str, symbol: str, quantity: str, client_order_id: str | None = None) -> Deferred:
        return self.upstream.callRemote(
            PurchaseAsset, token=token, symbol=symbol, quantity=quantity, client_order_id=client_order_id
        )


def _identity(tls_dir: str, label: str) -> tls.Identity:
    return tls.Identity(
        certificate=os.path.join(tls_dir, label + ".pem"),
        key=os.path.join(tls_dir, label + ".key"),
        ca=os.path.join(tls_dir, "ca.pem"),
    )


def _until_stopped(reactor: Any) -> Deferred:
    """Never fires: runs until SIGTERM, or until the benchmark that started this process is gone."""
    parent = os.getppid()

    def check() -> None:
        if os.getppid() != parent:
            reactor.stop()

    task.LoopingCall(check).start(1.0, now=False)
    return Deferred()


@inlineCallbacks
def _run_sink(reactor: Any, tls_dir: str, port_file: str) -> Any:
    """Listen like the master (TLS, client certificate required) and answer orders."""
    options = tls.server_options(_identity(tls_dir, "master"), require_client_certificate=True)
    sink = _Sink()
    endpoint = tls.tls_server_endpoint(reactor, f"tcp:0:interface={HOST}", options)
    port = yield endpoint.listen(Factory.forProtocol(lambda: amp.AMP(locator=sink)))
    write_port(port_file, port.getHost().port)
    yield _until_stopped(reactor)


@inlineCallbacks
def _run_relay(reactor: Any, tls_dir: str, sink_port: int, port_file: str) -> Any:
    """Connect to the sink like a worker to the master, then listen like a worker."""
    identity = _identity(tls_dir, "worker-local-1")
    upstream_options = tls.client_options(HOST, identity.ca, identity)
    endpoint = tls.tls_client_endpoint(reactor, HOST, sink_port, upstream_options)
    upstream = yield endpoint.connect(Factory.forProtocol(amp.AMP))
    relay = _Relay(upstream)
    server = tls.tls_server_endpoint(reactor, f"tcp:0:interface={HOST}", tls.server_options(identity))
    port = yield server.listen(Factory.forProtocol(lambda: amp.AMP(locator=relay)))
    write_port(port_file, port.getHost().port)
    yield _until_stopped(reactor)


# ---------------------------------------------------------------- the client side


class _Stream:
    """Sends one connection's share of orders, keeping ``window`` of them in flight, ``batch`` to a message."""

    def __init__(self, client: PaperTraderClient, count: int, window: int, batch: int, run: _Run) -> None:
        self.client = client
        self.remaining = count
        self.window = window
        self.batch = batch
        self.run = run

    def start(self) -> None:
        for _ in range(max(1, self.window // self.batch)):
            if self.remaining > 0:
                self._send()

    def _send(self) -> None:
        if self.batch == 1:
            self.remaining -= 1
            self.run.outstanding += 1
            self.client.buy(SYMBOL, 1).addCallbacks(self._answered, self._failed)
            return
        size = min(self.batch, self.remaining)
        self.remaining -= size
        self.run.outstanding += size
        orders = [{"side": "buy", "symbol": SYMBOL, "quantity": 1}] * size
        self.client.place_orders(orders).addCallbacks(self._batch_answered, self._failed, errbackArgs=(size,))

    def _answered(self, answer: dict[str, Any]) -> None:
        if isinstance(answer.get("order_id"), int):
            self.run.ok += 1
        else:
            self.run.failure(f"answer without an order id: {answer!r}")
        self._next(1)

    def _batch_answered(self, results: list[Any]) -> None:
        for result in results:
            if result.order_id is not None:
                self.run.ok += 1
            else:
                self.run.failure(f"refused: {result.error()!r}")
        self._next(len(results))

    def _failed(self, failure: Any, count: int = 1) -> None:
        self.run.failure(f"{failure.type.__name__}: {failure.getErrorMessage()}")
        self._next(count)

    def _next(self, answered: int) -> None:
        self.run.outstanding -= answered
        if self.run.failures:
            if self.run.outstanding == 0:
                self.run.finish()
            return
        if self.remaining > 0:
            self._send()
        elif self.run.outstanding == 0:
            self.run.finish()


class _Run:
    """One measurement: M orders over C connections; ``done`` fires with the elapsed seconds."""

    def __init__(self, clients: Sequence[PaperTraderClient], orders: int, window: int, batch: int = 1) -> None:
        share, extra = divmod(orders, len(clients))
        self.streams = [_Stream(c, share + (i < extra), window, batch, self) for i, c in enumerate(clients)]
        self.outstanding = 0
        self.ok = 0
        self.failures = 0
        self.first_failure: str | None = None
        self.done: Deferred[float] = Deferred()
        self._started = 0.0

    def start(self) -> Deferred[float]:
        self._started = time.perf_counter()
        for stream in self.streams:
            stream.start()
        return self.done

    def failure(self, why: str) -> None:
        self.failures += 1
        if self.first_failure is None:
            self.first_failure = why

    def finish(self) -> None:
        elapsed = time.perf_counter() - self._started
        if self.failures:
            self.done.errback(
                BenchmarkError(f"{self.failures} orders failed ({self.ok} accepted); first: {self.first_failure}")
            )
        else:
            self.done.callback(elapsed)


def _rate(orders: int, seconds: float) -> float:
    return orders / seconds if seconds > 0 else float("inf")


@inlineCallbacks
def _benchmark(
    reactor: Any, worker_port: int, relay_port: int, ca: str, pids: dict[str, int], options: argparse.Namespace
) -> Any:
    """Connect everything, measure both targets alternately, print the results."""
    probe = yield connect_retrying(reactor, worker_port, ca)
    probe.close()
    ours = []
    for i in range(options.connections):
        ours.append((yield log_in(reactor, worker_port, ca, i + 1)))
    theirs = []
    for client in ours:
        relayed = yield connect(reactor, HOST, relay_port, ca)
        relayed.token = client.token  # the same message, byte for byte
        relayed.max_requests_in_flight = options.window  # one PurchaseAsset per order, never a PlaceOrders
        theirs.append(relayed)

    me = os.getpid()
    targets = {
        "papertrader": (ours, {"client": me, "worker": child_of(pids["master"]), "master": pids["master"]}),
        "relay": (theirs, {"client": me, "relay": pids["relay"], "sink": pids["sink"]}),
    }
    best = {name: 0.0 for name in targets}
    cpu_of_best = {name: "" for name in targets}
    for round_number in range(1, options.rounds + 1):
        for name, (clients, processes) in targets.items():
            cpu = CPU(processes)
            cpu.start()
            batch = options.batch if name == "papertrader" else 1  # the bare relay knows single orders only
            elapsed = yield _Run(clients, options.orders, options.window, batch).start()
            cpu.stop()
            rate = _rate(options.orders, elapsed)
            if rate > best[name]:
                best[name], cpu_of_best[name] = rate, cpu.per_order(options.orders)
            print(
                f"  round {round_number}: {name} {rate:.0f} orders/s ({elapsed:.2f} s) {cpu.per_order(options.orders)}",
                file=sys.stderr,
            )
    for client in ours + theirs:
        client.close()

    print(
        f"papertrader: {best['papertrader']:.0f} orders/s "
        f"({options.orders} orders, {options.connections} connections, window {options.window}, "
        f"client batches of {options.batch})"
    )
    print(f"relay baseline: {best['relay']:.0f} orders/s")
    target = 1.5 if options.batch == 1 else 3.0
    print(f"ratio: {best['papertrader'] / best['relay']:.2f} (target >= {target})")
    for name, text in cpu_of_best.items():
        if text:
            print(f"cpu {name}: {text}")


# ---------------------------------------------------------------- main


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="PaperTrader order throughput against a bare AMP/TLS relay.")
    parser.add_argument("--orders", type=positive, default=20000, help="orders per measurement (20000)")
    parser.add_argument("--connections", type=positive, default=4, help="client connections, one user each (4)")
    parser.add_argument("--window", type=positive, default=256, help="calls in flight per connection (256)")
    parser.add_argument("--rounds", type=positive, default=3, help="measurements of each; the best counts (3)")
    parser.add_argument(
        "--batch", type=positive, default=1,
        help="orders per PlaceOrders from each client (1: single orders, which the library batches while busy)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> None:
    """Start a deployment and the baseline, measure both, clean up whatever happens."""
    options = _parse(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # clean up on SIGTERM too
    workdir = tempfile.mkdtemp(prefix="papertrader-bench-")
    data = os.path.join(workdir, "data")
    tls_dir = os.path.join(data, "tls")
    processes: list[subprocess.Popen] = []
    try:
        master_log = os.path.join(workdir, "master.log")
        master = spawn(
            [
                "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "--logfile", master_log,
                "papertrader-master",
                "--data-dir", data,
                "--listen", f"tcp:0:interface={HOST}",
                "--worker-listen", f"tcp:0:interface={HOST}",
                "--update-interval", "3600",
                "--bcrypt-cost", "4",
                "--max-order-quantity", "1000000",
                "--starting-cash", "100000000000.00",
            ],
            os.path.join(workdir, "master.out"),
        )  # fmt: skip
        processes.append(master)
        address = wait_for_file(os.path.join(data, "worker-local-1.address"), master)
        _, worker_port = tls.split_address(address, 0)

        sink_file = os.path.join(workdir, "sink.port")
        sink_log = os.path.join(workdir, "sink.log")
        sink = spawn([__file__, "_sink", "--tls-dir", tls_dir, "--port-file", sink_file], sink_log)
        processes.append(sink)
        sink_port = wait_for_file(sink_file, sink)

        relay_file = os.path.join(workdir, "relay.port")
        relay_log = os.path.join(workdir, "relay.log")
        relay = spawn(
            [__file__, "_relay", "--tls-dir", tls_dir, "--sink-port", sink_port, "--port-file", relay_file],
            relay_log,
        )
        processes.append(relay)
        relay_port = int(wait_for_file(relay_file, relay))

        ca = os.path.join(tls_dir, "ca.pem")
        pids = {"master": master.pid, "relay": relay.pid, "sink": sink.pid}
        run_measurement(lambda reactor: _benchmark(reactor, worker_port, relay_port, ca, pids, options))
    except BaseException:
        show_logs(workdir)
        raise
    finally:
        clean_up(processes, workdir)


def _sub_command(argv: Sequence[str]) -> None:
    """The hidden ``_sink`` and ``_relay`` processes of the baseline."""
    parser = argparse.ArgumentParser(prog="orders.py " + argv[0])
    parser.add_argument("--tls-dir", required=True)
    parser.add_argument("--port-file", required=True)
    if argv[0] == "_relay":
        parser.add_argument("--sink-port", type=int, required=True)
    options = parser.parse_args(argv[1:])
    if argv[0] == "_sink":
        task.react(_run_sink, (options.tls_dir, options.port_file))
    else:
        task.react(_run_relay, (options.tls_dir, options.sink_port, options.port_file))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("_sink", "_relay"):
        _sub_command(sys.argv[1:])
    else:
        try:
            main(sys.argv[1:])
        except BenchmarkError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
