"""Account management & authorization (spec 3.1.3): registration, login, sessions.

Passwords are hashed with bcrypt off the reactor thread.  Session tokens are
256 random bits from `secrets`; only their SHA-256 digest is stored, so a copy
of the database does not hand out live sessions.

Failed logins are throttled per account and per client address
(`LoginThrottle`; an IPv6 client counts by its /64, see `address_key`): after
a few failures further attempts are refused, without any bcrypt work and with
the same message as a wrong password, for a delay that doubles with each
further failure.  Registrations are limited per client address too
(`RateLimit`), so one client cannot spend bcrypt time and fill the database
with a registration storm.  A session ends at its absolute expiry or after
going unused for its idle timeout; use is recorded in memory on every check
and written to the database at most once a minute per session.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import attr
import bcrypt
from twisted.internet import threads
from twisted.internet.defer import Deferred, inlineCallbacks, returnValue, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from papertrader.errors import LoginFailed, PasswordChangeFailed, RegisterFailed, SessionInvalid
from papertrader.eventlog import EventLogger
from papertrader.timestamps import iso

_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{2,31}\Z")
_EMAIL = re.compile(r"^[^@\s]{1,64}@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+\Z")
MIN_PASSWORD = 8
MAX_PASSWORD = 72  # bcrypt uses at most 72 bytes
MAX_EMAIL = 254
LOGIN_FAILED = "invalid username or password"
WRONG_PASSWORD = "the current password is wrong"
SESSION_EXPIRED = "session has expired; log in again"
TOO_MANY_REGISTRATIONS = "too many registrations from this address; try again later"
# The window of `registrations_per_address_per_hour` (seconds).
REGISTRATION_WINDOW = 3600.0
# A session's last use is written to the database at most this often (seconds).
USE_WRITE_INTERVAL = 60.0
# Default caps of the in-memory tables.
THROTTLE_ENTRIES = 100_000
SESSION_CACHE_ENTRIES = 100_000

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


def password_problem(password: str) -> str | None:
    """Why ``password`` cannot be anyone's password, or None if it can."""
    if len(password) < MIN_PASSWORD:
        return f"password must be at least {MIN_PASSWORD} characters"
    if len(password.encode("utf-8")) > MAX_PASSWORD:
        return f"password must be at most {MAX_PASSWORD} bytes"
    return None


def client_host(address: str) -> str:
    """The host part of a client address as the worker reports it.

    Takes ``HOST:PORT``, ``[V6]:PORT`` and (as workers wrote IPv6 peers
    without brackets) ``V6:PORT``; an IP address comes back in one normal
    spelling (IPv4-mapped IPv6 as IPv4), so one client cannot appear as many.
    """
    text = address.strip()
    if text.startswith("["):
        end = text.find("]")
        host = text[1:end] if end > 0 else text[1:]
    else:
        head, colon, port = text.rpartition(":")
        host = head if colon and (port.isdigit() or not port) else text
        if ":" in host and _ip(host) is None and _ip(text) is not None:
            host = text  # a bare IPv6 address without a port
    ip = _ip(host)
    if ip is None:
        return host.lower()
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def address_key(address: str) -> str:
    """The key under which a client address is throttled: its `client_host`, but for IPv6 its /64.

    An IPv6 client is handed at least a /64 and can pick any address in it, so
    counting single addresses would let it rotate past every per-address limit.
    """
    host = client_host(address)
    ip = _ip(host)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))  # drops any %zone
    return host


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@attr.s(auto_attribs=True, slots=True)
class _Failures:
    """Failed attempts under one key."""

    failures: int = 0
    pending: int = 0  # attempts being checked right now
    last_failure: float = 0.0
    blocked_until: float = 0.0


class LoginThrottle:
    """Counts failed attempts per key and refuses attempts for a growing delay after too many.

    After ``failures_allowed`` failures an attempt is refused until
    ``delay * 2 ** (failures - failures_allowed)`` seconds (at most
    ``max_delay``) after the last failure.  Attempts still being checked
    count too, so attempts sent all at once cannot slip past the limit.  An
    entry is forgotten ``max_delay`` after its delay has passed; at most
    ``max_entries`` are kept, the least recently failed evicted first.
    """

    def __init__(
        self, clock: IReactorTime, failures_allowed: int, delay: float, max_delay: float, max_entries: int
    ) -> None:
        self._clock = clock
        self._allowed = failures_allowed
        self._delay = delay
        self._max_delay = max_delay
        self._max_entries = max_entries
        self._entries: OrderedDict[str, _Failures] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def allows(self, key: str) -> bool:
        """Whether an attempt under ``key`` may be checked now."""
        entry = self._current(key)
        if entry is None:
            return True
        if self._clock.seconds() < entry.blocked_until:
            return False
        return entry.pending == 0 or entry.failures + entry.pending < self._allowed

    def begin(self, key: str) -> None:
        """An attempt under ``key`` is being checked; end it with `failed`, `succeeded` or `ended`."""
        entry = self._current(key)
        if entry is None:
            entry = self._entries[key] = _Failures()
            self._evict()
        entry.pending += 1

    def failed(self, key: str) -> float:
        """The attempt failed; returns the delay this starts (0 if none)."""
        entry = self._current(key)
        if entry is None:  # evicted meanwhile
            entry = self._entries[key] = _Failures(pending=1)
            self._evict()
        self._entries.move_to_end(key)
        now = self._clock.seconds()
        entry.pending = max(0, entry.pending - 1)
        entry.failures += 1
        entry.last_failure = now
        if entry.failures < self._allowed:
            return 0.0
        exponent = min(entry.failures - self._allowed, 64)
        delay = min(self._max_delay, self._delay * 2.0**exponent)
        entry.blocked_until = now + delay
        return delay

    def succeeded(self, key: str) -> None:
        """The attempt succeeded: forget the failures under ``key``."""
        self._entries.pop(key, None)

    def ended(self, key: str) -> None:
        """The attempt ended without saying anything about the password (e.g. the database failed)."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.pending = max(0, entry.pending - 1)

    def forget_stale(self) -> None:
        """Drop every entry whose delay has long passed."""
        for key in [key for key, entry in self._entries.items() if self._stale(entry)]:
            del self._entries[key]

    def _current(self, key: str) -> _Failures | None:
        entry = self._entries.get(key)
        if entry is not None and self._stale(entry):
            del self._entries[key]
            return None
        return entry

    def _stale(self, entry: _Failures) -> bool:
        quiet_since = max(entry.last_failure, entry.blocked_until)
        return entry.pending == 0 and self._clock.seconds() >= quiet_since + self._max_delay

    def _evict(self) -> None:
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


class RateLimit:
    """Allows at most ``limit`` events per key within any ``window`` seconds.

    Each key keeps the times of its events still within the window (so at most
    ``limit`` of them).  A key is forgotten once its last event is a window
    old; at most ``max_entries`` keys are kept, the least recently used
    evicted first.
    """

    def __init__(self, clock: IReactorTime, limit: int, window: float, max_entries: int) -> None:
        self._clock = clock
        self._limit = limit
        self._window = window
        self._max_entries = max_entries
        self._entries: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def allows(self, key: str) -> bool:
        """Whether an event under ``key`` may happen now."""
        return len(self._recent(key)) < self._limit

    def record(self, key: str) -> None:
        """An event under ``key`` happens now."""
        times = self._recent(key)
        times.append(self._clock.seconds())
        self._entries[key] = times
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def forget_stale(self) -> None:
        """Drop every key whose last event is a whole window old."""
        since = self._clock.seconds() - self._window
        for key in [key for key, times in self._entries.items() if times[-1] <= since]:
            del self._entries[key]

    def _recent(self, key: str) -> list[float]:
        """The times of ``key``'s events within the window."""
        since = self._clock.seconds() - self._window
        return [t for t in self._entries.get(key, ()) if t > since]


@attr.s(auto_attribs=True, slots=True)
class _Tracked:
    """A session held in memory, with when it was last used and when that was last stored."""

    session: Session
    remember: bool
    last_used: float
    stored_used: float | None

    def unstored(self) -> bool:
        return self.stored_used is None or self.last_used > self.stored_used


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
        session_idle_timeout: float = 3600.0,
        remember_idle_timeout: float = 7 * 86400.0,
        login_failures_allowed: int = 5,
        login_address_failures_allowed: int | None = None,
        login_delay: float = 1.0,
        login_max_delay: float = 900.0,
        registrations_per_address_per_hour: int = 20,
        throttle_entries: int = THROTTLE_ENTRIES,
        session_cache_entries: int = SESSION_CACHE_ENTRIES,
        run_in_thread: RunInThread = threads.deferToThread,
    ) -> None:
        self._db = database
        self._clock = clock
        self._cost = bcrypt_cost
        self._cash = starting_cash_cents
        self._lifetime = session_lifetime
        self._remember_lifetime = remember_lifetime
        self._idle_timeout = session_idle_timeout
        self._remember_idle_timeout = remember_idle_timeout
        self._in_thread = run_in_thread
        self._sessions: OrderedDict[str, _Tracked] = OrderedDict()
        self._session_cache_entries = session_cache_entries
        # Bumped whenever sessions are revoked, so a lookup that overlapped a
        # revocation does not put a revoked session back in memory.
        self._revocations = 0
        # One address may be a whole classroom behind NAT: it may get more failures than one account.
        by_address = login_address_failures_allowed or login_failures_allowed
        self._account_failures = LoginThrottle(
            clock, login_failures_allowed, login_delay, login_max_delay, throttle_entries
        )
        self._address_failures = LoginThrottle(clock, by_address, login_delay, login_max_delay, throttle_entries)
        self._registrations = RateLimit(
            clock, registrations_per_address_per_hour, REGISTRATION_WINDOW, throttle_entries
        )
        self._dummy_hash: bytes | None = None
        self._making_dummy: Deferred | None = None
        self._waiting_for_dummy: list[Deferred] = []

    # ------------------------------------------------------------ start-up

    def start(self) -> Deferred[None]:
        """Make the hash that unknown users' passwords are checked against; call at start-up.

        Until it is made, logins wait for it, so the first login of an unknown
        user costs the same bcrypt work as any other.  Fires when it is made.
        """
        if self._dummy_hash is None and self._making_dummy is None:
            self._making_dummy = self._in_thread(bcrypt.hashpw, b"no such user", bcrypt.gensalt(self._cost))
            self._making_dummy.addCallbacks(self._dummy_made, self._dummy_failed)
        if self._dummy_hash is not None:
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        self._waiting_for_dummy.append(waiting)
        return waiting

    def _dummy_made(self, hashed: bytes) -> None:
        self._dummy_hash = hashed
        waiting, self._waiting_for_dummy = self._waiting_for_dummy, []
        for d in waiting:
            d.callback(None)

    def _dummy_failed(self, failure: Failure) -> None:
        self._making_dummy = None  # the next login tries again
        waiting, self._waiting_for_dummy = self._waiting_for_dummy, []
        for d in waiting:
            d.errback(failure)

    # ------------------------------------------------------------ accounts

    @inlineCallbacks
    def register(self, username: str, email: str, password: str, client_address: str = "") -> Any:
        """Create an account with the starting cash; fires with the username.

        Each registration from ``client_address`` (``HOST:PORT``) that gets as
        far as hashing counts against the address's hourly limit, taken names
        too (they cost the same bcrypt work); past it registrations are
        refused before any hashing.
        """
        problems = []
        if not _USERNAME.match(username):
            problems.append(
                "username must be 3-32 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        email = email.strip()
        if len(email) > MAX_EMAIL or not _EMAIL.match(email) or not email.isprintable():
            shown = repr(email[:40]) + ("..." if len(email) > 40 else "")
            problems.append(f"malformed email address {shown}")
        problem = password_problem(password)
        if problem is not None:
            problems.append(problem)
        if problems:
            raise RegisterFailed("; ".join(problems))
        key = address_key(client_address) if client_address else ""
        if key:
            if not self._registrations.allows(key):
                raise RegisterFailed(TOO_MANY_REGISTRATIONS)
            self._registrations.record(key)
            if not self._registrations.allows(key):
                self.log.warn("address {address} reached its limit of registrations per hour", address=key)
        hashed = yield self._in_thread(
            bcrypt.hashpw, password.encode("utf-8"), bcrypt.gensalt(self._cost)
        )
        yield self._db.create_user(
            username, email.lower(), hashed.decode("ascii"), self._cash, iso(self._clock.seconds())
        )
        returnValue(username)

    @inlineCallbacks
    def login(self, username: str, password: str, remember: bool = False, client_address: str = "") -> Any:
        """Check the password and open a session; fires with a `Session` holding the token.

        An unknown user costs the same bcrypt work and gets the same message as
        a wrong password, so neither reveals which usernames exist.  Too many
        failures for the username or from ``client_address`` (``HOST:PORT``)
        make further attempts fail at once with that same message.
        """
        if not _USERNAME.match(username) or len(password.encode("utf-8")) > MAX_PASSWORD:
            raise LoginFailed(LOGIN_FAILED)  # no account can have these
        with _Attempt(self, username, client_address) as attempt:
            if not attempt.allowed:
                raise LoginFailed(LOGIN_FAILED)
            yield self.start()
            user = yield self._db.find_user(username)
            if user is None:
                yield self._in_thread(bcrypt.checkpw, password.encode("utf-8"), self._dummy_hash)
                attempt.failed()
                raise LoginFailed(LOGIN_FAILED)
            matches = yield self._in_thread(
                bcrypt.checkpw, password.encode("utf-8"), user.password_hash.encode("ascii")
            )
            if not matches:
                attempt.failed()
                raise LoginFailed(LOGIN_FAILED)
            token = secrets.token_urlsafe(32)
            digest = token_digest(token)
            now = self._clock.seconds()
            expires = now + (self._remember_lifetime if remember else self._lifetime)
            revocations = self._revocations
            stored = yield self._db.create_session(
                digest, user.user_id, now, expires, bool(remember), user.password_hash
            )
            if not stored:  # the password changed while this one was being checked
                attempt.failed()
                raise LoginFailed(LOGIN_FAILED)
            attempt.succeeded()
        session = Session(user.user_id, user.username, expires)
        if revocations == self._revocations:
            self._keep(digest, _Tracked(session, bool(remember), now, now))
        returnValue(attr.evolve(session, token=token))

    @inlineCallbacks
    def change_password(
        self, token: str, old_password: str, new_password: str, client_address: str = ""
    ) -> Any:
        """Replace the password of the session's user and end all their sessions, this one too.

        The new password follows the rules of `register`.  A wrong current
        password counts as a failed login (so a stolen session cannot be used
        to guess the password).  Fires with the number of sessions ended.
        """
        session = yield self.authenticate(token)
        problem = password_problem(new_password)
        if problem is not None:
            raise PasswordChangeFailed(problem)
        if len(old_password.encode("utf-8")) > MAX_PASSWORD:
            raise PasswordChangeFailed(WRONG_PASSWORD)
        with _Attempt(self, session.username, client_address) as attempt:
            if not attempt.allowed:
                raise PasswordChangeFailed(WRONG_PASSWORD)
            user = yield self._db.find_user(session.username)
            if user is None:
                raise SessionInvalid("session is not valid; log in again")
            matches = yield self._in_thread(
                bcrypt.checkpw, old_password.encode("utf-8"), user.password_hash.encode("ascii")
            )
            if not matches:
                attempt.failed()
                raise PasswordChangeFailed(WRONG_PASSWORD)
            attempt.succeeded()
        hashed = yield self._in_thread(bcrypt.hashpw, new_password.encode("utf-8"), bcrypt.gensalt(self._cost))
        revoked = yield self._db.change_password(user.user_id, user.password_hash, hashed.decode("ascii"))
        if revoked is None:
            raise PasswordChangeFailed("the password was changed meanwhile; log in again")
        self._revoked(user.user_id)
        self.log.info("password of {username} changed; {count} session(s) ended",
                      username=user.username, count=len(revoked))
        returnValue(len(revoked))

    # ------------------------------------------------------------ sessions

    def cached_session(self, token: str) -> Session | None:
        """The live session for ``token`` if it is in memory; None means: ask `authenticate`.

        A hit counts as a use of the session.
        """
        digest = token_digest(token) if token else ""
        tracked = self._sessions.get(digest)
        if tracked is None or self._ended(tracked):
            return None
        self._use(digest, tracked)
        return tracked.session

    @inlineCallbacks
    def authenticate(self, token: str) -> Any:
        """The live `Session` for ``token``, counting as a use of it; SessionInvalid if none."""
        if not token:
            raise SessionInvalid("not logged in: no session token (run 'papertrader login')")
        digest = token_digest(token)
        tracked = self._sessions.get(digest)
        if tracked is None:
            while True:
                revocations = self._revocations
                record = yield self._db.find_session(digest)
                if revocations == self._revocations:
                    break  # else: sessions were revoked meanwhile; read again
            if record is None:
                raise SessionInvalid("session is not valid; log in again")
            now = self._clock.seconds()
            tracked = _Tracked(
                Session(record.user_id, record.username, record.expires_at),
                remember=True if record.remember is None else record.remember,
                last_used=now if record.last_used_at is None else record.last_used_at,
                stored_used=record.last_used_at,
            )
            if not self._ended(tracked):
                self._keep(digest, tracked)
        if self._ended(tracked):
            self._sessions.pop(digest, None)
            yield self._db.delete_session(digest)
            raise SessionInvalid(SESSION_EXPIRED)
        stored = self._use(digest, tracked)
        if stored is not None:
            yield stored  # a failure to store it is logged, not raised
        returnValue(tracked.session)

    @inlineCallbacks
    def logout(self, token: str) -> Any:
        """End the session for ``token``."""
        yield self.authenticate(token)
        digest = token_digest(token)
        self._revocations += 1  # a lookup that read the row before the delete must not cache it again
        self._sessions.pop(digest, None)
        yield self._db.delete_session(digest)

    @inlineCallbacks
    def logout_everywhere(self, token: str) -> Any:
        """End every session of the user holding ``token``; fires with how many were ended."""
        session = yield self.authenticate(token)
        revoked = yield self._db.delete_user_sessions(session.user_id)
        self._revoked(session.user_id)
        returnValue(len(revoked))

    def forget_expired(self) -> Deferred:
        """Store when sessions were last used, then drop expired and idle sessions from memory
        and the database, and stale throttle and registration entries.

        A periodic job: a failure is logged, never raised, so the job goes on.
        """
        now = self._clock.seconds()
        uses = []
        for digest, tracked in list(self._sessions.items()):
            if self._ended(tracked):
                del self._sessions[digest]
            elif tracked.unstored():
                tracked.stored_used = tracked.last_used
                uses.append((digest, tracked.last_used))
        self._account_failures.forget_stale()
        self._address_failures.forget_stale()
        self._registrations.forget_stale()
        d = self._db.record_session_use(uses) if uses else succeed(None)
        d.addCallback(
            lambda _: self._db.delete_expired_sessions(
                now, now - self._idle_timeout, now - self._remember_idle_timeout
            )
        )
        return d.addErrback(lambda failure: self.log.failure("could not delete expired sessions", failure))

    def _ended(self, tracked: _Tracked) -> bool:
        """Whether the session is past its absolute expiry or has been idle too long."""
        now = self._clock.seconds()
        idle = self._remember_idle_timeout if tracked.remember else self._idle_timeout
        return tracked.session.expires_at <= now or now - tracked.last_used >= idle

    def _use(self, digest: str, tracked: _Tracked) -> Deferred[None] | None:
        """Record a use now; store it if the stored one is a minute old (fires when stored)."""
        now = self._clock.seconds()
        tracked.last_used = max(tracked.last_used, now)
        if digest in self._sessions:
            self._sessions.move_to_end(digest)
        if tracked.stored_used is None or now - tracked.stored_used >= USE_WRITE_INTERVAL:
            return self._store_use(digest, tracked)
        return None

    def _store_use(self, digest: str, tracked: _Tracked) -> Deferred[None]:
        """Write the session's last use; a failure is logged, not raised (a use a minute later tries again)."""
        tracked.stored_used = tracked.last_used
        return self._db.record_session_use([(digest, tracked.last_used)]).addErrback(
            lambda failure: self.log.failure("could not record a session's use", failure)
        )

    def _keep(self, digest: str, tracked: _Tracked) -> None:
        """Hold a session in memory; past the cap, the least recently used one goes (its use stored)."""
        self._sessions[digest] = tracked
        self._sessions.move_to_end(digest)
        while len(self._sessions) > self._session_cache_entries:
            old_digest, old = self._sessions.popitem(last=False)
            if old.unstored():
                self._store_use(old_digest, old)

    def _revoked(self, user_id: int) -> None:
        """The user's sessions are gone from the database: forget them here too."""
        self._revocations += 1
        for digest in [d for d, t in self._sessions.items() if t.session.user_id == user_id]:
            del self._sessions[digest]


class _Attempt:
    """One password check under the throttles of its account and client address.

    Entering reserves a place in both (``allowed`` says whether one was
    free); `failed` or `succeeded` reports the outcome; leaving without either
    releases the places without counting anything.
    """

    def __init__(self, accounts: Accounts, username: str, client_address: str) -> None:
        account = username.lower()
        self._checks = [(accounts._account_failures, account, f"account {account!r}")]
        key = address_key(client_address) if client_address else ""
        if key:
            self._checks.append((accounts._address_failures, key, f"address {key}"))
        self._log = accounts.log
        self.allowed = all(throttle.allows(key) for throttle, key, _ in self._checks)
        self._open = self.allowed

    def __enter__(self) -> _Attempt:
        if self.allowed:
            for throttle, key, _ in self._checks:
                throttle.begin(key)
        return self

    def failed(self) -> None:
        if not self._open:
            return
        self._open = False
        for throttle, key, what in self._checks:
            delay = throttle.failed(key)
            if delay:
                self._log.warn("too many failed logins for {what}: refusing them for {delay} s", what=what, delay=delay)

    def succeeded(self) -> None:
        if not self._open:
            return
        self._open = False
        account_throttle, account, _ = self._checks[0]
        account_throttle.succeeded(account)
        for throttle, key, _ in self._checks[1:]:
            throttle.ended(key)

    def __exit__(self, *exc_info: Any) -> None:
        if self._open:
            self._open = False
            for throttle, key, _ in self._checks:
                throttle.ended(key)
