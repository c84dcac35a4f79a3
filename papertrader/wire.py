"""What every PaperTrader AMP connection shares: bounded boxes, declared bad requests, timeouts.

`GuardedAMP` is the base of every protocol that faces a peer (clients at a
worker, workers at the master, the master at a worker).  It makes sure that
whatever a peer sends costs bounded memory and bounded log space:

- a box may hold at most ``max_box_bytes`` and ``max_box_keys``; a peer that
  goes past either (a box that never ends) is cut off;
- a request that cannot be read -- a missing or mistyped argument, invalid
  UTF-8, an unknown command -- is answered with the declared ``BAD_REQUEST``
  error instead of AMP's undeclared ``UNKNOWN`` (which closes the connection
  and logs a traceback); it is logged once per connection, then counted, and
  a peer that keeps sending them is dropped;
- a connection that does not complete its TLS handshake, or sends nothing
  after it, within the handshake timeout is closed, and so is one that stays
  silent for its idle timeout;
- every log line caused by a peer goes through one `LogLimiter`, so a flood
  of peers cannot flood the logs either.

`BoundedWrites` adds the other direction, for connections that are sent
pushes: a peer that does not read what it is sent cannot make this process
hold an unbounded backlog for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attr
from OpenSSL import SSL
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IHandshakeListener, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.protocols import amp
from zope.interface import implementer

from papertrader.errors import BadRequest
from papertrader.eventlog import EventLogger

# The wire code of BadRequest (declared on every Command, see papertrader.protocol).
BAD_REQUEST = b"BAD_REQUEST"
# The wire code of ServiceUnavailable, also declared on every Command.
SERVICE_UNAVAILABLE = b"SERVICE_UNAVAILABLE"

# The largest box a peer may send, and the most keys in it.  No PaperTrader
# command comes near either; a box that never ends reaches them quickly.
MAX_BOX_BYTES = 1024 * 1024
MAX_BOX_KEYS = 64
# Bad requests a connection may send before it is dropped.
MAX_BAD_REQUESTS = 20


class Heartbeat(amp.Command):
    """"Still here": sent both ways on a quiet worker-master link, and by long-lived clients.

    A worker's Heartbeat to the master carries ``clients``, the client
    connections it holds (the master tracks it); nobody else sends it.
    """

    arguments = [(b"clients", amp.Integer(optional=True))]
    requiresAnswer = False


class AnswersHeartbeats(amp.CommandLocator):
    """A locator that takes Heartbeats (each one restarts the connection's idle countdown, nothing more)."""

    @Heartbeat.responder
    def heartbeat(self, clients: int | None = None) -> dict:
        return {}


class LogLimiter:
    """At most ``burst`` lines every ``interval`` seconds, and at most ``per_peer`` of them for one
    peer (so one noisy peer cannot use up the lines others' mistakes would have had); the rest
    are counted and reported later."""

    def __init__(self, burst: int = 20, interval: float = 60.0, per_peer: int = 5) -> None:
        self.burst = burst
        self.interval = interval
        self.per_peer = per_peer
        self._window_start = float("-inf")
        self._used = 0
        # Lines each peer logged in this window: only peers that did log are kept, so at most ``burst``.
        self._by_peer: dict[str, int] = {}
        self.suppressed = 0

    def allow(self, now: float, peer: str | None = None) -> tuple[bool, int]:
        """Whether a line (caused by ``peer``, if known) may be logged at ``now``, and how many were
        suppressed before it."""
        if now - self._window_start >= self.interval:
            self._window_start = now
            self._used = 0
            self._by_peer.clear()
        if self._used >= self.burst or (peer is not None and self._by_peer.get(peer, 0) >= self.per_peer):
            self.suppressed += 1
            return False, 0
        self._used += 1
        if peer is not None:
            self._by_peer[peer] = self._by_peer.get(peer, 0) + 1
        suppressed, self.suppressed = self.suppressed, 0
        return True, suppressed


# One budget for every line a peer's mistake causes in this process.
PEER_LOG = LogLimiter()


@attr.s(frozen=True, auto_attribs=True)
class Timeouts:
    """How long a connection may take at each stage, in seconds (None: no limit)."""

    handshake: float | None = 30.0
    """The TLS handshake, and then the first command, must each arrive within this."""
    idle: float | None = 300.0
    """A connection without a session that sends nothing for this long is closed."""
    session_idle: float | None = 3600.0
    """A connection with a session (or a worker link) that sends nothing for this long is closed."""


def note(log: EventLogger, budget: LogLimiter, clock: IReactorTime, level: str, format: str, **fields: Any) -> None:
    """Log a line that a peer caused, if ``budget`` allows it now, with a count of the lines it held back.

    A ``peer`` field (``HOST:PORT``) counts against that host's share of the budget.
    """
    peer = fields.get("peer")
    allowed, suppressed = budget.allow(clock.seconds(), _host(peer) if isinstance(peer, str) else None)
    if not allowed:
        return
    if suppressed:
        format += " ({suppressed} similar lines were suppressed before this one)"
    getattr(log, level)(format, suppressed=suppressed, **fields)


def _host(peer: str) -> str:
    """The host part of ``HOST:PORT`` or ``[V6]:PORT``."""
    return peer.rpartition(":")[0] or peer


def describe_address(address: Any) -> str:
    """``HOST:PORT`` (``[v6]:PORT``) of an ``IAddress``, for logs and envelopes."""
    host = getattr(address, "host", None)
    if host is None:
        return str(address)
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{getattr(address, 'port', '')}"


@implementer(IHandshakeListener)
class GuardedAMP(amp.AMP):
    """An AMP connection that bounds what its peer can make it hold, log and wait for."""

    log = EventLogger()
    max_box_bytes = MAX_BOX_BYTES
    max_box_keys = MAX_BOX_KEYS
    max_bad_requests = MAX_BAD_REQUESTS
    peer_log = PEER_LOG

    def __init__(
        self,
        locator: amp.CommandLocator | None = None,
        clock: IReactorTime | None = None,
        timeouts: Timeouts | None = None,
    ) -> None:
        super().__init__(locator=locator)
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.timeouts = timeouts or Timeouts()
        self.peer = "unknown"
        self.bad_requests = 0
        self._box_bytes = 0
        self._box_keys = 0
        self._cut_off = False
        self._boxes = 0
        self._timer: Any = None
        self._timer_why = ""
        self._timer_seconds: float | None = None
        self._tls_done = False
        self._ended = False
        self._heartbeats: LoopingCall | None = None

    # ------------------------------------------------------------ what subclasses may change

    def idle_timeout(self) -> float | None:
        """The idle timeout that applies now (by default: the one for connections without a session)."""
        return self.timeouts.idle

    def established(self) -> bool:
        """Whether the peer has done what it must first (a worker's hello); until then the handshake timeout runs."""
        return True

    def note(self, level: str, format: str, **fields: Any) -> None:
        """Log a line caused by the peer, within the process-wide budget for such lines."""
        note(self.log, self.peer_log, self.clock, level, format, peer=self.peer, **fields)

    # ------------------------------------------------------------ timeouts

    def makeConnection(self, transport: Any) -> None:
        # AMP's own version logs a line for every connection: a line any peer
        # can cause by connecting.  Connections are counted, not logged.
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        self.peer = describe_address(self.transport.getPeer())
        if isinstance(self.factory, GuardedFactory):
            self.factory.opened()
        super().connectionMade()
        self._arm(self.timeouts.handshake, "did not complete the TLS handshake within")

    def handshakeCompleted(self) -> None:
        self._tls_done = True
        if self._boxes == 0 or not self.established():
            self._arm(self.timeouts.handshake, "sent no command after the TLS handshake within")

    def start_heartbeats(self, interval: float) -> None:
        """Send a Heartbeat every ``interval`` seconds until the connection ends, and start the idle countdown."""
        if self._ended or self._heartbeats is not None:
            return
        self._heartbeats = LoopingCall(self._beat)
        self._heartbeats.clock = self.clock
        self._heartbeats.start(interval, now=False)
        self.refresh_timeout()

    def heartbeat_arguments(self) -> dict[str, Any]:
        """What this side's Heartbeats carry (by default nothing)."""
        return {}

    def _beat(self) -> None:
        self.callRemote(Heartbeat, **self.heartbeat_arguments())

    def refresh_timeout(self) -> None:
        """Restart the idle countdown, e.g. after the connection gained or lost a session."""
        if self._boxes and self.established():
            self._arm(self.idle_timeout(), "was idle for")

    def _arm(self, seconds: float | None, why: str) -> None:
        if self._ended:
            return  # nothing left to time out
        self._timer_why = why
        self._timer_seconds = seconds
        if self._timer is not None and self._timer.active():
            if seconds is not None:
                self._timer.reset(seconds)
                return
            self._timer.cancel()
        self._timer = None if seconds is None else self.clock.callLater(seconds, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        self.note(
            "info",
            "{peer} {why} {seconds} s; closing the connection",
            why=self._timer_why,
            seconds=self._timer_seconds,
        )
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Any) -> None:
        self._ended = True
        if self._heartbeats is not None and self._heartbeats.running:
            self._heartbeats.stop()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self._tls_done and reason.check(SSL.Error):
            self.note("warn", "TLS handshake with {peer} failed: {reason}", reason=reason.getErrorMessage()[:300])
        if self.bad_requests > 1:
            self.note("info", "{peer} sent {count} bad requests in all", count=self.bad_requests)
        amp.BinaryBoxProtocol.connectionLost(self, reason)  # without AMP's line per connection
        self.transport = None
        if isinstance(self.factory, GuardedFactory):
            self.factory.closed()

    # ------------------------------------------------------------ bounded boxes

    def proto_value(self, string: bytes) -> str:
        if self._cut_off:
            return "key"
        self._box_bytes += len(self._currentKey) + len(string) + 4
        self._box_keys += 1
        if self._box_bytes > self.max_box_bytes or self._box_keys > self.max_box_keys:
            self._cut_off = True
            self._currentBox = amp.AmpBox()
            self.note(
                "warn",
                "{peer} sent a box of more than {keys} keys or {size} bytes; closing the connection",
                keys=self.max_box_keys,
                size=self.max_box_bytes,
            )
            self.transport.abortConnection()
            return "key"
        return super().proto_value(string)

    def lengthLimitExceeded(self, length: int) -> None:
        self.note("warn", "{peer} sent a key of {length} bytes; closing the connection", length=length)
        super().lengthLimitExceeded(length)

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        self._box_bytes = self._box_keys = 0
        if self._cut_off:
            return
        self._boxes += 1
        if self.established():
            self._arm(self.idle_timeout(), "was idle for")
        if amp.ANSWER in box or amp.ERROR in box:
            tag = box.get(amp.ANSWER, box.get(amp.ERROR))
            if tag not in self._outstandingRequests or (amp.ERROR in box and amp.ERROR_CODE not in box):
                self._bad_request(box.get(amp.COMMAND, b"?"), "an answer to no question")
                return
        elif amp.COMMAND not in box:
            self._bad_request(b"?", "a box that is neither a command nor an answer")
            return
        super().ampBoxReceived(box)

    # ------------------------------------------------------------ answers too long to send

    def _safeEmit(self, box: amp.AmpBox) -> None:
        # AMP would drop the whole connection on an answer with a value over
        # 64 KiB; the asker hears a declared error instead.
        try:
            super()._safeEmit(box)
        except amp.TooLong:
            tag = box.get(amp.ANSWER, box.get(amp.ERROR))
            if tag is None:
                raise
            self.note("error", "an answer to {peer} was too long to send; answered SERVICE_UNAVAILABLE instead")
            error = amp.AmpBox()
            error[amp.ERROR] = tag
            error[amp.ERROR_CODE] = SERVICE_UNAVAILABLE
            error[amp.ERROR_DESCRIPTION] = b"the answer was too long to send; try again later"
            super()._safeEmit(error)

    # ------------------------------------------------------------ bad requests

    def dispatchCommand(self, box: amp.AmpBox) -> Deferred:
        name = box[amp.COMMAND]
        responder = self.locator.locateResponder(name)
        if responder is None:
            return self._answer_bad(box, name, "unknown command")
        try:
            # Arguments are parsed here, before the responder runs (and its
            # failures are already Deferred): what raises is the request itself.
            return responder(box)
        except Exception as e:
            return self._answer_bad(box, name, _argument_problem(e))

    def _answer_bad(self, box: amp.AmpBox, name: bytes, reason: str) -> Deferred:
        text = self._bad_request(name, reason)
        if amp.ASK not in box:
            return succeed(None)  # nobody to tell; failing here would log a traceback
        return fail(amp.RemoteAmpError(BAD_REQUEST, text))

    def _bad_request(self, name: bytes, reason: str) -> str:
        self.bad_requests += 1
        command = name.decode("ascii", "replace")[:64]
        text = f"bad {command} request: {reason}"
        if self.bad_requests == 1:
            self.note("warn", "{peer}: {text} (more on this connection are only counted)", text=text)
        if self.bad_requests == self.max_bad_requests:
            self.note("warn", "{peer} sent {count} bad requests; closing the connection", count=self.bad_requests)
            self.clock.callLater(0, self.close)
        return str(BadRequest(text))

    def close(self) -> None:
        """Close after what was already written (the connection may have ended meanwhile)."""
        if self.transport is not None:
            self.transport.loseConnection()


@implementer(IPushProducer)
class BoundedWrites(GuardedAMP):
    """A guarded connection that is its transport's producer and bounds what waits to be sent.

    While the transport says its buffer is full (``pauseProducing``) every byte
    written counts, and a peer that still does not read after
    ``max_unsent_bytes`` more is cut off (one log line): what it was not
    reading would otherwise pile up in this process without limit.  Pushes go
    through `write`; answers (`sendBox`) count too.
    """

    max_unsent_bytes = 256 * 1024
    paused = False
    _unsent = 0
    _producing = False
    _cut_off_slow = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.registerProducer(self, True)
        self._producing = True

    def connectionLost(self, reason: Any) -> None:
        self._producing = False
        super().connectionLost(reason)

    def close(self) -> None:
        # A TLS transport does not close while a producer is registered.
        if self._producing and self.transport is not None:
            self._producing = False
            self.transport.unregisterProducer()
        super().close()

    # ------------------------------------------------------------ IPushProducer: the transport's "stop" and "go"

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._unsent = 0

    def stopProducing(self) -> None:
        pass

    # ------------------------------------------------------------ writing

    def sendBox(self, box: amp.AmpBox) -> None:
        if self._locked or self.transport is None or self._startingTLSBuffer is not None:
            super().sendBox(box)
            return
        self.write(box.serialize())

    def write(self, data: bytes) -> None:
        """Write ``data`` (say, a push encoded once for many connections), or cut off a peer that does not read."""
        if self._cut_off_slow or self.transport is None:
            return
        self.transport.write(data)
        if not self.paused:
            return
        self._unsent += len(data)
        if self._unsent > self.max_unsent_bytes:
            self._cut_off_slow = True
            self.note(
                "warn",
                "{peer} does not read what it is sent ({size} bytes waiting past its full buffer); "
                "closing the connection",
                size=self._unsent,
            )
            self.transport.abortConnection()


def _argument_problem(error: Exception) -> str:
    """A short reason for an argument that could not be parsed."""
    if isinstance(error, KeyError):
        key = error.args[0] if error.args else "?"
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        return f"missing argument {key!r}"[:200]
    if isinstance(error, UnicodeDecodeError):
        return "an argument is not valid UTF-8"
    return f"malformed argument ({type(error).__name__}: {error})"[:200]


class GuardedFactory(Factory):
    """Builds a `GuardedAMP` of type ``protocol``, with a fresh locator, per connection; at most
    ``max_connections`` at once (None: no limit): past that, new connections are closed at once.
    """

    protocol: type[GuardedAMP] = GuardedAMP
    log = EventLogger()
    peer_log = PEER_LOG

    def __init__(
        self,
        new_locator: Callable[[], amp.CommandLocator],
        clock: IReactorTime | None = None,
        timeouts: Timeouts | None = None,
        max_connections: int | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.new_locator = new_locator
        self.clock = clock
        self.timeouts = timeouts
        self.max_connections = max_connections
        self.open = 0
        self._refused = 0

    def buildProtocol(self, addr: Any) -> GuardedAMP | None:
        if self.max_connections is not None and self.open >= self.max_connections:
            if self._refused == 0:
                note(
                    self.log, self.peer_log, self.clock, "warn",
                    "{limit} connections are open, the most allowed; refusing new ones (from {peer} first)",
                    limit=self.max_connections, peer=describe_address(addr),
                )
            self._refused += 1
            return None  # the reactor closes the connection
        locator = self.new_locator()
        connection = self.protocol(locator=locator, clock=self.clock, timeouts=self.timeouts)
        locator.connection = connection  # type: ignore[attr-defined]
        connection.factory = self
        return connection

    def opened(self) -> None:
        self.open += 1

    def closed(self) -> None:
        self.open -= 1
        if self._refused and (self.max_connections is None or self.open < self.max_connections):
            note(self.log, self.peer_log, self.clock, "info",
                 "accepting connections again; {count} were refused while full", count=self._refused)
            self._refused = 0
