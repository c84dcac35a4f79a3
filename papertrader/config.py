"""The deployment's configuration (spec 2.3) as one validated object.

Values come from an INI file (section ``[papertrader]``, see
``etc/papertrader.ini``) and may each be overridden on the command line.
Every problem is collected and reported together; unknown keys are refused.
"""

from __future__ import annotations

import configparser
import datetime
import os
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attr

from papertrader.assets import Asset, parse_assets
from papertrader.errors import ConfigError
from papertrader.market_calendar import (
    DEFAULT_TIME_ZONE,
    TradingCalendar,
    parse_days,
    parse_holidays,
    parse_hours,
    parse_time_zone,
)
from papertrader.money import parse_amount

if TYPE_CHECKING:
    from papertrader.master.sources import Replay

SECTION = "papertrader"
PRICE_SOURCES = ("simulated", "replay", "finnhub", "alphavantage")
HTTP_SOURCES = ("finnhub", "alphavantage")
# Price sources whose market runs around the clock unless market_always_open says otherwise.
ALWAYS_OPEN_SOURCES = ("simulated", "replay")


def default_data_dir() -> str:
    """Where a deployment keeps its database and certificates unless told otherwise."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "papertrader")


def default_assets_file() -> str:
    """The sample asset list: installed under ``share/papertrader`` or in a source checkout."""
    installed = os.path.join(sys.prefix, "share", "papertrader", "assets.csv")
    if os.path.exists(installed):
        return installed
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc", "assets.csv")


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class MasterConfig:
    """Everything a master (and the local workers it starts) needs to run."""

    assets: Mapping[str, Asset]
    assets_file: str
    workers: int = 1
    log_memory_entries: int = 1000
    update_interval: float = 60.0
    listen: str = "tcp:2048:interface=127.0.0.1"
    worker_listen: str = "tcp:2049:interface=127.0.0.1"
    directory_listen: str = "tcp:2050:interface=127.0.0.1"
    data_dir: str = attr.Factory(default_data_dir)
    database: str = ""
    hostnames: tuple[str, ...] = ("localhost", "127.0.0.1")
    bcrypt_cost: int = 12
    starting_cash_cents: int = 10_000_000
    max_order_quantity: int = 100_000
    session_lifetime: float = 24 * 3600.0
    remember_lifetime: float = 30 * 24 * 3600.0
    session_idle_timeout: float = 3600.0
    remember_idle_timeout: float = 7 * 24 * 3600.0
    login_failures_allowed: int = 5
    login_address_failures_allowed: int = 20
    login_delay: float = 1.0
    login_max_delay: float = 900.0
    registrations_per_address_per_hour: int = 20
    price_seed: int | None = None
    handshake_timeout: float = 30.0
    idle_timeout: float = 300.0
    logged_in_idle_timeout: float = 3600.0
    heartbeat_interval: float = 10.0
    nonce_lifetime: float = 30.0
    max_connections: int = 10_000
    hashing_processes: int = 0
    hashing_queue: int = 32
    hashing_nice: int = 10
    # Same defaults as CHUNK_ORDERS, SQLITE_CACHE_MIB and SQLITE_WAL_AUTOCHECKPOINT in papertrader.master.database.
    settlement_chunk_orders: int = 10_000
    sqlite_cache_mib: int = 256
    sqlite_wal_autocheckpoint: int = 16_000
    # Where prices come from (spec 3.1.6): see etc/papertrader.ini and papertrader.master.sources.
    price_source: str = "simulated"
    price_replay_file: str = ""
    price_replay_loop: bool = False
    # The parsed price_replay_file (with price_source = replay).
    replay: Replay | None = attr.ib(default=None, repr=False, eq=False)
    price_api_url: str = ""
    # From the configuration or the environment; never shown (nor logged).
    price_api_key: str = attr.ib(default="", repr=False)
    # None: the provider's default (see papertrader.master.sources).
    price_concurrency: int | None = None
    price_timeout: float = 10.0
    # None: the provider's free plan's limit; 0: no limit.
    price_requests_per_minute: int | None = None
    price_requests_per_day: int | None = None
    # The trading calendar (see papertrader.market_calendar and etc/papertrader.ini).
    market_hours: tuple[datetime.time, datetime.time] = (datetime.time(9, 30), datetime.time(16, 0))
    market_timezone: str = DEFAULT_TIME_ZONE
    market_days: frozenset[int] = frozenset(range(5))
    # market_holidays and the dates of market_holidays_file together.
    market_holidays: frozenset[datetime.date] = frozenset()
    market_holidays_file: str = ""
    # None: around the clock for a simulated or replayed market, the calendar for a provider's prices.
    market_always_open: bool | None = None

    def calendar(self) -> TradingCalendar:
        """The deployment's trading calendar, from the market_* settings."""
        always_open = self.market_always_open
        if always_open is None:
            always_open = self.price_source in ALWAYS_OPEN_SOURCES
        return TradingCalendar(
            time_zone=parse_time_zone(self.market_timezone),
            opening=self.market_hours[0],
            closing=self.market_hours[1],
            days=self.market_days,
            holidays=self.market_holidays,
            always_open=always_open,
        )


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def positive_seconds(text: str) -> float:
    """A positive, finite number of seconds; ValueError if not."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"must be a positive number of seconds, got {text!r}")
    return value


def check_endpoint(text: str) -> str:
    """An endpoint string PaperTrader can listen on (TLS is added on top); ValueError if not."""
    if not text.startswith(("tcp:", "tcp6:", "unix:")):
        raise ValueError(f"expected a tcp:, tcp6: or unix: endpoint string, got {text!r}")
    return text


def _hostnames(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ValueError("at least one hostname is needed")
    return names


def _database(text: str) -> str:
    text = text.strip()
    if text and not text.startswith(("sqlite:", "postgresql://", "postgres://")):
        raise ValueError("expected empty (SQLite in data_dir), sqlite:///PATH or postgresql://...")
    return text


def _seed(text: str) -> int | None:
    return None if text.strip() == "" else int(text)


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"expected yes or no, got {text!r}")


def _price_source(text: str) -> str:
    value = text.strip().lower()
    if value not in PRICE_SOURCES:
        raise ValueError(f"expected one of {', '.join(PRICE_SOURCES)}, got {text!r}")
    return value


def _http_url(text: str) -> str:
    text = text.strip()
    if text and not text.startswith(("http://", "https://")):
        raise ValueError(f"expected empty (the provider's) or an http:// or https:// URL, got {text!r}")
    return text


def _time_zone(text: str) -> str:
    """An IANA time zone name the system knows (kept as the name); ValueError if not."""
    parse_time_zone(text)
    return text.strip()


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse``, but empty text means None (the default)."""
    return lambda text: None if text.strip() == "" else parse(text)


# key -> (attribute, parser); keys are the INI names, options use dashes.
_PARSERS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "assets": ("assets_file", str),
    "workers": ("workers", _int_in(0, 64)),
    "log_memory_entries": ("log_memory_entries", _int_in(1, 10_000_000)),
    "update_interval": ("update_interval", positive_seconds),
    "listen": ("listen", check_endpoint),
    "worker_listen": ("worker_listen", check_endpoint),
    "directory_listen": ("directory_listen", check_endpoint),
    "data_dir": ("data_dir", str),
    "database": ("database", _database),
    "hostnames": ("hostnames", _hostnames),
    "bcrypt_cost": ("bcrypt_cost", _int_in(4, 31)),
    "starting_cash": ("starting_cash_cents", parse_amount),
    "max_order_quantity": ("max_order_quantity", _int_in(1, 1_000_000_000)),
    "session_lifetime": ("session_lifetime", positive_seconds),
    "remember_lifetime": ("remember_lifetime", positive_seconds),
    "session_idle_timeout": ("session_idle_timeout", positive_seconds),
    "remember_idle_timeout": ("remember_idle_timeout", positive_seconds),
    "login_failures_allowed": ("login_failures_allowed", _int_in(1, 1000)),
    "login_address_failures_allowed": ("login_address_failures_allowed", _int_in(1, 100_000)),
    "login_delay": ("login_delay", positive_seconds),
    "login_max_delay": ("login_max_delay", positive_seconds),
    "registrations_per_address_per_hour": ("registrations_per_address_per_hour", _int_in(1, 100_000)),
    "price_seed": ("price_seed", _seed),
    "handshake_timeout": ("handshake_timeout", positive_seconds),
    "idle_timeout": ("idle_timeout", positive_seconds),
    "logged_in_idle_timeout": ("logged_in_idle_timeout", positive_seconds),
    "heartbeat_interval": ("heartbeat_interval", positive_seconds),
    "nonce_lifetime": ("nonce_lifetime", positive_seconds),
    "max_connections": ("max_connections", _int_in(1, 1_000_000)),
    "hashing_processes": ("hashing_processes", _int_in(0, 256)),
    "hashing_queue": ("hashing_queue", _int_in(1, 100_000)),
    "hashing_nice": ("hashing_nice", _int_in(0, 19)),
    "settlement_chunk_orders": ("settlement_chunk_orders", _int_in(1, 1_000_000)),
    "sqlite_cache_mib": ("sqlite_cache_mib", _int_in(1, 1_048_576)),
    "sqlite_wal_autocheckpoint": ("sqlite_wal_autocheckpoint", _int_in(100, 10_000_000)),
    "price_source": ("price_source", _price_source),
    "price_replay_file": ("price_replay_file", str),
    "price_replay_loop": ("price_replay_loop", _boolean),
    "price_api_url": ("price_api_url", _http_url),
    "price_api_key": ("price_api_key", str.strip),
    "price_concurrency": ("price_concurrency", _optional(_int_in(1, 100))),
    "price_timeout": ("price_timeout", positive_seconds),
    "price_requests_per_minute": ("price_requests_per_minute", _optional(_int_in(0, 1_000_000))),
    "price_requests_per_day": ("price_requests_per_day", _optional(_int_in(0, 100_000_000))),
    "market_hours": ("market_hours", parse_hours),
    "market_timezone": ("market_timezone", _time_zone),
    "market_days": ("market_days", parse_days),
    "market_holidays": ("market_holidays", lambda text: parse_holidays([text])),
    "market_holidays_file": ("market_holidays_file", str.strip),
    "market_always_open": ("market_always_open", _optional(_boolean)),
}

KEYS = tuple(_PARSERS)


def load_master_config(
    path: str | None, overrides: Mapping[str, str | None], environ: Mapping[str, str] | None = None
) -> MasterConfig:
    """Read ``path`` (if any), apply non-None ``overrides``, validate, return the config.

    Raises `ConfigError` listing every problem. Relative paths in the file are
    taken relative to the file's folder.  A price provider's API key not
    configured is taken from ``environ`` (default: the process's environment).
    A replay file is read and parsed here, before the reactor runs.
    """
    problems: list[str] = []
    raw: dict[str, str] = {}
    base = os.getcwd()
    if path is not None:
        parser = configparser.ConfigParser(interpolation=None)
        try:
            with open(path, encoding="utf-8") as f:
                parser.read_file(f)
        except (OSError, UnicodeDecodeError, configparser.Error) as e:
            raise ConfigError([f"cannot read configuration {path}: {e}"]) from None
        if not parser.has_section(SECTION):
            raise ConfigError([f"{path}: no [{SECTION}] section"])
        for section in parser.sections():
            if section != SECTION:
                problems.append(f"{path}: unknown section [{section}]")
        base = os.path.dirname(os.path.abspath(path))
        for key, value in parser.items(SECTION):
            if key not in _PARSERS:
                problems.append(f"{path}: unknown key {key!r}")
            else:
                raw[key] = value
        for key in ("assets", "data_dir", "price_replay_file", "market_holidays_file"):
            if key in raw and (raw[key].strip() or key in ("assets", "data_dir")):
                raw[key] = os.path.join(base, os.path.expanduser(raw[key]))
    for key, value in overrides.items():
        if key not in _PARSERS:
            problems.append(f"unknown setting {key!r}")
        elif value is not None:
            raw[key] = value

    values: dict[str, Any] = {}
    for key, text in raw.items():
        attribute, parse = _PARSERS[key]
        try:
            values[attribute] = parse(text)
        except ValueError as e:
            problems.append(f"{key}: {e}")

    assets_file = values.pop("assets_file", None) or default_assets_file()
    assets: dict[str, Asset] = {}
    try:
        with open(assets_file, encoding="utf-8", newline="") as f:
            assets, asset_problems = parse_assets(f.readlines(), assets_file)
        problems.extend(asset_problems)
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"assets: cannot read {assets_file}: {e}")

    delay, max_delay = values.get("login_delay", 1.0), values.get("login_max_delay", 900.0)
    if max_delay < delay:
        problems.append(f"login_max_delay: must be at least login_delay ({delay:g} s), got {max_delay:g}")
    handshake, heartbeat = values.get("handshake_timeout", 30.0), values.get("heartbeat_interval", 10.0)
    if heartbeat >= handshake:
        # A worker taking over a name waits one interval for the old connection's ping, within its handshake.
        problems.append(
            f"heartbeat_interval: must be shorter than handshake_timeout ({handshake:g} s), got {heartbeat:g}"
        )
    problems.extend(_check_price_source(values, assets, os.environ if environ is None else environ))
    problems.extend(_read_holidays(values))
    if "data_dir" in values:
        values["data_dir"] = os.path.abspath(os.path.expanduser(values["data_dir"]))
        if os.path.exists(values["data_dir"]) and not os.path.isdir(values["data_dir"]):
            problems.append(f"data_dir: {values['data_dir']} exists and is not a directory")
    if problems:
        raise ConfigError(problems)
    return MasterConfig(assets=assets, assets_file=os.path.abspath(assets_file), **values)


def _read_holidays(values: dict[str, Any]) -> list[str]:
    """Add the dates of ``market_holidays_file`` (if any) to ``market_holidays``; the problems."""
    path = values.get("market_holidays_file", "")
    if not path:
        return []
    values["market_holidays_file"] = path = os.path.abspath(os.path.expanduser(path))
    try:
        with open(path, encoding="utf-8") as f:
            dates = parse_holidays(f.readlines())
    except (OSError, UnicodeDecodeError) as e:
        return [f"market_holidays_file: cannot read {path}: {e}"]
    except ValueError as e:
        return [f"market_holidays_file: {path}: {e}"]
    values["market_holidays"] = values.get("market_holidays", frozenset()) | dates
    return []


def _check_price_source(values: dict[str, Any], assets: Mapping[str, Asset], environ: Mapping[str, str]) -> list[str]:
    """Check the price source's settings (filling in ``values``: the replay, the API key); the problems."""
    problems: list[str] = []
    source = values.get("price_source", "simulated")
    if source == "replay":
        path = values.get("price_replay_file", "")
        if not path:
            problems.append("price_replay_file: price_source = replay needs a CSV file of prices")
        elif assets:
            from papertrader.master.sources import load_replay

            values["price_replay_file"] = path = os.path.abspath(os.path.expanduser(path))
            values["replay"], replay_problems = load_replay(path, assets)
            problems.extend(replay_problems)
    elif source in HTTP_SOURCES:
        from papertrader.master.sources import KEY_VARIABLES

        interval = values.get("update_interval", 60.0)
        timeout = values.get("price_timeout", 10.0)
        if timeout >= interval:
            # Each update's requests end before the next update asks again.
            problems.append(
                f"price_timeout: must be shorter than update_interval ({interval:g} s), got {timeout:g}"
            )

        if not values.get("price_api_key"):
            for variable in KEY_VARIABLES[source]:
                if environ.get(variable, "").strip():
                    values["price_api_key"] = environ[variable].strip()
                    break
            else:
                problems.append(
                    f"price_api_key: price_source = {source} needs an API key: set price_api_key or the "
                    f"environment variable {' or '.join(KEY_VARIABLES[source])}"
                )
    return problems
