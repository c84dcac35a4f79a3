"""Real OpenPGP keys for tests, in short temporary GnuPG homes.

Making a key and spawning gpg take time, so the keys of the usual test workers
are made once per test process (`cached_key`) in one home removed at exit;
`master_keyring` is the GnuPG home the in-memory masters of one process share.
A test that changes a key (expires or revokes it) makes its own in a home of
its own (`fresh_home`).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from typing import Any

import attr

from papertrader import gpg


@attr.s(frozen=True, auto_attribs=True)
class WorkerKey:
    """A worker's key: the home that holds its secret, its fingerprint and its armored public key."""

    home: str
    fingerprint: str
    public_key: str

    def sign(self, data: bytes, options: list[str] | None = None) -> str:
        return gpg.sign(self.home, self.fingerprint, data, options)


def _remove(home: str) -> None:
    try:
        gpg.stop_agent(home)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def fresh_home(test: Any = None) -> str:
    """A new short GnuPG home, removed (its agent stopped) when ``test`` ends, or at exit."""
    home = tempfile.mkdtemp(prefix="pt-gpg-", dir="/tmp")
    if test is None:
        atexit.register(_remove, home)
    else:
        test.addCleanup(_remove, home)
    return home


_homes: dict[str, str] = {}
_keys: dict[str, WorkerKey] = {}


def _process_home(purpose: str) -> str:
    if purpose not in _homes:
        _homes[purpose] = fresh_home()
    return _homes[purpose]


def new_key(home: str, name: str, **options: Any) -> WorkerKey:
    """A new key for worker ``name`` in ``home``."""
    fingerprint = gpg.generate_key(home, f"PaperTrader worker {name}", **options)
    return WorkerKey(home, fingerprint, gpg.export_public_key(home, fingerprint))


def cached_key(name: str) -> WorkerKey:
    """The key of test worker ``name``, made once per test process."""
    if name not in _keys:
        _keys[name] = new_key(_process_home("workers"), name)
    return _keys[name]


_registered: set[str] = set()


def registered_key(name: str) -> WorkerKey:
    """`cached_key` of ``name``, imported into `master_keyring` (once per process: tests must not
    remove these keys from it)."""
    key = cached_key(name)
    if name not in _registered:
        gpg.import_keys(master_keyring(), key.public_key)
        _registered.add(name)
    return key


def master_keyring() -> str:
    """The GnuPG home the in-memory masters of this process keep registered keys in."""
    return _process_home("master")
