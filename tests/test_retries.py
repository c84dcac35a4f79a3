"""Retrying an order is safe: the client order id makes a lost answer harmless, in memory and through real processes."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from papertrader.client.library import connect
from papertrader.errors import OrderConflict
from tests.databases import fresh_postgresql, query
from tests.processes import RunningDeployment
from tests.support import Deployment

PASSWORD = "correct horse battery"


class LostAnswerTests(SynchronousTestCase):
    """In memory: the connection closes after the order is sent and before its answer arrives."""

    def setUp(self) -> None:
        self.deployment = Deployment(self.mktemp())
        self.alice = self.deployment.logged_in("alice")

    def orders(self) -> list[tuple]:
        return self.deployment.pool.connection.execute("SELECT id, client_order_id FROM orders").fetchall()

    def test_resubmitted_after_lost_answer(self) -> None:
        """The retry on a new connection returns the order the lost answer was about; one order is stored."""
        d = self.alice.buy("AAPL", 2, client_order_id="retry-1")
        d.addErrback(lambda _: None)
        self.alice.close()  # the order is on its way; its answer will have nowhere to go
        self.deployment.flush()
        [(stored_id, _)] = self.orders()
        again = self.deployment.client()
        again.token = self.alice.token
        answer = self.deployment.result(again.buy("AAPL", 2, client_order_id="retry-1"))
        self.assertEqual(answer["order_id"], stored_id)
        self.assertEqual(self.orders(), [(stored_id, "retry-1")])

    def test_same_id_other_order_refused(self) -> None:
        """Reusing an id for a different order is refused with the declared OrderConflict."""
        self.deployment.result(self.alice.buy("AAPL", 2, client_order_id="mine"))
        error = self.assertRaises(
            OrderConflict, self.deployment.result, self.alice.buy("AAPL", 3, client_order_id="mine")
        )
        self.assertIn("mine", str(error))
        self.assertEqual(len(self.orders()), 1)

    def test_library_sends_an_id(self) -> None:
        """Every order the library places carries a client order id of its own."""
        self.deployment.result(self.alice.buy("AAPL", 1))
        self.deployment.result(self.alice.buy("AAPL", 1))
        ids = [client_order_id for _, client_order_id in self.orders()]
        self.assertEqual(len(set(ids)), 2)
        self.assertNotIn(None, ids)


class RealRetryTests(TestCase):
    """Through a real master and worker over TLS: submit, drop the connection, resubmit, exactly one order."""

    timeout = 240

    def database_args(self) -> list[str]:
        return []

    def orders(self) -> list[tuple]:
        return query(self.url, "SELECT id, client_order_id FROM orders")

    @inlineCallbacks
    def test_disconnect_before_answer(self) -> Any:
        """The first attempt is stored although its answer is lost; the retry gets its id and stores nothing."""
        d = RunningDeployment(self.mktemp(), *self.database_args())
        self.addCleanup(d.stop)
        yield d.start()
        self.url = self.database_args()[1] if self.database_args() else (
            "sqlite:///" + os.path.join(d.data, "papertrader.sqlite")
        )
        password = d.password_file(PASSWORD)
        yield d.cli_json("register", "retrier", "retrier@example.com", "--password-file", password)
        host, port = d.worker_address()
        ca = os.path.join(d.data, "tls", "ca.pem")

        first = yield connect(reactor, host, port, ca)
        yield first.login("retrier", PASSWORD)
        lost = first.buy("KO", 3, client_order_id="lost-answer-1")
        lost.addErrback(lambda _: None)
        first.close()  # written, then closed: the worker passes the order on; the answer is lost
        for _ in range(600):
            if self.orders():
                break
            yield deferLater(reactor, 0.05, lambda: None)
        [(stored_id, _)] = self.orders()

        second = yield connect(reactor, host, port, ca)
        self.addCleanup(second.close)
        yield second.login_with_token(first.token)
        answer = yield second.buy("KO", 3, client_order_id="lost-answer-1")
        self.assertEqual(answer["order_id"], stored_id)
        self.assertEqual(self.orders(), [(stored_id, "lost-answer-1")])

        code, out, err = yield d.cli("login", "retrier", "--password-file", password)
        self.assertEqual(code, 0, err)
        again = yield d.cli_json("buy", "KO", "3", "--client-order-id", "lost-answer-1")
        self.assertEqual(again["order_id"], stored_id)
        code, out, err = yield d.cli("buy", "KO", "4", "--client-order-id", "lost-answer-1")
        self.assertEqual(code, 1, out)
        self.assertIn("lost-answer-1", err)
        self.assertEqual(len(self.orders()), 1)


class PostgreSQLRealRetryTests(RealRetryTests):
    """The same on PostgreSQL."""

    def database_args(self) -> list[str]:
        if not hasattr(self, "_url"):
            self._url = fresh_postgresql(self)
        return ["--database", self._url]
