"""The master's main module (spec 3.1.1): what its services share, and start-up in order.

Start-up: certificates (created on first start) -> database and schema ->
the local workers' OpenPGP keys (made and registered on first start) ->
latest prices; then the listeners for workers and for the worker directory,
and the admin socket, open, the price update loop starts and the local workers
are started (they need the listener's port).
Any failure stops the process with the reason in the log.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import attr
from twisted.application import service
from twisted.internet import threads
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks, succeed

from papertrader import gpg, tls
from papertrader.admin.unixsocket import PrivatePort, admin_socket_path, bind_private
from papertrader.config import MasterConfig
from papertrader.daemon import StartUp
from papertrader.eventlog import EventLogger
from papertrader.market_calendar import TradingCalendar
from papertrader.master.accounts import Accounts
from papertrader.master.admin import AdminLocator, WorkerAdmin
from papertrader.master.database import Database, describe
from papertrader.master.directory import DirectoryLocator
from papertrader.master.exchange import Exchange
from papertrader.master.hashing import HashingPool
from papertrader.master.market import PriceBoard, PriceSource, SimulatedPriceSource
from papertrader.master.protocol import MasterLocator
from papertrader.master.registration import WorkerRegistrations
from papertrader.master.sources import PROVIDERS, HttpPriceSource, ReplayPriceSource, quota_problems
from papertrader.master.workers import WorkerRegistry
from papertrader.wire import Timeouts

SESSION_SWEEP_INTERVAL = 3600.0
# In the data directory: the HOST:PORT of the directory listener, for clients of a local deployment.
DIRECTORY_ADDRESS_FILE = "directory.address"


def local_worker_name(index: int) -> str:
    return f"local-{index + 1}"


def _port_of(description: str) -> int | None:
    """The TCP port of an endpoint description (None for port 0, a UNIX socket or anything else)."""
    match = re.match(r"^tcp6?:(?:port=)?(\d+)", description)
    return int(match.group(1)) or None if match is not None else None


def _nth_listen(description: str, index: int, reserved: tuple[str, ...] = ()) -> str:
    """The listen endpoint of local worker ``index``: the configured port plus ``index``, passing over
    the ports of ``reserved`` endpoints (the master's own listeners)."""
    match = re.match(r"^(tcp6?:(?:port=)?)(\d+)(.*)$", description)
    if index == 0 or match is None or match.group(2) == "0":
        return description
    taken = {port for port in map(_port_of, reserved) if port is not None}
    port = int(match.group(2))
    for _ in range(index):
        port += 1
        while port in taken:
            port += 1
    return f"{match.group(1)}{port}{match.group(3)}"


def local_worker_gnupg_home(config: MasterConfig, index: int) -> str:
    """The GnuPG home holding local worker ``index``'s key."""
    return os.path.join(config.data_dir, "workers", local_worker_name(index), "gnupg")


def prepare_local_worker_key(home: str, name: str) -> tuple[str, str]:
    """The fingerprint and armored public key of the worker key in ``home``, made on first start."""
    keys = gpg.secret_keys(home)
    fingerprint = keys[0] if keys else gpg.generate_key(home, f"PaperTrader local worker {name}")
    return fingerprint, gpg.export_public_key(home, fingerprint)


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


def build_price_source(config: MasterConfig, reactor: Any) -> tuple[PriceSource, Any]:
    """The configured price source (the reactor its clock), and the HTTP connection pool it uses (or None)."""
    if config.price_source == "replay":
        return ReplayPriceSource(config.replay, config.assets, loop=config.price_replay_loop), None
    if config.price_source in PROVIDERS:
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool

        provider = PROVIDERS[config.price_source]()
        per_minute, per_day = price_quota(config)
        pool = HTTPConnectionPool(reactor)
        source = HttpPriceSource(
            provider,
            list(config.assets),
            HTTPClient(Agent(reactor, pool=pool)),
            reactor,
            config.price_api_key,
            base_url=config.price_api_url,
            concurrency=config.price_concurrency or provider.concurrency,
            timeout=config.price_timeout,
            requests_per_minute=per_minute,
            requests_per_day=per_day,
        )
        return source, pool
    return SimulatedPriceSource(config.assets, config.price_seed), None


def price_quota(config: MasterConfig) -> tuple[int | None, int | None]:
    """The configured provider's requests allowed a minute and a day (None: no limit)."""
    provider = PROVIDERS[config.price_source]
    per_minute, per_day = config.price_requests_per_minute, config.price_requests_per_day
    return (
        provider.requests_per_minute if per_minute is None else per_minute or None,
        provider.requests_per_day if per_day is None else per_day or None,
    )


def log_price_source(config: MasterConfig, log: Any) -> None:
    """Say where prices come from; for a provider, warn if the asset list and interval need more than its quota.

    The master starts all the same: the source's request budget keeps within
    the quota, and the assets left out at one update are asked for first at the next.
    """
    if config.price_source not in PROVIDERS:
        return
    provider = PROVIDERS[config.price_source]
    per_minute, per_day = price_quota(config)
    log.info(
        "prices from {provider} at {url}, {count} assets every {interval:g} s",
        provider=provider.name,
        url=config.price_api_url or provider.default_url,
        count=len(config.assets),
        interval=config.update_interval,
    )
    for problem in quota_problems(provider.name, len(config.assets), config.update_interval, per_minute, per_day):
        log.warn("price quota exceeded: {problem}", problem=problem)


def describe_calendar(calendar: TradingCalendar) -> str:
    """The trading calendar in a few words, for the start-up log."""
    if calendar.always_open:
        return "open around the clock"
    holidays = f", {len(calendar.holidays)} holidays" if calendar.holidays else ""
    return f"{calendar.hours} {calendar.trading_days} {calendar.zone_name}{holidays}"


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
        # When the market is open: GetMarketStatus answers from it, and a day order expires at its session_end.
        self.calendar = config.calendar()
        self.registry = WorkerRegistry(reactor)
        self.admin = WorkerAdmin(self.registry)
        self.registrations: WorkerRegistrations | None = None
        self.port: Any = None
        self.admin_port: Any = None
        self.directory_port: Any = None
        self.startup = StartUp(reactor, "master")
        self.ready = self.startup.ready
        self._prepared: _Prepared | None = None
        self._listening: list[Deferred[Any]] = []
        self._price_pool: Any = None

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
        source, self._price_pool = build_price_source(config, self.reactor)
        self.exchange = Exchange(
            self.database,
            self.accounts,
            PriceBoard(config.assets),
            source,
            self.reactor,
            config.max_order_quantity,
            config.settlement_chunk_orders,
        )
        self.registry.follow(self.exchange)
        self.registrations = WorkerRegistrations(self.database, os.path.join(config.data_dir, "gnupg"), self.reactor)
        self.admin.registrations = self.registrations

    @inlineCallbacks
    def _prepare(self) -> Any:
        config = self.config
        # File work off the reactor thread, like everything else here.
        yield threads.deferToThread(os.makedirs, config.data_dir, mode=0o700, exist_ok=True)
        master_identity, worker_identities = yield threads.deferToThread(prepare_identities, config)
        version = yield self.database.migrate()
        worker_keys = yield self._register_local_workers()
        yield self.accounts.start()
        self.log.info(
            "{backend} database {where}, schema version {version}",
            backend=self.database.dialect.name,
            where=describe(config.database) or "in the data directory",
            version=version,
        )
        log_price_source(config, self.log)
        self.log.info("market calendar: {calendar}", calendar=describe_calendar(self.calendar))
        yield self.exchange.resume()
        options = yield threads.deferToThread(tls.server_options, master_identity, require_client_certificate=True)
        # Clients of the directory have no certificate; they check the master's against the deployment's CA.
        directory_options = yield threads.deferToThread(tls.server_options, master_identity)
        self._prepared = _Prepared(options, worker_identities, worker_keys, directory_options)
        return self._prepared

    @inlineCallbacks
    def _register_local_workers(self) -> Any:
        """Make (on first start) each local worker's OpenPGP key and register it: enabled, from anywhere.

        A registration the operator disabled stays disabled; one whose key was
        made again (its home deleted) gets the new key.
        """
        fingerprints = []
        for index in range(self.config.workers):
            name = local_worker_name(index)
            home = local_worker_gnupg_home(self.config, index)
            fingerprint, public_key = yield threads.deferToThread(prepare_local_worker_key, home, name)
            registered = yield self.registrations.find(name)
            if registered is None:
                yield self.registrations.add(name, public_key)
                self.log.info("registered local worker {name}, key {fingerprint}", name=name, fingerprint=fingerprint)
            elif registered.fingerprint != fingerprint:
                yield self.registrations.update_key(name, public_key)
                self.log.info("local worker {name} has a new key {fingerprint}", name=name, fingerprint=fingerprint)
            fingerprints.append((home, fingerprint))
        return fingerprints

    def when_ready(self) -> Deferred[_Prepared]:
        """Fires once start-up has prepared everything (fails with CancelledError if it could not)."""
        return self.startup.when_done()

    # ------------------------------------------------------------ what the children call

    def worker_endpoint(self) -> _ListenWhenReady:
        """Where workers connect: the configured endpoint with TLS, listening once start-up is done."""
        return _ListenWhenReady(self, lambda config: config.listen, lambda p: p.options, self._listening_on)

    def directory_endpoint(self) -> _ListenWhenReady:
        """Where clients ask for the worker directory: ``directory_listen`` with TLS (no client
        certificate), listening once start-up is done."""
        return _ListenWhenReady(
            self, lambda config: config.directory_listen, lambda p: p.directory_options, self._directory_listening_on
        )

    def new_directory_locator(self) -> DirectoryLocator:
        """The responder for one connection to the directory listener."""
        return DirectoryLocator(self.registry.directory)

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
            registrations=self.registrations,
            clock=self.reactor,
            nonce_lifetime=self.config.nonce_lifetime,
            calendar=self.calendar,
        )

    def _listening_on(self, port: Any) -> Any:
        self.port = port
        self.log.info("listening for workers on {address}", address=port.getHost())
        waiting, self._listening = self._listening, []
        for d in waiting:
            d.callback(port)
        return port

    @inlineCallbacks
    def _directory_listening_on(self, port: Any) -> Any:
        self.directory_port = port
        host = port.getHost()
        self.log.info("listening for worker directory requests on {address}", address=host)
        path = os.path.join(self.config.data_dir, DIRECTORY_ADDRESS_FILE)
        yield threads.deferToThread(_write_address, path, f"{host.host}:{host.port}")
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
        prepared = self._prepared
        for index, (identity, (home, fingerprint)) in enumerate(
            zip(prepared.worker_identities, prepared.worker_keys)
        ):
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
                        "--listen", _nth_listen(config.worker_listen, index, (config.listen, config.directory_listen)),
                        "--ca", identity.ca,
                        "--cert", identity.certificate,
                        "--key", identity.key,
                        "--gnupg-home", home,
                        "--key-fingerprint", fingerprint,
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
        if self._prepared is not None:
            # The local workers have ended: so should the gpg-agents their signing started (and the
            # short aliases of long homes, the master's keyring's included).
            homes = [home for home, _ in self._prepared.worker_keys] + [self.registrations.gnupg_home]
            for home in homes:
                yield threads.deferToThread(gpg.stop_agent, home)
        if self.directory_port is not None:
            try:
                os.unlink(os.path.join(self.config.data_dir, DIRECTORY_ADDRESS_FILE))
            except OSError:
                pass
        if self._price_pool is not None:
            yield self._price_pool.closeCachedConnections()
        if self.hashing is not None:
            self.hashing.close()
        if self.database is not None:
            self.database.close()


@attr.s(frozen=True, auto_attribs=True)
class _Prepared:
    """What start-up prepared: the listener's TLS options and the local workers' certificates and
    OpenPGP keys (GnuPG home, fingerprint)."""

    options: Any
    worker_identities: list[tls.Identity]
    worker_keys: list[tuple[str, str]]
    directory_options: Any = None


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


def _write_address(path: str, address: str) -> None:
    with open(path + ".tmp", "w", encoding="ascii") as f:
        f.write(address + "\n")
    os.replace(path + ".tmp", path)


class _ListenWhenReady:
    """One of the master's listening endpoints: TLS over a configured endpoint, once start-up is done."""

    def __init__(
        self,
        master: MasterService,
        description: Callable[[MasterConfig], str],
        options: Callable[[_Prepared], Any],
        listening: Callable[[Any], Any],
    ) -> None:
        self.master = master
        self.description = description
        self.options = options
        self.listening = listening

    def listen(self, factory: Any) -> Deferred:
        master = self.master

        def listen(prepared: _Prepared) -> Deferred:
            endpoint = tls.tls_server_endpoint(
                master.reactor, self.description(master.config), self.options(prepared)
            )
            return endpoint.listen(factory).addCallback(self.listening).addErrback(master.startup.failed)

        return master.when_ready().addCallback(listen)
