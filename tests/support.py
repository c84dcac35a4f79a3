"""Shared test fixtures: a synchronous database pool and a whole in-memory deployment.

`SynchronousPool` runs each interaction at once on a real SQLite connection, so
unit tests drive the real SQL deterministically, without threads or real time.
`Deployment` wires a real master and worker to clients through ``iosim``.
"""

from __future__ import annotations

import sqlite3
import uuid
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.test import iosim

from papertrader.assets import Asset
from papertrader.client.library import ClientAMP, PaperTraderClient, client_from_connection
from papertrader.gpg import proof_statement
from papertrader.market_calendar import TradingCalendar
from papertrader.master.accounts import Accounts
from papertrader.master.database import CHUNK_ORDERS, Database
from papertrader.master.exchange import Exchange
from papertrader.master.market import PriceBoard, Quote, Retrieval
from papertrader.master.protocol import MasterFactory, MasterLocator
from papertrader.master.registration import RegisteredWorker, WorkerRegistrations, parse_networks
from papertrader.master.workers import WorkerRegistry
from papertrader.protocol import WorkerHello, WorkerProof
from papertrader.worker.cache import QuoteCache
from papertrader.worker.clients import ClientFactory, ClientLocator, ClientRegistry, MasterPushes
from papertrader.worker.upstream import MasterLink, OrderBatcher
from tests.gpgkeys import WorkerKey, cached_key, master_keyring, registered_key

ASSETS = {
    "AAPL": Asset("AAPL", "Apple Inc.", "NASDAQ", "Technology", "Consumer Electronics", 19_000),
    "MSFT": Asset("MSFT", "Microsoft Corporation", "NASDAQ", "Technology", "Software", 41_500),
    "KO": Asset("KO", "Coca-Cola Co.", "NYSE", "Consumer Defensive", "Beverages", 6_000),
}
PASSWORD = "correct horse"


class SynchronousPool:
    """The subset of ``adbapi.ConnectionPool`` that `Database` uses, run synchronously."""

    def __init__(self, path: str) -> None:
        self.connection = sqlite3.connect(path)
        self.connection.execute("PRAGMA foreign_keys=ON")
        self.broken: Exception | None = None

    def runInteraction(self, interaction: Any, *args: Any, **kw: Any) -> Deferred:
        if self.broken is not None:
            return fail(self.broken)
        cursor = self.connection.cursor()
        try:
            result = interaction(cursor, *args, **kw)
        except BaseException:
            self.connection.rollback()
            return fail()
        self.connection.commit()
        return succeed(result)

    def runOperation(self, *args: Any) -> Deferred:
        return self.runInteraction(lambda txn: txn.execute(*args) and None)

    def close(self) -> None:
        self.connection.close()


def run_now(function: Any, *args: Any) -> Deferred:
    """A stand-in for ``deferToThread`` that runs ``function`` at once."""
    return maybeDeferred(function, *args)


def make_database(path: str) -> tuple[Database, SynchronousPool]:
    pool = SynchronousPool(path)
    database = Database(pool)
    database.migrate()
    return database, pool


def make_accounts(database: Database, clock: Clock, **kw: Any) -> Accounts:
    settings = dict(
        bcrypt_cost=4,
        starting_cash_cents=10_000_000,
        session_lifetime=3600.0,
        remember_lifetime=30 * 86400.0,
        run_in_thread=run_now,
    )
    settings.update(kw)
    return Accounts(database, clock, **settings)


class Deployment:
    """A master and a worker connected through iosim, with clients attached on demand."""

    def __init__(
        self,
        path: str,
        max_order_quantity: int = 1000,
        assets: dict[str, Asset] | None = None,
        chunk_orders: int = CHUNK_ORDERS,
        calendar: TradingCalendar | None = None,
        **accounts: Any,
    ) -> None:
        assets = ASSETS if assets is None else assets
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.database, self.pool = make_database(path)
        self.accounts = make_accounts(self.database, self.clock, **accounts)
        self.board = PriceBoard(assets)
        self.source = FixedPrices({s: a.reference_cents for s, a in assets.items()})
        self.exchange = Exchange(
            self.database, self.accounts, self.board, self.source, self.clock, max_order_quantity, chunk_orders
        )
        self.registry = WorkerRegistry(self.clock)
        self.registry.follow(self.exchange)
        # Real gpg, run at once instead of in a thread; the key made once per test process.
        self.registrations = WorkerRegistrations(self.database, master_keyring(), self.clock, run_in_thread=run_now)
        self.worker_key = self.register("test-worker")
        # No TLS in memory: the name a worker's certificate would carry is given here.
        self.certified_names: list[str] = ["test-worker"]
        self.nonce_lifetime = 30.0
        self.master_factory = MasterFactory(
            lambda: MasterLocator(
                self.exchange,
                self.registry,
                60.0,
                certified_name=lambda transport: self.certified_names[0],
                registrations=self.registrations,
                clock=self.clock,
                nonce_lifetime=self.nonce_lifetime,
                calendar=calendar,
            ),
            clock=self.clock,
        )
        self.tick()

        self.cache = QuoteCache()
        self.clients = ClientRegistry(self.clock)
        self.link = MasterLink(
            self.clock,
            None,
            "test-worker",
            self.cache,
            MasterPushes(self.cache, self.clients, clock=self.clock),
            served_users=lambda: list(self.clients.by_user),
            client_count=lambda: len(self.clients.connections),
            sign=self.signer(self.worker_key),
        )
        self.batcher = OrderBatcher(self.clock, self.link.call, master_takes_groups=lambda: self.link.order_groups)
        self.client_factory = ClientFactory(
            lambda: ClientLocator(self.clock, self.link, self.batcher, self.cache, self.clients), clock=self.clock
        )
        self.pumps: list[iosim.IOPump] = []
        self.connect_worker()

    def register(self, name: str, networks: tuple[str, ...] = ()) -> WorkerKey:
        """Register test worker ``name`` (its key made once per process) with this master; return its key.

        The key was checked and imported into the shared master keyring once
        (`registered_key`); here only the database row is written, saving the
        gpg runs `WorkerRegistrations.add` makes (tested in test_registration).
        """
        key = registered_key(name)
        worker = RegisteredWorker(
            name, str(uuid.uuid4()), key.fingerprint, key.public_key, parse_networks(networks), True, "t"
        )
        self.result(self.database.add_worker(worker))
        return key

    @staticmethod
    def signer(key: WorkerKey) -> Any:
        """A MasterLink's ``sign`` that signs with ``key`` at once (real gpg, no thread)."""
        return lambda data: run_now(key.sign, data)

    def handshake(self, connection: Any, name: str, key: WorkerKey | None = None) -> Deferred:
        """Complete the worker handshake as ``name`` on the raw AMP ``connection``, signing with ``key``
        (by default ``name``'s cached key, registered first if it is not)."""
        if key is None:
            key = cached_key(name)
            if self.result(self.registrations.find(name)) is None:
                self.register(name)

        def prove(answer: dict[str, Any]) -> Deferred:
            return connection.callRemote(WorkerProof, signature=key.sign(proof_statement(name, answer["nonce"])))

        return connection.callRemote(WorkerHello, name=name, version="0").addCallback(prove)

    def connect_worker(self) -> Any:
        """(Re)connect the worker to the master (closing the link it has) and run its handshake."""
        if self.link.connection is not None:
            self.link.connection.transport.loseConnection()
            self.flush()
        upstream, master_side, pump = iosim.connectedServerAndClient(
            lambda: self.master_factory.buildProtocol(None), self.link._build, clock=self.clock
        )
        self.master_pump = pump
        self.pumps.append(pump)
        handshake = self.link._handshake(upstream)
        self.flush()
        return handshake

    def client(self, host: str = "192.168.1.1") -> PaperTraderClient:
        """A new client connected to the worker from ``host``."""
        address = IPv4Address("TCP", host, 40000 + len(self.pumps))
        connection, _, pump = iosim.connectedServerAndClient(
            lambda: self.client_factory.buildProtocol(address),
            ClientAMP,
            serverTransportFactory=lambda p: iosim.FakeTransport(p, isServer=True, peerAddress=address),
            clock=self.clock,
        )
        self.pumps.append(pump)
        return client_from_connection(connection)

    def flush(self) -> None:
        """Move every pending byte and run every due call until nothing moves (slices of a push included)."""
        while any([pump.pump() for pump in self.pumps]) or self._due_calls():
            self.clock.advance(0)

    def deliver_in_one_turn(self) -> None:
        """Move the bytes every connection has written to its peer, all in one reactor turn (``flush`` runs
        the due calls before each connection's bytes): requests that arrive together are batched together."""
        for pump in self.pumps:
            pump.pump(advanceClock=False)

    def _due_calls(self) -> bool:
        return any(call.getTime() <= self.clock.seconds() for call in self.clock.getDelayedCalls())

    def advance(self, seconds: float, step: float = 5.0) -> None:
        """Let ``seconds`` pass in steps, moving bytes after each, as a live network would (heartbeats flow)."""
        while seconds > 0:
            self.clock.advance(min(step, seconds))
            seconds -= step
            self.flush()

    def tick(self) -> None:
        """One price update and settlement."""
        self.exchange.tick()
        if hasattr(self, "pumps"):
            self.flush()

    def result(self, d: Deferred) -> Any:
        """Flush, then return what ``d`` fired with (raising its failure)."""
        results: list[Any] = []
        d.addBoth(results.append)
        if hasattr(self, "pumps"):
            self.flush()
        assert results, "the Deferred did not fire"
        if hasattr(results[0], "raiseException"):
            results[0].raiseException()
        return results[0]

    def logged_in(self, username: str = "alice") -> PaperTraderClient:
        """A client registered and logged in as ``username``."""
        client = self.client()
        self.result(client.register(username, f"{username}@example.com", PASSWORD))
        self.result(client.login(username, PASSWORD))
        return client


class FixedPrices:
    """A price source whose next prices the test sets."""

    def __init__(self, prices: dict[str, int]) -> None:
        self.prices = dict(prices)

    def fetch(self) -> Deferred[Retrieval]:
        return succeed(Retrieval({symbol: Quote(cents) for symbol, cents in self.prices.items()}))


class SimWorker:
    """One more worker of a `Deployment`, listed in the directory at ``address``, with its own clients.

    `crash` makes it vanish as a killed process would: what it had not sent
    is lost, its connections close, and connecting to it is refused.
    """

    def __init__(self, deployment: Deployment, name: str, address: str | None) -> None:
        self.deployment = deployment
        self.name = name
        self.address = address
        self.up = True
        self.cache = QuoteCache()
        self.clients = ClientRegistry(deployment.clock)
        if deployment.result(deployment.registrations.find(name)) is None:
            deployment.register(name)
        self.link = MasterLink(
            deployment.clock,
            None,
            name,
            self.cache,
            MasterPushes(
                self.cache,
                self.clients,
                clock=deployment.clock,
                on_boot_off=lambda reason: self.link.booted_off(reason),
            ),
            served_users=lambda: list(self.clients.by_user),
            sign=Deployment.signer(cached_key(name)),
            client_address=lambda: self.address,
            client_count=lambda: len(self.clients.connections),
        )
        self.batcher = OrderBatcher(
            deployment.clock, self.link.call, master_takes_groups=lambda: self.link.order_groups
        )
        self.client_factory = ClientFactory(
            lambda: ClientLocator(deployment.clock, self.link, self.batcher, self.cache, self.clients),
            clock=deployment.clock,
        )
        self.connect()

    def connect(self) -> Deferred:
        """Connect this worker to the master (as the name its certificate would carry) and shake hands."""
        deployment = self.deployment
        upstream, _, pump = iosim.connectedServerAndClient(
            lambda: deployment.master_factory.buildProtocol(None), self.link._build, clock=deployment.clock
        )
        deployment.pumps.append(pump)
        names, deployment.certified_names = deployment.certified_names, [self.name]
        try:
            handshake = self.link._handshake(upstream)
            deployment.flush()
        finally:
            deployment.certified_names = names
        return handshake

    def client(self, host: str = "192.168.1.1") -> PaperTraderClient:
        """A new client connected to this worker from ``host``."""
        deployment = self.deployment
        address = IPv4Address("TCP", host, 40000 + len(deployment.pumps))
        connection, _, pump = iosim.connectedServerAndClient(
            lambda: self.client_factory.buildProtocol(address),
            ClientAMP,
            serverTransportFactory=lambda p: iosim.FakeTransport(p, isServer=True, peerAddress=address),
            clock=deployment.clock,
        )
        deployment.pumps.append(pump)
        return client_from_connection(connection)

    def cut(self) -> None:
        """Lose the network, as ``ip link set ... down`` does: from now on nothing this worker's connections
        send arrives, and neither end hears of it (no FIN, no RST) until it gives up itself; connecting to it
        fails."""
        self.up = False
        deployment = self.deployment
        mine = set(self.clients.connections)
        if self.link.connection is not None:
            mine.add(self.link.connection)
        deployment.pumps = [
            CutPump(pump) if pump.server in mine or pump.client in mine else pump for pump in deployment.pumps
        ]

    def crash(self) -> None:
        """Vanish: drop what is not sent yet, close every connection, refuse new ones."""
        self.up = False
        connections = [*self.clients.connections]
        if self.link.connection is not None:
            connections.append(self.link.connection)
        for connection in connections:
            connection.transport.stream.clear()
            connection.transport.loseConnection()
        self.deployment.flush()


class CutPump:
    """An `iosim.IOPump` whose link is cut: what either end writes is lost, and an end hears that the
    connection ended only once it closes (or aborts) it itself."""

    def __init__(self, pump: iosim.IOPump) -> None:
        self.client, self.server = pump.client, pump.server
        self.clientIO, self.serverIO = pump.clientIO, pump.serverIO
        self.clock = pump.clock

    def pump(self, debug: bool = False, advanceClock: bool = True) -> bool:
        if advanceClock:
            self.clock.advance(0)
        self.clientIO.getOutBuffer()
        self.serverIO.getOutBuffer()
        moved = False
        for io in (self.clientIO, self.serverIO):
            if io.disconnecting and not io.disconnected:
                io.disconnected = True
                io.reportDisconnect()
                moved = True
        return moved


def sim_connector(workers: list[SimWorker]) -> Any:
    """A `Session` connector reaching the `SimWorker` at an address, or refused when it is down or unknown."""
    from twisted.internet.error import ConnectionRefusedError

    def connect_to(address: str) -> Deferred:
        for worker in workers:
            if worker.address == address and worker.up:
                return succeed(worker.client())
        return fail(ConnectionRefusedError(address))

    return connect_to
