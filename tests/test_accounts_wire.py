"""Account protection over the wire: throttled logins by account and address, limited registrations
per address, log out everywhere, password change."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from papertrader.errors import LoginFailed, PasswordChangeFailed, RegisterFailed, SessionInvalid
from tests.support import PASSWORD, Deployment


class ThrottlingThroughTheWorkerTests(SynchronousTestCase):
    """The master throttles by the client address the worker stamped on each login and registration."""

    def setUp(self) -> None:
        self.deployment = Deployment(self.mktemp())
        for name in ("alice", "bob"):
            self.deployment.logged_in(name)

    def login(self, client, username: str, password: str) -> None:
        self.deployment.result(client.login(username, password))

    def test_wrong_passwords_then_right_one_refused(self) -> None:
        """After five wrong passwords for an account, even the right one is refused for a while, same message."""
        guesser = self.deployment.client("10.0.0.7")
        messages = {
            str(self.assertRaises(LoginFailed, self.login, guesser, "alice", f"guess {n}")) for n in range(50)
        }
        refused = self.assertRaises(LoginFailed, self.login, guesser, "alice", PASSWORD)
        self.assertEqual(messages, {str(refused)})
        self.deployment.advance(901)
        self.login(self.deployment.client("10.0.0.8"), "alice", PASSWORD)

    def test_address_throttled_across_accounts(self) -> None:
        """Guessing across many accounts from one address locks that address out, not the others."""
        sprayer = self.deployment.client("10.0.0.9")
        for n in range(5):
            self.assertRaises(LoginFailed, self.login, sprayer, f"user{n}", "wrong password")
        self.assertRaises(LoginFailed, self.login, self.deployment.client("10.0.0.9"), "bob", PASSWORD)
        self.login(self.deployment.client("10.0.0.10"), "bob", PASSWORD)


    def test_registrations_limited_per_address(self) -> None:
        """Past 20 registrations within the hour from one address the master refuses more, storing
        nothing; another address still registers."""
        storm = self.deployment.client("10.0.0.11")
        for n in range(20):
            self.deployment.result(storm.register(f"storm{n}", f"storm{n}@example.com", PASSWORD))
        refused = self.assertRaises(
            RegisterFailed, self.deployment.result, storm.register("storm20", "storm20@example.com", PASSWORD)
        )
        self.assertEqual(str(refused), "too many registrations from this address; try again later")
        stored = self.deployment.pool.connection.execute("SELECT COUNT(*) FROM users WHERE username = 'storm20'")
        self.assertEqual(stored.fetchall(), [(0,)])
        other = self.deployment.client("10.0.0.12")
        self.assertEqual(self.deployment.result(other.register("carol", "carol@example.com", PASSWORD)),
                         {"username": "carol"})

class RevocationThroughTheWorkerTests(SynchronousTestCase):
    """"Log out everywhere" and a password change end every session of the user."""

    def setUp(self) -> None:
        self.deployment = Deployment(self.mktemp())
        self.laptop = self.deployment.logged_in("alice")
        self.phone = self.deployment.client()
        self.deployment.result(self.phone.login("alice", PASSWORD))
        self.bob = self.deployment.logged_in("bob")

    def test_logout_everywhere(self) -> None:
        """Every session of the user ends, on every connection; other users' sessions do not."""
        answer = self.deployment.result(self.laptop.logout_everywhere())
        self.assertEqual(answer["sessions"], 2)
        self.assertRaises(SessionInvalid, self.deployment.result, self.phone.portfolio())
        self.assertEqual(self.deployment.result(self.bob.portfolio())["username"], "bob")

    def test_change_password(self) -> None:
        """A wrong current password changes nothing; the right one ends every session and the new password works."""
        self.assertRaises(
            PasswordChangeFailed, self.deployment.result, self.laptop.change_password("wrong one", "new secret 1")
        )
        self.assertEqual(self.deployment.result(self.phone.portfolio())["username"], "alice")
        answer = self.deployment.result(self.laptop.change_password(PASSWORD, "new secret 1"))
        self.assertEqual(answer["sessions"], 2)
        self.assertRaises(SessionInvalid, self.deployment.result, self.phone.portfolio())
        other = self.deployment.client("10.1.1.1")
        self.assertRaises(LoginFailed, self.deployment.result, other.login("alice", PASSWORD))
        self.deployment.result(other.login("alice", "new secret 1"))
        self.assertEqual(self.deployment.result(other.portfolio())["username"], "alice")
