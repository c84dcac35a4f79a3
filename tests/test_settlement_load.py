"""Settlement while orders keep arriving: neither may starve the other, and no order settles before it was placed."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from papertrader.client.library import connect
from papertrader.master.database import Database
from papertrader.master.trading import NewOrder, refuse_reason, settle_orders
from papertrader.timestamps import iso
from tests.databases import fresh_database_url, fresh_postgresql, query
from tests.processes import RunningDeployment

USERS = 4
IN_FLIGHT = 3
TICKS = 20
PRICES = {"AAPL": 19_000, "KO": 6_000}
START = 1_800_000_000.0
PROCESS_TICKS = 20
ORDER_LOOPS = 3
MAX_PROCESS_ORDERS = 20_000
PASSWORD = "correct horse battery"


class SettlementUnderLoadMixin:
    """A steady stream of order commits runs through the real pool while ticks settle one after another."""

    backend: str
    timeout = 300
    log = Logger()

    @inlineCallbacks
    def setUp(self) -> Any:
        self.url = fresh_database_url(self, self.backend)
        self.database = Database.open(self.url, self.mktemp())
        self.addCleanup(self.database.close)
        yield self.database.migrate()
        self.users = []
        for n in range(USERS):
            user_id = yield self.database.create_user(f"u{n}", f"u{n}@example.com", "h", 10**12, iso(START))
            self.users.append((user_id, f"u{n}"))
        self.instants = 0

    def now(self) -> str:
        """The next instant: every call is later than the one before, as a clock read would be."""
        self.instants += 1
        return iso(START + self.instants / 1000)

    @inlineCallbacks
    def test_ticks_settle_while_orders_stream_in(self) -> Any:
        """Every tick succeeds while several order batches are always in flight.

        Each tick settles every order acknowledged before it began and none
        whose creation time is later than the tick's.
        """
        acknowledged: list[int] = []
        refused: list[str] = []
        failures: list[Any] = []
        streaming = [True]
        outstanding: set[Deferred] = set()

        def commit_batch(number: int) -> None:
            batch = [
                NewOrder(user_id, name, "buy", "AAPL" if number % 2 else "KO", 1, "r", "127.0.0.1:1", "w")
                for user_id, name in self.users
            ]
            d = self.database.queue_orders(batch, PRICES, refuse_reason, self.now())
            outstanding.add(d)

            def stored(answer: Any) -> None:
                results, _ = answer
                acknowledged.extend(r for r in results if isinstance(r, int))
                refused.extend(r for r in results if isinstance(r, str))

            def next_batch(_: object) -> None:
                outstanding.discard(d)
                if streaming[0]:
                    commit_batch(number + IN_FLIGHT)

            d.addCallbacks(stored, failures.append).addBoth(next_batch)

        for number in range(IN_FLIGHT):
            commit_batch(number)

        attempts: list[int] = []

        def settle(*args: Any) -> Any:
            attempts.append(1)  # once per attempt of a tick's transaction (that finds orders queued)
            return settle_orders(*args)

        failed_ticks: list[str] = []
        left_queued: list[int] = []
        settled_early: list[tuple] = []
        for _ in range(TICKS):
            before = set(acknowledged)
            now = self.now()
            try:
                tick_id, settlements = yield self.database.settle_tick(PRICES, now, settle)
            except Exception as e:
                failed_ticks.append(repr(e))
                continue
            settled = {s.order.order_id for s in settlements}
            left_queued.extend(before - settled - self.settled_ids())
            settled_early.extend(
                query(self.url, "SELECT id, created_at, settled_at FROM orders WHERE tick_id = ? AND created_at > ?",
                      tick_id, now)
            )

        streaming[0] = False
        while outstanding:
            yield DeferredList(list(outstanding))
        [(ticks,)] = query(self.url, "SELECT COUNT(*) FROM ticks")
        summary = (
            f"{self.backend}: {len(failed_ticks)} of {TICKS} ticks failed, {len(attempts) - TICKS} retries, "
            f"{len(acknowledged)} orders acknowledged, {len(left_queued)} left queued by a tick, "
            f"{len(settled_early)} settled before they were placed, {len(failures)} batches failed"
        )
        self.log.info("{summary}", summary=summary)
        self.assertEqual(failed_ticks, [], summary)
        self.assertLess(len(attempts) - TICKS, TICKS, f"most ticks should need one attempt; {summary}")
        self.assertEqual(left_queued, [], summary)
        self.assertEqual(settled_early, [], summary)
        self.assertEqual(failures, [])
        self.assertEqual(refused, [])
        self.assertEqual(ticks, TICKS)
        self.assertGreater(len(acknowledged), TICKS * USERS, "the order stream did not keep up")
        self.assertEqual(
            query(self.url, "SELECT COUNT(*) FROM orders WHERE settled_at < created_at"), [(0,)]
        )
        self.assertEqual(query(self.url, "SELECT COUNT(*) FROM orders"), [(len(acknowledged),)])

    def settled_ids(self) -> set[int]:
        """Every order no longer queued."""
        return {order_id for (order_id,) in query(self.url, "SELECT id FROM orders WHERE status <> 'queued'")}


class SQLiteSettlementUnderLoadTests(SettlementUnderLoadMixin, TestCase):
    """The load test on an SQLite file."""

    backend = "sqlite"


class PostgreSQLSettlementUnderLoadTests(SettlementUnderLoadMixin, TestCase):
    """The load test on PostgreSQL, where order commits and settlement run on separate connections."""

    backend = "postgresql"


class RunningMasterUnderLoadTests(TestCase):
    """A real master on PostgreSQL, updating every 0.2 s, while a client places orders back to back."""

    timeout = 300
    log = Logger()

    @inlineCallbacks
    def test_every_update_settles_while_orders_stream_in(self) -> Any:
        """Twenty ticks with orders arriving throughout: none fails, none is noisy, every order settles in order."""
        url = fresh_postgresql(self)
        deployment = RunningDeployment(
            self.mktemp(), "--database", url, "--update-interval", "0.2", "--starting-cash", "100000000.00"
        )
        self.addCleanup(deployment.stop)
        yield deployment.start()
        host, port = deployment.worker_address()
        client = yield connect(reactor, host, port, os.path.join(deployment.data, "tls", "ca.pem"))
        self.addCleanup(client.close)
        yield client.register("alice", "alice@example.com", PASSWORD)
        yield client.login("alice", PASSWORD)

        ticks: list[int] = []
        waiting: list[tuple[int, Deferred]] = []

        def ticked(tick: dict[str, Any]) -> None:
            ticks.append(tick["tick"])
            for wanted, d in list(waiting):
                if len(ticks) >= wanted:
                    waiting.remove((wanted, d))
                    d.callback(None)

        def after_ticks(count: int) -> Deferred:
            d: Deferred = Deferred()
            waiting.append((len(ticks) + count, d))
            return d

        client.on_price_tick(ticked)
        yield client.subscribe("all")
        acknowledged: list[int] = []
        refused: list[str] = []

        @inlineCallbacks
        def place_back_to_back() -> Any:
            # Bounded, so that a master whose updates keep failing still lets the test end (and fail).
            while len(ticks) < PROCESS_TICKS and len(acknowledged) + len(refused) < MAX_PROCESS_ORDERS:
                try:
                    answer = yield client.buy("PFE", 1)
                except Exception as e:
                    refused.append(repr(e))
                else:
                    acknowledged.append(answer["order_id"])

        yield DeferredList([place_back_to_back() for _ in range(ORDER_LOOPS)])
        pushed = len(ticks)
        # Two more updates after the last order was acknowledged settle everything still queued.
        yield after_ticks(2)
        yield deployment.stop()

        output = deployment.watcher.output.decode("utf-8", "replace") + "".join(_read_logs(deployment.base))
        [(recorded,)] = query(url, "SELECT COUNT(*) FROM ticks")
        [(last_tick,)] = query(url, "SELECT MAX(retrieved_at) FROM ticks")
        unsettled = query(url, "SELECT COUNT(*) FROM orders WHERE status = 'queued' AND created_at <= ?", last_tick)
        early = query(url, "SELECT COUNT(*) FROM orders WHERE settled_at < created_at")
        with open(os.path.join(deployment.base, "master.log"), encoding="utf-8", errors="replace") as f:
            failed_updates = f.read().count("price update failed")
        summary = (
            f"{pushed} ticks pushed while ordering, {recorded} recorded, {failed_updates} failed updates, "
            f"{len(acknowledged)} orders acknowledged, {len(refused)} refused"
        )
        self.log.info("running master under load: {summary}", summary=summary)
        self.assertGreaterEqual(pushed, PROCESS_TICKS, summary)
        self.assertEqual(failed_updates, 0, summary)
        self.assertNotIn("price update failed", output)
        self.assertNotIn("INERROR", output)
        self.assertEqual(refused, [], summary)
        self.assertEqual(unsettled, [(0,)], summary)
        self.assertEqual(early, [(0,)], summary)
        self.assertEqual(query(url, "SELECT COUNT(*) FROM orders"), [(len(acknowledged),)])


def _read_logs(base: str) -> list[str]:
    """Every log file the deployment wrote under ``base``."""
    texts = []
    for folder, _, names in os.walk(base):
        for name in names:
            if name.endswith(".log"):
                with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                    texts.append(f.read())
    return texts
