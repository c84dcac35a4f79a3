"""Tests for L{papertrader.config}: loading and validating the deployment configuration."""

from __future__ import annotations

import os

import attr
from twisted.trial.unittest import SynchronousTestCase

from papertrader.config import KEYS, MasterConfig, default_data_dir, load_master_config
from papertrader.errors import ConfigError

ETC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc")
SAMPLE_CONFIG = os.path.join(ETC, "papertrader.ini")
SAMPLE_ASSETS = os.path.join(ETC, "assets.csv")
ASSETS_CSV = (
    "symbol,name,exchange,sector,industry,reference_price\n"
    "AAPL,Apple Inc.,NASDAQ,Technology,Consumer Electronics,189.50\n"
    "KO,Coca-Cola Co.,NYSE,Consumer Defensive,Beverages,60.50\n"
)


class ConfigTestMixin:
    """Helpers writing configuration and asset files into a fresh temporary folder."""

    def folder(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    def write(self, path: str, text: str) -> str:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def config_file(self, body: str, assets: str | None = ASSETS_CSV) -> str:
        """A config file C{[papertrader]} + C{body}; with C{assets}, an C{assets.csv} beside it."""
        folder = self.folder()
        if assets is not None:
            self.write(os.path.join(folder, "assets.csv"), assets)
            body = "assets = assets.csv\n" + body
        return self.write(os.path.join(folder, "papertrader.ini"), "[papertrader]\n" + body)

    def problems(self, path: str | None, overrides: dict[str, str | None] | None = None) -> list[str]:
        """The problems of the L{ConfigError} that loading C{path} raises."""
        exc = self.assertRaises(ConfigError, load_master_config, path, overrides or {})
        self.assertEqual(str(exc), "; ".join(exc.problems))
        return exc.problems


class SampleConfigTests(ConfigTestMixin, SynchronousTestCase):
    """
    The shipped C{etc/papertrader.ini} loads and gives the documented defaults.
    """

    def setUp(self) -> None:
        self.config = load_master_config(SAMPLE_CONFIG, {})

    def test_type(self) -> None:
        """Loading returns a L{MasterConfig}."""
        self.assertIsInstance(self.config, MasterConfig)

    def test_globalVariables(self) -> None:
        """The four global deployment variables have their documented sample values."""
        self.assertEqual(self.config.workers, 1)
        self.assertEqual(self.config.log_memory_entries, 1000)
        self.assertEqual(self.config.update_interval, 60.0)
        self.assertIsInstance(self.config.update_interval, float)
        self.assertGreaterEqual(len(self.config.assets), 20)

    def test_assetsBesideConfig(self) -> None:
        """The sample's relative C{assets.csv} is the one next to the configuration file."""
        self.assertEqual(self.config.assets_file, os.path.abspath(SAMPLE_ASSETS))
        self.assertIn("AAPL", self.config.assets)

    def test_network(self) -> None:
        """The master listens on port 2048 and local workers on 2049, on loopback."""
        self.assertEqual(self.config.listen, "tcp:2048:interface=127.0.0.1")
        self.assertEqual(self.config.worker_listen, "tcp:2049:interface=127.0.0.1")
        self.assertEqual(self.config.hostnames, ("localhost", "127.0.0.1"))

    def test_accounts(self) -> None:
        """Accounts start with 100000.00 of cash and passwords use bcrypt cost 12."""
        self.assertEqual(self.config.bcrypt_cost, 12)
        self.assertEqual(self.config.starting_cash_cents, 10_000_000)
        self.assertEqual(self.config.max_order_quantity, 100_000)
        self.assertEqual(self.config.session_lifetime, 86400.0)
        self.assertEqual(self.config.remember_lifetime, 2_592_000.0)

    def test_sessionsAndLogins(self) -> None:
        """Sessions end after an hour unused (a week with "remember me"); after 5 failed logins
        for an account (20 from an address) further ones wait 1 s, doubling up to 900 s."""
        self.assertEqual(self.config.session_idle_timeout, 3600.0)
        self.assertEqual(self.config.remember_idle_timeout, 604_800.0)
        self.assertEqual(self.config.login_failures_allowed, 5)
        self.assertEqual(self.config.login_address_failures_allowed, 20)
        self.assertEqual(self.config.login_delay, 1.0)
        self.assertEqual(self.config.login_max_delay, 900.0)

    def test_registrationLimit(self) -> None:
        """At most 20 registrations an hour come from one address by default; the limit must be a
        whole number of at least 1."""
        self.assertEqual(self.config.registrations_per_address_per_hour, 20)
        self.assertEqual(load_master_config(None, {}).registrations_per_address_per_hour, 20)
        for bad, problem in (("0", "must be between 1 and 100000, got 0"), ("many", "not a whole number: 'many'")):
            self.assertEqual(self.problems(SAMPLE_CONFIG, {"registrations_per_address_per_hour": bad}),
                             [f"registrations_per_address_per_hour: {problem}"])
        config = load_master_config(SAMPLE_CONFIG, {"registrations_per_address_per_hour": "5"})
        self.assertEqual(config.registrations_per_address_per_hour, 5)

    def test_connectionTimeouts(self) -> None:
        """The sample's connection timeouts are the documented defaults: 30 s, 300 s, 3600 s, heartbeats every 10 s."""
        self.assertEqual(
            (
                self.config.handshake_timeout,
                self.config.idle_timeout,
                self.config.logged_in_idle_timeout,
                self.config.heartbeat_interval,
            ),
            (30.0, 300.0, 3600.0, 10.0),
        )

    def test_connectionCap(self) -> None:
        """Each listener holds at most 10,000 connections by default; the cap must be a whole number of at least 1."""
        self.assertEqual(self.config.max_connections, 10_000)
        self.assertEqual(self.problems(SAMPLE_CONFIG, {"max_connections": "0"}),
                         ["max_connections: must be between 1 and 1000000, got 0"])

    def test_settlementAndStorage(self) -> None:
        """Settlement chunks of 10,000 orders, a 256 MiB SQLite cache and checkpoints every 16,000 pages by
        default, the same as the database module's; each must be a whole number in range."""
        from papertrader.master import database

        self.assertEqual(
            (self.config.settlement_chunk_orders, self.config.sqlite_cache_mib, self.config.sqlite_wal_autocheckpoint),
            (database.CHUNK_ORDERS, database.SQLITE_CACHE_MIB, database.SQLITE_WAL_AUTOCHECKPOINT),
        )
        self.assertEqual((database.CHUNK_ORDERS, database.SQLITE_CACHE_MIB), (10_000, 256))
        self.assertEqual(
            self.problems(
                SAMPLE_CONFIG,
                {"settlement_chunk_orders": "0", "sqlite_cache_mib": "lots", "sqlite_wal_autocheckpoint": "10"},
            ),
            [
                "settlement_chunk_orders: must be between 1 and 1000000, got 0",
                "sqlite_cache_mib: not a whole number: 'lots'",
                "sqlite_wal_autocheckpoint: must be between 100 and 10000000, got 10",
            ],
        )

    def test_emptyPriceSeed(self) -> None:
        """The sample's empty C{price_seed} means no fixed seed."""
        self.assertIsNone(self.config.price_seed)

    def test_defaultDataDir(self) -> None:
        """The sample leaves C{data_dir} commented out, so the default is used."""
        self.assertEqual(self.config.data_dir, default_data_dir())

    def test_sampleMatchesDataclassDefaults(self) -> None:
        """Loading no file at all gives the same settings as the sample file."""
        bare = load_master_config(None, {})
        for attribute in (
            "workers",
            "log_memory_entries",
            "update_interval",
            "listen",
            "worker_listen",
            "hostnames",
            "bcrypt_cost",
            "starting_cash_cents",
            "max_order_quantity",
            "session_lifetime",
            "remember_lifetime",
            "session_idle_timeout",
            "remember_idle_timeout",
            "login_failures_allowed",
            "login_delay",
            "login_max_delay",
            "registrations_per_address_per_hour",
            "price_seed",
            "data_dir",
            "settlement_chunk_orders",
            "sqlite_cache_mib",
            "sqlite_wal_autocheckpoint",
        ):
            self.assertEqual(getattr(bare, attribute), getattr(self.config, attribute), attribute)
        self.assertGreaterEqual(len(bare.assets), 20)

    def test_everyKeyDocumented(self) -> None:
        """Every accepted key is mentioned in the sample file."""
        with open(SAMPLE_CONFIG, encoding="utf-8") as f:
            text = f.read()
        for key in KEYS:
            self.assertIn(key, text)


class DefaultDataDirTests(SynchronousTestCase):
    """
    L{default_data_dir} follows the XDG base directory convention.
    """

    def setUp(self) -> None:
        saved = dict(os.environ)

        def restore() -> None:
            os.environ.clear()
            os.environ.update(saved)

        self.addCleanup(restore)

    def test_xdgDataHome(self) -> None:
        """C{$XDG_DATA_HOME} is honoured."""
        os.environ["XDG_DATA_HOME"] = "/srv/data"
        self.assertEqual(default_data_dir(), "/srv/data/papertrader")

    def test_home(self) -> None:
        """Without C{$XDG_DATA_HOME}, C{~/.local/share} is used."""
        os.environ.pop("XDG_DATA_HOME", None)
        os.environ["HOME"] = "/home/someone"
        self.assertEqual(default_data_dir(), "/home/someone/.local/share/papertrader")


class LoadMasterConfigTests(ConfigTestMixin, SynchronousTestCase):
    """
    L{load_master_config} applies overrides, resolves paths and reports every problem at once.
    """

    def test_overridesWin(self) -> None:
        """Command-line overrides replace the file's values and are validated the same way."""
        config = load_master_config(
            SAMPLE_CONFIG,
            {
                "update_interval": "5",
                "workers": "3",
                "bcrypt_cost": "4",
                "starting_cash": "250.50",
                "hostnames": "a.example, 10.0.0.1,",
                "price_seed": "42",
                "listen": "tcp6:3000",
            },
        )
        self.assertEqual(config.update_interval, 5.0)
        self.assertEqual(config.workers, 3)
        self.assertEqual(config.bcrypt_cost, 4)
        self.assertEqual(config.starting_cash_cents, 25_050)
        self.assertEqual(config.hostnames, ("a.example", "10.0.0.1"))
        self.assertEqual(config.price_seed, 42)
        self.assertEqual(config.listen, "tcp6:3000")
        self.assertEqual(config.worker_listen, "tcp:2049:interface=127.0.0.1")

    def test_noneOverridesIgnored(self) -> None:
        """An override of C{None} (an option not given) leaves the file's value alone."""
        path = self.config_file("workers = 7\n")
        config = load_master_config(path, {"workers": None, "update_interval": None})
        self.assertEqual(config.workers, 7)
        self.assertEqual(config.update_interval, 60.0)

    def test_overridesWithoutFile(self) -> None:
        """Overrides apply when no configuration file is given."""
        config = load_master_config(None, {"workers": "0"})
        self.assertEqual(config.workers, 0)

    def test_keysCaseInsensitive(self) -> None:
        """INI keys are matched case-insensitively."""
        config = load_master_config(self.config_file("Workers = 5\n"), {})
        self.assertEqual(config.workers, 5)

    def test_relativePathsAgainstConfigFolder(self) -> None:
        """Relative C{assets} and C{data_dir} are taken relative to the file's folder, not the cwd."""
        folder = self.folder()
        self.write(os.path.join(folder, "lists", "mine.csv"), ASSETS_CSV)
        path = self.write(
            os.path.join(folder, "conf.ini"), "[papertrader]\nassets = lists/mine.csv\ndata_dir = state\n"
        )
        self.assertNotEqual(os.getcwd(), folder)
        config = load_master_config(path, {})
        self.assertEqual(config.assets_file, os.path.join(folder, "lists", "mine.csv"))
        self.assertEqual(sorted(config.assets), ["AAPL", "KO"])
        self.assertEqual(config.data_dir, os.path.join(folder, "state"))
        self.assertFalse(os.path.exists(config.data_dir))

    def test_relativeConfigPath(self) -> None:
        """A configuration file given by a relative path still resolves its paths against its folder."""
        folder = self.mktemp()
        self.write(os.path.join(folder, "assets.csv"), ASSETS_CSV)
        path = self.write(os.path.join(folder, "p.ini"), "[papertrader]\nassets = assets.csv\ndata_dir = d\n")
        self.assertFalse(os.path.isabs(path))
        config = load_master_config(path, {})
        self.assertEqual(config.assets_file, os.path.abspath(os.path.join(folder, "assets.csv")))
        self.assertEqual(config.data_dir, os.path.abspath(os.path.join(folder, "d")))

    def test_absolutePathsKept(self) -> None:
        """Absolute paths in the file are used as they are."""
        elsewhere = self.folder()
        assets = self.write(os.path.join(elsewhere, "a.csv"), ASSETS_CSV)
        path = self.config_file(f"data_dir = {elsewhere}\n", assets=None)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"assets = {assets}\n")
        config = load_master_config(path, {})
        self.assertEqual(config.assets_file, assets)
        self.assertEqual(config.data_dir, elsewhere)

    def test_homeExpanded(self) -> None:
        """A C{~} in C{data_dir} is the user's home folder."""
        config = load_master_config(self.config_file("data_dir = ~/pt-data\n"), {})
        self.assertEqual(config.data_dir, os.path.join(os.path.expanduser("~"), "pt-data"))

    def test_unknownKey(self) -> None:
        """A key the program does not know is refused, naming it."""
        problems = self.problems(self.config_file("colour = blue\n"))
        self.assertEqual(len(problems), 1)
        self.assertIn("unknown key 'colour'", problems[0])

    def test_dashedKeyUnknown(self) -> None:
        """Keys use underscores in the file; the dashed option spelling is refused."""
        problems = self.problems(self.config_file("update-interval = 5\n"))
        self.assertIn("unknown key 'update-interval'", problems[0])

    def test_unknownSection(self) -> None:
        """A section other than C{[papertrader]} is refused, naming it."""
        path = self.config_file("workers = 1\n[extras]\nworkers = 2\n")
        problems = self.problems(path)
        self.assertEqual(len(problems), 1)
        self.assertIn("unknown section [extras]", problems[0])
        self.assertIn(path, problems[0])

    def test_missingSection(self) -> None:
        """A file without the C{[papertrader]} section is refused."""
        path = self.write(os.path.join(self.folder(), "p.ini"), "[other]\nworkers = 1\n")
        problems = self.problems(path)
        self.assertEqual(problems, [f"{path}: no [papertrader] section"])

    def test_unknownOverride(self) -> None:
        """An override for an unknown setting is refused."""
        problems = self.problems(SAMPLE_CONFIG, {"colour": "blue"})
        self.assertEqual(problems, ["unknown setting 'colour'"])

    def test_everyBadValueReportedTogether(self) -> None:
        """All bad values, unknown keys and sections end up in one L{ConfigError}."""
        path = self.config_file(
            "workers = many\n"
            "log_memory_entries = 0\n"
            "update_interval = -1\n"
            "listen = http://localhost\n"
            "hostnames = ,\n"
            "bcrypt_cost = 3\n"
            "starting_cash = 1.001\n"
            "max_order_quantity = 0\n"
            "session_lifetime = nan\n"
            "remember_lifetime = inf\n"
            "session_idle_timeout = 0\n"
            "remember_idle_timeout = soon\n"
            "login_failures_allowed = 0\n"
            "login_delay = -1\n"
            "login_max_delay = nan\n"
            "price_seed = abc\n"
            "colour = blue\n"
            "[extras]\n"
        )
        problems = self.problems(path, {"worker_listen": "2049"})
        expected = [
            "workers",
            "log_memory_entries",
            "update_interval",
            "listen",
            "worker_listen",
            "hostnames",
            "bcrypt_cost",
            "starting_cash",
            "max_order_quantity",
            "session_lifetime",
            "remember_lifetime",
            "session_idle_timeout",
            "remember_idle_timeout",
            "login_failures_allowed",
            "login_delay",
            "login_max_delay",
            "price_seed",
        ]
        for key in expected:
            self.assertTrue(any(p.startswith(key + ": ") for p in problems), f"{key} not in {problems}")
        self.assertTrue(any("unknown key 'colour'" in p for p in problems), problems)
        self.assertTrue(any("unknown section [extras]" in p for p in problems), problems)
        self.assertEqual(len(problems), len(expected) + 2, problems)

    def test_sessionAndLoginOverrides(self) -> None:
        """The idle timeouts and login throttling settings can be overridden like any other."""
        config = load_master_config(
            SAMPLE_CONFIG,
            {
                "session_idle_timeout": "600",
                "remember_idle_timeout": "86400",
                "login_failures_allowed": "3",
                "login_delay": "0.5",
                "login_max_delay": "60",
            },
        )
        self.assertEqual(
            (
                config.session_idle_timeout,
                config.remember_idle_timeout,
                config.login_failures_allowed,
                config.login_delay,
                config.login_max_delay,
            ),
            (600.0, 86400.0, 3, 0.5, 60.0),
        )

    def test_loginMaxDelayBelowDelay(self) -> None:
        """A maximum login delay shorter than the first delay is refused, naming both."""
        problems = self.problems(SAMPLE_CONFIG, {"login_delay": "10", "login_max_delay": "5"})
        self.assertEqual(problems, ["login_max_delay: must be at least login_delay (10 s), got 5"])

    def test_heartbeatWithinHandshake(self) -> None:
        """Heartbeats must come more often than the handshake timeout.

        A worker taking over a name waits one heartbeat interval for the old
        connection's answer, inside its handshake time; a longer interval would
        time every such worker out.
        """
        problems = self.problems(SAMPLE_CONFIG, {"handshake_timeout": "10", "heartbeat_interval": "10"})
        self.assertEqual(problems, ["heartbeat_interval: must be shorter than handshake_timeout (10 s), got 10"])

    def test_rangeMessages(self) -> None:
        """Out-of-range numbers say the allowed range and the value given."""
        problems = self.problems(SAMPLE_CONFIG, {"workers": "65", "bcrypt_cost": "32"})
        self.assertIn("workers: must be between 0 and 64, got 65", problems)
        self.assertIn("bcrypt_cost: must be between 4 and 31, got 32", problems)

    def test_rangeLimitsAccepted(self) -> None:
        """The limits of each range are themselves accepted."""
        config = load_master_config(SAMPLE_CONFIG, {"workers": "64", "bcrypt_cost": "31"})
        self.assertEqual((config.workers, config.bcrypt_cost), (64, 31))
        config = load_master_config(SAMPLE_CONFIG, {"workers": "0", "bcrypt_cost": "4"})
        self.assertEqual((config.workers, config.bcrypt_cost), (0, 4))

    def test_zeroSecondsRefused(self) -> None:
        """An update interval of zero seconds is refused."""
        problems = self.problems(SAMPLE_CONFIG, {"update_interval": "0"})
        self.assertEqual(len(problems), 1)
        self.assertTrue(problems[0].startswith("update_interval: "), problems)

    def test_fractionalSecondsAccepted(self) -> None:
        """Intervals may be fractions of a second."""
        config = load_master_config(SAMPLE_CONFIG, {"update_interval": "0.5"})
        self.assertEqual(config.update_interval, 0.5)

    def test_missingConfigFile(self) -> None:
        """A configuration file that does not exist is named in the error."""
        path = os.path.join(self.folder(), "absent.ini")
        problems = self.problems(path)
        self.assertEqual(len(problems), 1)
        self.assertIn(f"cannot read configuration {path}", problems[0])

    def test_unreadableConfigFile(self) -> None:
        """A path that cannot be read as a file (here a folder) is named in the error."""
        path = self.folder()
        problems = self.problems(path)
        self.assertEqual(len(problems), 1)
        self.assertIn(f"cannot read configuration {path}", problems[0])

    def test_notUtf8ConfigFile(self) -> None:
        """A configuration file that is not UTF-8 is refused, naming it."""
        path = os.path.join(self.folder(), "latin1.ini")
        with open(path, "wb") as f:
            f.write(b"[papertrader]\n# caf\xe9\nworkers = 1\n")
        problems = self.problems(path)
        self.assertIn(f"cannot read configuration {path}", problems[0])

    def test_malformedConfigFile(self) -> None:
        """A file that is not INI at all is refused, naming it."""
        path = self.write(os.path.join(self.folder(), "p.ini"), "workers = 1\n")
        problems = self.problems(path)
        self.assertIn(f"cannot read configuration {path}", problems[0])

    def test_missingAssetsFile(self) -> None:
        """An asset list that does not exist is named in the error."""
        path = self.config_file("assets = nowhere.csv\n", assets=None)
        problems = self.problems(path)
        missing = os.path.join(os.path.dirname(path), "nowhere.csv")
        self.assertEqual(len(problems), 1)
        self.assertIn(f"assets: cannot read {missing}", problems[0])

    def test_assetProblemsReportedWithOthers(self) -> None:
        """Problems of the asset list are reported together with bad settings."""
        path = self.config_file("workers = -1\n", assets="symbol,name\nAAPL,Apple\n")
        problems = self.problems(path)
        self.assertEqual(len(problems), 2, problems)
        self.assertTrue(problems[0].startswith("workers: "), problems)
        self.assertIn("missing column(s)", problems[1])
        self.assertIn(os.path.join(os.path.dirname(path), "assets.csv"), problems[1])

    def test_dataDirIsAFile(self) -> None:
        """A C{data_dir} that exists as a regular file is refused."""
        folder = self.folder()
        self.write(os.path.join(folder, "occupied"), "not a folder")
        problems = self.problems(self.config_file(f"data_dir = {folder}/occupied\n"))
        self.assertEqual(problems, [f"data_dir: {folder}/occupied exists and is not a directory"])

    def test_dataDirIsAFolder(self) -> None:
        """An existing folder is a fine C{data_dir}."""
        folder = self.folder()
        config = load_master_config(self.config_file(f"data_dir = {folder}\n"), {})
        self.assertEqual(config.data_dir, folder)

    def test_configUnchanged(self) -> None:
        """The loaded configuration is immutable."""
        config = load_master_config(SAMPLE_CONFIG, {})
        self.assertRaises(attr.exceptions.FrozenInstanceError, setattr, config, "workers", 2)


class PriceSourceConfigTests(ConfigTestMixin, SynchronousTestCase):
    """
    The market data keys: the source, its replay file or provider, and their checks.
    """

    def test_sampleDefaults(self) -> None:
        """The sample says the simulated market and the dataclass defaults for every price key."""
        sample, bare = load_master_config(SAMPLE_CONFIG, {}), load_master_config(None, {})
        self.assertEqual(sample.price_source, "simulated")
        for attribute in (
            "price_source",
            "price_replay_file",
            "price_replay_loop",
            "price_api_url",
            "price_api_key",
            "price_concurrency",
            "price_timeout",
            "price_requests_per_minute",
            "price_requests_per_day",
        ):
            self.assertEqual(getattr(sample, attribute), getattr(bare, attribute), attribute)
        self.assertIsNone(sample.replay)

    def test_replayFileBesideConfig(self) -> None:
        """A relative replay file is the one next to the configuration file; it is parsed at loading."""
        path = self.config_file("price_source = replay\nprice_replay_file = prices.csv\nprice_replay_loop = yes\n")
        replay_file = self.write(
            os.path.join(os.path.dirname(path), "prices.csv"), "time,symbol,price\n2024-01-02,AAPL,185.64\n"
        )
        config = load_master_config(path, {})
        self.assertEqual(config.price_replay_file, replay_file)
        self.assertTrue(config.price_replay_loop)
        self.assertEqual(dict(config.replay.steps[0].prices), {"AAPL": 18_564})

    def test_replayNeedsFile(self) -> None:
        """price_source = replay without a file is refused."""
        problems = self.problems(None, {"price_source": "replay"})
        self.assertEqual(problems, ["price_replay_file: price_source = replay needs a CSV file of prices"])

    def test_replayProblemsReportedWithOthers(self) -> None:
        """The replay file's problems come with the other settings' problems."""
        path = self.config_file("price_source = replay\nprice_replay_file = prices.csv\nworkers = many\n")
        self.write(os.path.join(os.path.dirname(path), "prices.csv"), "time,symbol,price\n2024-01-02,AAPL,-1\n")
        problems = self.problems(path)
        self.assertEqual(len(problems), 2, problems)
        self.assertTrue(problems[0].startswith("workers: "), problems)
        self.assertTrue(problems[1].endswith("prices.csv:2: price: price must be positive, got -1"), problems)

    def test_providerNeedsKey(self) -> None:
        """A provider without an API key is refused, naming where a key may be given."""
        exc = self.assertRaises(ConfigError, load_master_config, None, {"price_source": "finnhub"}, {})
        self.assertEqual(
            exc.problems,
            [
                "price_api_key: price_source = finnhub needs an API key: set price_api_key or the environment "
                "variable PAPERTRADER_PRICE_API_KEY or FINNHUB_API_KEY"
            ],
        )
        exc = self.assertRaises(
            ConfigError, load_master_config, None, {"price_source": "alphavantage"}, {"FINNHUB_API_KEY": "f"}
        )
        self.assertIn("ALPHAVANTAGE_API_KEY", exc.problems[0])

    def test_keyFromEnvironment(self) -> None:
        """The configured key wins; then PAPERTRADER_PRICE_API_KEY; then the provider's own variable."""
        finnhub = {"price_source": "finnhub"}
        both = {"PAPERTRADER_PRICE_API_KEY": "general", "FINNHUB_API_KEY": "specific"}
        self.assertEqual(load_master_config(None, finnhub, {"FINNHUB_API_KEY": "specific"}).price_api_key, "specific")
        self.assertEqual(load_master_config(None, finnhub, both).price_api_key, "general")
        configured = load_master_config(None, {**finnhub, "price_api_key": "configured"}, both)
        self.assertEqual(configured.price_api_key, "configured")
        self.assertNotIn("configured", repr(configured))

    def test_timeoutWithinInterval(self) -> None:
        """A provider's price_timeout must be shorter than update_interval."""
        problems = self.problems(
            None, {"price_source": "finnhub", "price_api_key": "k", "update_interval": "5", "price_timeout": "5"}
        )
        self.assertEqual(problems, ["price_timeout: must be shorter than update_interval (5 s), got 5"])
        config = load_master_config(
            None, {"price_source": "finnhub", "price_api_key": "k", "update_interval": "5", "price_timeout": "4.5"}
        )
        self.assertEqual(config.price_timeout, 4.5)

    def test_badValues(self) -> None:
        """Every bad market data value is reported together."""
        problems = self.problems(
            None,
            {
                "price_source": "yahoo",
                "price_replay_loop": "maybe",
                "price_api_url": "ftp://example.com",
                "price_concurrency": "0",
                "price_timeout": "0",
                "price_requests_per_minute": "-1",
                "price_requests_per_day": "many",
            },
        )
        self.assertEqual(
            [p.split(":")[0] for p in problems],
            [
                "price_source",
                "price_replay_loop",
                "price_api_url",
                "price_concurrency",
                "price_timeout",
                "price_requests_per_minute",
                "price_requests_per_day",
            ],
        )
        self.assertIn("expected one of simulated, replay, finnhub, alphavantage, got 'yahoo'", problems[0])

    def test_limits(self) -> None:
        """Empty limits mean the provider's defaults; 0 means none."""
        config = load_master_config(
            None,
            {
                "price_source": "alphavantage",
                "price_api_key": "k",
                "price_requests_per_minute": "",
                "price_requests_per_day": "0",
                "price_concurrency": "2",
                "price_api_url": "http://127.0.0.1:8080",
            },
        )
        self.assertEqual(
            (config.price_requests_per_minute, config.price_requests_per_day, config.price_concurrency),
            (None, 0, 2),
        )
        self.assertEqual(config.price_api_url, "http://127.0.0.1:8080")
