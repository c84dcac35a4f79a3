"""The worker's main module (spec 3.2.1): connect to the master, listen for clients."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import attr
from twisted.application import service
from twisted.internet import protocol, stdio, threads
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.python.failure import Failure

from papertrader import gpg, tls
from papertrader.daemon import StartUp
from papertrader.eventlog import EventLogger
from papertrader.stalls import StallMonitor, interval_from_environment
from papertrader.wire import Timeouts
from papertrader.worker.cache import QuoteCache, quote_cache_from_environment
from papertrader.worker.clients import ClientLocator, ClientRegistry, MasterPushes
from papertrader.worker.upstream import MasterLink, OrderBatcher


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class WorkerConfig:
    """What a worker needs: who it is, where the master is, where to listen."""

    name: str
    master_host: str
    master_port: int
    listen: str
    identity: tls.Identity
    gnupg_home: str
    key_fingerprint: str | None = None
    address_file: str | None = None
    # The HOST:PORT clients reach this worker on, for the directory (None: the address it listens on).
    public_address: str | None = None
    exit_with_stdin: bool = False
    timeouts: Timeouts = attr.Factory(Timeouts)


def _prepare(config: WorkerConfig) -> tuple[Any, Any, str]:
    """The TLS options (serving clients, connecting to the master) and the fingerprint of the key to sign with."""
    identity = config.identity
    return (
        tls.server_options(identity),
        tls.client_options(config.master_host, identity.ca, identity),
        gpg.signing_key(config.gnupg_home, config.key_fingerprint),
    )


class WorkerService(service.MultiService):
    """The whole worker process: the objects its services share, and start-up.

    `makeService` (``papertrader.worker.tap``) adds the children: the event
    log, the link to the master and the listener for clients.  Both wait for
    the TLS options, which are loaded in a thread when the service starts.
    """

    log = EventLogger()

    def __init__(self, config: WorkerConfig, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.cache = QuoteCache(answers=quote_cache_from_environment())
        self.clients = ClientRegistry(reactor)
        interval = interval_from_environment()
        # Off unless a benchmark asks for it (see papertrader.stalls).
        self.stalls: StallMonitor | None = None
        if interval is not None:
            self.stalls = StallMonitor(reactor, interval, lambda: len(self.clients.connections))
        self.port: Any = None
        self._listening: list[Deferred[Any]] = []
        self.startup = StartUp(reactor, "worker")
        self.ready = self.startup.ready
        self.link = MasterLink(
            reactor,
            _WhenReady(self, self._connect_to_master),
            config.name,
            self.cache,
            MasterPushes(
                self.cache,
                self.clients,
                on_tick=None if self.stalls is None else self.stalls.update_arrived,
                clock=reactor,
                on_boot_off=lambda reason: self.link.booted_off(reason),
            ),
            timeouts=config.timeouts,
            served_users=lambda: list(self.clients.by_user),
            sign=self._sign,
            client_address=self.client_address,
            client_count=lambda: len(self.clients.connections),
        )
        self.key_fingerprint: str | None = None
        self.batcher = OrderBatcher(reactor, self.link.call, master_takes_groups=lambda: self.link.order_groups)

    def startService(self) -> None:
        super().startService()
        if self.stalls is not None:
            self.stalls.start()
        if self.config.exit_with_stdin:
            stdio.StandardIO(_ParentWatch(self.reactor), reactor=self.reactor)
        threads.deferToThread(_prepare, self.config).addCallback(self._prepared).addCallbacks(
            self.startup.succeeded, self.startup.failed
        )

    def _prepared(self, prepared: tuple[Any, Any, str]) -> tuple[Any, Any, str]:
        self.key_fingerprint = prepared[2]
        self.log.info("signing the master's handshakes with key {fingerprint}", fingerprint=self.key_fingerprint)
        return prepared

    def _sign(self, statement: bytes) -> Deferred[str]:
        """Sign the master's handshake statement with this worker's key, in a thread."""
        return threads.deferToThread(gpg.sign, self.config.gnupg_home, self.key_fingerprint, statement)

    # ------------------------------------------------------------ what the children use

    def client_endpoint(self) -> _WhenReady:
        """Where clients connect: the configured endpoint with TLS, once the options are loaded."""
        return _WhenReady(self, self._listen_for_clients)

    def new_locator(self) -> ClientLocator:
        """The responders for one new client connection."""
        return ClientLocator(self.reactor, self.link, self.batcher, self.cache, self.clients)

    def client_address(self) -> str | None:
        """The HOST:PORT clients reach this worker on (for the master's directory), once it listens."""
        if self.config.public_address:
            return self.config.public_address
        if self.port is None:
            return None
        host = self.port.getHost()
        name = host.host if host.host not in ("0.0.0.0", "::") else socket.getfqdn()
        return f"[{name}]:{host.port}" if ":" in name else f"{name}:{host.port}"

    @inlineCallbacks
    def _connect_to_master(self, options: tuple[Any, Any], factory: Any) -> Any:
        # Once listening for clients: the handshake tells the master where clients reach this worker.
        if self.port is None:
            waiting: Deferred[Any] = Deferred()
            self._listening.append(waiting)
            yield waiting
        config = self.config
        endpoint = tls.tls_client_endpoint(self.reactor, config.master_host, config.master_port, options[1])
        connection = yield endpoint.connect(factory)
        return connection

    @inlineCallbacks
    def _listen_for_clients(self, options: tuple[Any, Any], factory: Any) -> Any:
        try:
            self.port = yield tls.tls_server_endpoint(self.reactor, self.config.listen, options[0]).listen(factory)
            host = self.port.getHost()
            self.log.info("listening for clients on {address}", address=host)
            waiting, self._listening = self._listening, []
            for d in waiting:
                d.callback(self.port)
            if self.config.address_file:
                yield threads.deferToThread(_write_address, self.config.address_file, f"{host.host}:{host.port}")
        except Exception:
            self.startup.failed(Failure())
            raise CancelledError("the worker could not listen") from None
        return self.port

    @inlineCallbacks
    def stopService(self) -> Any:
        if self.stalls is not None:
            self.stalls.stop()
        for connection in list(self.clients.connections):
            connection.close()
        yield super().stopService()
        if self.config.address_file:
            try:
                os.unlink(self.config.address_file)
            except OSError:
                pass


class _WhenReady:
    """An endpoint (listening or connecting) whose work waits until the worker's TLS options are loaded."""

    def __init__(self, worker: WorkerService, act: Callable[[tuple[Any, Any], Any], Deferred]) -> None:
        self.worker = worker
        self.act = act

    def listen(self, factory: Any) -> Deferred:
        return self.worker.startup.when_done().addCallback(self.act, factory)

    connect = listen


class _ParentWatch(protocol.Protocol):
    """Stops the worker when its standard input closes: the master that started it has ended."""

    log = EventLogger()

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def connectionLost(self, reason: Any) -> None:
        self.log.info("standard input closed: the master that started this worker has ended; stopping")
        if self.reactor.running:
            self.reactor.stop()


def _write_address(path: str, address: str) -> None:
    with open(path + ".tmp", "w", encoding="ascii") as f:
        f.write(address + "\n")
    os.replace(path + ".tmp", path)
