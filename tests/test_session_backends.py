"""Session activity, idle expiry and revocation through real ``adbapi`` pools, on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from papertrader.errors import LoginFailed, SessionInvalid
from papertrader.master.accounts import Accounts, token_digest
from papertrader.master.database import Database
from tests.databases import fresh_database_url, query
from tests.support import PASSWORD

T0 = 1_800_000_000


class SessionBackendTestsMixin:
    """Tests every backend must pass; subclasses name the backend."""

    backend: str

    def setUp(self) -> Any:
        self.url = fresh_database_url(self, self.backend)
        self.clock = Clock()
        self.clock.advance(T0)
        self.database = self.open()
        return self.database.migrate()

    def open(self) -> Database:
        database = Database.open(self.url, self.mktemp())
        self.addCleanup(database.close)
        return database

    def accounts(self) -> Accounts:
        return Accounts(
            self.database,
            self.clock,
            bcrypt_cost=4,
            starting_cash_cents=100_000,
            session_lifetime=86400.0,
            remember_lifetime=30 * 86400.0,
        )

    @inlineCallbacks
    def test_idle_sessions_swept(self) -> Any:
        """Uses are stored, and the sweep deletes idle sessions (the remembered one only after a week)."""
        accounts = self.accounts()
        yield accounts.start()
        yield accounts.register("alice", "alice@example.com", PASSWORD)
        idle = yield accounts.login("alice", PASSWORD)
        used = yield accounts.login("alice", PASSWORD)
        remembered = yield accounts.login("alice", PASSWORD, remember=True)
        self.clock.advance(100)
        yield accounts.authenticate(used.token)
        self.clock.advance(3550)
        yield accounts.forget_expired()
        rows = query(self.url, "SELECT token_hash, last_used_at, remember FROM sessions ORDER BY remember")
        self.assertEqual(
            rows, [(token_digest(used.token), T0 + 100, 0), (token_digest(remembered.token), T0, 1)]
        )
        yield self.assertFailure(self.accounts().authenticate(idle.token), SessionInvalid)
        self.clock.advance(7 * 86400)
        yield self.accounts().forget_expired()
        self.assertEqual(query(self.url, "SELECT COUNT(*) FROM sessions"), [(0,)])

    @inlineCallbacks
    def test_session_stored_before_the_upgrade(self) -> Any:
        """A session row without activity columns (written before schema 4) works and gets them."""
        accounts = self.accounts()
        yield accounts.register("alice", "alice@example.com", PASSWORD)
        query(
            self.url,
            "INSERT INTO sessions (token_hash, user_id, created_at, expires_at) "
            "SELECT ?, id, ?, ? FROM users",
            token_digest("old"),
            T0 - 1000,
            T0 + 86400,
        )
        session = yield accounts.authenticate("old")
        self.assertEqual(session.username, "alice")
        self.assertEqual(query(self.url, "SELECT last_used_at, remember FROM sessions"), [(T0, None)])

    @inlineCallbacks
    def test_revocations(self) -> Any:
        """Logging out everywhere and changing the password each end every session of the user only."""
        accounts = self.accounts()
        for name in ("alice", "bob"):
            yield accounts.register(name, f"{name}@example.com", PASSWORD)
        alice = []
        for _ in range(3):
            alice.append((yield accounts.login("alice", PASSWORD)))
        bob = yield accounts.login("bob", PASSWORD)
        ended = yield accounts.logout_everywhere(alice[0].token)
        self.assertEqual(ended, 3)
        yield self.assertFailure(accounts.authenticate(alice[2].token), SessionInvalid)
        alice = []
        for _ in range(2):
            alice.append((yield accounts.login("alice", PASSWORD)))
        ended = yield accounts.change_password(alice[0].token, PASSWORD, "another passphrase")
        self.assertEqual(ended, 2)
        self.assertEqual(query(self.url, "SELECT user_id FROM sessions"), [(bob.user_id,)])
        yield self.assertFailure(accounts.login("alice", PASSWORD), LoginFailed)
        yield accounts.login("alice", "another passphrase")

    @inlineCallbacks
    def test_session_only_for_the_current_password(self) -> Any:
        """`create_session` with a password hash stores nothing once the password has changed."""
        accounts = self.accounts()
        yield accounts.register("alice", "alice@example.com", PASSWORD)
        user = yield self.database.find_user("alice")
        stored = yield self.database.create_session("a", user.user_id, T0, T0 + 60, False, user.password_hash)
        self.assertTrue(stored)
        revoked = yield self.database.change_password(user.user_id, user.password_hash, "new-hash")
        self.assertEqual(revoked, ["a"])
        stored = yield self.database.create_session("b", user.user_id, T0, T0 + 60, False, user.password_hash)
        self.assertFalse(stored)
        again = yield self.database.change_password(user.user_id, user.password_hash, "other-hash")
        self.assertIsNone(again)
        self.assertEqual(query(self.url, "SELECT COUNT(*) FROM sessions"), [(0,)])


class SQLiteSessionTests(SessionBackendTestsMixin, TestCase):
    """The session tests on SQLite."""

    backend = "sqlite"


class PostgreSQLSessionTests(SessionBackendTestsMixin, TestCase):
    """The session tests on PostgreSQL."""

    backend = "postgresql"
