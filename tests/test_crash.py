"""Crash safety with real processes: SIGKILL the master while it settles a large tick, restart, reconcile."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from papertrader.client.library import connect
from papertrader.errors import PurchaseFailed, SellFailed
from tests.databases import fresh_database_url, query
from tests.processes import RunningDeployment

USERS = 40
ORDERS_PER_USER = 250
WINDOW = 50
SYMBOLS = ("AAPL", "MSFT", "KO", "JPM", "XOM")
STARTING_CASH = 10_000_000
PASSWORD = "correct horse battery"
# Orders per settlement transaction: the queue settles in about a hundred chunks.
CHUNK_ORDERS = 100


class CrashTestsMixin:
    """Every acknowledged order is settled exactly once, whatever the kill interrupted."""

    backend: str
    timeout = 600
    log = Logger()

    @inlineCallbacks
    def test_sigkill_during_settlement(self) -> Any:
        """SIGKILL as a settlement of thousands of orders begins, and again after part of it committed;
        after the restarts every order settled once, at the prices of the tick that first took it, and
        cash and shares reconcile to the cent."""
        url = fresh_database_url(self, self.backend)
        # All USERS register from one address (loopback), more than the default hourly limit.
        deployment = RunningDeployment(
            self.mktemp(),
            "--database", url,
            "--update-interval", "3600",
            "--registrations-per-address-per-hour", str(USERS),
            "--settlement-chunk-orders", str(CHUNK_ORDERS),
            log_to_stdout=True,
        )
        self.addCleanup(deployment.stop)
        yield deployment.start()

        acknowledged = yield self.queue_orders(deployment)
        self.assertGreater(len(acknowledged), USERS * ORDERS_PER_USER // 2)
        self.assertGreater(len(acknowledged), 10 * CHUNK_ORDERS)
        self.assertEqual(query(url, "SELECT COUNT(*) FROM orders WHERE status = 'queued'"), [(len(acknowledged),)])

        # Restart: the first update after start settles the whole queue; kill it as it begins.
        yield deployment.kill()
        settling = deployment.spawn().wait_for(b"settling the order queue")
        yield settling
        yield deployment.kill()
        [(still_queued,)] = query(url, "SELECT COUNT(*) FROM orders WHERE status = 'queued'")
        self.log.info("after the first kill {queued} orders were still queued", queued=still_queued)

        # Restart: the interrupted tick (or, if it was not recorded, a new one) settles in chunks; kill
        # it once a chunk has committed.
        chunk_done = deployment.spawn().wait_for(b"orders settled so far")
        yield chunk_done
        yield deployment.kill()
        [(still_queued,)] = query(url, "SELECT COUNT(*) FROM orders WHERE status = 'queued'")
        self.log.info("after the second kill {queued} orders were still queued", queued=still_queued)
        self.assertLess(still_queued, len(acknowledged), "a chunk had committed before the kill")

        deployment.spawn()
        for _ in range(1200):
            if query(url, "SELECT COUNT(*) FROM orders WHERE status = 'queued'") == [(0,)]:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.reconcile(url, acknowledged)
        # One tick took every order (they were all queued before it), and settled them at its own prices
        # and time, across the kills.
        [(tick,)] = query(url, "SELECT DISTINCT tick_id FROM orders")
        self.assertEqual(
            query(
                url,
                "SELECT COUNT(*) FROM orders o JOIN ticks t ON t.id = o.tick_id "
                "LEFT JOIN prices p ON p.tick_id = o.tick_id AND p.symbol = o.symbol "
                "WHERE p.price_cents IS NULL OR o.price_cents <> p.price_cents OR o.settled_at <> t.retrieved_at",
            ),
            [(0,)],
        )
        self.assertEqual(query(url, "SELECT settled FROM ticks WHERE id = ?", tick), [(1,)])

    @inlineCallbacks
    def queue_orders(self, deployment: RunningDeployment) -> Any:
        """Many users pipeline buys and sells; fires with the acknowledged order ids."""
        host, port = deployment.worker_address()
        ca = os.path.join(deployment.data, "tls", "ca.pem")
        clients = []
        for n in range(USERS):
            client = yield connect(reactor, host, port, ca)
            self.addCleanup(client.close)
            yield client.register(f"trader{n}", f"trader{n}@example.com", PASSWORD)
            yield client.login(f"trader{n}", PASSWORD)
            clients.append(client)
        acknowledged: list[int] = []

        @inlineCallbacks
        def trade(n: int, client: Any) -> Any:
            for start in range(0, ORDERS_PER_USER, WINDOW):
                calls = []
                for i in range(start, start + WINDOW):
                    symbol = SYMBOLS[(n + i) % len(SYMBOLS)]
                    place = client.sell if i % 7 == 6 else client.buy
                    calls.append(place(symbol, 1 + i % 3).addErrback(_refused))
                answers = yield gatherResults(calls)
                acknowledged.extend(a["order_id"] for a in answers if a)

        yield gatherResults([trade(n, c) for n, c in enumerate(clients)])
        return acknowledged

    def reconcile(self, url: str, acknowledged: list[int]) -> None:
        """Every acknowledged order settled once; cash and positions follow from the history exactly."""
        orders = dict(query(url, "SELECT id, status FROM orders"))
        self.assertEqual(sorted(orders), sorted(acknowledged))
        self.assertEqual(set(orders.values()) - {"filled", "rejected"}, set())
        self.assertEqual(
            query(
                url,
                "SELECT COUNT(*) FROM orders o LEFT JOIN transactions t ON t.order_id = o.id "
                "WHERE (o.status = 'filled' AND t.id IS NULL) OR (o.status <> 'filled' AND t.id IS NOT NULL)",
            ),
            [(0,)],
        )
        [(filled,)] = query(url, "SELECT COUNT(*) FROM orders WHERE status = 'filled'")
        self.assertEqual(query(url, "SELECT COUNT(*), COUNT(DISTINCT order_id) FROM transactions"), [(filled, filled)])
        self.assertGreater(filled, 0)
        mismatched_cash = query(
            url,
            "SELECT u.username FROM users u WHERE u.cash_cents <> ? + COALESCE((SELECT SUM(CASE t.side "
            "WHEN 'sell' THEN t.total_cents ELSE -t.total_cents END) FROM transactions t WHERE t.user_id = u.id), 0)",
            STARTING_CASH,
        )
        self.assertEqual(mismatched_cash, [])
        held = {(u, s): int(q) for u, s, q in query(url, "SELECT user_id, symbol, quantity FROM positions")}
        traded = {
            (u, s): int(q)
            for u, s, q in query(
                url,
                "SELECT user_id, symbol, SUM(CASE side WHEN 'buy' THEN quantity ELSE -quantity END) "
                "FROM transactions GROUP BY user_id, symbol",
            )
            if int(q) != 0
        }
        self.assertEqual(held, traded)


class SQLiteCrashTests(CrashTestsMixin, TestCase):
    """The crash test on SQLite."""

    backend = "sqlite"


class PostgreSQLCrashTests(CrashTestsMixin, TestCase):
    """The crash test on PostgreSQL."""

    backend = "postgresql"


def _refused(failure: Any) -> None:
    """An order refused before queueing (no cash, no shares) is simply not acknowledged."""
    failure.trap(PurchaseFailed, SellFailed)
