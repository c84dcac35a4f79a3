"""`LoginThrottle`, `client_host` and `address_key`: the bookkeeping behind refusing repeated failed logins."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from papertrader.master.accounts import LoginThrottle, address_key, client_host


class LoginThrottleTests(SynchronousTestCase):
    """Failures per key, the growing delay, and the bounds on the table."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.throttle = LoginThrottle(self.clock, failures_allowed=3, delay=2.0, max_delay=16.0, max_entries=4)

    def fail(self, key: str, times: int = 1) -> float:
        """Run ``times`` failed attempts under ``key``; the delay the last one started."""
        delay = 0.0
        for _ in range(times):
            self.assertTrue(self.throttle.allows(key))
            self.throttle.begin(key)
            delay = self.throttle.failed(key)
        return delay

    def test_delays(self) -> None:
        """No delay before the limit; then the base delay, doubling, capped."""
        self.assertEqual([self.fail("k") for _ in range(3)], [0.0, 0.0, 2.0])
        delays = []
        for _ in range(5):
            self.assertFalse(self.throttle.allows("k"))
            self.clock.advance(delays[-1] if delays else 2.0)
            delays.append(self.fail("k"))
        self.assertEqual(delays, [4.0, 8.0, 16.0, 16.0, 16.0])

    def test_keys_are_independent(self) -> None:
        """One key's failures do not block another."""
        self.fail("a", 3)
        self.assertFalse(self.throttle.allows("a"))
        self.assertTrue(self.throttle.allows("b"))

    def test_pending_attempts_count(self) -> None:
        """Attempts being checked take places: no more than the limit are in flight at once, and
        after the limit only one at a time."""
        for _ in range(3):
            self.assertTrue(self.throttle.allows("k"))
            self.throttle.begin("k")
        self.assertFalse(self.throttle.allows("k"))
        self.throttle.ended("k")
        self.assertTrue(self.throttle.allows("k"))
        self.throttle.begin("k")
        for _ in range(3):
            self.throttle.failed("k")
        self.clock.advance(2)
        self.assertTrue(self.throttle.allows("k"))
        self.throttle.begin("k")
        self.assertFalse(self.throttle.allows("k"))

    def test_success_forgets(self) -> None:
        """`succeeded` clears the key's failures."""
        self.fail("k", 2)
        self.throttle.begin("k")
        self.throttle.succeeded("k")
        self.assertEqual(len(self.throttle), 0)
        self.assertEqual(self.fail("k", 2), 0.0)

    def test_entries_forgotten_when_their_delay_has_long_passed(self) -> None:
        """An entry goes once its delay ended a whole maximum delay ago, not before."""
        self.fail("blocked", 3)  # blocked for 2 s
        self.fail("counted", 1)
        self.clock.advance(17.9)
        self.throttle.forget_stale()
        self.assertEqual(len(self.throttle), 1)  # "counted" went at 16 s, "blocked" goes at 2 + 16 s
        self.clock.advance(0.1)
        self.throttle.forget_stale()
        self.assertEqual(len(self.throttle), 0)

    def test_stale_entry_starts_afresh(self) -> None:
        """Once forgotten, a key gets its full allowance of failures again."""
        self.fail("k", 3)
        self.clock.advance(2 + 16)
        self.assertEqual(self.fail("k", 2), 0.0)

    def test_capped(self) -> None:
        """At most ``max_entries`` keys are kept; the least recently failing one goes first."""
        for key in "abcdef":
            self.fail(key, 3)
        self.assertEqual(len(self.throttle), 4)
        self.assertTrue(self.throttle.allows("a"))
        self.assertTrue(self.throttle.allows("b"))
        self.assertFalse(self.throttle.allows("c"))


class ClientHostTests(SynchronousTestCase):
    """`client_host` takes the host out of the address the worker reports."""

    def test_forms(self) -> None:
        """IPv4 and IPv6 with or without brackets, hostnames and odd text all give the host."""
        cases = {
            "203.0.113.9:5000": "203.0.113.9",
            "[2001:db8::1]:443": "2001:db8::1",
            "[2001:DB8:0:0::1]:443": "2001:db8::1",
            "2001:db8::1:40000": "2001:db8::1",
            "::1:40000": "::1",
            "[::ffff:203.0.113.9]:80": "203.0.113.9",
            "fe80::1": "fe80::1",
            "203.0.113.9": "203.0.113.9",
            "Client.Example.org:22": "client.example.org",
            "/run/papertrader.sock:": "/run/papertrader.sock",
            "": "",
        }
        self.assertEqual({address: client_host(address) for address in cases}, cases)


class AddressKeyTests(SynchronousTestCase):
    """`address_key` names what a client controls: its host, or for IPv6 its whole /64."""

    def test_forms(self) -> None:
        """IPv6 addresses give their /64 (however written), IPv4 and IPv4-mapped IPv6 give the
        IPv4 address, and anything else is used as it is."""
        cases = {
            "[2001:db8:1:2::1]:40001": "2001:db8:1:2::/64",
            "[2001:DB8:1:2:ffff:ffff:ffff:ffff]:1": "2001:db8:1:2::/64",
            "2001:db8:1:2::9:40001": "2001:db8:1:2::/64",
            "[2001:db8:1:3::1]:40001": "2001:db8:1:3::/64",
            "[fe80::1%eth0]:22": "fe80::/64",
            "[::1]:5000": "::/64",
            "192.168.1.1:40001": "192.168.1.1",
            "[::ffff:192.168.1.1]:40001": "192.168.1.1",
            "Client.Example.org:22": "client.example.org",
            "[not an address]:1": "not an address",
            "": "",
        }
        self.assertEqual({address: address_key(address) for address in cases}, cases)
