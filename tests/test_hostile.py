"""Hostile input against real processes: a twistd master and its local worker, on loopback, over real TLS.

Both listeners (the worker's for clients, the master's for workers) get
oversized key prefixes, a box that never ends, a box of 10^6 keys, garbage
bytes, unreadable requests (missing and mistyped arguments, invalid UTF-8,
unknown commands) by the thousand, and connections that never speak.  Each
must end in a declared error or a dropped connection, with the processes'
memory and logs bounded, while an honest user keeps trading.
"""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols import amp
from twisted.trial.unittest import TestCase

from papertrader import tls
from papertrader.client.library import ClientAMP, client_from_connection
from papertrader.protocol import Heartbeat, OrderUpdates, PriceTick
from papertrader.wire import MAX_BAD_REQUESTS
from tests.processes import RunningDeployment

PASSWORD = "correct horse battery"
# Connection timeouts of the deployment under test, short so that the idle cases end quickly.
HANDSHAKE_TIMEOUT = 2
IDLE_TIMEOUT = 4
LOGGED_IN_IDLE_TIMEOUT = 6
HEARTBEAT_INTERVAL = 1  # shorter than the handshake timeout, as the configuration requires
# How long a test waits for a server to close a connection before it fails (a liveness bound, not a timing claim).
GIVE_UP = 60


class Probe(Protocol):
    """A peer that sends what it is told and notes when the server closes the connection."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any) -> None:
        if not self.lost.called:
            self.lost.callback(None)


class ListeningPeer(amp.AMP):
    """A bare AMP peer that takes the pushes either listener may send it (a price tick can come at any time)."""

    @PriceTick.responder
    def price_tick(self, **_: Any) -> dict:
        return {}

    @OrderUpdates.responder
    def order_updates(self, **_: Any) -> dict:
        return {}

    @Heartbeat.responder
    def heartbeat(self, clients: int | None = None) -> dict:
        return {}


def _pair(key: bytes, value: bytes) -> bytes:
    return len(key).to_bytes(2, "big") + key + len(value).to_bytes(2, "big") + value


def _box(**values: bytes) -> bytes:
    return b"".join(_pair(k.encode(), v) for k, v in values.items()) + b"\x00\x00"


def rss_kib(pid: int) -> int:
    """Resident memory of process ``pid`` in KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def child_pid(parent: int) -> int:
    """The one child process of ``parent`` (the master's local worker)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                return int(entry)
    raise AssertionError(f"process {parent} has no child")


class HostileInputTests(TestCase):
    """What a hostile peer sends to either listener costs bounded memory and log space, and nobody else notices."""

    timeout = 300

    @inlineCallbacks
    def setUp(self) -> Any:
        self.deployment = d = RunningDeployment(
            self.mktemp(),
            "--handshake-timeout", str(HANDSHAKE_TIMEOUT),
            "--idle-timeout", str(IDLE_TIMEOUT),
            "--logged-in-idle-timeout", str(LOGGED_IN_IDLE_TIMEOUT),
            "--heartbeat-interval", str(HEARTBEAT_INTERVAL),
        )
        self.addCleanup(d.stop)
        yield d.start()
        password = d.password_file(PASSWORD)
        yield d.cli_json("register", "honest", "honest@example.com", "--password-file", password)
        yield d.cli_json("login", "honest", "--password-file", password)
        self.tls_dir = os.path.join(d.data, "tls")
        self.ca = os.path.join(self.tls_dir, "ca.pem")
        self.master_port = d.master_port()
        self.worker_host, self.worker_port = d.worker_address()
        self.master_pid = d.process.pid
        self.worker_pid = child_pid(self.master_pid)
        self.client_options = yield threads.deferToThread(tls.client_options, "localhost", self.ca)
        worker_identity = tls.Identity(
            os.path.join(self.tls_dir, "worker-local-1.pem"), os.path.join(self.tls_dir, "worker-local-1.key"), self.ca
        )
        self.worker_options = yield threads.deferToThread(tls.client_options, "localhost", self.ca, worker_identity)

    # ------------------------------------------------------------ connecting

    def listeners(self) -> list[tuple[str, int, Any]]:
        """(name, port, TLS options) of the worker's and the master's listener."""
        return [("worker", self.worker_port, self.client_options), ("master", self.master_port, self.worker_options)]

    def connect(self, port: int, options: Any, protocol: Any) -> Deferred:
        endpoint = tls.tls_client_endpoint(reactor, "localhost", port, options)
        return endpoint.connect(Factory.forProtocol(lambda: protocol))

    @inlineCallbacks
    def send_and_expect_drop(self, port: int, options: Any | None, *chunks: bytes) -> Any:
        """Send ``chunks`` (over TLS unless ``options`` is None) and wait until the server closes the connection."""
        probe = Probe()
        if options is None:
            yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda: probe))
        else:
            yield self.connect(port, options, probe)
        for chunk in chunks:
            if probe.lost.called:
                break
            probe.transport.write(chunk)
        yield probe.lost.addTimeout(GIVE_UP, reactor)
        return probe

    @inlineCallbacks
    def assert_honest_user_served(self) -> Any:
        code, out, err = yield self.deployment.cli("quote", "AAPL")
        self.assertEqual(code, 0, err)
        queued = yield self.deployment.cli_json("buy", "KO", "1")
        self.assertEqual(queued["status"], "queued")

    def log_sizes(self) -> int:
        total = 0
        for path in (
            os.path.join(self.deployment.base, "master.log"),
            os.path.join(self.deployment.data, "logs", "worker-local-1.log"),
        ):
            total += os.path.getsize(path)
        return total

    # ------------------------------------------------------------ the cases

    @inlineCallbacks
    def test_boxes_that_never_end(self) -> Any:
        """Oversized key prefixes, a never-ending box and a 10^6-key box are dropped, with memory bounded."""
        before = {"master": rss_kib(self.master_pid), "worker": rss_kib(self.worker_pid)}
        million_keys = b"".join(_pair(b"%d" % i, b"") for i in range(1_000_000))  # about 10.9 MB
        endless = [_pair(b"k%d" % i, b"v" * 60_000) for i in range(40)]  # 2.4 MB, never terminated
        for _name, port, options in self.listeners():
            yield self.send_and_expect_drop(port, options, b"\x01\x00" + b"k" * 256)
            yield self.send_and_expect_drop(port, options, *endless)
            yield self.send_and_expect_drop(
                port, options, *[million_keys[i : i + 65536] for i in range(0, len(million_keys), 65536)]
            )
            yield self.assert_honest_user_served()
        growth = {
            "master": rss_kib(self.master_pid) - before["master"],
            "worker": rss_kib(self.worker_pid) - before["worker"],
        }
        for name, kib in growth.items():
            self.assertLess(kib, 40 * 1024, f"the {name} grew by {kib} KiB")

    @inlineCallbacks
    def test_garbage_bytes(self) -> Any:
        """Garbage in plain TCP and inside TLS closes the connection on both listeners."""
        garbage = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff" + bytes(range(256)) * 8
        for _name, port, options in self.listeners():
            yield self.send_and_expect_drop(port, None, garbage)
            yield self.send_and_expect_drop(port, options, garbage)
        yield self.assert_honest_user_served()

    @inlineCallbacks
    def test_unreadable_requests(self) -> Any:
        """Thousands of unreadable requests get declared BAD_REQUEST answers (on the master, before a
        worker's handshake: the handshake refusal), cost a few log lines, then a drop."""
        log_before = self.log_sizes()
        for name, port, options in self.listeners():
            # One connection: each kind gets its declared answer.
            connection = yield self.connect(port, options, ListeningPeer())
            asks = [
                connection.callRemoteString(b"Login", username=b"x"),
                connection.callRemoteString(b"ListOrders", token=b"t", cursor=b"\xc3\x28"),
                connection.callRemoteString(b"Login", username=b"a", password=b"b", remember=b"maybe"),
                connection.callRemoteString(b"GetAssetValue", symbol=b"\xff\xfe\xfd"),
                connection.callRemoteString(b"NoSuchCommand"),
            ]
            if name == "master":
                # Before its handshake a worker connection is answered nothing else: each request that
                # arrived is refused, as the connection is closed.
                for ask in asks:
                    error = yield self.assertFailure(ask, amp.RemoteAmpError, ConnectionDone, ConnectionLost)
                    if isinstance(error, amp.RemoteAmpError):
                        self.assertEqual(error.errorCode, b"SERVICE_UNAVAILABLE", f"{name}: {error}")
                        self.assertIn("has not completed its handshake", str(error))
            else:
                for ask in asks:
                    error = yield self.assertFailure(ask, amp.RemoteAmpError)
                    self.assertEqual(error.errorCode, b"BAD_REQUEST", f"{name}: {error}")
            if connection.transport is not None:
                connection.transport.loseConnection()
            # 100 connections pipelining 20 bad boxes each (2,000 boxes): each is dropped.
            bad_login = _box(_command=b"Login", _ask=b"1", username=b"a", password=b"b", remember=b"maybe")
            flood = bad_login * MAX_BAD_REQUESTS
            yield gatherResults([self.send_and_expect_drop(port, options, flood) for _ in range(100)])
            # And one connection pipelining 2,000 at once.
            yield self.send_and_expect_drop(port, options, flood * 100)
            yield self.assert_honest_user_served()
        growth = self.log_sizes() - log_before
        self.assertLess(growth, 32 * 1024, f"the twistd logs grew by {growth} bytes")

    @inlineCallbacks
    def test_idle_connections_closed(self) -> Any:
        """Connections that never speak (raw TCP, TLS without a command) and idle clients are closed."""
        waits = []
        for _name, port, options in self.listeners():
            waits.append(self.send_and_expect_drop(port, None))  # TCP only: the TLS handshake never starts
            waits.append(self.send_and_expect_drop(port, options))  # TLS done, no command
        waits.append(self.idle_client())
        waits.append(self.idle_client(logged_in=True))
        yield gatherResults(waits)
        yield self.assert_honest_user_served()

    @inlineCallbacks
    def idle_client(self, logged_in: bool = False) -> Any:
        """A client that asks one thing (a quote, or logs in) and then stays silent is closed after its idle timeout."""
        connection = yield self.connect(self.worker_port, self.client_options, ClientAMP())
        client = client_from_connection(connection)
        lost: Deferred[None] = Deferred()
        connection.on_lost = lambda reason: lost.callback(None)
        if logged_in:
            yield client.login("honest", PASSWORD)
        else:
            yield connection.callRemoteString(b"GetAssetValue", symbol=b"AAPL")
        yield lost.addTimeout(GIVE_UP, reactor)


class ConnectionCapTests(TestCase):
    """A listener full of connections closes new ones at once, and serves again when one leaves."""

    timeout = 120

    @inlineCallbacks
    def test_worker_listener_full(self) -> Any:
        """With room for three, a fourth raw connection to the worker is closed at once; after one of the
        three leaves, a real client is served."""
        self.deployment = d = RunningDeployment(self.mktemp(), "--max-connections", "3")
        self.addCleanup(d.stop)
        yield d.start()
        host, port = d.worker_address()
        endpoint = TCP4ClientEndpoint(reactor, host, port)
        holders = [Probe() for _ in range(3)]
        for holder in holders:
            yield endpoint.connect(Factory.forProtocol(lambda holder=holder: holder))
        refused = Probe()
        yield endpoint.connect(Factory.forProtocol(lambda: refused))
        yield refused.lost.addTimeout(GIVE_UP, reactor)  # closed by the worker, long before any timeout
        self.assertFalse(any(holder.lost.called for holder in holders))
        holders[0].transport.loseConnection()
        yield holders[0].lost
        code, out, err = yield d.cli("quote", "AAPL")
        self.assertEqual(code, 0, err)
        with open(os.path.join(d.data, "logs", "worker-local-1.log"), encoding="utf-8") as f:
            log = f.read()
        self.assertEqual(log.count("the most allowed; refusing new ones"), 1, log[-3000:])
        for holder in holders[1:]:
            holder.transport.loseConnection()
