"""Accounts: registration, password checks, session tokens and their expiry, driven by a Clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from papertrader.errors import LoginFailed, RegisterFailed, SessionInvalid
from papertrader.master.accounts import token_digest
from tests.support import PASSWORD, make_accounts, make_database, run_now


class AccountsTests(SynchronousTestCase):
    """`Accounts` over a real SQLite schema."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.database, self.pool = make_database(self.mktemp())
        self.threaded: list[Any] = []

        def in_thread(function: Any, *args: Any) -> Any:
            self.threaded.append(function.__name__)
            return run_now(function, *args)

        self.accounts = make_accounts(self.database, self.clock, run_in_thread=in_thread)
        self.successResultOf(self.accounts.register("alice", "Alice@Example.com", PASSWORD))

    def test_password_is_bcrypt_hashed_off_the_reactor(self) -> None:
        """The stored password is a bcrypt hash at the configured cost, computed via the thread runner."""
        [(stored, email, cash)] = self.pool.connection.execute(
            "SELECT password_hash, email, cash_cents FROM users"
        ).fetchall()
        self.assertTrue(stored.startswith("$2b$04$"))
        self.assertNotIn(PASSWORD, stored)
        self.assertEqual(self.threaded, ["hashpw"])
        self.assertEqual((email, cash), ("alice@example.com", 10_000_000))

    def test_login_gives_long_random_token_stored_as_digest(self) -> None:
        """Tokens carry at least 128 random bits; only their digest is stored."""
        first = self.successResultOf(self.accounts.login("alice", PASSWORD))
        second = self.successResultOf(self.accounts.login("alice", PASSWORD))
        self.assertNotEqual(first.token, second.token)
        self.assertGreaterEqual(len(first.token), 43)  # 32 bytes in URL-safe base64
        stored = [row[0] for row in self.pool.connection.execute("SELECT token_hash FROM sessions")]
        self.assertEqual(sorted(stored), sorted([token_digest(first.token), token_digest(second.token)]))
        self.assertIn("checkpw", self.threaded)

    def test_session_expires(self) -> None:
        """A session works until its lifetime has passed, then is refused and forgotten."""
        session = self.successResultOf(self.accounts.login("alice", PASSWORD))
        self.assertEqual(session.expires_at, 1_800_000_000 + 3600)
        self.clock.advance(3599)
        self.assertEqual(self.successResultOf(self.accounts.authenticate(session.token)).username, "alice")
        self.clock.advance(1)
        failure = self.failureResultOf(self.accounts.authenticate(session.token), SessionInvalid)
        self.assertIn("expired", str(failure.value))
        self.assertEqual(self.pool.connection.execute("SELECT COUNT(*) FROM sessions").fetchone(), (0,))

    def test_remember_me_lives_longer(self) -> None:
        """"Remember me" sessions outlive normal ones."""
        session = self.successResultOf(self.accounts.login("alice", PASSWORD, remember=True))
        self.clock.advance(7 * 86400)
        self.assertEqual(self.successResultOf(self.accounts.authenticate(session.token)).username, "alice")

    def test_session_survives_restart(self) -> None:
        """A token is found in the database by a fresh `Accounts` (a restarted master)."""
        session = self.successResultOf(self.accounts.login("alice", PASSWORD))
        restarted = make_accounts(self.database, self.clock)
        self.assertEqual(self.successResultOf(restarted.authenticate(session.token)).username, "alice")

    def test_logout(self) -> None:
        """After logout the token is refused, also by a restarted master."""
        session = self.successResultOf(self.accounts.login("alice", PASSWORD))
        self.successResultOf(self.accounts.logout(session.token))
        self.failureResultOf(self.accounts.authenticate(session.token), SessionInvalid)
        self.failureResultOf(make_accounts(self.database, self.clock).authenticate(session.token), SessionInvalid)

    def test_login_is_case_insensitive_on_username(self) -> None:
        """Usernames match in any letter case; the stored spelling is reported."""
        session = self.successResultOf(self.accounts.login("ALICE", PASSWORD))
        self.assertEqual(session.username, "alice")

    def test_unknown_user_costs_a_bcrypt_check(self) -> None:
        """An unknown user still costs a password check, so timing does not reveal usernames."""
        self.threaded.clear()
        self.failureResultOf(self.accounts.login("nobody", PASSWORD), LoginFailed)
        self.assertEqual(self.threaded, ["hashpw", "checkpw"])

    def test_duplicate_email_any_case(self) -> None:
        """Emails are unique regardless of letter case."""
        failure = self.failureResultOf(self.accounts.register("bob", "ALICE@example.com", PASSWORD), RegisterFailed)
        self.assertIn("email", str(failure.value))

    def test_sweep_forgets_expired(self) -> None:
        """The periodic sweep deletes expired sessions and keeps live ones."""
        self.successResultOf(self.accounts.login("alice", PASSWORD))
        self.clock.advance(4000)
        live = self.successResultOf(self.accounts.login("alice", PASSWORD))
        self.successResultOf(self.accounts.forget_expired())
        rows = self.pool.connection.execute("SELECT token_hash FROM sessions").fetchall()
        self.assertEqual(rows, [(token_digest(live.token),)])

    def test_sweep_survives_database_failure(self) -> None:
        """A failing sweep is logged and does not fail, so its LoopingCall keeps running."""
        self.pool.broken = RuntimeError("disk gone")
        self.assertIsNone(self.successResultOf(self.accounts.forget_expired()))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
