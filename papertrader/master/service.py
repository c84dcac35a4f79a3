"""The master's main module (spec 3.1.1): what its services share, and start-up in order.

Start-up: certificates (created on first start) -> database and schema ->
latest prices; then the listener for workers and the admin socket open, the
price update loop starts and the local workers are started (they need the
listener's port).
Any failure stops the process with the reason in the log.
"""

from __future__ import annotations

import os
import re
from typing import Any

import attr
from twisted.application import service
from twisted.internet import threads
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks, succeed

from papertrader import tls
from papertrader.admin.unixsocket import PrivatePort, admin_socket_path, bind_private
from papertrader.config import MasterConfig
from papertrader.daemon import StartUp
from papertrader.eventlog import EventLogger
from papertrader.master.accounts import Accounts
from papertrader.master.admin import AdminLocator, WorkerAdmin
from papertrader.master.database import Database, describe
from papertrader.master.exchange import Exchange
from papertrader.master.hashing import HashingPool
from papertrader.master.market import PriceBoard, SimulatedPriceSource
from papertrader.master.protocol import MasterLocator
from papertrader.master.workers import WorkerRegistry
from papertrader.wire import Timeouts

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


def timeouts(config: MasterConfig) -> Timeouts:
    """The connection timeouts the configuration sets."""
    return Timeouts(
        handshake=config.handshake_timeout, idle=config.idle_timeout, session_idle=config.logged_in_idle_timeout
    )


class MasterService(service.MultiService):
    """The whole master process: the objects its services share, and the start-up they wait for.

    `makeService` (``papertrader.master.tap``) adds the children: the event
    log, the listener for workers, the local workers and the periodic jobs.
    What they need first -- certificates, the database schema, the latest
    prices -- is prepared when the service starts; the listener and the jobs
    wait for it (`when_ready`).  A failure stops the process with the reason.
    """

    log = EventLogger()

    def __init__(self, config: MasterConfig, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.database: Database | None = None
        self.accounts: Accounts | None = None
        self.hashing: HashingPool | None = None
        self.exchange: Exchange | None = None
        self.registry = WorkerRegistry(reactor)
        self.admin = WorkerAdmin(self.registry)
        self.port: Any = None
        self.admin_port: Any = None
        self.startup = StartUp(reactor, "master")
        self.ready = self.startup.ready
        self._prepared: _Prepared | None = None
        self._listening: list[Deferred[Any]] = []

    # ------------------------------------------------------------ start-up

    def startService(self) -> None:
        self._open()
        super().startService()
        self._prepare().addCallbacks(self.startup.succeeded, self.startup.failed)

    def _open(self) -> None:
        """Build the domain objects (no I/O here: the pool connects in its own threads)."""
        config = self.config
        self.database = Database.open(
            config.database,
            config.data_dir,
            config.sqlite_cache_mib,
            config.sqlite_wal_autocheckpoint,
            clock=self.reactor,
        )
        self.hashing = HashingPool(
            self.reactor, config.hashing_processes or None, config.hashing_queue, nice=config.hashing_nice
        )
        self.accounts = Accounts(
            self.database,
            self.reactor,
            bcrypt_cost=config.bcrypt_cost,
            starting_cash_cents=config.starting_cash_cents,
            session_lifetime=config.session_lifetime,
            remember_lifetime=config.remember_lifetime,
            session_idle_timeout=config.session_idle_timeout,
            remember_idle_timeout=config.remember_idle_timeout,
            login_failures_allowed=config.login_failures_allowed,
            login_address_failures_allowed=config.login_address_failures_allowed,
            login_delay=config.login_delay,
            login_max_delay=config.login_max_delay,
            registrations_per_address_per_hour=config.registrations_per_address_per_hour,
            run_in_thread=self.hashing.run,
        )
        self.exchange = Exchange(
            self.database,
            self.accounts,
            PriceBoard(config.assets),
            SimulatedPriceSource(config.assets, config.price_seed),
            self.reactor,
            config.max_order_quantity,
            config.settlement_chunk_orders,
        )
        self.registry.follow(self.exchange)

    @inlineCallbacks
    def _prepare(self) -> Any:
        config = self.config
        # File work off the reactor thread, like everything else here.
        yield threads.deferToThread(os.makedirs, config.data_dir, mode=0o700, exist_ok=True)
        master_identity, worker_identities = yield threads.deferToThread(prepare_identities, config)
        version = yield self.database.migrate()
        yield self.accounts.start()
        self.log.info(
            "{backend} database {where}, schema version {version}",
            backend=self.database.dialect.name,
            where=describe(config.database) or "in the data directory",
            version=version,
        )
        yield self.exchange.resume()
        options = yield threads.deferToThread(tls.server_options, master_identity, require_client_certificate=True)
        self._prepared = _Prepared(options, worker_identities)
        return self._prepared

    def when_ready(self) -> Deferred[_Prepared]:
        """Fires once start-up has prepared everything (fails with CancelledError if it could not)."""
        return self.startup.when_done()

    # ------------------------------------------------------------ what the children call

    def worker_endpoint(self) -> _ListenWhenReady:
        """Where workers connect: the configured endpoint with TLS, listening once start-up is done."""
        return _ListenWhenReady(self)

    def admin_endpoint(self) -> _AdminSocketWhenReady:
        """The admin socket (``DATA_DIR/admin.sock``, mode 0600), listening once start-up is done."""
        return _AdminSocketWhenReady(self)

    def new_admin_locator(self) -> AdminLocator:
        """The responders for one new connection to the admin socket."""
        return AdminLocator(self.admin)

    def new_locator(self) -> MasterLocator:
        """The responders for one new worker connection."""
        return MasterLocator(
            self.exchange,
            self.registry,
            self.config.update_interval,
            heartbeat_interval=self.config.heartbeat_interval,
        )

    def _listening_on(self, port: Any) -> Any:
        self.port = port
        self.log.info("listening for workers on {address}", address=port.getHost())
        waiting, self._listening = self._listening, []
        for d in waiting:
            d.callback(port)
        return port

    def tick(self) -> Deferred:
        """One price update and settlement (the update loop's job), once start-up is done."""
        return self.when_ready().addCallbacks(lambda _: self.exchange.tick(), _quietly_cancelled)

    def sweep_sessions(self) -> Deferred:
        """Forget expired sessions (a periodic job), once start-up is done."""
        return self.when_ready().addCallbacks(lambda _: self.accounts.forget_expired(), _quietly_cancelled)

    def local_worker_commands(self) -> Deferred[list[tuple[str, list[str]]]]:
        """The command lines of the local workers, once the master listens (they need its port)."""
        if self.port is not None:
            return succeed(self._local_worker_commands())
        d: Deferred[Any] = Deferred()
        self._listening.append(d)
        return d.addCallback(lambda _: self._local_worker_commands())

    def _local_worker_commands(self) -> list[tuple[str, list[str]]]:
        config = self.config
        log_dir = os.path.join(config.data_dir, "logs")
        os.makedirs(log_dir, exist_ok=True)
        master_address = f"{config.hostnames[0]}:{self.port.getHost().port}"
        commands = []
        for index, identity in enumerate(self._prepared.worker_identities):
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
                        "--handshake-timeout", repr(config.handshake_timeout),
                        "--idle-timeout", repr(config.idle_timeout),
                        "--logged-in-idle-timeout", repr(config.logged_in_idle_timeout),
                        "--max-connections", str(config.max_connections),
                    ],
                )
            )
        return commands

    # ------------------------------------------------------------ shutdown

    @inlineCallbacks
    def stopService(self) -> Any:
        # The children stop together (the update loop waits for a running
        # update; the event log writes each later entry at once); the pool last.
        yield super().stopService()
        if self.hashing is not None:
            self.hashing.close()
        if self.database is not None:
            self.database.close()


@attr.s(frozen=True, auto_attribs=True)
class _Prepared:
    """What start-up prepared: the listener's TLS options and the local workers' certificates."""

    options: Any
    worker_identities: list[tls.Identity]


class _AdminSocketWhenReady:
    """The admin socket's endpoint: made privately (in a thread: file work) once start-up is done."""

    def __init__(self, master: MasterService) -> None:
        self.master = master

    def listen(self, factory: Any) -> Deferred:
        master = self.master
        path = admin_socket_path(master.config.data_dir)

        def adopt(made: Any) -> Any:
            listening, identity = made
            master.admin_port = PrivatePort.adopt(master.reactor, listening, identity, path, factory)
            master.log.info("admin socket listening at {path}", path=path)
            return master.admin_port

        def listen(_: Any) -> Deferred:
            return threads.deferToThread(bind_private, path).addCallback(adopt).addErrback(master.startup.failed)

        return master.when_ready().addCallback(listen)


def _quietly_cancelled(failure: Any) -> None:
    failure.trap(CancelledError)  # start-up failed; the process is stopping


class _ListenWhenReady:
    """The master's listening endpoint: TLS over the configured endpoint, once start-up is done."""

    def __init__(self, master: MasterService) -> None:
        self.master = master

    def listen(self, factory: Any) -> Deferred:
        master = self.master

        def listen(prepared: _Prepared) -> Deferred:
            endpoint = tls.tls_server_endpoint(master.reactor, master.config.listen, prepared.options)
            return endpoint.listen(factory).addCallback(master._listening_on).addErrback(master.startup.failed)

        return master.when_ready().addCallback(listen)
