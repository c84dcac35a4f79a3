"""OpenPGP keys of workers, over python-gnupg: make, export, sign, verify, inspect.

Every function here is synchronous and spawns ``gpg``: callers run them off
the reactor thread (``deferToThread``, or a runner a test injects).  Keys
are ed25519 signing keys without a passphrase: a worker signs unattended.

gpg-agent, which every use of a secret key needs, puts its socket in the
GnuPG home when ``/run/user/UID`` does not exist, and a UNIX socket path has
at most about 100 bytes: a home under a long data directory could not sign.
`usable_home` gives such a home a short alias (a symlink in a per-user
directory under the system's temporary directory) that gpg is run with.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from typing import Any

import attr
import gnupg

# The longest home gpg is run with as it is; past it, through a short alias.
# (The agent's longest socket name, S.gpg-agent.browser, is 20 bytes; sun_path holds 108.)
MAX_HOME_LENGTH = 80
# What a worker signs in the handshake: this line, its name and the master's nonce.
PROOF_HEADER = "PaperTrader worker handshake v1"


class GPGError(Exception):
    """gpg could not do what was asked; the message says why."""


@attr.s(frozen=True, auto_attribs=True)
class KeyState:
    """What a keyring says about one public key."""

    fingerprint: str
    expired: bool
    revoked: bool
    expires: int | None  # Unix time, or None for never
    can_sign: bool


@attr.s(frozen=True, auto_attribs=True)
class Verified:
    """A good signature: the signer's primary-key fingerprint and the data it signed."""

    fingerprint: str
    data: bytes


def proof_statement(name: str, nonce: str) -> bytes:
    """The statement a worker signs to prove it holds its registered key: its name and the master's nonce."""
    return f"{PROOF_HEADER}\nworker: {name}\nnonce: {nonce}\n".encode()


def parse_proof_statement(data: bytes) -> tuple[str, str] | None:
    """(name, nonce) of a signed statement, or None if it is not one `proof_statement` makes."""
    try:
        header, name_line, nonce_line, end = data.decode("utf-8").split("\n")
    except (UnicodeDecodeError, ValueError):
        return None
    if header != PROOF_HEADER or end or not name_line.startswith("worker: ") or not nonce_line.startswith("nonce: "):
        return None
    return name_line[len("worker: ") :], nonce_line[len("nonce: ") :]


def usable_home(home: str) -> str:
    """``home`` (created, mode 0700, if missing) as a path gpg can run its agent under.

    A long path is replaced by a symlink to it in ``$TMPDIR/papertrader-gnupg-UID``
    (a directory of this user's only, mode 0700), named after the home's real path.
    """
    home = os.path.abspath(home)
    os.makedirs(home, mode=0o700, exist_ok=True)
    if len(home.encode()) <= MAX_HOME_LENGTH:
        return home
    aliases = os.path.join(tempfile.gettempdir(), f"papertrader-gnupg-{os.getuid()}")
    try:
        os.mkdir(aliases, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(aliases)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise GPGError(f"{aliases} is not a private directory of this user; cannot make a short alias of {home}")
    real = os.path.realpath(home)
    alias = os.path.join(aliases, hashlib.sha256(real.encode()).hexdigest()[:16])
    if len(alias.encode()) > MAX_HOME_LENGTH:
        raise GPGError(f"the GnuPG home {home} has too long a path for gpg-agent's socket; use a shorter one")
    try:
        if os.readlink(alias) == real:
            return alias
        os.unlink(alias)
    except FileNotFoundError:
        pass
    except OSError:
        raise GPGError(f"{alias} is in the way of a short alias of {home}") from None
    os.symlink(real, alias)
    return alias


def _gpg(home: str, options: list[str] | None = None, agent: bool = True) -> gnupg.GPG:
    """python-gnupg on ``home``; without ``agent``, for work on public keys only, no gpg-agent is started
    (the master's keyring never has one left running)."""
    extra = list(options or ()) + ([] if agent else ["--no-autostart"])
    return gnupg.GPG(gnupghome=usable_home(home), options=extra)


def generate_key(home: str, uid: str, expire: str = "0", options: list[str] | None = None) -> str:
    """Make an ed25519 signing key without passphrase in ``home``; return its fingerprint.

    ``expire`` is gpg's Expire-Date (``0``: never); ``options`` extra gpg options.
    """
    gpg = _gpg(home, options)
    spec = gpg.gen_key_input(
        key_type="eddsa",
        key_curve="ed25519",
        key_usage="sign",
        name_real=uid,
        name_email="",
        name_comment="",
        expire_date=expire,
        no_protection=True,
    )
    result = gpg.gen_key(spec)
    if not result.fingerprint:
        raise GPGError(f"gpg could not make a key: {_reason(result)}")
    return result.fingerprint


def export_public_key(home: str, fingerprint: str) -> str:
    """The armored public key ``fingerprint`` in ``home``."""
    armored = _gpg(home, agent=False).export_keys(fingerprint)
    if "BEGIN PGP PUBLIC KEY BLOCK" not in armored:
        raise GPGError(f"no public key {fingerprint} in {home}")
    return armored


def secret_keys(home: str) -> list[str]:
    """Fingerprints of the secret keys in ``home``."""
    return [key["fingerprint"] for key in _gpg(home).list_keys(secret=True)]


def signing_key(home: str, fingerprint: str | None = None) -> str:
    """The fingerprint of the secret key in ``home`` to sign with: ``fingerprint`` (or the one it ends),
    or, when not given, the only secret key there; GPGError saying what is missing."""
    keys = secret_keys(home)
    if fingerprint:
        wanted = fingerprint.replace(" ", "").upper()
        matches = [key for key in keys if key.endswith(wanted)]
        if len(matches) != 1:
            raise GPGError(f"no secret key {fingerprint} in the GnuPG home {home}")
        return matches[0]
    if len(keys) != 1:
        raise GPGError(
            f"the GnuPG home {home} holds {len(keys) or 'no'} secret keys; "
            + ("make one (see the README)" if not keys else "choose one with --key-fingerprint")
        )
    return keys[0]


def sign(home: str, fingerprint: str, data: bytes, options: list[str] | None = None) -> str:
    """``data`` signed (an armored signed message, data inside) with secret key ``fingerprint`` of ``home``."""
    signed = _gpg(home, options).sign(data, keyid=fingerprint, clearsign=False, detach=False, binary=False)
    if not signed.data:
        raise GPGError(f"gpg could not sign with {fingerprint}: {_reason(signed)}")
    return signed.data.decode("ascii")


def verify(home: str, signed: str) -> Verified:
    """Check the signed message ``signed`` against the keys in ``home``; GPGError unless the signature is good.

    A signature by an expired or revoked key is not good.
    """
    result = _gpg(home, agent=False).decrypt(signed)
    if not result.valid or not result.pubkey_fingerprint:
        signer = f", key {result.key_id}" if getattr(result, "key_id", None) else ""
        raise GPGError(f"the signature is not good ({result.key_status or _reason(result)}{signer})")
    return Verified(result.pubkey_fingerprint, result.data)


def key_state(home: str, fingerprint: str) -> KeyState | None:
    """What the keyring of ``home`` says about public key ``fingerprint``, or None if it does not hold it."""
    for key in _gpg(home, agent=False).list_keys(keys=[fingerprint]):
        if key["fingerprint"] == fingerprint:
            return _state(key)
    return None


def scan_keys(home: str, armored: str) -> list[KeyState]:
    """The public keys in ``armored``, as they would be imported (nothing is imported)."""
    return [_state(key) for key in _gpg(home, agent=False).scan_keys_mem(armored)]


def import_keys(home: str, armored: str) -> tuple[list[str], int]:
    """Import ``armored`` (keys, or a revocation certificate) into ``home``.

    Returns the fingerprints of the keys it imported or changed, and the number
    of things (keys, user ids, signatures, revocations) it added.
    """
    result = _gpg(home, agent=False).import_keys(armored)
    fingerprints = sorted({fingerprint for fingerprint in result.fingerprints if fingerprint})
    added = sum(int(getattr(result, field) or 0) for field in ("imported", "n_uids", "n_subk", "n_sigs", "n_revoc"))
    return fingerprints, added


def delete_public_key(home: str, fingerprint: str) -> None:
    """Remove public key ``fingerprint`` from ``home`` (nothing if it is not there)."""
    _gpg(home, agent=False).delete_keys(fingerprint)


def stop_agent(home: str) -> None:
    """End the gpg-agent serving ``home``, if one runs (so that nothing outlives the process that used it),
    and remove its short alias, if it has one."""
    gpgconf = shutil.which("gpgconf")
    if gpgconf is None or not os.path.isdir(home):
        return
    used = usable_home(home)
    subprocess.run(
        [gpgconf, "--homedir", used, "--kill", "gpg-agent"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=30,
        check=False,
    )
    if used != os.path.abspath(home):
        try:
            os.unlink(used)  # the alias; made again by the next use
        except OSError:
            pass


def _state(key: dict[str, Any]) -> KeyState:
    validity = key.get("trust") or ""
    expires = int(key["expires"]) if key.get("expires") else None
    capabilities = key.get("cap") or ""
    return KeyState(
        fingerprint=key["fingerprint"],
        expired=validity == "e",
        revoked=validity == "r",
        expires=expires,
        can_sign="S" in capabilities,
    )


def _reason(result: Any) -> str:
    status = getattr(result, "status", None)
    if status:
        return str(status)
    lines = [line for line in (getattr(result, "stderr", "") or "").splitlines() if line.startswith("gpg:")]
    return lines[-1][5:] if lines else "no reason given"
