"""Account management & authorization (spec 3.1.3): registration, login, sessions.

Passwords are hashed with bcrypt off the reactor thread.  Session tokens are
256 random bits from `secrets`; only their SHA-256 digest is stored, so a copy
of the database does not hand out live sessions.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable
from typing import Any

import attr
import bcrypt
from twisted.internet import threads
from twisted.internet.defer import Deferred, inlineCallbacks, returnValue
from twisted.internet.interfaces import IReactorTime

from papertrader.errors import LoginFailed, RegisterFailed, SessionInvalid
from papertrader.eventlog import EventLogger
from papertrader.timestamps import iso

_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{2,31}\Z")
_EMAIL = re.compile(r"^[^@\s]{1,64}@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+\Z")
MIN_PASSWORD = 8
MAX_PASSWORD = 72  # bcrypt uses at most 72 bytes
MAX_EMAIL = 254
LOGIN_FAILED = "invalid username or password"

RunInThread = Callable[..., Deferred]


@attr.s(frozen=True, auto_attribs=True)
class Session:
    """An authenticated session."""

    user_id: int
    username: str
    expires_at: float
    token: str | None = None


def token_digest(token: str) -> str:
    """The form in which a token is stored and looked up."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Accounts:
    """Registers users, logs them in and answers who holds a session token."""

    log = EventLogger()

    def __init__(
        self,
        database: Any,
        clock: IReactorTime,
        *,
        bcrypt_cost: int = 12,
        starting_cash_cents: int,
        session_lifetime: float,
        remember_lifetime: float,
        run_in_thread: RunInThread = threads.deferToThread,
    ) -> None:
        self._db = database
        self._clock = clock
        self._cost = bcrypt_cost
        self._cash = starting_cash_cents
        self._lifetime = session_lifetime
        self._remember_lifetime = remember_lifetime
        self._in_thread = run_in_thread
        self._sessions: dict[str, Session] = {}
        self._dummy_hash: bytes | None = None

    @inlineCallbacks
    def register(self, username: str, email: str, password: str) -> Any:
        """Create an account with the starting cash; fires with the username."""
        problems = []
        if not _USERNAME.match(username):
            problems.append(
                "username must be 3-32 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        email = email.strip()
        if len(email) > MAX_EMAIL or not _EMAIL.match(email) or not email.isprintable():
            shown = repr(email[:40]) + ("..." if len(email) > 40 else "")
            problems.append(f"malformed email address {shown}")
        if len(password) < MIN_PASSWORD:
            problems.append(f"password must be at least {MIN_PASSWORD} characters")
        elif len(password.encode("utf-8")) > MAX_PASSWORD:
            problems.append(f"password must be at most {MAX_PASSWORD} bytes")
        if problems:
            raise RegisterFailed("; ".join(problems))
        hashed = yield self._in_thread(
            bcrypt.hashpw, password.encode("utf-8"), bcrypt.gensalt(self._cost)
        )
        yield self._db.create_user(
            username, email.lower(), hashed.decode("ascii"), self._cash, iso(self._clock.seconds())
        )
        returnValue(username)

    @inlineCallbacks
    def login(self, username: str, password: str, remember: bool = False) -> Any:
        """Check the password and open a session; fires with a `Session` holding the token.

        An unknown user costs the same bcrypt work and gets the same message as
        a wrong password, so neither reveals which usernames exist.
        """
        if not _USERNAME.match(username) or len(password.encode("utf-8")) > MAX_PASSWORD:
            raise LoginFailed(LOGIN_FAILED)  # no account can have these
        user = yield self._db.find_user(username)
        if user is None:
            if self._dummy_hash is None:
                self._dummy_hash = yield self._in_thread(
                    bcrypt.hashpw, b"no such user", bcrypt.gensalt(self._cost)
                )
            yield self._in_thread(bcrypt.checkpw, password.encode("utf-8"), self._dummy_hash)
            raise LoginFailed(LOGIN_FAILED)
        matches = yield self._in_thread(
            bcrypt.checkpw, password.encode("utf-8"), user.password_hash.encode("ascii")
        )
        if not matches:
            raise LoginFailed(LOGIN_FAILED)
        token = secrets.token_urlsafe(32)
        now = self._clock.seconds()
        expires = now + (self._remember_lifetime if remember else self._lifetime)
        yield self._db.create_session(token_digest(token), user.user_id, now, expires)
        session = Session(user.user_id, user.username, expires)
        self._sessions[token_digest(token)] = session
        returnValue(attr.evolve(session, token=token))

    def cached_session(self, token: str) -> Session | None:
        """The live session for ``token`` if it is in memory; None means: ask `authenticate`."""
        session = self._sessions.get(token_digest(token)) if token else None
        if session is None or self._expired(session):
            return None
        return session

    def _expired(self, session: Session) -> bool:
        return session.expires_at <= self._clock.seconds()

    @inlineCallbacks
    def authenticate(self, token: str) -> Any:
        """The live `Session` for ``token``; SessionInvalid if none."""
        if not token:
            raise SessionInvalid("not logged in: no session token (run 'papertrader login')")
        digest = token_digest(token)
        session = self._sessions.get(digest)
        if session is None:
            record = yield self._db.find_session(digest)
            if record is None:
                raise SessionInvalid("session is not valid; log in again")
            session = Session(record.user_id, record.username, record.expires_at)
            self._sessions[digest] = session
        if self._expired(session):
            self._sessions.pop(digest, None)
            yield self._db.delete_session(digest)
            raise SessionInvalid("session has expired; log in again")
        returnValue(session)

    @inlineCallbacks
    def logout(self, token: str) -> Any:
        """End the session for ``token``."""
        yield self.authenticate(token)
        digest = token_digest(token)
        self._sessions.pop(digest, None)
        yield self._db.delete_session(digest)

    def forget_expired(self) -> Deferred:
        """Drop expired sessions from memory and the database.

        A periodic job: a failure is logged, never raised, so the job goes on.
        """
        now = self._clock.seconds()
        for digest, session in list(self._sessions.items()):
            if self._expired(session):
                del self._sessions[digest]
        return self._db.delete_expired_sessions(now).addErrback(
            lambda failure: self.log.failure("could not delete expired sessions", failure)
        )
