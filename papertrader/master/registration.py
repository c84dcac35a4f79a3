"""Worker management (spec 3.1.5): the workers allowed to connect, and their OpenPGP keys.

A registration names a worker, gives it a UUID, and holds the fingerprint of
its OpenPGP key, the key itself (also imported into the master's own GnuPG
home, where handshakes verify signatures), the networks its connections may
come from (none listed: anywhere) and whether it is enabled.  The records
live in the master's database; every gpg call runs through ``run_in_thread``
(``deferToThread`` unless a test runs them at once).
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import attr
from twisted.internet import threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime

from papertrader import gpg
from papertrader.errors import BadRequest, UnknownWorker, WorkerExists, WorkerKeyRejected
from papertrader.timestamps import iso

if TYPE_CHECKING:
    from papertrader.master.database import Database

# A worker's name: what it says in its hello and what its certificate carries.
WORKER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# An armored key (or revocation) longer than this is refused unread.
MAX_KEY_TEXT = 60_000
MAX_NETWORKS = 64


@attr.s(frozen=True, auto_attribs=True)
class RegisteredWorker:
    """One worker allowed to connect (while ``enabled``), and how it proves it is that worker."""

    name: str
    uuid: str
    fingerprint: str
    public_key: str
    networks: tuple[str, ...]
    enabled: bool
    added_at: str

    def allows(self, host: str | None) -> bool:
        """Whether a connection from ``host`` (an IP address) may be this worker."""
        if not self.networks:
            return True
        address = _address(host)
        if address is None:
            return False
        return any(address in ipaddress.ip_network(network) for network in self.networks)


def _address(host: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address((host or "").strip("[]").split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def check_worker_name(name: str) -> str:
    """``name`` if it can name a worker; BadRequest saying why not."""
    if not WORKER_NAME.match(name):
        raise BadRequest(
            "a worker name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit; "
            f"got {name[:80]!r}"
        )
    return name


def parse_networks(networks: Iterable[str]) -> tuple[str, ...]:
    """Each CIDR block of ``networks`` in its normal form; BadRequest naming the first that is not one."""
    parsed = []
    for text in networks:
        try:
            parsed.append(str(ipaddress.ip_network(text.strip(), strict=True)))
        except ValueError as e:
            raise BadRequest(f"not a network in CIDR form (such as 10.1.0.0/16): {text[:80]!r} ({e})") from None
    if len(parsed) > MAX_NETWORKS:
        raise BadRequest(f"at most {MAX_NETWORKS} networks per worker")
    return tuple(dict.fromkeys(parsed))


@attr.s(frozen=True, auto_attribs=True)
class ProofCheck:
    """What the master's keyring says of a handshake signature: the verified signature, or why it is
    not good (gpg counts a signature by an expired or revoked key as not good, and says which)."""

    verified: gpg.Verified | None
    problem: str | None


class WorkerRegistrations:
    """The registry of allowed workers: records in the database, keys in the master's keyring."""

    def __init__(
        self,
        database: Database,
        gnupg_home: str,
        clock: IReactorTime,
        run_in_thread: Callable[..., Deferred] = threads.deferToThread,
    ) -> None:
        self.database = database
        self.gnupg_home = gnupg_home
        self._clock = clock
        self._run = run_in_thread

    # ------------------------------------------------------------ reading

    def find(self, name: str) -> Deferred[RegisteredWorker | None]:
        """Worker ``name``'s registration, or None."""
        return self.database.find_worker(name)

    def get(self, name: str) -> Deferred[RegisteredWorker]:
        """Worker ``name``'s registration; UnknownWorker if there is none."""
        return self.find(name).addCallback(_known, name)

    def list(self) -> Deferred[list[RegisteredWorker]]:
        """Every registration, by name."""
        return self.database.list_workers()

    # ------------------------------------------------------------ changing

    @inlineCallbacks
    def add(self, name: str, armored_key: str, networks: Iterable[str] = ()) -> Any:
        """Register worker ``name`` with the public key ``armored_key``, enabled.

        BadRequest for a bad name or network; WorkerKeyRejected unless the text
        holds exactly one public key that can sign and is neither expired nor
        revoked; WorkerExists if the name or the key is registered already.
        """
        check_worker_name(name)
        allowed = parse_networks(networks)
        if (yield self.find(name)) is not None:
            raise WorkerExists(f"a worker named {name!r} is registered already")
        state, public_key = yield self._run(_import_new_key, self.gnupg_home, armored_key)
        worker = RegisteredWorker(
            name=name,
            uuid=str(uuid.uuid4()),
            fingerprint=state.fingerprint,
            public_key=public_key,
            networks=allowed,
            enabled=True,
            added_at=iso(self._clock.seconds()),
        )
        yield self.database.add_worker(worker)
        return worker

    @inlineCallbacks
    def set_enabled(self, name: str, enabled: bool) -> Any:
        """Enable or disable worker ``name`` (a disabled one is refused at its next handshake)."""
        if not (yield self.database.set_worker_enabled(name, enabled)):
            raise UnknownWorker(f"no worker named {name[:80]!r} is registered")
        return (yield self.get(name))

    @inlineCallbacks
    def remove(self, name: str) -> Any:
        """Forget worker ``name`` and drop its key from the master's keyring."""
        worker = yield self.get(name)
        if not (yield self.database.remove_worker(name)):
            raise UnknownWorker(f"no worker named {name[:80]!r} is registered")
        yield self._run(_forget_key, self.gnupg_home, worker.fingerprint)

    @inlineCallbacks
    def update_key(self, name: str, armored_key: str) -> Any:
        """Import ``armored_key`` for worker ``name``: an update of its key (a revocation, a new expiry
        date) or a new key to replace it (checked as `add` checks one)."""
        worker = yield self.get(name)
        fingerprint, public_key = yield self._run(_import_update, self.gnupg_home, worker.fingerprint, armored_key)
        if not (yield self.database.set_worker_key(name, fingerprint, public_key)):
            raise UnknownWorker(f"no worker named {name[:80]!r} is registered")
        return (yield self.get(name))

    # ------------------------------------------------------------ handshakes

    def check_proof(self, signed: str) -> Deferred[ProofCheck]:
        """Verify the handshake signature ``signed`` against the master's keyring (in a thread)."""
        return self._run(_check_proof, self.gnupg_home, signed)


def _known(worker: RegisteredWorker | None, name: str) -> RegisteredWorker:
    if worker is None:
        raise UnknownWorker(f"no worker named {name[:80]!r} is registered")
    return worker


def _usable(state: gpg.KeyState) -> None:
    """WorkerKeyRejected unless ``state`` is of a key a worker can prove itself with."""
    if state.revoked:
        raise WorkerKeyRejected(f"key {state.fingerprint} is revoked")
    if state.expired:
        raise WorkerKeyRejected(f"key {state.fingerprint} has expired")
    if not state.can_sign:
        raise WorkerKeyRejected(f"key {state.fingerprint} cannot make signatures")


def _one_public_key(home: str, armored: str) -> gpg.KeyState:
    if len(armored) > MAX_KEY_TEXT:
        raise WorkerKeyRejected(f"the key text is longer than {MAX_KEY_TEXT} characters")
    if "PRIVATE KEY BLOCK" in armored:
        raise WorkerKeyRejected("this is a secret key: register the public key (gpg --armor --export FINGERPRINT)")
    keys = gpg.scan_keys(home, armored)
    if len(keys) != 1:
        raise WorkerKeyRejected(f"expected exactly one OpenPGP public key, found {len(keys) or 'none'}")
    _usable(keys[0])
    return keys[0]


def _import_new_key(home: str, armored: str) -> tuple[gpg.KeyState, str]:
    """Check and import a worker's new key; its state in the master's keyring and its armored export."""
    scanned = _one_public_key(home, armored)
    gpg.import_keys(home, armored)
    state = gpg.key_state(home, scanned.fingerprint)
    if state is None:
        raise WorkerKeyRejected(f"gpg did not import key {scanned.fingerprint}")
    _usable(state)  # the keyring may know more of it (a revocation imported before)
    return state, gpg.export_public_key(home, state.fingerprint)


def _import_update(home: str, fingerprint: str, armored: str) -> tuple[str, str]:
    """Import an update of key ``fingerprint`` (or a replacement key); the key's fingerprint and export."""
    if len(armored) > MAX_KEY_TEXT:
        raise WorkerKeyRejected(f"the key text is longer than {MAX_KEY_TEXT} characters")
    keys = gpg.scan_keys(home, armored)
    if keys and [key.fingerprint for key in keys] != [fingerprint]:
        state, public_key = _import_new_key(home, armored)
        return state.fingerprint, public_key
    if "PRIVATE KEY BLOCK" in armored:
        raise WorkerKeyRejected("this is a secret key: give the public key (gpg --armor --export FINGERPRINT)")
    _, added = gpg.import_keys(home, armored)
    if added == 0:
        raise WorkerKeyRejected(f"nothing in this text is new for key {fingerprint}")
    return fingerprint, gpg.export_public_key(home, fingerprint)


def _forget_key(home: str, fingerprint: str) -> None:
    try:
        gpg.delete_public_key(home, fingerprint)
    except Exception:
        pass  # a key left in the keyring proves nothing: the registry no longer names it


def _check_proof(home: str, signed: str) -> ProofCheck:
    try:
        return ProofCheck(gpg.verify(home, signed), None)
    except gpg.GPGError as e:
        return ProofCheck(None, str(e))
