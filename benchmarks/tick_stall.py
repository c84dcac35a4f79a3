"""Order acknowledgements and order-update pushes while a large queue settles, in a real deployment.

A real master (``twistd papertrader-master``) with one local worker, over TLS,
on SQLite or PostgreSQL.  C clients (default 1,000), each a user of its own,
stay connected.  Each round:

* right after a price update has settled, Q orders (default 100,000; Q / C
  per user, buys of one share) are stored straight into the database, as if
  they had been placed since (seeding: not timed);
* from a little before the next update until its pushes are over, every
  client places an order every ``--period`` seconds (default 1 s, at random
  phases) and times each acknowledgement;
* that update settles the Q orders (and the live ones placed before it).

Reported per round, then min/median/max over the rounds:

* **settle** -- the database's settlement time, as the master logs it (from
  recording the tick to its last chunk);
* **stall** -- the worst acknowledgement latency of the orders sent while the
  update settled, divided by the settlement time (target <= 1.2: no order
  waits for the whole settlement);
* **push** -- the time from the price update (its ``as_of``) to the last
  order update a client received for it, against settlement + 0.5 s;
* ack p50/p99 during the settlement, and the worst ack outside it (a baseline
  from the same run).

Run it from a source checkout::

    python benchmarks/tick_stall.py [--clients C] [--orders Q] [--rounds R] [--backend sqlite|postgresql]
        [--period S] [--update-interval I] [--profile]

With ``--profile``, py-spy records the master and the worker during each
round (``--profile-clients``: the client processes too; raw stacks in the kept
work directory; py-spy must be on PATH or in the venv).  PostgreSQL is found as in ``benchmarks/settlement.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402  (benchmarks/common.py, beside this script)
    HOST,
    PASSWORD,
    BenchmarkError,
    child_of,
    connect_retrying,
    show_logs,
    spawn,
    stop,
    wait_for_file,
)
from settlement import PostgreSQLBackend, find_postgresql  # noqa: E402
from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks  # noqa: E402

from papertrader import tls  # noqa: E402
from papertrader.client.library import PaperTraderClient, connect  # noqa: E402
from papertrader.errors import Busy  # noqa: E402
from papertrader.timestamps import iso  # noqa: E402

SYMBOLS = ("AAPL", "MSFT", "KO", "JPM", "XOM", "PFE", "WMT", "DIS")
STALL_TARGET = 1.2
PUSH_MARGIN = 0.5
# Live ordering starts this long before the update is due, and goes on this long after its pushes.
LEAD = 2.0
TAIL = 1.0
PUSH_TIMEOUT = 300.0
_NEW_PRICES = re.compile(r"new prices as of ([^;\s]+)")
_SETTLED = re.compile(r"update (\d+): (\d+) orders settled in ([\d.]+) s")


def _seconds(as_of: str) -> float:
    return datetime.fromisoformat(as_of).timestamp()


class MasterLog:
    """Follows the master's log: each update's time, orders settled and settlement seconds, as they end."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._offset = 0
        self._partial = ""
        self._as_of: str | None = None
        self.updates: list[dict[str, Any]] = []

    def poll(self) -> None:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                f.seek(self._offset)
                text = f.read()
                self._offset = f.tell()
        except FileNotFoundError:
            return
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            started = _NEW_PRICES.search(line)
            if started:
                self._as_of = started.group(1)
            settled = _SETTLED.search(line)
            if settled and self._as_of is not None:
                self.updates.append(
                    {
                        "tick": int(settled.group(1)),
                        "orders": int(settled.group(2)),
                        "seconds": float(settled.group(3)),
                        "as_of": self._as_of,
                    }
                )
                self._as_of = None


class Trader:
    """One connected user: places orders on a period while told to, times each answer, notes its updates."""

    def __init__(self, reactor: Any, client: PaperTraderClient, period: float, run: Run) -> None:
        self.reactor = reactor
        self.client = client
        self.period = period
        self.run = run
        self._call: Any = None
        client.on_order_update(self._update)

    def _update(self, update: dict[str, Any]) -> None:
        self.run.updated(update.get("settled_at"))

    def start(self) -> None:
        self._call = self.reactor.callLater(random.uniform(0, self.period), self._place)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _place(self) -> None:
        self._call = self.reactor.callLater(self.period, self._place)
        sent = time.time()

        def answered(_: Any) -> None:
            self.run.acks.append((sent, time.time()))

        def failed(failure: Any) -> None:
            self.run.failures.append(f"{failure.type.__name__}: {failure.getErrorMessage()}")

        self.client.buy(random.choice(SYMBOLS), 1).addCallbacks(answered, failed)


class Run:
    """What one client process records: (sent, acknowledged) times, failures, and per update time
    (``settled_at``) how many order updates arrived and when the last one did."""

    def __init__(self) -> None:
        self.acks: list[tuple[float, float]] = []
        self.failures: list[str] = []
        self.updates: dict[str, list[float]] = {}  # settled_at -> [count, last arrival]

    def updated(self, settled_at: str | None) -> None:
        entry = self.updates.setdefault(settled_at or "", [0, 0.0])
        entry[0] += 1
        entry[1] = time.time()

    def as_json(self) -> dict[str, Any]:
        return {"acks": self.acks, "failures": self.failures[:10], "failed": len(self.failures),
                "updates": self.updates}  # fmt: skip


# ---------------------------------------------------------------- seeding (straight into the database)


def seed_sqlite(path: str, user_ids: Sequence[int], orders: int, now: str) -> None:
    """Store ``orders`` queued buys, spread over the users, in one transaction."""
    rng = random.Random(len(user_ids))
    rows = [
        (user_ids[n % len(user_ids)], "buy", rng.choice(SYMBOLS), 1, "queued", now, now, "127.0.0.1:1", "seed")
        for n in range(orders)
    ]
    with sqlite3.connect(path, timeout=30) as connection:
        connection.executemany(
            "INSERT INTO orders (user_id, side, symbol, quantity, status, created_at, received_at, client_address, "
            "worker) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    connection.close()


def seed_postgresql(url: str, user_ids: Sequence[int], orders: int, now: str) -> None:
    """As `seed_sqlite`, with COPY."""
    import psycopg

    rng = random.Random(len(user_ids))
    with psycopg.connect(url) as connection:
        with connection.cursor().copy(
            "COPY orders (user_id, side, symbol, quantity, status, created_at, received_at, client_address, worker) "
            "FROM STDIN"
        ) as copy:
            for n in range(orders):
                copy.write_row(
                    (user_ids[n % len(user_ids)], "buy", rng.choice(SYMBOLS), 1, "queued", now, now, "127.0.0.1:1",
                     "seed")
                )  # fmt: skip


def user_ids(database: str, names: Sequence[str]) -> list[int]:
    """The ids of the users called ``names``."""
    if database.startswith("postgresql"):
        import psycopg

        with psycopg.connect(database) as connection:
            rows = connection.execute("SELECT id FROM users WHERE username = ANY(%s)", (list(names),)).fetchall()
    else:
        with sqlite3.connect(database, timeout=30) as connection:
            rows = connection.execute(
                f"SELECT id FROM users WHERE username IN ({','.join('?' * len(names))})", list(names)
            ).fetchall()
        connection.close()
    return [row[0] for row in rows]


# ---------------------------------------------------------------- measuring


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def wait(condition: Any, timeout: float, what: str, step: float = 0.02) -> None:
    """Wait until ``condition()`` is true, polling; BenchmarkError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise BenchmarkError(f"timed out waiting for {what}")
        time.sleep(step)


def touch(path: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write("1\n")


def write_json(path: str, value: Any) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(value, f)
    os.replace(path + ".tmp", path)


def read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


class Clients:
    """The client processes, driven through files in ``folder``: ``go-R`` / ``stop-R`` / ``exit`` in,
    ``ready-I``, ``status-I`` (update counts) and ``result-I-R.json`` out."""

    def __init__(self, folder: str, processes: list[subprocess.Popen]) -> None:
        self.folder = folder
        self.processes = processes

    def check(self) -> None:
        for process in self.processes:
            if process.poll() is not None:
                raise BenchmarkError(f"a client process exited with {process.returncode}")

    def ready(self) -> bool:
        self.check()
        return all(os.path.exists(os.path.join(self.folder, f"ready-{i}")) for i in range(len(self.processes)))

    def updates(self, settled_at: str) -> int:
        """Order updates for ``settled_at`` received so far, by every client."""
        self.check()
        return sum(
            (read_json(os.path.join(self.folder, f"status-{i}")) or {}).get(settled_at, 0)
            for i in range(len(self.processes))
        )

    def results(self, number: int) -> list[dict[str, Any]]:
        paths = [os.path.join(self.folder, f"result-{i}-{number}.json") for i in range(len(self.processes))]
        wait(lambda: (self.check(), all(os.path.exists(p) for p in paths))[1], 60, "the clients' results")
        return [read_json(path) for path in paths]

    def stop(self) -> None:
        touch(os.path.join(self.folder, "exit"))
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                stop(process)


def one_round(options: argparse.Namespace, log: MasterLog, clients: Clients, seed: Any,
              pids: dict[str, int | None], workdir: str, number: int) -> dict[str, Any]:  # fmt: skip
    """Seed the queue right after an update, order through the next one, and measure it."""
    seen = len(log.updates)
    wait(lambda: (log.poll(), len(log.updates) > seen)[1], options.update_interval * 3, "an update")
    previous = log.updates[-1]
    seed_started = time.time()
    seed(iso(seed_started))
    seeded = time.time()
    due = _seconds(previous["as_of"]) + options.update_interval
    if seeded > due - LEAD:
        raise BenchmarkError(
            f"seeding took {seeded - seed_started:.1f} s, past the next update; use a longer --update-interval"
        )
    profilers = _profile(pids, workdir, number, due - time.time() + 120) if options.profile else []
    time.sleep(max(0.0, due - LEAD - time.time()))
    touch(os.path.join(clients.folder, f"go-{number}"))
    # The next update, and every order update it pushes.
    wait(lambda: (log.poll(), len(log.updates) > seen + 1)[1], options.update_interval * 2, "the update")
    update = log.updates[seen + 1]
    as_of = update["as_of"]
    wait(
        lambda: clients.updates(as_of) >= update["orders"],
        PUSH_TIMEOUT,
        f"the {update['orders']} order updates of update {update['tick']}",
        step=0.1,
    )
    time.sleep(TAIL)
    touch(os.path.join(clients.folder, f"stop-{number}"))
    for profiler in profilers:
        profiler.send_signal(signal.SIGINT)  # py-spy writes its output when interrupted
    for profiler in profilers:
        profiler.wait(60)
    results = clients.results(number)
    failed = sum(r["failed"] for r in results)
    if failed:
        raise BenchmarkError(f"{failed} orders failed; first: {[f for r in results for f in r['failures']][:1]}")
    if update["orders"] < options.orders:
        raise BenchmarkError(f"update {update['tick']} settled {update['orders']} orders, fewer than seeded")

    start = _seconds(as_of)
    settle = update["seconds"]
    end = start + settle
    acks = [(sent, acked) for r in results for sent, acked in r["acks"]]
    during = [acked - sent for sent, acked in acks if start <= sent <= end]
    outside = [acked - sent for sent, acked in acks if sent < start or sent > end]
    last_push = max(r["updates"][as_of][1] for r in results if as_of in r["updates"]) - start
    if os.environ.get("PAPERTRADER_BENCH_KEEP"):
        with open(os.path.join(workdir, f"acks-{number}.txt"), "w", encoding="ascii") as f:
            f.writelines(f"{sent - start:.3f} {acked - sent:.3f}\n" for sent, acked in sorted(acks))
    worst = max(during) if during else float("nan")
    return {
        "tick": update["tick"],
        "orders": update["orders"],
        "settle": settle,
        "worst": worst,
        "stall": worst / settle,
        "p50": percentile(during, 0.5),
        "p99": percentile(during, 0.99),
        "sent": len(during),
        "outside": max(outside) if outside else float("nan"),
        "push": last_push,
    }


def _profile(pids: dict[str, int | None], workdir: str, number: int, seconds: float) -> list[subprocess.Popen]:
    """py-spy record of each process, to ``workdir/profile-NAME-ROUND.txt`` (raw, for flame graphs)."""
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    started = []
    for name, pid in pids.items():
        if pid is None:
            continue
        output = os.path.join(workdir, f"profile-{name}-{number}.txt")
        started.append(
            subprocess.Popen(
                [py_spy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw", "--idle",
                 "--duration", str(int(seconds)), "--output", output],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        )
    return started


def spread(values: Sequence[float], unit: str = "s", digits: int = 3) -> str:
    return (
        f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f} / {max(values):.{digits}f}"
        + (f" {unit}" if unit else "")
    )


def benchmark(options: argparse.Namespace, port: int, ca: str, database: str, seed_target: str,
              pids: dict[str, int | None], log: MasterLog, workdir: str) -> None:  # fmt: skip
    folder = os.path.join(workdir, "clients")
    os.makedirs(folder)
    share = -(-options.clients // options.client_processes)
    processes = []
    for index in range(options.client_processes):
        first = index * share
        count = min(share, options.clients - first)
        if count <= 0:
            break
        processes.append(
            spawn(
                [__file__, "_clients", "--port", str(port), "--ca", ca, "--first", str(first), "--count", str(count),
                 "--period", str(options.period), "--folder", folder, "--index", str(index)],
                os.path.join(workdir, f"clients-{index}.log"),
            )  # fmt: skip
        )
    clients = Clients(folder, processes)
    try:
        started = time.time()
        wait(clients.ready, 900, "the clients to log in", step=0.2)
        print(
            f"{options.clients} clients in {len(processes)} processes connected and logged in "
            f"({time.time() - started:.1f} s)",
            flush=True,
        )
        if options.profile_clients:
            pids.update({f"clients{i}": p.pid for i, p in enumerate(processes)})
        ids = user_ids(database, [f"stall{n}" for n in range(options.clients)])
        if len(ids) != options.clients:
            raise BenchmarkError(f"found {len(ids)} of {options.clients} users")
        if database.startswith("postgresql"):

            def seed(now: str) -> None:
                seed_postgresql(database, ids, options.orders, now)

        else:

            def seed(now: str) -> None:
                seed_sqlite(seed_target, ids, options.orders, now)

        rounds = []
        for number in range(1, options.rounds + 1):
            row = one_round(options, log, clients, seed, pids, workdir, number)
            rounds.append(row)
            print(
                f"  round {number}: update {row['tick']} settled {row['orders']} orders in {row['settle']:.3f} s; "
                f"worst ack during it {row['worst']:.3f} s ({row['sent']} orders; p50 {row['p50']:.3f} s, "
                f"p99 {row['p99']:.3f} s) = {row['stall']:.2f}x settlement; worst ack outside "
                f"{row['outside']:.3f} s; last order update {row['push']:.3f} s after the update",
                flush=True,
            )
    finally:
        clients.stop()

    print()
    print(
        f"{options.backend}: {options.orders} queued orders, {options.clients} clients ordering every "
        f"{options.period:g} s, {len(rounds)} rounds (min / median / max)"
    )
    print(f"  settlement           {spread([r['settle'] for r in rounds])}")
    print(f"  worst ack during it  {spread([r['worst'] for r in rounds])}")
    print(f"  ack p99 during it    {spread([r['p99'] for r in rounds])}")
    print(f"  worst ack outside    {spread([r['outside'] for r in rounds])}")
    stall = [r["stall"] for r in rounds]
    print(f"  stall ratio          {spread(stall, 'x', 2)}  worst ack / settlement; target <= {STALL_TARGET:g}x "
          f"({'met' if statistics.median(stall) <= STALL_TARGET else 'NOT met'})")  # fmt: skip
    late = [r["push"] - r["settle"] for r in rounds]
    print(f"  last update pushed   {spread([r['push'] for r in rounds])} after the price update; "
          f"{spread(late)} after settlement; target <= {PUSH_MARGIN:g} s after "
          f"({'met' if statistics.median(late) <= PUSH_MARGIN else 'NOT met'})")  # fmt: skip


# ---------------------------------------------------------------- a client process


@inlineCallbacks
def log_in(reactor: Any, port: int, ca: str, index: int) -> Any:
    """A new user, registered and logged in on its own connection (retrying while the master is BUSY)."""
    client = yield connect(reactor, HOST, port, ca)
    username = f"stall{index}"
    for step in (lambda: client.register(username, f"{username}@example.com", PASSWORD),
                 lambda: client.login(username, PASSWORD)):  # fmt: skip
        while True:
            try:
                yield step()
                break
            except Busy:
                yield task.deferLater(reactor, 0.2, lambda: None)
    return client


@inlineCallbacks
def client_process(reactor: Any, options: argparse.Namespace) -> Any:
    """Log ``count`` users in, then order from ``go-R`` until ``stop-R``, and write the round's results."""
    folder = options.folder
    probe = yield connect_retrying(reactor, options.port, options.ca)  # the worker has its master
    probe.close()
    run = Run()
    clients: list[PaperTraderClient] = []
    last = options.first + options.count
    for first in range(options.first, last, 8):
        clients.extend((yield gatherResults([log_in(reactor, options.port, options.ca, n)
                                             for n in range(first, min(first + 8, last))])))  # fmt: skip
    traders = [Trader(reactor, client, options.period, run) for client in clients]
    touch(os.path.join(folder, f"ready-{options.index}"))
    state: dict[str, Any] = {"round": 1, "going": False, "stopped_at": None, "status_at": 0.0}
    done: Deferred[None] = Deferred()

    def check() -> None:
        number = state["round"]
        if os.path.exists(os.path.join(folder, "exit")):
            loop.stop()
            for client in clients:
                client.close()
            done.callback(None)
            return
        if not state["going"] and os.path.exists(os.path.join(folder, f"go-{number}")):
            state["going"] = True
            for trader in traders:
                trader.start()
        elif state["going"] and state["stopped_at"] is None and os.path.exists(os.path.join(folder, f"stop-{number}")):
            for trader in traders:
                trader.stop()
            state["stopped_at"] = time.time()
        elif state["stopped_at"] is not None and time.time() > state["stopped_at"] + 1.0:
            # Answers still on their way have had a second to arrive.
            write_json(os.path.join(folder, f"result-{options.index}-{number}.json"), run.as_json())
            run.acks, run.failures = [], []
            state.update(round=number + 1, going=False, stopped_at=None)
        now = time.time()
        if now >= state["status_at"]:
            write_json(os.path.join(folder, f"status-{options.index}"), {k: v[0] for k, v in run.updates.items()})
            state["status_at"] = now + 0.1

    loop = task.LoopingCall(check)
    loop.clock = reactor
    loop.start(0.02)
    yield done


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--clients", type=int, default=1000, help="connected clients (default 1000)")
    parser.add_argument("--client-processes", type=int, default=4, help="processes they run in (default 4)")
    parser.add_argument("--orders", type=int, default=100_000, help="orders queued for each update (default 100000)")
    parser.add_argument("--rounds", type=int, default=3, help="updates measured (default 3)")
    parser.add_argument("--period", type=float, default=1.0, help="seconds between a client's orders (default 1)")
    parser.add_argument("--update-interval", type=float, default=30.0, help="the master's (default 30 s)")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--postgresql-admin", metavar="URL", help="a PostgreSQL URL allowed to CREATE DATABASE")
    parser.add_argument("--chunk-orders", type=int, help="the master's settlement_chunk_orders (default: its own)")
    parser.add_argument("--profile", action="store_true", help="py-spy the master and worker (keeps the work dir)")
    parser.add_argument("--profile-clients", action="store_true", help="with --profile: the client processes too")
    options = parser.parse_args(argv)
    if min(options.clients, options.client_processes, options.orders, options.rounds) < 1 or options.period <= 0:
        parser.error("--clients, --client-processes, --orders, --rounds and --period must be positive")
    return options


def main(argv: Sequence[str]) -> None:
    options = parse(argv)
    workdir = tempfile.mkdtemp(prefix="papertrader-stall-")
    data = os.path.join(workdir, "data")
    backend = None
    master = None
    try:
        if options.backend == "postgresql":
            admin, why = find_postgresql(options.postgresql_admin)
            if admin is None:
                raise BenchmarkError(f"PostgreSQL is unreachable ({why})")
            backend = PostgreSQLBackend(admin)
            database = backend.create()
            seed_target = database
        else:
            database = "sqlite:///papertrader.sqlite"
            seed_target = os.path.join(data, "papertrader.sqlite")
        extra = ["--settlement-chunk-orders", str(options.chunk_orders)] if options.chunk_orders else []
        master_log = os.path.join(workdir, "master.log")
        master = spawn(
            [
                "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "--logfile", master_log,
                "papertrader-master",
                "--data-dir", data,
                "--database", database,
                "--listen", f"tcp:0:interface={HOST}",
                "--worker-listen", f"tcp:0:interface={HOST}",
                "--update-interval", str(options.update_interval),
                "--bcrypt-cost", "4",
                "--registrations-per-address-per-hour", "100000",
                "--login-address-failures-allowed", "100000",
                "--starting-cash", "100000000.00",
                "--max-connections", str(options.clients + 100),
                *extra,
            ],
            os.path.join(workdir, "master.out"),
        )  # fmt: skip
        address = wait_for_file(os.path.join(data, "worker-local-1.address"), master)
        _, port = tls.split_address(address, 0)
        ca = os.path.join(data, "tls", "ca.pem")
        pids = {"master": master.pid, "worker": child_of(master.pid)}
        print(
            f"{options.backend}: master pid {pids['master']}, worker pid {pids['worker']}, work dir {workdir}",
            flush=True,
        )
        if database.startswith("sqlite:///"):
            database = os.path.join(data, database[len("sqlite:///") :])
        benchmark(options, port, ca, database, seed_target, pids, MasterLog(master_log), workdir)
    except BaseException:
        show_logs(workdir)
        raise
    finally:
        if master is not None:
            stop(master)
        if backend is not None:
            backend.destroy()
        if options.profile or os.environ.get("PAPERTRADER_BENCH_KEEP"):
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _clients_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="tick_stall.py _clients")
    for name in ("--port", "--first", "--count", "--index"):
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--period", type=float, required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--folder", required=True)
    options = parser.parse_args(argv)
    task.react(client_process, (options,))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_clients":
        _clients_main(sys.argv[2:])
    else:
        try:
            main(sys.argv[1:])
        except (BenchmarkError, subprocess.SubprocessError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
