"""Tests for the C{twistd} plugins: L{papertrader.master.tap} and L{papertrader.worker.tap}."""

from __future__ import annotations

import gc
import os
import socket

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, IServiceMaker
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from papertrader import tls
from papertrader.config import KEYS, MasterConfig
from papertrader.master import tap as master_tap
from papertrader.master.admin import MAX_ADMIN_CONNECTIONS, AdminFactory
from papertrader.master.directory import DirectoryFactory
from papertrader.master.protocol import MasterFactory
from papertrader.master.service import MasterService
from papertrader.worker import tap as worker_tap
from papertrader.worker.service import WorkerConfig, WorkerService

ETC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc")
SAMPLE_CONFIG = os.path.join(ETC, "papertrader.ini")


class PluginTests(SynchronousTestCase):
    """
    Both daemons are found by C{twistd} through the C{twisted.plugins} drop-ins.
    """

    def setUp(self) -> None:
        self.makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}

    def test_tapnames(self) -> None:
        """The master and the worker plugins are listed under their C{twistd} names."""
        self.assertIn("papertrader-master", self.makers)
        self.assertIn("papertrader-worker", self.makers)

    def test_masterModule(self) -> None:
        """The master plugin provides the master's options and service maker."""
        maker = self.makers["papertrader-master"]
        self.assertTrue(IServiceMaker.providedBy(maker))
        self.assertIs(maker.options, master_tap.Options)
        self.assertTrue(maker.description)

    def test_workerModule(self) -> None:
        """The worker plugin provides the worker's options and service maker."""
        maker = self.makers["papertrader-worker"]
        self.assertTrue(IServiceMaker.providedBy(maker))
        self.assertIs(maker.options, worker_tap.Options)
        self.assertTrue(maker.description)


class MasterOptionsTests(SynchronousTestCase):
    """
    C{twistd papertrader-master} reads a configuration file and lets options override it.
    """

    def setUp(self) -> None:
        # makeService tunes this process's garbage collector; the test process keeps its own.
        self.addCleanup(gc.set_threshold, *gc.get_threshold())

    def parse(self, *argv: str) -> master_tap.Options:
        options = master_tap.Options()
        options.parseOptions(list(argv))
        return options

    def usageError(self, *argv: str) -> str:
        return str(self.assertRaises(usage.UsageError, self.parse, *argv))

    def test_configWithOverride(self) -> None:
        """C{--config} loads the file and C{--update-interval} overrides its value."""
        options = self.parse("--config", SAMPLE_CONFIG, "--update-interval", "5")
        self.assertIsInstance(options.config, MasterConfig)
        self.assertEqual(options.config.update_interval, 5.0)
        self.assertEqual(options.config.workers, 1)
        self.assertEqual(options.config.bcrypt_cost, 12)

    def test_shortConfig(self) -> None:
        """C{-c} is short for C{--config}."""
        options = self.parse("-c", SAMPLE_CONFIG)
        self.assertEqual(options.config.update_interval, 60.0)

    def test_everySettingIsAnOption(self) -> None:
        """Every configuration key can be overridden by a dashed option."""
        for key in KEYS:
            self.assertIn(key.replace("_", "-"), master_tap.Options().keys())

    def test_severalOverrides(self) -> None:
        """Dashed options reach the matching settings."""
        data_dir = os.path.abspath(self.mktemp())
        options = self.parse(
            "--config",
            SAMPLE_CONFIG,
            "--workers",
            "0",
            "--starting-cash",
            "5000.00",
            "--worker-listen",
            "tcp:0",
            "--data-dir",
            data_dir,
            "--price-seed",
            "7",
        )
        config = options.config
        self.assertEqual(config.workers, 0)
        self.assertEqual(config.starting_cash_cents, 500_000)
        self.assertEqual(config.worker_listen, "tcp:0")
        self.assertEqual(config.data_dir, data_dir)
        self.assertEqual(config.price_seed, 7)

    def test_everyProblemListed(self) -> None:
        """Bad values give one L{usage.UsageError} that lists every problem."""
        message = self.usageError(
            "--config",
            SAMPLE_CONFIG,
            "--workers",
            "lots",
            "--update-interval",
            "-5",
            "--bcrypt-cost",
            "99",
            "--listen",
            "http://x",
            "--starting-cash",
            "0.001",
        )
        self.assertTrue(message.startswith("invalid configuration:"), message)
        for key in ("workers", "update_interval", "bcrypt_cost", "listen", "starting_cash"):
            self.assertIn(f"\n  {key}: ", message)
        self.assertEqual(len(message.splitlines()), 6, message)

    def test_missingConfigFile(self) -> None:
        """A missing configuration file is a usage error naming it."""
        path = os.path.abspath(self.mktemp())
        message = self.usageError("--config", path)
        self.assertIn(path, message)

    def test_unknownOption(self) -> None:
        """Options that are not settings are refused."""
        self.assertRaises(usage.UsageError, self.parse, "--colour", "blue")

    def test_makeService(self) -> None:
        """C{makeService} builds a L{MasterService} from the options without starting it, and
        raises the young-generation threshold of the garbage collector (see GC_YOUNG_THRESHOLD)."""
        options = self.parse("--config", SAMPLE_CONFIG, "--update-interval", "5")
        gc.set_threshold(700, 10, 10)
        service = master_tap.makeService(options)
        self.assertEqual(gc.get_threshold(), (master_tap.GC_YOUNG_THRESHOLD, 10, 10))
        self.assertIsInstance(service, MasterService)
        self.assertTrue(IService.providedBy(service))
        self.assertIs(service.config, options.config)
        self.assertIs(service.reactor, reactor)
        self.assertFalse(service.running)


    def test_connectionCap(self) -> None:
        """The master's listeners (for workers, for the directory) take their cap from C{max_connections},
        which is passed on to local workers."""
        options = self.parse("--config", SAMPLE_CONFIG, "--max-connections", "9")
        service = master_tap.makeService(options)
        listeners = [s for s in service if isinstance(s, StreamServerEndpointService)]
        self.assertEqual([type(s.factory) for s in listeners], [MasterFactory, DirectoryFactory, AdminFactory])
        self.assertEqual([s.factory.max_connections for s in listeners], [9, 9, MAX_ADMIN_CONNECTIONS])

    def test_directoryListen(self) -> None:
        """The directory listener is set by C{directory_listen} (default port 2050, loopback only)."""
        self.assertEqual(self.parse().config.directory_listen, "tcp:2050:interface=127.0.0.1")
        options = self.parse("--directory-listen", "tcp:0")
        self.assertEqual(options.config.directory_listen, "tcp:0")
        self.assertRaises(usage.UsageError, self.parse, "--directory-listen", "ssl:2050")

    def test_adminSocket(self) -> None:
        """The master also listens on its admin socket, bounded like its other listener."""
        options = self.parse("--config", SAMPLE_CONFIG, "--handshake-timeout", "17")
        service = master_tap.makeService(options)
        [admin] = [
            s for s in service if isinstance(s, StreamServerEndpointService) and isinstance(s.factory, AdminFactory)
        ]
        self.assertEqual(admin.factory.max_connections, MAX_ADMIN_CONNECTIONS)
        self.assertEqual(admin.factory.timeouts.handshake, 17)


class WorkerOptionsTests(SynchronousTestCase):
    """
    C{twistd papertrader-worker} needs TLS files and a well-formed master address.
    """

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        self.identity = tls.ensure_identity(directory, "worker", "papertrader-worker", ["localhost"])
        self.gnupg_home = os.path.join(directory, "gnupg")
        os.makedirs(self.gnupg_home)
        self.tlsArgs = [
            "--ca", self.identity.ca, "--cert", self.identity.certificate, "--key", self.identity.key,
            "--gnupg-home", self.gnupg_home,
        ]
        # makeService tunes this process's garbage collector; the test process keeps its own.
        self.addCleanup(gc.set_threshold, *gc.get_threshold())

    def parse(self, *argv: str) -> worker_tap.Options:
        options = worker_tap.Options()
        options.parseOptions(list(argv))
        return options

    def usageError(self, *argv: str) -> str:
        return str(self.assertRaises(usage.UsageError, self.parse, *argv))

    def test_valid(self) -> None:
        """Valid options give a L{WorkerConfig} with the master's host and port parsed."""
        address_file = os.path.abspath(self.mktemp())
        options = self.parse(
            "--name",
            "w1",
            "--master",
            "pt.example:3000",
            "--listen",
            "tcp:0",
            "--address-file",
            address_file,
            *self.tlsArgs,
        )
        self.assertEqual(
            options.config,
            WorkerConfig(
                name="w1",
                master_host="pt.example",
                master_port=3000,
                listen="tcp:0",
                identity=self.identity,
                gnupg_home=self.gnupg_home,
                address_file=address_file,
            ),
        )

    def test_gpg_options(self) -> None:
        """--gnupg-home must be a directory; --key-fingerprint and --public-address (HOST:PORT) are optional."""
        config = self.parse("--key-fingerprint", "ABCD", "--public-address", "w1.example:2049", *self.tlsArgs).config
        self.assertEqual(
            (config.gnupg_home, config.key_fingerprint, config.public_address),
            (self.gnupg_home, "ABCD", "w1.example:2049"),
        )
        self.assertIsNone(self.parse(*self.tlsArgs).config.key_fingerprint)
        message = self.usageError(*self.tlsArgs, "--gnupg-home", "/nonexistent/gnupg", "--public-address", "w1:x")
        self.assertIn("--gnupg-home: no directory /nonexistent/gnupg", message)
        self.assertIn("--public-address: expected HOST:PORT", message)

    def test_defaults(self) -> None:
        """By default a worker is named after the host and talks to C{localhost:2048}."""
        config = self.parse(*self.tlsArgs).config
        self.assertEqual(config.name, socket.gethostname())
        self.assertEqual((config.master_host, config.master_port), ("localhost", 2048))
        self.assertEqual(config.listen, "tcp:2049:interface=127.0.0.1")
        self.assertIsNone(config.address_file)

    def test_masterDefaultPort(self) -> None:
        """A master given without a port is reached on port 2048."""
        config = self.parse("--master", "pt.example", *self.tlsArgs).config
        self.assertEqual((config.master_host, config.master_port), ("pt.example", 2048))

    def test_masterIPv6(self) -> None:
        """A bracketed IPv6 master address is accepted."""
        config = self.parse("-m", "[::1]:2049", *self.tlsArgs).config
        self.assertEqual((config.master_host, config.master_port), ("::1", 2049))

    def test_missingTLSFiles(self) -> None:
        """Without C{--ca}, C{--cert} and C{--key}, the error names all three."""
        message = self.usageError()
        for option in ("--ca", "--cert", "--key"):
            self.assertIn(f"{option} is required", message)

    def test_oneTLSFileMissing(self) -> None:
        """Only the missing option is named."""
        message = self.usageError("--ca", self.identity.ca, "--cert", self.identity.certificate)
        self.assertIn("--key is required", message)
        self.assertNotIn("--ca", message)
        self.assertNotIn("--cert", message)

    def test_unreadableTLSFile(self) -> None:
        """A TLS file that cannot be read is named in the error."""
        absent = os.path.abspath(self.mktemp())
        message = self.usageError("--ca", self.identity.ca, "--cert", absent, "--key", self.identity.key)
        self.assertIn(f"--cert: cannot read {absent}", message)

    def test_badMaster(self) -> None:
        """A malformed master address is a usage error naming C{--master}."""
        for address in ("pt.example:http", "pt.example:0", ":2048", "pt.example:99999"):
            message = self.usageError("--master", address, *self.tlsArgs)
            self.assertIn("--master: ", message)
            self.assertIn(repr(address), message)

    def test_badListen(self) -> None:
        """A listen description that is not a TCP or UNIX endpoint is refused."""
        message = self.usageError("--listen", "ssl:2049", *self.tlsArgs)
        self.assertIn("--listen", message)

    def test_publicAddress(self) -> None:
        """C{--public-address} is the HOST:PORT the directory gives clients (default: none, the listening
        address); one that is not a HOST:PORT is refused."""
        self.assertIsNone(self.parse(*self.tlsArgs).config.public_address)
        config = self.parse("--public-address", "eu1.example.org:2049", *self.tlsArgs).config
        self.assertEqual(config.public_address, "eu1.example.org:2049")
        message = self.usageError("--public-address", "eu1.example.org", *self.tlsArgs)
        self.assertIn("--public-address: expected HOST:PORT", message)

    def test_clientAddress(self) -> None:
        """The address a worker gives the directory: C{--public-address}, else where it listens (a
        wildcard interface replaced by the machine's name), and nothing before it listens."""
        service = WorkerService(self.parse(*self.tlsArgs).config, reactor)
        self.assertIsNone(service.client_address())
        for host, expected in (
            ("127.0.0.1", "127.0.0.1:2049"),
            ("::1", "[::1]:2049"),
            ("0.0.0.0", f"{socket.getfqdn()}:2049"),
        ):
            service.port = _Listening(IPv4Address("TCP", host, 2049))
            self.assertEqual(service.client_address(), expected)
        public = WorkerService(self.parse("--public-address", "w.example:1", *self.tlsArgs).config, reactor)
        self.assertEqual(public.client_address(), "w.example:1")

    def test_everyProblemListed(self) -> None:
        """All problems are reported in one error."""
        message = self.usageError(
            "--master", "x:y", "--listen", "2049", "--key", self.identity.key, "--gnupg-home", "/nonexistent"
        )
        self.assertTrue(message.startswith("invalid options:"), message)
        for part in ("--master: ", "--listen: ", "--gnupg-home: ", "--ca is required", "--cert is required"):
            self.assertIn(part, message)
        self.assertEqual(len(message.splitlines()), 6, message)

    def test_connectionCap(self) -> None:
        """C{--max-connections} (10,000 by default) caps the client listener; it must be a whole number >= 1."""
        self.assertEqual(self.parse(*self.tlsArgs)["max-connections"], 10_000)
        service = worker_tap.makeService(self.parse("--max-connections", "7", *self.tlsArgs))
        [listener] = [s for s in service if isinstance(s, StreamServerEndpointService)]
        self.assertEqual(listener.factory.max_connections, 7)
        message = self.usageError("--max-connections", "0", *self.tlsArgs)
        self.assertIn("--max-connections: expected a whole number", message)

    def test_makeService(self) -> None:
        """C{makeService} builds a L{WorkerService} from the options without starting it, and
        raises the young-generation threshold of the garbage collector (see GC_YOUNG_THRESHOLD)."""
        options = self.parse("--name", "w1", *self.tlsArgs)
        gc.set_threshold(700, 10, 10)
        service = worker_tap.makeService(options)
        self.assertEqual(gc.get_threshold(), (worker_tap.GC_YOUNG_THRESHOLD, 10, 10))
        self.assertIsInstance(service, WorkerService)
        self.assertTrue(IService.providedBy(service))
        self.assertIs(service.config, options.config)
        self.assertIs(service.reactor, reactor)
        self.assertFalse(service.running)


class _Listening:
    """A listening port that says where it listens."""

    def __init__(self, address: IPv4Address) -> None:
        self.address = address

    def getHost(self) -> IPv4Address:
        return self.address
