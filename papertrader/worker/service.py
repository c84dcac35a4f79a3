"""The worker's main module (spec 3.2.1): connect to the master, listen for clients."""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import attr
from twisted.application import service
from twisted.internet import protocol, stdio, threads
from twisted.internet.defer import Deferred, inlineCallbacks

from papertrader import tls
from papertrader.daemon import abort_start
from papertrader.eventlog import EventLogger
from papertrader.wire import Timeouts
from papertrader.worker.cache import QuoteCache
from papertrader.worker.clients import ClientFactory, ClientLocator, ClientRegistry, MasterPushes
from papertrader.worker.upstream import MasterLink, OrderBatcher


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class WorkerConfig:
    """What a worker needs: who it is, where the master is, where to listen."""

    name: str
    master_host: str
    master_port: int
    listen: str
    identity: tls.Identity
    address_file: str | None = None
    exit_with_stdin: bool = False
    timeouts: Timeouts = attr.Factory(Timeouts)


def _tls_options(identity: tls.Identity, master_host: str) -> tuple[Any, Any]:
    return (
        tls.server_options(identity),
        tls.client_options(master_host, identity.ca, identity),
    )


class WorkerService(service.MultiService):
    """The whole worker process."""

    log = EventLogger()

    def __init__(self, config: WorkerConfig, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.cache = QuoteCache()
        self.clients = ClientRegistry()
        self.port: Any = None
        self.link: MasterLink | None = None
        self.ready: Deferred[None] = Deferred()

    def startService(self) -> None:
        super().startService()
        if self.config.exit_with_stdin:
            stdio.StandardIO(_ParentWatch(self.reactor), reactor=self.reactor)
        self._start().addCallbacks(self.ready.callback, self._failed_to_start)

    def _failed_to_start(self, failure: Any) -> None:
        self.ready.errback(failure)
        self.ready.addErrback(lambda _: None)
        abort_start(self.reactor, "worker", failure)

    @inlineCallbacks
    def _start(self) -> Any:
        config = self.config
        server_options, master_options = yield threads.deferToThread(
            _tls_options, config.identity, config.master_host
        )
        self.link = MasterLink(
            self.reactor,
            tls.tls_client_endpoint(self.reactor, config.master_host, config.master_port, master_options),
            config.name,
            self.cache,
            MasterPushes(self.cache, self.clients),
            timeouts=config.timeouts,
        )
        self.link.service.setServiceParent(self)
        batcher = OrderBatcher(self.reactor, self.link.call)
        factory = ClientFactory(
            partial(ClientLocator, self.reactor, self.link, batcher, self.cache, self.clients),
            clock=self.reactor,
            timeouts=config.timeouts,
        )
        endpoint = tls.tls_server_endpoint(self.reactor, config.listen, server_options)
        self.port = yield endpoint.listen(factory)
        host = self.port.getHost()
        self.log.info("listening for clients on {address}", address=host)
        if config.address_file:
            yield threads.deferToThread(_write_address, config.address_file, f"{host.host}:{host.port}")

    @inlineCallbacks
    def stopService(self) -> Any:
        if self.port is not None:
            yield self.port.stopListening()
        for connection in list(self.clients.connections):
            connection.transport.loseConnection()
        yield super().stopService()
        if self.config.address_file:
            try:
                os.unlink(self.config.address_file)
            except OSError:
                pass


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
