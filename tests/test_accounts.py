"""Accounts: registration, password checks, session tokens and their expiry, driven by a Clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from papertrader.errors import LoginFailed, PasswordChangeFailed, RegisterFailed, SessionInvalid
from papertrader.master.accounts import LOGIN_FAILED, Session, token_digest
from tests.support import PASSWORD, make_accounts, make_database, run_now

TOO_MANY_REGISTRATIONS = "too many registrations from this address; try again later"


class HeldThreads:
    """A stand-in for ``deferToThread`` that records each call and holds it until `release`."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.held: list[tuple[Deferred, Any, tuple]] = []

    def __call__(self, function: Any, *args: Any) -> Deferred:
        self.calls.append(function.__name__)
        d: Deferred = Deferred()
        self.held.append((d, function, args))
        return d

    def release(self, result: Any = None) -> None:
        """Run every held call (or, with ``result``, answer each with it) and fire its Deferred."""
        held, self.held = self.held, []
        for d, function, args in held:
            d.callback(function(*args) if result is None else result)


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
        """"Remember me" sessions used daily outlive normal ones and the normal idle timeout."""
        session = self.successResultOf(self.accounts.login("alice", PASSWORD, remember=True))
        for _day in range(8):
            self.clock.advance(86400)
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
        """After `start`, the first login of an unknown user costs exactly one bcrypt check, like a
        known user's, so timing does not reveal which usernames exist."""
        self.successResultOf(self.accounts.start())
        self.threaded.clear()
        self.failureResultOf(self.accounts.login("nobody", PASSWORD), LoginFailed)
        self.assertEqual(self.threaded, ["checkpw"])
        self.threaded.clear()
        self.failureResultOf(self.accounts.login("alice", "wrong password"), LoginFailed)
        self.assertEqual(self.threaded, ["checkpw"])

    def test_wrong_passwords_are_throttled(self) -> None:
        """After 50 wrong passwords in 11 s the right one is refused too, with the same message,
        and most of the guesses cost no bcrypt check."""
        for _ in range(50):
            self.failureResultOf(self.accounts.login("alice", "wrong password"), LoginFailed)
            self.clock.advance(0.22)
        failure = self.failureResultOf(self.accounts.login("alice", PASSWORD), LoginFailed)
        self.assertEqual(str(failure.value), LOGIN_FAILED)
        self.assertLess(self.threaded.count("checkpw"), 10)

    def test_login_waits_for_start(self) -> None:
        """A login that arrives while `start` is still hashing waits for it, then checks once."""
        runner = HeldThreads()
        accounts = make_accounts(self.database, self.clock, run_in_thread=runner)
        started = accounts.start()
        first = accounts.login("nobody", PASSWORD)
        second = accounts.login("nobody", PASSWORD)
        self.assertNoResult(first)
        self.assertEqual(runner.calls, ["hashpw"])
        runner.release()  # the dummy hash is made
        self.successResultOf(started)
        self.assertEqual(runner.calls, ["hashpw", "checkpw", "checkpw"])
        runner.release()
        self.failureResultOf(first, LoginFailed)
        self.failureResultOf(second, LoginFailed)

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



class ThrottledLoginTests(SynchronousTestCase):
    """Failed logins are throttled per account and per client address."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.database, self.pool = make_database(self.mktemp())
        self.checks = 0

        def in_thread(function: Any, *args: Any) -> Any:
            if function.__name__ == "checkpw":
                self.checks += 1
            return run_now(function, *args)

        self.in_thread = in_thread
        self.accounts = make_accounts(self.database, self.clock, run_in_thread=in_thread, login_max_delay=8.0)
        self.successResultOf(self.accounts.start())
        self.successResultOf(self.accounts.register("alice", "alice@example.com", PASSWORD))

    def attempt(self, password: str, username: str = "alice", address: str = "203.0.113.9:5000") -> str:
        """One login: 'ok', 'failed' (checked, wrong) or 'refused' (no bcrypt check, same message)."""
        checks = self.checks
        results: list[Any] = []
        self.accounts.login(username, password, client_address=address).addBoth(results.append)
        [result] = results
        spent = self.checks - checks
        if isinstance(result, Session):
            self.assertEqual(spent, 1)
            return "ok"
        result.trap(LoginFailed)
        self.assertEqual(str(result.value), LOGIN_FAILED)
        self.assertIn(spent, (0, 1))
        return "failed" if spent else "refused"

    def test_guessing_is_throttled(self) -> None:
        """50 wrong passwords in 11 s do not leave the door open: the right one is refused, and
        most guesses cost no bcrypt check; once the delay has passed the right one works."""
        outcomes = []
        for _ in range(50):
            outcomes.append(self.attempt("wrong password"))
            self.clock.advance(0.22)
        self.assertEqual(outcomes[:5], ["failed"] * 5)
        self.assertGreater(outcomes.count("refused"), 40)
        self.assertEqual(self.attempt(PASSWORD), "refused")
        self.clock.advance(8)
        self.assertEqual(self.attempt(PASSWORD), "ok")

    def test_delay_doubles_up_to_the_cap(self) -> None:
        """After 5 failures each further one blocks for 1, 2, 4, 8, 8 s (the cap here)."""
        for _ in range(5):
            self.assertEqual(self.attempt("wrong password"), "failed")
        for delay in (1, 2, 4, 8, 8):
            self.clock.advance(delay - 0.01)
            self.assertEqual(self.attempt(PASSWORD), "refused", delay)
            self.clock.advance(0.01)
            self.assertEqual(self.attempt("wrong password"), "failed", delay)

    def test_success_resets_the_account(self) -> None:
        """A successful login clears the account's failures: 4 more wrong ones are allowed again."""
        for _ in range(2):
            for _ in range(4):
                self.assertEqual(self.attempt("wrong password", address=""), "failed")
            self.assertEqual(self.attempt(PASSWORD, address=""), "ok")

    def test_account_key_is_lowercased_username_existing_or_not(self) -> None:
        """Failures count per lowercased username, whether or not the user exists."""
        for name in ("Nobody", "NOBODY", "nobody", "noBody", "NoBody"):
            self.assertEqual(self.attempt("wrong password", username=name, address=""), "failed")
        self.assertEqual(self.attempt("wrong password", username="nobody", address=""), "refused")
        for name in ("ALICE", "Alice", "alice", "aLice", "alicE"):
            self.assertEqual(self.attempt("wrong password", username=name, address=""), "failed")
        self.assertEqual(self.attempt(PASSWORD, username="alice", address=""), "refused")

    def test_address_is_throttled_across_usernames(self) -> None:
        """Failures from one host (any port, IPv4 or IPv6) block it for every username; other hosts
        are not affected, and a success elsewhere does not clear the host."""
        for index in range(5):
            outcome = self.attempt("wrong password", username=f"guess{index}", address=f"203.0.113.9:{index}")
            self.assertEqual(outcome, "failed")
        self.assertEqual(self.attempt(PASSWORD, address="203.0.113.9:9999"), "refused")
        self.assertEqual(self.attempt(PASSWORD, address="[::ffff:203.0.113.9]:1"), "refused")
        self.assertEqual(self.attempt(PASSWORD, address="198.51.100.7:5000"), "ok")
        self.assertEqual(self.attempt(PASSWORD, address="203.0.113.9:5000"), "refused")
        for index, address in enumerate(["[2001:db8::1]:1", "2001:db8::1:2", "[2001:DB8:0::1]:3", "2001:db8::1:4"]):
            self.assertEqual(self.attempt("wrong password", username=f"guess{index}", address=address), "failed")
        self.assertEqual(self.attempt("wrong password", username="guess9", address="[2001:db8::1]:5"), "failed")
        self.assertEqual(self.attempt(PASSWORD, address="[2001:db8::1]:6"), "refused")

    def test_ipv6_addresses_count_by_their_64_prefix(self) -> None:
        """An IPv6 client holds a whole /64: 30 failures from 30 of its addresses are throttled like
        30 from one address, and another /64 is counted on its own."""

        def failures(addresses: list[str]) -> list[str]:
            self.accounts = make_accounts(
                self.database, self.clock, run_in_thread=self.in_thread, login_address_failures_allowed=20
            )
            return [
                self.attempt("wrong password", username=f"guess{index}", address=address)
                for index, address in enumerate(addresses)
            ]

        from_one = failures(["[2001:db8:1:2::1]:40001"] * 30)
        from_many = failures([f"[2001:db8:1:2:{index:x}::{index + 1:x}]:40001" for index in range(30)])
        self.assertEqual(from_one, ["failed"] * 20 + ["refused"] * 10)
        self.assertEqual(from_many, from_one)
        self.assertEqual(self.attempt(PASSWORD, address="[2001:db8:1:2:ffff:ffff:ffff:ffff]:1"), "refused")
        self.assertEqual(self.attempt(PASSWORD, address="[2001:db8:1:3::1]:40001"), "ok")

    def test_simultaneous_attempts_count(self) -> None:
        """Guesses sent all at once cannot slip past the limit while the first ones are being checked."""
        runner = HeldThreads()
        accounts = make_accounts(self.database, self.clock, run_in_thread=runner)
        started = accounts.start()
        runner.release()
        self.successResultOf(started)
        guesses = [accounts.login("alice", f"guess {i}!", client_address=f"10.0.0.{i}:1") for i in range(10)]
        self.assertEqual(len(runner.held), 5)
        for guess in guesses[5:]:
            self.assertEqual(str(self.failureResultOf(guess, LoginFailed).value), LOGIN_FAILED)
        runner.release()
        for guess in guesses[:5]:
            self.failureResultOf(guess, LoginFailed)
        self.failureResultOf(accounts.login("alice", PASSWORD), LoginFailed)
        self.assertEqual(runner.held, [])

    def test_database_failure_is_not_a_failed_login(self) -> None:
        """A login that fails because the database is down neither counts nor keeps its place."""
        self.pool.broken = RuntimeError("database gone")
        for _ in range(10):
            attempt = self.accounts.login("alice", "wrong password", client_address="10.0.0.1:1")
            self.failureResultOf(attempt, RuntimeError)
        self.pool.broken = None
        self.assertEqual(self.attempt(PASSWORD, address="10.0.0.1:1"), "ok")

    def test_tables_are_bounded(self) -> None:
        """Past the cap the least recently failing entries are evicted, so memory stays bounded."""
        accounts = make_accounts(self.database, self.clock, throttle_entries=3)
        for index in range(10):
            self.failureResultOf(
                accounts.login(f"user{index}", "wrong password", client_address=f"10.0.0.{index}:1"), LoginFailed
            )
        self.assertEqual(len(accounts._account_failures), 3)
        self.assertEqual(len(accounts._address_failures), 3)


class RegistrationLimitTests(SynchronousTestCase):
    """Registrations are limited per client address (20 an hour by default), before any bcrypt work."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.database, self.pool = make_database(self.mktemp())
        self.hashes = 0

        def in_thread(function: Any, *args: Any) -> Any:
            if function.__name__ == "hashpw":
                self.hashes += 1
            return run_now(function, *args)

        self.accounts = make_accounts(self.database, self.clock, run_in_thread=in_thread)

    def register(self, name: str, address: str) -> Any:
        """Register ``name`` from ``address``; the Deferred."""
        return self.accounts.register(name, f"{name}@example.com", PASSWORD, client_address=address)

    def users(self) -> list[str]:
        return [name for (name,) in self.pool.connection.execute("SELECT username FROM users ORDER BY 1")]

    def register_many(self, count: int, address: str, prefix: str = "trader") -> list[str]:
        """Register ``count`` users from ``address`` (each from its own port); their names."""
        names = [f"{prefix}{index:02d}" for index in range(count)]
        for index, name in enumerate(names):
            self.assertEqual(self.successResultOf(self.register(name, address.format(port=40000 + index))), name)
        return names

    def assertRefused(self, name: str, address: str) -> None:
        """Registering ``name`` from ``address`` is refused as too many, with no hashing and nothing stored."""
        before, hashes = self.users(), self.hashes
        failure = self.failureResultOf(self.register(name, address), RegisterFailed)
        self.assertEqual(str(failure.value), TOO_MANY_REGISTRATIONS)
        self.assertEqual((self.users(), self.hashes), (before, hashes))

    def test_21st_registration_within_an_hour_is_refused(self) -> None:
        """20 registrations from one address (any port) pass; the 21st within the hour is refused,
        before any hashing and storing nothing."""
        names = self.register_many(20, "192.168.1.1:{port}")
        self.clock.advance(3599)
        self.assertRefused("late", "192.168.1.1:40001")
        self.assertRefused("late", "[::ffff:192.168.1.1]:40001")
        self.assertEqual(self.users(), names)

    def test_other_addresses_still_register(self) -> None:
        """One address at its limit does not hold back another, nor callers that give no address."""
        self.register_many(20, "192.168.1.1:{port}")
        self.assertRefused("late", "192.168.1.1:40001")
        self.successResultOf(self.register("neighbour", "192.168.1.2:40001"))
        self.successResultOf(self.accounts.register("admin", "admin@example.com", PASSWORD))
        self.assertIn("neighbour", self.users())
        self.assertIn("admin", self.users())

    def test_limit_lifts_after_an_hour(self) -> None:
        """Once an hour has passed since the earlier registrations, the address may register again."""
        self.register_many(20, "192.168.1.1:{port}")
        self.clock.advance(3599.9)
        self.assertRefused("late", "192.168.1.1:40001")
        self.clock.advance(0.1)
        self.successResultOf(self.register("late", "192.168.1.1:40001"))

    def test_limit_counts_the_last_hour(self) -> None:
        """The hour slides: registrations spread over it still count, each until it is an hour old."""
        self.register_many(10, "192.168.1.1:{port}", prefix="early")
        self.clock.advance(1800)
        self.register_many(10, "192.168.1.1:{port}", prefix="later")
        self.clock.advance(1800)
        self.successResultOf(self.register("next", "192.168.1.1:40001"))  # the first ten have aged out
        self.register_many(9, "192.168.1.1:{port}", prefix="more")
        self.assertRefused("late", "192.168.1.1:40001")

    def test_ipv6_counts_by_its_64(self) -> None:
        """Addresses of one IPv6 /64 share one allowance; another /64 has its own."""
        for index in range(20):
            self.successResultOf(self.register(f"trader{index:02d}", f"[2001:db8:1:2::{index + 1:x}]:40001"))
        self.assertRefused("late", "[2001:db8:1:2:ffff::1]:40001")
        self.successResultOf(self.register("elsewhere", "[2001:db8:1:3::1]:40001"))

    def test_registrations_in_flight_count(self) -> None:
        """Registrations sent all at once cannot slip past the limit while the first are being hashed."""
        runner = HeldThreads()
        accounts = make_accounts(self.database, self.clock, run_in_thread=runner)
        pending = [
            accounts.register(f"trader{index:02d}", f"trader{index:02d}@example.com", PASSWORD, "10.0.0.1:1")
            for index in range(25)
        ]
        self.assertEqual(len(runner.held), 20)
        for d in pending[20:]:
            self.assertEqual(str(self.failureResultOf(d, RegisterFailed).value), TOO_MANY_REGISTRATIONS)
        runner.release()
        for d in pending[:20]:
            self.successResultOf(d)
        self.assertEqual(len(self.users()), 20)

    def test_invalid_registrations_do_not_count(self) -> None:
        """A registration refused for its input costs no bcrypt work and uses none of the allowance."""
        for _ in range(30):
            self.failureResultOf(self.register("x", "192.168.1.1:40001"), RegisterFailed)
        self.assertEqual(self.hashes, 0)
        self.register_many(20, "192.168.1.1:{port}")

    def test_table_is_bounded(self) -> None:
        """At most ``throttle_entries`` addresses are remembered, and the sweep forgets those an hour quiet."""
        accounts = make_accounts(self.database, self.clock, throttle_entries=3)
        for index in range(10):
            self.successResultOf(
                accounts.register(f"trader{index:02d}", f"t{index}@example.com", PASSWORD, f"10.0.0.{index}:1")
            )
            self.clock.advance(60)
        self.assertEqual(len(accounts._registrations), 3)
        self.clock.advance(3600 - 60 * 2)
        self.successResultOf(accounts.forget_expired())
        self.assertEqual(len(accounts._registrations), 1)
        self.clock.advance(60)
        self.successResultOf(accounts.forget_expired())
        self.assertEqual(len(accounts._registrations), 0)


class IdleSessionTests(SynchronousTestCase):
    """Sessions end after going unused for the idle timeout, also across a restart."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.database, self.pool = make_database(self.mktemp())
        self.accounts = self.restarted()
        self.successResultOf(self.accounts.register("alice", "alice@example.com", PASSWORD))

    def restarted(self) -> Any:
        """A fresh `Accounts` on the same database: day-long sessions, 1 h (7 d remembered) idle timeouts."""
        return make_accounts(self.database, self.clock, session_lifetime=86400.0)

    def stored_use(self, token: str) -> float:
        [(used,)] = self.pool.connection.execute(
            "SELECT last_used_at FROM sessions WHERE token_hash = ?", (token_digest(token),)
        ).fetchall()
        return used - 1_800_000_000

    def test_idle_session_expires(self) -> None:
        """A session unused for an hour is refused as expired although its lifetime is a day;
        each use starts the hour again."""
        session = self.successResultOf(self.accounts.login("alice", PASSWORD))
        for _ in range(3):
            self.clock.advance(3599)
            self.successResultOf(self.accounts.authenticate(session.token))
        self.clock.advance(3600)
        failure = self.failureResultOf(self.accounts.authenticate(session.token), SessionInvalid)
        self.assertEqual(str(failure.value), "session has expired; log in again")

    def test_remembered_session_idle_timeout(self) -> None:
        """"Remember me" sessions have the longer idle timeout (7 days)."""
        session = self.successResultOf(self.accounts.login("alice", PASSWORD, remember=True))
        self.clock.advance(7 * 86400 - 1)
        self.successResultOf(self.accounts.authenticate(session.token))
        self.clock.advance(7 * 86400)
        self.failureResultOf(self.accounts.authenticate(session.token), SessionInvalid)

    def test_cached_session_counts_as_use_and_ends_when_idle(self) -> None:
        """The order path's `cached_session` keeps a session alive and stops answering once it is idle."""
        session = self.successResultOf(self.accounts.login("alice", PASSWORD))
        self.clock.advance(3000)
        self.assertEqual(self.accounts.cached_session(session.token).username, "alice")
        self.clock.advance(3000)
        self.assertEqual(self.accounts.cached_session(session.token).username, "alice")
        self.clock.advance(3600)
        self.assertIsNone(self.accounts.cached_session(session.token))

    def test_use_written_at_most_once_a_minute(self) -> None:
        """Uses are kept in memory and written to the database only when the stored one is a minute old."""
        session = self.successResultOf(self.accounts.login("alice", PASSWORD))
        self.assertEqual(self.stored_use(session.token), 0)
        for _ in range(59):
            self.clock.advance(1)
            self.accounts.cached_session(session.token)
        self.assertEqual(self.stored_use(session.token), 0)
        self.clock.advance(1)
        self.successResultOf(self.accounts.authenticate(session.token))
        self.assertEqual(self.stored_use(session.token), 60)

    def test_failed_use_write_is_logged_not_raised(self) -> None:
        """If the database cannot store a session's use, the session still works from memory."""
        session = self.successResultOf(self.accounts.login("alice", PASSWORD))
        self.clock.advance(60)
        self.pool.broken = RuntimeError("disk gone")
        self.assertEqual(self.successResultOf(self.accounts.authenticate(session.token)).username, "alice")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_idle_expiry_survives_restart(self) -> None:
        """A restarted master knows when a session was last used (to the minute) and ends it when idle."""
        session = self.successResultOf(self.accounts.login("alice", PASSWORD))
        self.clock.advance(100)
        self.successResultOf(self.accounts.authenticate(session.token))
        self.clock.advance(3599)
        self.successResultOf(self.restarted().authenticate(session.token))
        self.clock.advance(3600)
        self.failureResultOf(self.restarted().authenticate(session.token), SessionInvalid)
        self.assertEqual(self.pool.connection.execute("SELECT COUNT(*) FROM sessions").fetchone(), (0,))

    def test_sweep_removes_idle_sessions(self) -> None:
        """The sweep deletes idle sessions from memory and the database, stores recent uses first
        (so a session used less than a minute ago is kept) and keeps remembered ones longer."""
        idle = self.successResultOf(self.accounts.login("alice", PASSWORD))
        used = self.successResultOf(self.accounts.login("alice", PASSWORD))
        remembered = self.successResultOf(self.accounts.login("alice", PASSWORD, remember=True))
        self.clock.advance(30)
        self.accounts.cached_session(used.token)  # not yet written
        self.clock.advance(3580)
        self.successResultOf(self.accounts.forget_expired())
        rows = {row[0] for row in self.pool.connection.execute("SELECT token_hash FROM sessions")}
        self.assertEqual(rows, {token_digest(used.token), token_digest(remembered.token)})
        self.assertIsNone(self.accounts.cached_session(idle.token))
        self.assertEqual(self.stored_use(used.token), 30)

    def test_sessions_from_before_the_upgrade(self) -> None:
        """A session stored before idle tracking counts as used when first seen, with the long idle timeout."""
        [(user_id,)] = self.pool.connection.execute("SELECT id FROM users").fetchall()
        self.pool.connection.execute(
            "INSERT INTO sessions (token_hash, user_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
            (token_digest("old-token"), user_id, 1_700_000_000, 1_900_000_000),
        )
        self.pool.connection.commit()
        self.successResultOf(self.accounts.authenticate("old-token"))
        self.assertEqual(self.stored_use("old-token"), 0)
        self.clock.advance(7 * 86400 - 1)
        self.successResultOf(self.restarted().authenticate("old-token"))

    def test_session_cache_is_bounded(self) -> None:
        """Past its cap the least recently used session leaves memory (its use written first);
        it is still found in the database."""
        accounts = make_accounts(self.database, self.clock, session_lifetime=86400.0, session_cache_entries=2)
        first = self.successResultOf(accounts.login("alice", PASSWORD))
        self.clock.advance(30)
        self.assertIsNotNone(accounts.cached_session(first.token))
        others = [self.successResultOf(accounts.login("alice", PASSWORD)) for _ in range(2)]
        self.assertIsNone(accounts.cached_session(first.token))
        self.assertEqual(self.stored_use(first.token), 30)
        self.assertEqual([accounts.cached_session(s.token) is not None for s in others], [True, True])
        self.successResultOf(accounts.authenticate(first.token))


class RevocationTests(SynchronousTestCase):
    """"Log out everywhere" and password changes end every session of the user."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.database, self.pool = make_database(self.mktemp())
        self.threaded: list[str] = []

        def in_thread(function: Any, *args: Any) -> Any:
            self.threaded.append(function.__name__)
            return run_now(function, *args)

        self.accounts = make_accounts(self.database, self.clock, run_in_thread=in_thread)
        for name in ("alice", "bob"):
            self.successResultOf(self.accounts.register(name, f"{name}@example.com", PASSWORD))
        self.sessions = [self.successResultOf(self.accounts.login("alice", PASSWORD)) for _ in range(3)]
        self.bob = self.successResultOf(self.accounts.login("bob", PASSWORD))

    def assertAllRevoked(self) -> None:
        """None of alice's sessions works, in memory, from the database, or after a restart; bob's does."""
        restarted = make_accounts(self.database, self.clock)
        for session in self.sessions:
            self.assertIsNone(self.accounts.cached_session(session.token))
            self.failureResultOf(self.accounts.authenticate(session.token), SessionInvalid)
            self.failureResultOf(restarted.authenticate(session.token), SessionInvalid)
        self.assertEqual(self.successResultOf(self.accounts.authenticate(self.bob.token)).username, "bob")

    def test_logout_everywhere(self) -> None:
        """Every session of the user ends, including ones this master only has in the database."""
        restarted = make_accounts(self.database, self.clock)
        self.assertEqual(self.successResultOf(restarted.logout_everywhere(self.sessions[0].token)), 3)
        self.accounts = restarted
        self.assertAllRevoked()

    def test_logout_everywhere_needs_a_session(self) -> None:
        """Without a live session nothing is revoked."""
        self.failureResultOf(self.accounts.logout_everywhere("forged"), SessionInvalid)
        self.assertEqual(self.pool.connection.execute("SELECT COUNT(*) FROM sessions").fetchone(), (4,))

    def test_change_password(self) -> None:
        """The new password is bcrypt-hashed in a thread, every session ends, and only the new one works."""
        self.threaded.clear()
        ended = self.successResultOf(
            self.accounts.change_password(self.sessions[1].token, PASSWORD, "a new passphrase")
        )
        self.assertEqual(ended, 3)
        self.assertEqual(self.threaded, ["checkpw", "hashpw"])
        self.assertAllRevoked()
        self.failureResultOf(self.accounts.login("alice", PASSWORD), LoginFailed)
        self.successResultOf(self.accounts.login("alice", "a new passphrase"))

    def test_change_password_refusals(self) -> None:
        """A wrong current password or a new one that register would refuse changes nothing."""
        token = self.sessions[0].token
        for old, new, reason in [
            ("wrong password", "a new passphrase", "the current password is wrong"),
            (PASSWORD, "short", "password must be at least 8 characters"),
            (PASSWORD, "x" * 73, "password must be at most 72 bytes"),
        ]:
            failure = self.failureResultOf(self.accounts.change_password(token, old, new), PasswordChangeFailed)
            self.assertEqual(str(failure.value), reason)
        self.successResultOf(self.accounts.login("alice", PASSWORD))
        for session in self.sessions:
            self.successResultOf(self.accounts.authenticate(session.token))

    def test_change_password_guesses_are_throttled(self) -> None:
        """A stolen session cannot be used to guess the password: wrong current passwords count as
        failed logins of the account and are refused without bcrypt after the limit."""
        token = self.sessions[0].token
        for _ in range(5):
            attempt = self.accounts.change_password(token, "wrong password", "a new passphrase")
            self.failureResultOf(attempt, PasswordChangeFailed)
        self.threaded.clear()
        attempt = self.accounts.change_password(token, PASSWORD, "a new passphrase")
        failure = self.failureResultOf(attempt, PasswordChangeFailed)
        self.assertEqual(str(failure.value), "the current password is wrong")
        self.assertEqual(self.threaded, [])
        self.failureResultOf(self.accounts.login("alice", PASSWORD), LoginFailed)

    def test_login_checked_against_the_old_password_gets_no_session(self) -> None:
        """A login whose check of the old password finishes after a password change opens no session."""
        runner = HeldThreads()
        accounts = make_accounts(self.database, self.clock, run_in_thread=runner)
        started = accounts.start()
        runner.release()
        self.successResultOf(started)
        login = accounts.login("alice", PASSWORD)
        self.assertEqual(runner.calls[-1], "checkpw")
        self.successResultOf(self.accounts.change_password(self.sessions[0].token, PASSWORD, "a new passphrase"))
        runner.release()
        self.assertEqual(str(self.failureResultOf(login, LoginFailed).value), LOGIN_FAILED)
        self.assertEqual(
            self.pool.connection.execute("SELECT COUNT(*) FROM sessions WHERE user_id = 1").fetchone(), (0,)
        )

    def held_lookup(self, accounts: Any, token: str) -> tuple[Deferred, Deferred]:
        """Start ``accounts.authenticate(token)`` with its database read done now but delivered only when
        the returned gate fires, as a read running in a thread during other work would be."""
        real_find = self.database.find_session
        gate: Deferred = Deferred()

        def held_find(digest: str) -> Deferred:
            self.database.find_session = real_find  # type: ignore[method-assign]
            record = self.successResultOf(real_find(digest))
            return gate.addCallback(lambda _: record)

        self.database.find_session = held_find  # type: ignore[method-assign]
        lookup = accounts.authenticate(token)
        self.assertNoResult(lookup)
        return lookup, gate

    def test_lookup_overlapping_revocation_is_not_cached(self) -> None:
        """A session read from the database while its user's sessions are being revoked is not put
        back in memory: it is read again and found gone."""
        restarted = make_accounts(self.database, self.clock)
        lookup, gate = self.held_lookup(restarted, self.sessions[0].token)
        self.successResultOf(restarted.logout_everywhere(self.sessions[1].token))
        gate.callback(None)  # the first read saw the session (it ran before the revocation)...
        self.failureResultOf(lookup, SessionInvalid)
        self.assertIsNone(restarted.cached_session(self.sessions[0].token))

    def test_lookup_overlapping_logout_is_not_cached(self) -> None:
        """A lookup that read the session just before its logout does not keep it alive in memory."""
        restarted = make_accounts(self.database, self.clock)
        lookup, gate = self.held_lookup(restarted, self.sessions[0].token)
        self.successResultOf(restarted.logout(self.sessions[0].token))
        gate.callback(None)
        self.failureResultOf(lookup, SessionInvalid)
        self.assertIsNone(restarted.cached_session(self.sessions[0].token))
        self.failureResultOf(restarted.authenticate(self.sessions[0].token), SessionInvalid)
