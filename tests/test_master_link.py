"""The worker's reconnecting link to the master when the master will not have it, in memory.

A real `ClientService` runs on a `task.Clock` against an endpoint that
connects it, through ``iosim``, to a real master locator.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from papertrader.worker.cache import QuoteCache
from papertrader.worker.upstream import REFUSED_RETRY_DELAY, MasterLink
from tests.support import Deployment


@implementer(IStreamClientEndpoint)
class MasterEndpoint:
    """Connects each attempt to the in-memory master of ``deployment`` (or lets the test end it)."""

    def __init__(self, deployment: Deployment, pumped: bool = True) -> None:
        self.deployment = deployment
        self.pumped = pumped
        self.protocols: list[Any] = []
        self.transports: list[iosim.FakeTransport] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        protocol = factory.buildProtocol(None)
        transport = iosim.makeFakeClient(protocol)
        self.protocols.append(protocol)
        self.transports.append(transport)
        if self.pumped:
            server = self.deployment.master_factory.buildProtocol(None)
            pump = iosim.connect(
                server, iosim.makeFakeServer(server), protocol, transport, greet=False, clock=self.deployment.clock
            )
            self.deployment.pumps.append(pump)
        else:
            protocol.makeConnection(transport)
        return succeed(protocol)


class RefusedLinkTests(SynchronousTestCase):
    """A refused worker says why in one line, closes the connection, and waits long before trying again."""

    def setUp(self) -> None:
        self.deployment = Deployment(self.mktemp())

    def start(self, name: str, pumped: bool = True) -> tuple[MasterLink, MasterEndpoint, list[Any]]:
        """Start a link named ``name``; return it, its endpoint and the events it logs meanwhile."""
        endpoint = MasterEndpoint(self.deployment, pumped)
        key = self.deployment.register(name)
        link = MasterLink(self.deployment.clock, endpoint, name, QuoteCache(), None, sign=Deployment.signer(key))
        with capturedLogs() as events:
            link.service.startService()
            self.deployment.flush()
        self.addCleanup(link.service.stopService)
        return link, endpoint, list(events)

    def advance(self, seconds: float) -> list[Any]:
        """Let ``seconds`` pass; return the events logged meanwhile."""
        with capturedLogs() as events:
            self.deployment.clock.advance(seconds)
            self.deployment.flush()
        return list(events)

    def retry_delay(self) -> float:
        """Seconds until the link's scheduled reconnection attempt."""
        clock = self.deployment.clock
        [retry] = [call for call in clock.getDelayedCalls() if "_reconnect" in repr(call.func)]
        return retry.getTime() - clock.seconds()

    def messages(self, events: list[Any], level: LogLevel) -> list[str]:
        return [
            e["log_format"].format(**e) for e in events
            if e.get("log_level") == level and e.get("log_namespace", "").endswith("MasterLink")
        ]

    def test_refused_by_name(self) -> None:
        """The master's refusal is logged once as an error, the connection closed, the retry 30+ s away."""
        link, endpoint, events = self.start("impostor")
        self.assertEqual(
            self.messages(events, LogLevel.error),
            ["the master refused this worker: this certificate is not for a worker named 'impostor'"],
        )
        self.assertIsNone(link.connection)
        self.assertTrue(endpoint.transports[0].disconnecting)
        self.assertNotIn("impostor", self.deployment.registry.workers)
        delay = self.retry_delay()
        self.assertTrue(REFUSED_RETRY_DELAY <= delay < REFUSED_RETRY_DELAY + 1, delay)  # plus jitter below 1 s
        events = self.advance(delay)
        self.assertEqual(len(endpoint.protocols), 2)
        self.assertEqual(len(self.messages(events, LogLevel.error)), 1)
        delay = self.retry_delay()
        self.assertTrue(2 * REFUSED_RETRY_DELAY <= delay < 2 * REFUSED_RETRY_DELAY + 1, delay)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_accepted_after_refusals(self) -> None:
        """Once the master accepts the worker, a later lost connection is retried quickly again."""
        link, endpoint, _ = self.start("impostor")
        self.deployment.certified_names[0] = "impostor"
        events = self.advance(REFUSED_RETRY_DELAY + 1)
        self.assertEqual(self.messages(events, LogLevel.info), ["connected to the master as impostor"])
        self.assertIsNotNone(link.connection)
        link.connection.transport.loseConnection()
        self.deployment.flush()
        self.advance(2.0)  # backoffPolicy(0.5) for the first attempt, plus jitter
        self.assertEqual(len(endpoint.protocols), 3)

    def test_tls_handshake_failed(self) -> None:
        """A TLS alert or a certificate for another host ends the connection: one error line, a long wait."""
        link, endpoint, _ = self.start("w", pumped=False)
        alert = SSL.Error([("SSL routines", "", "tlsv1 alert unknown ca")])
        mismatch = VerificationError(errors=["DNSMismatch(mismatched_id=DNS_ID(hostname=b'master.example'))"])
        for n, (error, reason) in enumerate([(alert, "tlsv1 alert unknown ca"), (mismatch, "DNSMismatch")]):
            with capturedLogs() as events:
                endpoint.protocols[-1].connectionLost(Failure(error))
            [message] = self.messages(list(events), LogLevel.error)
            self.assertTrue(message.startswith("TLS handshake with the master failed: "), message)
            self.assertIn(reason, message)
            self.assertGreaterEqual(self.retry_delay(), REFUSED_RETRY_DELAY * 2**n)
            self.advance(self.retry_delay())
            self.assertEqual(len(endpoint.protocols), n + 2)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_other_handshake_failure(self) -> None:
        """A connection that ends mid-handshake is a warning and a short wait that grows with each failure."""
        link, endpoint, _ = self.start("w", pumped=False)
        delays = []
        for attempt in range(1, 4):
            with capturedLogs() as events:
                endpoint.protocols[-1].connectionLost(Failure(ConnectionDone()))
            [message] = self.messages(list(events), LogLevel.warn)
            self.assertIn("the handshake with the master failed", message)
            delays.append(self.retry_delay())
            self.advance(delays[-1])
            self.assertEqual(len(endpoint.protocols), attempt + 1)
        # backoffPolicy(0.5, factor 1.5) plus up to 1 s of jitter: 1.125-2.125 s, then 2.53-3.53 s.
        self.assertLess(delays[0], 2.2)
        self.assertGreater(delays[2], 2.5)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_stopped_during_handshake(self) -> None:
        """Stopping the service mid-handshake aborts the half-made connection and stops once it is gone."""
        link, endpoint, _ = self.start("w", pumped=False)
        with capturedLogs() as events:
            stopped = link.service.stopService()
            self.assertTrue(endpoint.transports[0].disconnecting)
            self.assertNoResult(stopped)
            endpoint.protocols[0].connectionLost(Failure(ConnectionAborted()))
        self.successResultOf(stopped)
        self.assertEqual(self.messages(list(events), LogLevel.warn) + self.messages(list(events), LogLevel.error), [])
        self.assertEqual(self.flushLoggedErrors(), [])
