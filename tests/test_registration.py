"""The registry of allowed workers on SQLite and PostgreSQL, with real GnuPG keys, and the gpg helpers."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from papertrader import gpg
from papertrader.errors import BadRequest, UnknownWorker, WorkerExists, WorkerKeyRejected
from papertrader.master.database import Database
from papertrader.master.registration import RegisteredWorker, WorkerRegistrations
from tests.databases import fresh_database_url, query
from tests.gpgkeys import cached_key, fresh_home, new_key

_keys: dict[str, Any] = {}


def special_keys() -> dict[str, Any]:
    """Keys no worker could register, made once per test process: expired, revoked, unable to sign."""
    if not _keys:
        home = fresh_home()
        expired = new_key(home, "expired", expire="1d", options=["--faked-system-time", "20200101T000000!"])
        revoked_home = fresh_home()
        revoked = new_key(revoked_home, "revoked")
        with open(f"{revoked_home}/openpgp-revocs.d/{revoked.fingerprint}.rev", encoding="ascii") as f:
            gpg.import_keys(revoked_home, f.read().replace(":-----BEGIN", "-----BEGIN"))
        certify_only = gpg._gpg(home).gen_key(
            gpg._gpg(home).gen_key_input(
                key_type="eddsa", key_curve="ed25519", key_usage="cert", name_real="certify only",
                name_email="", name_comment="", no_protection=True,
            )
        ).fingerprint
        _keys.update(
            expired=expired.public_key,
            revoked=gpg.export_public_key(revoked_home, revoked.fingerprint),
            certify_only=gpg.export_public_key(home, certify_only),
            secret=gpg._gpg(home).export_keys(certify_only, secret=True, expect_passphrase=False),
        )
    return _keys


class RegistrationTestsMixin:
    """`WorkerRegistrations` over a real pool of ``backend`` and a real keyring, gpg in threads."""

    backend: str

    def setUp(self) -> Any:
        self.url = fresh_database_url(self, self.backend)
        self.database = Database.open(self.url, self.mktemp())
        self.addCleanup(self.database.close)
        self.home = fresh_home(self)
        self.registrations = WorkerRegistrations(self.database, self.home, reactor)
        return self.database.migrate()

    @inlineCallbacks
    def test_add_get_list(self) -> Any:
        """A registered worker is stored with a UUID, its key's fingerprint, its networks (normal form)
        and enabled; its key is in the master's keyring."""
        key = cached_key("reg-a")
        worker = yield self.registrations.add("reg-a", key.public_key, ["10.1.0.0/16", "2001:db8::/32 "])
        self.assertEqual(worker.fingerprint, key.fingerprint)
        self.assertEqual(worker.networks, ("10.1.0.0/16", "2001:db8::/32"))
        self.assertTrue(worker.enabled)
        self.assertEqual(len(worker.uuid), 36)
        self.assertEqual((yield self.registrations.get("reg-a")), worker)
        other = yield self.registrations.add("reg-b", cached_key("reg-b").public_key)
        self.assertEqual((yield self.registrations.list()), [worker, other])
        self.assertEqual(other.networks, ())
        state = gpg.key_state(self.home, key.fingerprint)
        self.assertEqual((state.fingerprint, state.revoked, state.expired), (key.fingerprint, False, False))
        rows = query(self.url, "SELECT name, fingerprint, networks, enabled FROM workers ORDER BY name")
        self.assertEqual(rows, [("reg-a", key.fingerprint, "10.1.0.0/16 2001:db8::/32", 1),
                                ("reg-b", other.fingerprint, "", 1)])

    @inlineCallbacks
    def test_duplicates_refused(self) -> Any:
        """A second worker of the same name, or with a key registered to another, is refused."""
        key = cached_key("reg-a")
        yield self.registrations.add("reg-a", key.public_key)
        error = yield self.assertFailure(self.registrations.add("reg-a", cached_key("reg-b").public_key), WorkerExists)
        self.assertIn("a worker named 'reg-a' is registered already", str(error))
        error = yield self.assertFailure(self.registrations.add("reg-c", key.public_key), WorkerExists)
        self.assertIn("registered to worker 'reg-a'", str(error))
        self.assertEqual([w.name for w in (yield self.registrations.list())], ["reg-a"])

    @inlineCallbacks
    def test_unusable_keys_refused(self) -> Any:
        """Not exactly one public key, or one that is expired, revoked or cannot sign, is refused with why."""
        keys = special_keys()
        two = cached_key("reg-a").public_key + cached_key("reg-b").public_key
        for text, reason in (
            ("not a key", "found none"),
            (two, "found 2"),
            (keys["secret"], "this is a secret key"),
            (keys["expired"], "has expired"),
            (keys["revoked"], "is revoked"),
            (keys["certify_only"], "cannot make signatures"),
            ("x" * 70_000, "longer than"),
        ):
            error = yield self.assertFailure(self.registrations.add("reg-x", text), WorkerKeyRejected)
            self.assertIn(reason, str(error))
        self.assertEqual((yield self.registrations.list()), [])

    @inlineCallbacks
    def test_bad_names_and_networks(self) -> Any:
        """A name that cannot be a worker's, or a network that is not CIDR, is a bad request."""
        key = cached_key("reg-a").public_key
        for name in ("", "-x", "a b", "x" * 65):
            yield self.assertFailure(self.registrations.add(name, key), BadRequest)
        for network in ("10.0.0.1/8", "nonsense", "10.0.0.0/33"):
            error = yield self.assertFailure(self.registrations.add("reg-a", key, [network]), BadRequest)
            self.assertIn("CIDR", str(error))
        self.assertEqual((yield self.registrations.list()), [])

    @inlineCallbacks
    def test_enable_disable_remove(self) -> Any:
        """A worker is disabled and enabled again, then removed (its key leaves the keyring); unknown names
        are UnknownWorker."""
        key = cached_key("reg-a")
        yield self.registrations.add("reg-a", key.public_key)
        self.assertFalse((yield self.registrations.set_enabled("reg-a", False)).enabled)
        self.assertFalse((yield self.registrations.get("reg-a")).enabled)
        self.assertTrue((yield self.registrations.set_enabled("reg-a", True)).enabled)
        yield self.registrations.remove("reg-a")
        self.assertIsNone((yield self.registrations.find("reg-a")))
        self.assertIsNone(gpg.key_state(self.home, key.fingerprint))
        for call in (
            lambda: self.registrations.get("reg-a"),
            lambda: self.registrations.set_enabled("reg-a", True),
            lambda: self.registrations.remove("reg-a"),
            lambda: self.registrations.update_key("reg-a", key.public_key),
        ):
            yield self.assertFailure(call(), UnknownWorker)

    @inlineCallbacks
    def test_update_key(self) -> Any:
        """update_key imports a revocation of the worker's key, or replaces the key by another usable one;
        text that changes nothing, or another worker's key, is refused."""
        home = fresh_home(self)
        key = new_key(home, "reg-r")
        yield self.registrations.add("reg-r", key.public_key)
        yield self.registrations.add("reg-b", cached_key("reg-b").public_key)
        error = yield self.assertFailure(self.registrations.update_key("reg-r", key.public_key), WorkerKeyRejected)
        self.assertIn("nothing in this text is new", str(error))
        yield self.assertFailure(
            self.registrations.update_key("reg-r", cached_key("reg-b").public_key), WorkerExists
        )
        with open(f"{home}/openpgp-revocs.d/{key.fingerprint}.rev", encoding="ascii") as f:
            revocation = f.read().replace(":-----BEGIN", "-----BEGIN")
        worker = yield self.registrations.update_key("reg-r", revocation)
        self.assertEqual(worker.fingerprint, key.fingerprint)
        self.assertTrue(gpg.key_state(self.home, key.fingerprint).revoked)
        self.assertTrue(gpg.scan_keys(self.home, worker.public_key)[0].revoked)  # the stored key says so too
        replacement = new_key(home, "reg-r2")
        worker = yield self.registrations.update_key("reg-r", replacement.public_key)
        self.assertEqual(worker.fingerprint, replacement.fingerprint)


class SQLiteRegistrationTests(RegistrationTestsMixin, TestCase):
    """On SQLite."""

    backend = "sqlite"


class PostgreSQLRegistrationTests(RegistrationTestsMixin, TestCase):
    """On PostgreSQL."""

    backend = "postgresql"


class NetworkTests(SynchronousTestCase):
    """Whether a connection's address is inside a worker's allowed networks."""

    def worker(self, *networks: str) -> RegisteredWorker:
        return RegisteredWorker("w", "u", "F", "K", networks, True, "t")

    def test_allows(self) -> None:
        """No networks: anywhere; otherwise inside one of them, IPv4-mapped IPv6 counted as IPv4."""
        self.assertTrue(self.worker().allows("203.0.113.9"))
        worker = self.worker("10.0.0.0/8", "2001:db8::/32")
        for host, allowed in (
            ("10.1.2.3", True), ("::ffff:10.1.2.3", True), ("2001:db8::1", True), ("[2001:db8::1]", True),
            ("11.0.0.1", False), ("2001:db9::1", False), (None, False), ("not-an-address", False),
        ):
            self.assertEqual(worker.allows(host), allowed, host)


class GPGHelperTests(SynchronousTestCase):
    """The gpg helpers: short aliases for long homes, picking the key to sign with."""

    def test_long_home_signs_through_an_alias(self) -> None:
        """A home whose path is too long for gpg-agent's socket is used through a short alias, and signs."""
        base = fresh_home(self)
        long_home = os.path.join(base, "d" * 90, "gnupg")
        alias = gpg.usable_home(long_home)
        self.assertLessEqual(len(alias), gpg.MAX_HOME_LENGTH)
        self.assertEqual(os.path.realpath(alias), os.path.realpath(long_home))
        self.assertEqual(gpg.usable_home(long_home), alias)
        self.addCleanup(gpg.stop_agent, long_home)
        key = new_key(long_home, "long")
        signed = gpg.sign(long_home, key.fingerprint, b"statement")
        self.assertEqual(gpg.verify(long_home, signed).data, b"statement")
        self.assertEqual(os.stat(long_home).st_mode & 0o777, 0o700)

    def test_signing_key(self) -> None:
        """The home's only secret key is used by default; with several, one must be named."""
        home = fresh_home(self)
        self.assertIn("holds no secret keys", str(self.assertRaises(gpg.GPGError, gpg.signing_key, home)))
        first = new_key(home, "one")
        self.assertEqual(gpg.signing_key(home), first.fingerprint)
        second = new_key(home, "two")
        self.assertIn("choose one with --key-fingerprint", str(self.assertRaises(gpg.GPGError, gpg.signing_key, home)))
        self.assertEqual(gpg.signing_key(home, second.fingerprint[-16:]), second.fingerprint)
        self.assertRaises(gpg.GPGError, gpg.signing_key, home, "0" * 40)

    def test_proof_statement_round_trip(self) -> None:
        """The handshake statement parses back to its name and nonce; anything else does not parse."""
        statement = gpg.proof_statement("w1", "ab" * 32)
        self.assertEqual(gpg.parse_proof_statement(statement), ("w1", "ab" * 32))
        for data in (b"", b"hello", statement + b"more\n", statement.replace(b"v1", b"v2"), b"\xff\xfe"):
            self.assertIsNone(gpg.parse_proof_statement(data))
