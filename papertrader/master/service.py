"""The master's main module (spec 3.1.1): starts everything in order and stops it cleanly.

Start-up: certificates (created on first start) -> database and schema ->
latest prices -> listen for workers -> the price update loop -> local workers.
Any failure stops the process with the reason in the log.
"""

from __future__ import annotations

import os
import re
from functools import partial
from typing import Any

from twisted.application import service
from twisted.internet import threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import LoopingCall

from papertrader import tls
from papertrader.config import MasterConfig
from papertrader.daemon import abort_start
from papertrader.eventlog import EventLogger
from papertrader.master.accounts import Accounts
from papertrader.master.database import Database, describe
from papertrader.master.exchange import Exchange
from papertrader.master.market import PriceBoard, SimulatedPriceSource
from papertrader.master.protocol import MasterFactory, MasterLocator
from papertrader.master.workers import LocalWorkers, WorkerRegistry

SESSION_SWEEP_INTERVAL = 3600.0


def local_worker_name(index: int) -> str:
    return f"local-{index + 1}"


def _nth_listen(description: str, index: int) -> str:
    """The listen endpoint of local worker ``index``: the configured port plus ``index``."""
    match = re.match(r"^(tcp6?:(?:port=)?)(\d+)(.*)$", description)
    if index == 0 or match is None or match.group(2) == "0":
        return description
    return f"{match.group(1)}{int(match.group(2)) + index}{match.group(3)}"


def prepare_identities(config: MasterConfig) -> tuple[tls.Identity, list[tls.Identity]]:
    """Create (on first start) the deployment CA and the master's and local workers' certificates."""
    directory = os.path.join(config.data_dir, "tls")
    master = tls.ensure_identity(directory, "master", "papertrader-master", config.hostnames)
    workers = [
        # A worker's certificate names it: the master accepts a worker only under that name.
        tls.ensure_identity(directory, f"worker-{local_worker_name(i)}", local_worker_name(i), config.hostnames)
        for i in range(config.workers)
    ]
    return master, workers


class MasterService(service.MultiService):
    """The whole master process."""

    log = EventLogger()

    def __init__(self, config: MasterConfig, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.database: Database | None = None
        self.exchange: Exchange | None = None
        self.registry = WorkerRegistry()
        self.port: Any = None
        self._loops: list[LoopingCall] = []
        self._ticking: Deferred | None = None
        self.ready: Deferred[None] = Deferred()

    def startService(self) -> None:
        super().startService()
        d = self._start()
        d.addCallbacks(self.ready.callback, self._failed_to_start)

    def _failed_to_start(self, failure: Any) -> None:
        self.ready.errback(failure)
        self.ready.addErrback(lambda _: None)
        abort_start(self.reactor, "master", failure)

    @inlineCallbacks
    def _start(self) -> Any:
        config = self.config
        os.makedirs(config.data_dir, mode=0o700, exist_ok=True)
        master_identity, worker_identities = yield threads.deferToThread(prepare_identities, config)

        self.database = Database.open(config.database, config.data_dir)
        version = yield self.database.migrate()
        self.log.info(
            "{backend} database {where}, schema version {version}",
            backend=self.database.dialect.name,
            where=describe(config.database) or "in the data directory",
            version=version,
        )

        accounts = Accounts(
            self.database,
            self.reactor,
            bcrypt_cost=config.bcrypt_cost,
            starting_cash_cents=config.starting_cash_cents,
            session_lifetime=config.session_lifetime,
            remember_lifetime=config.remember_lifetime,
            session_idle_timeout=config.session_idle_timeout,
            remember_idle_timeout=config.remember_idle_timeout,
            login_failures_allowed=config.login_failures_allowed,
            login_delay=config.login_delay,
            login_max_delay=config.login_max_delay,
        )
        yield accounts.start()
        board = PriceBoard(config.assets)
        source = SimulatedPriceSource(config.assets, config.price_seed)
        self.exchange = Exchange(
            self.database, accounts, board, source, self.reactor, config.max_order_quantity
        )
        yield self.exchange.resume()
        self.exchange.on_tick(self.registry.broadcast_tick)

        options = yield threads.deferToThread(
            tls.server_options, master_identity, require_client_certificate=True
        )
        endpoint = tls.tls_server_endpoint(self.reactor, config.listen, options)
        self.port = yield endpoint.listen(
            MasterFactory(partial(MasterLocator, self.exchange, self.registry, config.update_interval))
        )
        self.log.info("listening for workers on {address}", address=self.port.getHost())

        self._start_loop(self._tick, config.update_interval)
        self._start_loop(accounts.forget_expired, SESSION_SWEEP_INTERVAL, now=False)

        if config.workers:
            self._start_local_workers(worker_identities)

    def _tick(self) -> Deferred:
        self._ticking = self.exchange.tick()
        return self._ticking

    def _start_loop(self, job: Any, interval: float, now: bool = True) -> None:
        loop = LoopingCall(job)
        loop.clock = self.reactor
        loop.start(interval, now=now).addErrback(
            lambda f: self.log.failure("periodic job stopped", f)
        )
        self._loops.append(loop)

    def _start_local_workers(self, identities: list[tls.Identity]) -> None:
        config = self.config
        log_dir = os.path.join(config.data_dir, "logs")
        os.makedirs(log_dir, exist_ok=True)
        master_address = f"{config.hostnames[0]}:{self.port.getHost().port}"
        commands = []
        for index, identity in enumerate(identities):
            name = local_worker_name(index)
            commands.append(
                (
                    name,
                    [
                        "-c", "from twisted.scripts.twistd import run; run()",
                        "--nodaemon", "--pidfile=",
                        "--logfile", os.path.join(log_dir, f"worker-{name}.log"),
                        "papertrader-worker",
                        "--name", name,
                        "--master", master_address,
                        "--listen", _nth_listen(config.worker_listen, index),
                        "--ca", identity.ca,
                        "--cert", identity.certificate,
                        "--key", identity.key,
                        "--address-file", os.path.join(config.data_dir, f"worker-{name}.address"),
                        "--exit-with-stdin",
                        "--event-log", os.path.join(log_dir, f"worker-{name}-events.log"),
                        "--log-memory-entries", str(config.log_memory_entries),
                    ],
                )
            )
        LocalWorkers(self.reactor, commands, log_dir).setServiceParent(self)

    @inlineCallbacks
    def stopService(self) -> Any:
        # Own work first, then the children (local workers, and the event log
        # last of all, so it still holds what this shutdown logs), then the pool.
        for loop in self._loops:
            if loop.running:
                loop.stop()
        if self.port is not None:
            yield self.port.stopListening()
        if self._ticking is not None:
            yield self._ticking
        yield super().stopService()
        if self.database is not None:
            self.database.close()
