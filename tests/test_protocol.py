"""The whole protocol, client -> worker -> master, in memory through iosim and a Clock."""

from __future__ import annotations

from functools import partial

from twisted.internet.error import ConnectionClosed
from twisted.protocols import amp
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from papertrader.errors import (
    DataFailed,
    LoginFailed,
    PurchaseFailed,
    RegisterFailed,
    SellFailed,
    ServiceUnavailable,
    SessionInvalid,
    WorkerRefused,
)
from papertrader.protocol import (
    MAX_CLIENT_ORDER_ID_LENGTH,
    MAX_ORDER_BATCH,
    MAX_QUANTITY_LENGTH,
    MAX_SYMBOL_LENGTH,
    ListAssets,
    PurchaseAsset,
    RelayedGetUserPortfolio,
    SellAsset,
    WorkerHello,
)
from tests.support import PASSWORD, Deployment


class TradingTests(SynchronousTestCase):
    """Buying and selling end to end through the relay."""

    def setUp(self) -> None:
        self.deployment = Deployment(self.mktemp())
        self.client = self.deployment.logged_in("alice")

    def rows(self, sql: str, *args: object) -> list[tuple]:
        return self.deployment.pool.connection.execute(sql, args).fetchall()

    def test_buy_is_durable_when_acknowledged(self) -> None:
        """The order id answered to the client is already a queued row in the database."""
        order_id = self.deployment.result(self.client.buy("AAPL", 3))["order_id"]
        self.assertEqual(
            self.rows("SELECT side, symbol, quantity, status FROM orders WHERE id = ?", order_id),
            [("buy", "AAPL", 3, "queued")],
        )

    def test_worker_stamps_envelope(self) -> None:
        """Each order carries the worker's receive time, the client's address and the worker's name."""
        order_id = self.deployment.result(self.client.buy("AAPL", 1))["order_id"]
        [(received_at, address, worker)] = self.rows(
            "SELECT received_at, client_address, worker FROM orders WHERE id = ?", order_id
        )
        self.assertEqual(received_at, "2027-01-15T08:00:00.000000+00:00")
        self.assertIn("192.168.1.1", address)
        self.assertEqual(worker, "test-worker")

    def test_buy_settles_on_next_update_and_pushes(self) -> None:
        """A buy fills at the next update's price; the client is pushed the fill."""
        updates: list[dict] = []
        self.client.on_order_update(updates.append)
        order_id = self.deployment.result(self.client.buy("AAPL", 10))["order_id"]
        self.assertEqual(updates, [])
        self.deployment.source.prices["AAPL"] = 20_000
        self.deployment.tick()
        self.assertEqual(len(updates), 1)
        self.assertEqual(
            {k: updates[0][k] for k in ("order_id", "status", "price_cents", "quantity")},
            {"order_id": order_id, "status": "filled", "price_cents": 20_000, "quantity": 10},
        )
        portfolio = self.deployment.result(self.client.portfolio())
        self.assertEqual(portfolio["cash_cents"], 10_000_000 - 200_000)
        self.assertEqual(
            portfolio["positions"],
            [{"symbol": "AAPL", "quantity": 10, "price_cents": 20_000, "value_cents": 200_000}],
        )
        self.assertEqual(portfolio["total_cents"], 10_000_000)
        [trade] = self.deployment.result(self.client.history())["transactions"]
        self.assertEqual((trade["order_id"], trade["total_cents"]), (order_id, 200_000))
        self.assertEqual(trade["settled_at"], updates[0]["settled_at"])

    def test_sell_after_buy(self) -> None:
        """Shares bought can be sold; cash comes back at the sell price."""
        self.deployment.result(self.client.buy("KO", 5))
        self.deployment.tick()
        self.deployment.source.prices["KO"] = 7_000
        self.deployment.result(self.client.sell("KO", 5))
        self.deployment.tick()
        portfolio = self.deployment.result(self.client.portfolio())
        self.assertEqual(portfolio["positions"], [])
        self.assertEqual(portfolio["cash_cents"], 10_000_000 + 5 * 1_000)
        orders = self.deployment.result(self.client.orders())["orders"]
        self.assertEqual([o["status"] for o in orders], ["filled", "filled"])

    def test_login_with_token(self) -> None:
        """Another connection resumes the session with the token alone (the spec's second login method)."""
        other = self.deployment.client()
        answer = self.deployment.result(other.login_with_token(self.client.token))
        self.assertEqual(answer["username"], "alice")
        self.assertEqual(self.deployment.result(other.portfolio())["username"], "alice")
        self.assertRaises(SessionInvalid, self.deployment.result, other.login_with_token("forged" * 7))

    def test_pushes_follow_the_user(self) -> None:
        """A connection that logged in with the token receives the user's order updates too."""
        other = self.deployment.client()
        self.deployment.result(other.login_with_token(self.client.token))
        updates: list[dict] = []
        other.on_order_update(updates.append)
        self.deployment.result(self.client.buy("KO", 2))
        self.deployment.tick()
        self.assertEqual([(u["symbol"], u["status"]) for u in updates], [("KO", "filled")])

    def test_wait_for_settlement_without_push(self) -> None:
        """A client that missed the order's push still learns of the fill after the next price tick."""
        order_id = self.deployment.result(self.client.buy("AAPL", 1))["order_id"]
        waiting = self.client.wait_for_settlement(order_id)
        self.deployment.flush()  # the client asks for the order's ticks while it waits
        for connection in list(self.deployment.clients.by_user["alice"]):
            self.deployment.clients.detach(connection)
        self.deployment.tick()
        update = self.deployment.result(waiting)
        self.assertEqual((update["order_id"], update["status"]), (order_id, "filled"))

    def test_wait_for_settlement_connection_lost(self) -> None:
        """Waiting for a fill ends with ConnectionClosed when the connection does."""
        order_id = self.deployment.result(self.client.buy("AAPL", 1))["order_id"]
        waiting = self.client.wait_for_settlement(order_id)
        self.client.close()
        self.assertRaises(ConnectionClosed, self.deployment.result, waiting)

    def test_quote_from_cache(self) -> None:
        """Quotes are answered by the worker's cache with the latest update's price."""
        self.deployment.source.prices["MSFT"] = 42_000
        self.deployment.tick()
        quote = self.deployment.result(self.client.quote("msft"))
        self.assertEqual((quote["symbol"], quote["price_cents"]), ("MSFT", 42_000))

    def test_rejected_at_fill_price(self) -> None:
        """A buy queued with enough cash is rejected, with its reason, if the price jumps past it."""
        updates: list[dict] = []
        self.client.on_order_update(updates.append)
        self.deployment.result(self.client.buy("AAPL", 500))  # 95,000.00 of 100,000.00
        self.deployment.source.prices["AAPL"] = 30_000
        self.deployment.tick()
        self.assertEqual(updates[0]["status"], "rejected")
        self.assertIn("insufficient cash", updates[0]["reason"])
        portfolio = self.deployment.result(self.client.portfolio())
        self.assertEqual((portfolio["cash_cents"], portfolio["positions"]), (10_000_000, []))

    def test_queued_buys_reserve_cash(self) -> None:
        """Two queued buys cannot together spend more cash than the user has."""
        self.deployment.result(self.client.buy("AAPL", 300))  # 57,000.00
        failure = self.assertRaises(PurchaseFailed, self.deployment.result, self.client.buy("AAPL", 300))
        self.assertIn("insufficient cash", str(failure))

    def test_queued_sells_reserve_shares(self) -> None:
        """Two queued sells cannot together sell more shares than held."""
        self.deployment.result(self.client.buy("KO", 5))
        self.deployment.tick()
        self.deployment.result(self.client.sell("KO", 3))
        failure = self.assertRaises(SellFailed, self.deployment.result, self.client.sell("KO", 3))
        self.assertIn("not enough shares", str(failure))


class BadInputTests(SynchronousTestCase):
    """Each bad input gets a declared error, the servers keep serving, and nothing stored changes."""

    def setUp(self) -> None:
        self.deployment = Deployment(self.mktemp())
        self.client = self.deployment.logged_in("alice")
        self.bystander = self.deployment.logged_in("carol")

    def snapshot(self) -> list:
        connection = self.deployment.pool.connection
        return [
            connection.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            for table in ("users", "orders", "positions", "transactions")
        ]

    def refused(self, error: type[Exception], d, *fragments: str) -> None:
        """``d`` fails with ``error`` mentioning ``fragments``; nothing stored changed; others still served."""
        failure = self.assertRaises(error, self.deployment.result, d)
        for fragment in fragments:
            self.assertIn(fragment, str(failure))
        other = self.deployment.client()
        self.assertEqual(self.deployment.result(other.quote("AAPL"))["symbol"], "AAPL")
        self.assertEqual(self.deployment.result(self.bystander.portfolio())["username"], "carol")

    def test_unknown_symbol(self) -> None:
        """Buying or selling an unlisted symbol is refused by name."""
        before = self.snapshot()
        self.refused(PurchaseFailed, self.client.buy("NOPE", 1), "unknown symbol 'NOPE'")
        self.refused(SellFailed, self.client.sell("NOPE", 1), "unknown symbol")
        self.refused(DataFailed, self.client.quote("NOPE"), "unknown symbol")
        self.assertEqual(self.snapshot(), before)

    def test_bad_quantities(self) -> None:
        """Zero, negative, non-integer and too-large quantities are refused, each saying why."""
        before = self.snapshot()
        self.refused(PurchaseFailed, self.client.buy("AAPL", 0), "at least 1")
        self.refused(PurchaseFailed, self.client.buy("AAPL", -5), "at least 1")
        self.refused(PurchaseFailed, self.client.buy("AAPL", "1.5"), "whole number")
        self.refused(PurchaseFailed, self.client.buy("AAPL", "ten"), "whole number")
        self.refused(PurchaseFailed, self.client.buy("AAPL", 1001), "at most 1000")
        self.refused(SellFailed, self.client.sell("AAPL", "2e3"), "whole number")
        self.assertEqual(self.snapshot(), before)

    def test_insufficient_cash(self) -> None:
        """A buy costing more than the cash is refused before it is queued."""
        before = self.snapshot()
        self.refused(PurchaseFailed, self.client.buy("MSFT", 300), "insufficient cash")
        self.assertEqual(self.snapshot(), before)

    def test_selling_shares_not_owned(self) -> None:
        """Selling shares the user does not hold is refused."""
        before = self.snapshot()
        self.refused(SellFailed, self.client.sell("AAPL", 1), "not enough shares", "0 held")
        self.assertEqual(self.snapshot(), before)

    def test_missing_session(self) -> None:
        """Trading without logging in is refused as an invalid session."""
        anonymous = self.deployment.client()
        before = self.snapshot()
        self.refused(SessionInvalid, anonymous.buy("AAPL", 1), "not logged in")
        self.refused(SessionInvalid, anonymous.portfolio(), "not logged in")
        self.assertEqual(self.snapshot(), before)

    def test_forged_session(self) -> None:
        """A made-up token is refused."""
        forger = self.deployment.client()
        forger.token = "A" * 43
        before = self.snapshot()
        self.refused(SessionInvalid, forger.buy("AAPL", 1), "not valid")
        self.refused(SessionInvalid, forger.history(), "not valid")
        self.assertEqual(self.snapshot(), before)

    def test_expired_session(self) -> None:
        """After its lifetime a session is refused, and the login must be repeated."""
        token = self.client.token
        self.deployment.advance(3601)
        # Connections that quiet are closed by now (see TimeoutTests); the session outlived them.
        self.bystander = self.deployment.client()
        self.client = self.deployment.client()
        self.client.token = token
        self.deployment.result(self.bystander.login("carol", PASSWORD))
        before = self.snapshot()
        self.refused(SessionInvalid, self.client.buy("AAPL", 1), "expired")
        self.assertEqual(self.snapshot(), before)
        self.deployment.result(self.client.login("alice", PASSWORD))
        self.assertIn("order_id", self.deployment.result(self.client.buy("AAPL", 1)))

    def test_logged_out_session(self) -> None:
        """A token stops working after logout."""
        token = self.client.token
        self.deployment.result(self.client.logout())
        self.client.token = token
        self.refused(SessionInvalid, self.client.buy("AAPL", 1), "not valid")

    def test_duplicate_username(self) -> None:
        """A taken username (in any letter case) cannot be registered again."""
        before = self.snapshot()
        other = self.deployment.client()
        self.refused(RegisterFailed, other.register("alice", "other@example.com", PASSWORD), "already taken")
        self.refused(RegisterFailed, other.register("ALICE", "other@example.com", PASSWORD), "already taken")
        self.refused(RegisterFailed, other.register("bob", "alice@example.com", PASSWORD), "email")
        self.assertEqual(self.snapshot(), before)

    def test_malformed_email(self) -> None:
        """Registration refuses an address that is not an email address."""
        before = self.snapshot()
        other = self.deployment.client()
        for email in ("bob", "bob@", "@example.com", "bob@@example.com", "bob@example", "b ob@example.com"):
            self.refused(RegisterFailed, other.register("bob", email, PASSWORD), "malformed email")
        self.assertEqual(self.snapshot(), before)

    def test_bad_username_and_short_password(self) -> None:
        """Registration reports every problem with its fields at once."""
        other = self.deployment.client()
        self.refused(RegisterFailed, other.register("x", "x@example.com", "short"), "username", "password")

    def test_wrong_password_same_as_unknown_user(self) -> None:
        """A wrong password and an unknown user get the very same message."""
        other = self.deployment.client()
        wrong = self.assertRaises(LoginFailed, self.deployment.result, other.login("alice", "wrong password"))
        unknown = self.assertRaises(LoginFailed, self.deployment.result, other.login("nobody", PASSWORD))
        self.assertEqual(str(wrong), str(unknown))
        self.assertEqual(str(wrong), "invalid username or password")

    def test_garbage_bytes(self) -> None:
        """A client sending garbage instead of AMP is dropped; everyone else is still served."""
        before = self.snapshot()
        rogue = self.deployment.client()
        server_side = self.deployment.pumps[-1].serverIO
        self.assertEqual(len(self.deployment.clients.connections), 3)
        rogue.connection.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff" + bytes(range(256)))
        self.deployment.flush()
        self.assertTrue(server_side.disconnected)
        self.assertEqual(len(self.deployment.clients.connections), 2)
        self.refused(PurchaseFailed, self.client.buy("NOPE", 1), "unknown symbol")
        self.assertIn("order_id", self.deployment.result(self.client.buy("AAPL", 1)))
        self.assertEqual(len(self.snapshot()[1]), len(before[1]) + 1)

    def test_oversized_fields(self) -> None:
        """Oversized tokens, symbols and quantities are refused by the worker; the same batch still flows."""
        before = self.snapshot()
        forger = self.deployment.client()
        forger.token = "t" * 60_000
        huge = forger.buy("AAPL", 1)
        fine = self.client.buy("KO", 1)
        self.refused(SessionInvalid, huge, "not valid")
        self.assertIn("order_id", self.deployment.result(fine))
        self.refused(PurchaseFailed, self.client.buy("A" * 5000, 1), "unknown symbol")
        self.refused(SellFailed, self.client.sell("AAPL", "9" * 5000), "whole number")
        self.assertEqual(len(self.snapshot()[1]), len(before[1]) + 1)

    def assertLinkIntact(self) -> None:
        """The worker is still connected to the master and serves another user."""
        self.assertIn("test-worker", self.deployment.registry.workers)
        self.assertIsNotNone(self.deployment.link.connection)
        self.assertEqual(self.deployment.result(self.bystander.portfolio())["username"], "carol")

    def test_overlong_password_login(self) -> None:
        """A password longer than bcrypt takes is a plain failed login, not a broken link."""
        other = self.deployment.client()
        failure = self.assertRaises(LoginFailed, self.deployment.result, other.login("alice", "x" * 100))
        self.assertEqual(str(failure), "invalid username or password")
        self.assertLinkIntact()

    def test_hostile_email(self) -> None:
        """A huge email of control characters is refused with a short message; the link stays up."""
        other = self.deployment.client()
        failure = self.assertRaises(
            RegisterFailed, self.deployment.result, other.register("mallory", "\x01" * 20_000, PASSWORD)
        )
        self.assertIn("malformed email", str(failure))
        self.assertLess(len(str(failure)), 200)
        self.refused(RegisterFailed, other.register("mallory", "mal\x00lory@example.com", PASSWORD), "malformed")
        self.assertLinkIntact()

    def test_database_failure_is_declared(self) -> None:
        """A database failure while logging in is answered as unavailable; the worker stays connected."""
        self.deployment.pool.broken = RuntimeError("disk gone")
        other = self.deployment.client()
        failure = self.assertRaises(ServiceUnavailable, self.deployment.result, other.login("alice", PASSWORD))
        self.assertIn("try again later", str(failure))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.deployment.pool.broken = None
        self.assertLinkIntact()
        self.assertEqual(self.deployment.result(other.login("alice", PASSWORD))["username"], "alice")

    def test_non_ascii_order_fields(self) -> None:
        """Tokens, symbols and quantities must be plain ASCII, so a batch always fits one AMP value."""
        before = self.snapshot()
        emoji = self.deployment.client()
        emoji.token = "\U0001f642" * 100
        self.refused(SessionInvalid, emoji.buy("AAPL", 1), "not valid")
        self.refused(PurchaseFailed, self.client.buy("\U0001f642" * 10, 1), "unknown symbol")
        self.refused(PurchaseFailed, self.client.buy("AAPL", "\u0661"), "whole number")
        self.assertEqual(self.snapshot(), before)

    def test_order_fields_json_escapes(self) -> None:
        """Control characters, DEL, '"' and '\\' in a token, symbol, quantity or client order id are refused by
        the worker with the order's declared error, and never passed on to the master."""
        passed_on: list[object] = []
        submit = self.deployment.batcher.submit_group
        self.deployment.batcher.submit_group = lambda group: passed_on.append(group) or submit(group)
        before = self.snapshot()
        connection = self.client.connection
        for bad in ("\x01", "\x00", "\n", "\x1f", "\x7f", '"', "\\"):
            order = {"token": self.client.token, "symbol": "AAPL", "quantity": "1", "client_order_id": "id-1"}
            buy = partial(connection.callRemote, PurchaseAsset)
            self.refused(SessionInvalid, buy(**order | {"token": bad * 43}), "not valid")
            self.refused(PurchaseFailed, buy(**order | {"symbol": "AA" + bad}))
            sell = partial(connection.callRemote, SellAsset)
            self.refused(SellFailed, sell(**order | {"quantity": "1" + bad}), "whole number")
            self.refused(PurchaseFailed, buy(**order | {"client_order_id": bad * 64}), "client order id")
        self.assertEqual(passed_on, [])
        self.assertEqual(self.snapshot(), before)
        # What the master itself takes still passes: a symbol it tidies up, an id of the characters it allows.
        self.assertIn("order_id", self.deployment.result(self.client.buy(" aapl ", 1, "A.b_c:d-0")))

    def test_hostile_orders_batched_with_others(self) -> None:
        """One client's orders full of control characters, sent in the same turn as another user's, are refused
        one by one; the other user's order, batched with them, is queued (the batch never grows too long)."""
        mallory = self.deployment.logged_in("mallory")
        fields = {"symbol": "\x01" * MAX_SYMBOL_LENGTH, "quantity": "\x01" * MAX_QUANTITY_LENGTH}
        fine = self.bystander.buy("KO", 1)
        hostile = [
            mallory.connection.callRemote(
                PurchaseAsset, token=mallory.token, client_order_id="\x01" * MAX_CLIENT_ORDER_ID_LENGTH, **fields
            )
            for _ in range(MAX_ORDER_BATCH - 1)
        ]
        outcomes: list[object] = []
        for d in hostile:
            d.addBoth(outcomes.append)
        self.deployment.deliver_in_one_turn()
        self.assertIn("order_id", self.deployment.result(fine))
        self.assertEqual([type(outcome.value) for outcome in outcomes], [PurchaseFailed] * len(hostile))
        self.assertEqual(len(self.snapshot()[1]), 1)
        self.assertLinkIntact()

    def test_oversized_box(self) -> None:
        """A client that sends more than a megabyte without finishing an AMP box is cut off."""
        rogue = self.deployment.client()
        server_side = self.deployment.pumps[-1].serverIO
        key = b"\x00\x01k\xff\xff" + b"v" * 0xFFFF
        for _ in range(20):
            if server_side.disconnected:
                break
            rogue.connection.transport.write(key)
            self.deployment.flush()
        self.assertTrue(server_side.disconnected)
        self.assertLinkIntact()

    def test_master_unreachable(self) -> None:
        """With the master gone, orders are refused as unavailable while cached quotes still work."""
        self.deployment.master_pump.serverIO.loseConnection()
        self.deployment.flush()
        self.assertIsNone(self.deployment.link.connection)
        before = self.snapshot()
        failure = self.assertRaises(ServiceUnavailable, self.deployment.result, self.client.buy("AAPL", 1))
        self.assertIn("not reachable", str(failure))
        self.assertEqual(self.deployment.result(self.client.quote("AAPL"))["symbol"], "AAPL")
        self.assertEqual(self.snapshot(), before)
        self.deployment.connect_worker()
        self.assertIn("order_id", self.deployment.result(self.client.buy("AAPL", 1)))


class HandshakeTests(SynchronousTestCase):
    """The master answers a connection only after its WorkerHello."""

    def test_commands_before_hello_refused(self) -> None:
        """A command before the handshake is refused (declared, saying why) and the connection closed;
        the registered worker keeps serving."""
        deployment = Deployment(self.mktemp())
        for command, arguments in (
            (ListAssets, {}),
            (RelayedGetUserPortfolio, {"token": "t", "received_at": "t", "client_address": "a"}),
        ):
            stranger, server, pump = iosim.connectedServerAndClient(
                lambda: deployment.master_factory.buildProtocol(None), amp.AMP, clock=deployment.clock
            )
            deployment.pumps.append(pump)
            answer = stranger.callRemote(command, **arguments)
            failure = self.assertRaises(ServiceUnavailable, deployment.result, answer)
            self.assertIn("has not completed its handshake", str(failure))
            self.assertIsNone(server.transport)  # closed: the connection has ended
        self.assertEqual(list(deployment.registry.workers), ["test-worker"])
        alice = deployment.logged_in("alice")
        self.assertIn("order_id", deployment.result(alice.buy("AAPL", 1)))

    def test_name_must_match_certificate(self) -> None:
        """A worker may only take the name its certificate carries; the named worker stays connected."""
        deployment = Deployment(self.mktemp())
        deployment.certified_names[0] = "someone-else"
        impostor, _, pump = iosim.connectedServerAndClient(
            lambda: deployment.master_factory.buildProtocol(None), amp.AMP, clock=deployment.clock
        )
        deployment.pumps.append(pump)
        hello = impostor.callRemote(WorkerHello, name="test-worker", version="0")
        failure = self.assertRaises(WorkerRefused, deployment.result, hello)
        self.assertIn("not for a worker named 'test-worker'", str(failure))
        self.assertIs(deployment.registry.workers["test-worker"].connection, deployment.master_pump.server)
