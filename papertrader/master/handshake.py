"""The worker handshake (spec 3.1.5, 3.2.2) as a small explicit state machine, one per connection.

    AWAITING_HELLO --hello--> CHECKING_NAME --registered, enabled, allowed address--> AWAITING_PROOF
    AWAITING_PROOF --proof--> VERIFYING --good signature of this nonce by the registered key--> PROVED
    any stage --anything wrong--> REFUSED (terminal: the connection is closed)

The worker names itself in WorkerHello; if that name is registered, enabled
and the connection comes from one of its networks, the master answers a fresh
random nonce, good once and for ``nonce_lifetime`` seconds.  The worker signs
a statement of its name and the nonce with its OpenPGP key (WorkerProof); the
master verifies it in a thread against its keyring (where a signature by an
expired or revoked key is not good) and accepts it only from the registered
key, over this very nonce.  The
caller (`MasterLocator`) then claims the name in the `WorkerRegistry`.  A
refusal (WorkerRefused, with the reason) clears the nonce: nothing is kept.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IReactorTime

from papertrader import gpg
from papertrader.errors import BadRequest, WorkerRefused
from papertrader.master.registration import RegisteredWorker, WorkerRegistrations, check_worker_name

NONCE_LIFETIME = 30.0
# A handshake signature is a few hundred bytes; anything far longer is not one.
MAX_PROOF_LENGTH = 8192


class Stage(enum.Enum):
    AWAITING_HELLO = "awaiting hello"
    CHECKING_NAME = "checking the name"
    AWAITING_PROOF = "awaiting proof"
    VERIFYING = "verifying the proof"
    PROVED = "proved"
    REFUSED = "refused"


class Handshake:
    """One connection's handshake: who the worker says it is, the nonce it was given, and how far it got."""

    def __init__(
        self,
        registrations: WorkerRegistrations,
        clock: IReactorTime,
        nonce_lifetime: float = NONCE_LIFETIME,
        new_nonce: Callable[[], str] = lambda: secrets.token_hex(32),
    ) -> None:
        self._registrations = registrations
        self._clock = clock
        self._nonce_lifetime = nonce_lifetime
        self._new_nonce = new_nonce
        self.stage = Stage.AWAITING_HELLO
        self.name: str | None = None
        self.worker: RegisteredWorker | None = None
        self._nonce: str | None = None
        self._nonce_issued_at = 0.0

    def _expect(self, stage: Stage, what: str) -> None:
        if self.stage is not stage:
            self.refuse(f"{what} out of turn (the handshake is {self.stage.value})")

    def refuse(self, reason: str) -> None:
        """End the handshake: nothing of it is kept; WorkerRefused with ``reason``."""
        self.stage = Stage.REFUSED
        self._nonce = None
        raise WorkerRefused(reason)

    @inlineCallbacks
    def hello(self, name: str, source_host: str | None) -> Any:
        """The worker named itself: fires with the nonce to sign, or fails with WorkerRefused."""
        self._expect(Stage.AWAITING_HELLO, "a hello")
        try:
            check_worker_name(name)
        except BadRequest as e:
            self.refuse(str(e))
        self.stage = Stage.CHECKING_NAME
        self.name = name
        worker = yield self._registrations.find(name)
        if self.stage is not Stage.CHECKING_NAME:
            raise WorkerRefused("the handshake ended meanwhile")
        self._check_registration(worker, name, source_host)
        self.worker = worker
        self._nonce = self._new_nonce()
        self._nonce_issued_at = self._clock.seconds()
        self.stage = Stage.AWAITING_PROOF
        return self._nonce

    def _check_registration(self, worker: RegisteredWorker | None, name: str, source_host: str | None) -> None:
        if worker is None:
            self.refuse(f"no worker named {name!r} is registered with this master")
        if not worker.enabled:
            self.refuse(f"worker {name!r} is disabled")
        if not worker.allows(source_host):
            self.refuse(f"worker {name!r} may not connect from {source_host}")

    @inlineCallbacks
    def proof(self, signed: str, source_host: str | None) -> Any:
        """The worker's signature over its name and the nonce: fires with its registration, or fails
        with WorkerRefused.  The nonce is spent whatever the outcome."""
        self._expect(Stage.AWAITING_PROOF, "a proof")
        nonce, self._nonce = self._nonce, None
        name = self.name
        self.stage = Stage.VERIFYING
        if self._clock.seconds() - self._nonce_issued_at > self._nonce_lifetime:
            self.refuse(f"the nonce expired: sign it within {self._nonce_lifetime:g} s of the hello")
        if len(signed) > MAX_PROOF_LENGTH:
            self.refuse("the proof is too long to be a handshake signature")
        check = yield self._registrations.check_proof(signed)
        if self.stage is not Stage.VERIFYING:
            raise WorkerRefused("the handshake ended meanwhile")
        # Registered, enabled and allowed still?  It may have changed while the worker signed.
        worker = yield self._registrations.find(name)
        if self.stage is not Stage.VERIFYING:
            raise WorkerRefused("the handshake ended meanwhile")
        self._check_registration(worker, name, source_host)
        if check.verified is None:
            self.refuse(f"the proof is not a good signature by a key this master knows: {check.problem}")
        if check.verified.fingerprint != worker.fingerprint:
            self.refuse(f"the proof is signed by key {check.verified.fingerprint}, not by worker {name!r}'s key")
        statement = gpg.parse_proof_statement(check.verified.data)
        if statement is None:
            self.refuse("the signed text is not a handshake statement")
        signed_name, signed_nonce = statement
        if signed_name != name:
            self.refuse(f"the signed statement is for worker {signed_name[:64]!r}, not {name!r}")
        if not secrets.compare_digest(signed_nonce, nonce):
            self.refuse("the signed nonce is not the one issued to this connection")
        self.worker = worker
        self.stage = Stage.PROVED
        return worker

    def abandon(self) -> None:
        """The connection ended: forget the nonce; nothing later may complete this handshake."""
        if self.stage is not Stage.PROVED:
            self.stage = Stage.REFUSED
            self._nonce = None
