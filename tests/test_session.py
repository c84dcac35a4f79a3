"""The client library's reconnecting session: failover between workers (in memory, through iosim)."""

from __future__ import annotations

from typing import Any

from twisted.protocols import amp
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from papertrader.client.library import ClientAMP, RequestTimedOut, client_from_connection
from papertrader.client.session import FIRST_RETRY_DELAY, REQUEST_TIMEOUT, NoWorkerReachable, Session
from papertrader.errors import SessionInvalid
from papertrader.worker.clients import ClientLocator
from tests import support
from tests.support import PASSWORD, Deployment, SimWorker, sim_connector

A1 = "10.0.0.1:2049"
A2 = "10.0.0.2:2049"
A3 = "10.0.0.3:2049"


class TwoWorkers(SynchronousTestCase):
    """Two workers of one deployment, alice registered, and the password logins counted."""

    def setUp(self) -> None:
        self.deployment = d = Deployment(self.mktemp())
        self.w1 = SimWorker(d, "w1", A1)
        self.w2 = SimWorker(d, "w2", A2)
        d.result(self.w1.client().register("alice", "alice@example.com", PASSWORD))
        self.password_logins = 0
        login = d.accounts.login

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.password_logins += 1
            return login(*args, **kwargs)

        d.accounts.login = counted

    def session(self, workers: list[str] | None = None) -> Session:
        return Session(self.deployment.clock, sim_connector([self.w1, self.w2]), workers or [A1])

    def logged_in(self) -> Session:
        session = self.session()
        self.deployment.result(session.login("alice", PASSWORD))
        return session


class SessionTests(TwoWorkers):
    """A session moves to another worker when its own goes away, without logging in again."""

    def test_login_learns_workers(self) -> None:
        """Logging in on the first worker of the list keeps the token and learns every worker from the answer."""
        session = self.logged_in()
        self.assertEqual(session.address, A1)
        self.assertEqual(session.workers, [A1, A2])
        self.assertEqual((session.username, self.password_logins), ("alice", 1))
        self.assertIsNotNone(session.token)

    def test_resume_on_another_worker(self) -> None:
        """When its worker dies the session resumes on the other with its token (no second password
        login), subscribes again, and gets a fill it was waiting for through the new worker."""
        d = self.deployment
        session = self.logged_in()
        ticks: list[dict[str, Any]] = []
        session.on_price_tick(ticks.append)
        d.result(session.subscribe(["AAPL"]))
        order = d.result(session.buy("AAPL", 3))
        fills: list[Any] = []
        session.wait_for_settlement(order["order_id"]).addBoth(fills.append)
        workers: list[str] = []
        session.on_worker(workers.append)

        self.w1.crash()
        self.assertEqual((session.address, workers, session.failovers), (A2, [A2], 1))
        self.assertEqual(fills, [])
        d.tick()
        [fill] = fills
        self.assertEqual((fill["order_id"], fill["status"], fill["quantity"]), (order["order_id"], "filled", 3))
        self.assertEqual([[p["symbol"] for p in tick["prices"]] for tick in ticks], [["AAPL"]])
        self.assertEqual(self.password_logins, 1)
        self.assertEqual(self.w2.clients.by_user.keys(), {"alice"})

    def test_fill_while_away(self) -> None:
        """A fill pushed while the session had no worker is found in the orders listing when it resumes."""
        d = self.deployment
        session = self.logged_in()
        order = d.result(session.buy("MSFT", 1))
        fills: list[Any] = []
        session.wait_for_settlement(order["order_id"]).addBoth(fills.append)
        self.w2.up = False
        self.w1.crash()
        d.tick()  # settles the order; no worker passes the push on to the session
        self.assertEqual(fills, [])
        self.w2.up = True
        d.clock.advance(FIRST_RETRY_DELAY)
        d.flush()
        [fill] = fills
        self.assertEqual((fill["order_id"], fill["status"]), (order["order_id"], "filled"))
        self.assertEqual(session.address, A2)

    def test_in_flight_order_sent_again(self) -> None:
        """An order stored by the master whose answer was lost with its worker is sent again, with the
        same client order id, on the other worker: the session gets the original order, and there is one."""
        d = self.deployment
        session = self.logged_in()
        answers: list[Any] = []
        session.buy("KO", 7, client_order_id="order-1").addBoth(answers.append)
        [client_pump] = [p for p in d.pumps if p.client is session.client.connection]
        client_pump.pump()  # the request reaches the worker
        d.pumps.remove(client_pump)
        d.flush()  # ... and the master, which stores the order; the answer waits at the worker
        self.assertEqual(answers, [])
        self.w1.crash()
        d.pumps.append(client_pump)
        d.flush()
        [answer] = answers
        orders = d.result(session.orders())["orders"]
        self.assertEqual([(o["order_id"], o["client_order_id"]) for o in orders], [(answer["order_id"], "order-1")])
        self.assertEqual(session.address, A2)

    def test_orders_sent_while_worker_dies(self) -> None:
        """Orders placed just as the worker dies (never delivered) are placed once each on the other worker."""
        d = self.deployment
        session = self.logged_in()
        answers: list[Any] = []
        for i in range(8):
            session.buy("AAPL", 1, client_order_id=f"burst-{i}").addBoth(answers.append)
        self.w1.crash()
        d.flush()
        self.assertEqual(len({a["order_id"] for a in answers}), 8)
        ids = sorted(o["client_order_id"] for o in d.result(session.orders())["orders"])
        self.assertEqual(ids, [f"burst-{i}" for i in range(8)])

    def test_go_away(self) -> None:
        """A kicked worker's GoAway sends the session to the workers it names, without a password login."""
        d = self.deployment
        session = self.logged_in()
        session.keep_alive(60)
        d.result(d.registry.kick("w1", "maintenance"))
        self.assertEqual(session.address, A2)
        self.assertEqual(self.password_logins, 1)
        self.assertEqual(d.result(session.portfolio())["username"], "alice")

    def test_no_worker_reachable(self) -> None:
        """With every worker down the session tries each, waits between rounds on its clock, and then
        fails with NoWorkerReachable naming each worker and why; waited-for orders fail with it too."""
        d = self.deployment
        session = self.logged_in()
        order = d.result(session.buy("AAPL", 1))
        waited: list[Any] = []
        session.wait_for_settlement(order["order_id"]).addBoth(waited.append)
        self.w2.up = False
        self.w1.crash()
        self.assertEqual(waited, [])
        d.clock.advance(FIRST_RETRY_DELAY)
        d.flush()
        self.assertEqual(waited, [])
        d.clock.advance(2 * FIRST_RETRY_DELAY)
        d.flush()
        [failure] = waited
        failure.trap(NoWorkerReachable)
        self.assertIn(A1, str(failure.value))
        self.assertIn(A2, str(failure.value))
        self.assertIn("refused", str(failure.value))

    def test_session_ended(self) -> None:
        """A token that no longer works is not retried elsewhere: SessionInvalid, and the token is dropped."""
        d = self.deployment
        session = self.logged_in()
        other = self.session([A2])
        other.token = session.token
        d.result(session.logout())
        self.assertRaises(SessionInvalid, d.result, other.portfolio())
        self.assertIsNone(other.token)

    def test_close_while_connecting(self) -> None:
        """Closing the session stops a connection attempt or a wait between rounds; nothing is left scheduled."""
        d = self.deployment
        session = self.logged_in()
        session.keep_alive(60)
        self.w2.up = False
        self.w1.crash()  # the session waits to try again
        due = d.clock.seconds() + FIRST_RETRY_DELAY
        [wait] = [call for call in d.clock.getDelayedCalls() if call.getTime() == due]
        given_up: list[Any] = []
        session.when_given_up().addBoth(given_up.append)
        session.close()
        self.assertFalse(wait.active())
        self.assertEqual(len(given_up), 1)
        self.assertFalse(session._connecting)


class BeforePing(ClientLocator):
    """A worker's client side from before Ping: it does not know the command."""

    def locateResponder(self, name: bytes) -> Any:
        return None if name == b"Ping" else super().locateResponder(name)


class SilentWorkerTests(TwoWorkers):
    """A worker whose network link is cut (no FIN, no RST) is noticed by the request timeout and by Pings."""

    def test_silent_request_times_out(self) -> None:
        """An order whose answer is lost on a cut link: after the request timeout the connection is aborted
        and the order sent again, with its client order id, on the other worker; the master holds it once."""
        d = self.deployment
        session = self.logged_in()
        answers: list[Any] = []
        session.buy("KO", 7, client_order_id="order-1").addBoth(answers.append)
        [client_pump] = [p for p in d.pumps if p.client is session.client.connection]
        client_pump.pump()  # the request reaches the worker
        d.pumps.remove(client_pump)
        d.flush()  # ... and the master, which stores the order; the answer waits at the worker
        d.pumps.append(client_pump)
        self.w1.cut()  # ... and is lost
        d.advance(REQUEST_TIMEOUT - 1)
        self.assertEqual((answers, session.address), ([], A1))
        d.advance(1)
        [answer] = answers
        self.assertEqual((session.address, session.failovers), (A2, 1))
        orders = d.result(session.orders())["orders"]
        self.assertEqual([(o["order_id"], o["client_order_id"]) for o in orders], [(answer["order_id"], "order-1")])
        self.assertEqual(self.password_logins, 1)

    def test_unsafe_request_not_sent_again(self) -> None:
        """A register that gets no answer fails with RequestTimedOut saying it was not sent again, and no
        other worker is asked."""
        d = self.deployment
        session = self.session()
        d.result(session.portfolio().addErrback(lambda _: None))  # connected to w1, not logged in
        self.w1.cut()
        results: list[Any] = []
        session.register("bob", "bob@example.com", PASSWORD).addBoth(results.append)
        d.advance(REQUEST_TIMEOUT)
        [failure] = results
        failure.trap(RequestTimedOut)
        self.assertIn("Register", str(failure.value))
        self.assertIn("not sent again", str(failure.value))
        self.assertEqual(self.w2.clients.connections, set())

    def test_idle_session_notices_cut_worker(self) -> None:
        """A session waiting for a fill, with keep_alive, notices its worker's cut link within two intervals
        (its Ping is not answered), moves to the other worker and finds the fill in the orders listing."""
        d = self.deployment
        session = self.logged_in()
        order = d.result(session.buy("MSFT", 1))
        fills: list[Any] = []
        session.wait_for_settlement(order["order_id"]).addBoth(fills.append)
        session.keep_alive(10)
        self.w1.cut()
        d.tick()  # the order is filled; the push to w1 is lost
        d.advance(10)
        self.assertEqual((fills, session.address), ([], A1))
        d.advance(10)
        [fill] = fills
        self.assertEqual((fill["order_id"], fill["status"]), (order["order_id"], "filled"))
        self.assertEqual((session.address, session.failovers), (A2, 1))
        self.assertEqual(self.password_logins, 1)

    def test_pings_keep_a_live_worker(self) -> None:
        """Pings that are answered keep the session on its worker, past the worker's idle timeout."""
        d = self.deployment
        session = self.logged_in()
        session.keep_alive(10)
        d.advance(3600)
        self.assertEqual((session.address, session.failovers), (A1, 0))
        [connection] = self.w1.clients.connections
        self.assertEqual(connection.bad_requests, 0)

    def test_worker_answers_ping(self) -> None:
        """The worker answers Ping itself: without a login, and with its master link gone."""
        d = self.deployment
        client = self.w1.client()
        self.w1.link.connection.transport.loseConnection()
        d.flush()
        self.assertIsNone(self.w1.link.connection)
        self.assertIs(d.result(client.ping()), True)

    def test_worker_before_ping(self) -> None:
        """A worker from before Ping answers BAD_REQUEST once: the session sends it Heartbeats from then on,
        and stays."""
        d = self.deployment
        self.patch(support, "ClientLocator", BeforePing)
        w3 = SimWorker(d, "w3", A3)
        session = Session(d.clock, sim_connector([w3]), [A3])
        d.result(session.login("alice", PASSWORD))
        session.keep_alive(10)
        d.advance(3600)
        self.assertEqual((session.address, session.failovers), (A3, 0))
        [connection] = w3.clients.connections
        self.assertEqual(connection.bad_requests, 1)

    def test_unhandled_ping(self) -> None:
        """A peer that answers Ping with AMP's UNHANDLED (no PaperTrader error handling) counts as not knowing it."""
        connection, _, pump = iosim.connectedServerAndClient(amp.AMP, ClientAMP)
        answers: list[Any] = []
        client_from_connection(connection).ping().addBoth(answers.append)
        pump.flush()
        self.assertEqual(answers, [False])
