"""``twistd papertrader-master``: command-line options and service wiring."""

from __future__ import annotations

import gc
import os

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IService
from twisted.python import usage

from papertrader.config import KEYS, load_master_config
from papertrader.errors import ConfigError
from papertrader.eventlog import BufferedFileLogObserver, EventLogService
from papertrader.master.admin import MAX_ADMIN_CONNECTIONS, AdminFactory
from papertrader.master.directory import DirectoryFactory
from papertrader.master.protocol import MasterFactory
from papertrader.master.service import SESSION_SWEEP_INTERVAL, MasterService, timeouts
from papertrader.master.workers import LocalWorkers

# Net new tracked objects between young garbage collections (Python's default: 700).  Settling a
# tick keeps two objects per order alive until the tick is pushed (100,000 orders: 200,000), and
# with the default the collector passes over them again and again as they pile up: building them
# took twice as long.  With this, short-lived objects are freed by reference counting first.
GC_YOUNG_THRESHOLD = 50_000


class Options(usage.Options):
    """Options of the master; each setting of the configuration file can be overridden."""

    synopsis = "[--config FILE] [--SETTING VALUE ...]"
    longdesc = (
        "Prices come from --price-source: simulated (default), replay (--price-replay-file CSV), finnhub or "
        "alphavantage (API key in --price-api-key or the environment: PAPERTRADER_PRICE_API_KEY, FINNHUB_API_KEY, "
        "ALPHAVANTAGE_API_KEY). With a provider the master warns at start when the asset list and "
        "--update-interval need more requests than its quota (--price-requests-per-minute, "
        "--price-requests-per-day; empty: the free plan's), says by how much and the shortest interval that fits, "
        "and starts all the same: requests beyond the quota are not sent. etc/papertrader.ini documents every setting."
    )
    optParameters = [["config", "c", None, "Configuration file (see etc/papertrader.ini)."]] + [
        [key.replace("_", "-"), None, None, f"Override '{key}' of the configuration file."]
        for key in KEYS
    ]

    def postOptions(self) -> None:
        overrides = {key: self[key.replace("_", "-")] for key in KEYS}
        try:
            self.config = load_master_config(self["config"], overrides)
        except ConfigError as e:
            raise usage.UsageError(
                "invalid configuration:\n  " + "\n  ".join(e.problems)
            ) from None


def makeService(options: Options) -> IService:
    """Wire the master: event log first (it starts first and stops last), then the listeners (workers,
    worker directory, admin socket), local workers, loops."""
    from twisted.internet import reactor

    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    config = options.config
    master = MasterService(config, reactor)
    events = BufferedFileLogObserver(
        os.path.join(config.data_dir, "logs", "master-events.log"),
        capacity=config.log_memory_entries,
        run_in_thread=reactor.callInThread,
    )
    EventLogService(events, reactor).setServiceParent(master)
    StreamServerEndpointService(
        master.worker_endpoint(),
        MasterFactory(
            master.new_locator, clock=reactor, timeouts=timeouts(config), max_connections=config.max_connections
        ),
    ).setServiceParent(master)
    StreamServerEndpointService(
        master.directory_endpoint(),
        DirectoryFactory(
            master.new_directory_locator,
            clock=reactor,
            timeouts=timeouts(config),
            max_connections=config.max_connections,
        ),
    ).setServiceParent(master)
    StreamServerEndpointService(
        master.admin_endpoint(),
        AdminFactory(
            master.new_admin_locator, clock=reactor, timeouts=timeouts(config), max_connections=MAX_ADMIN_CONNECTIONS
        ),
    ).setServiceParent(master)
    if config.workers:
        LocalWorkers(reactor, master.local_worker_commands).setServiceParent(master)
    for interval, job in ((config.update_interval, master.tick), (SESSION_SWEEP_INTERVAL, master.sweep_sessions)):
        loop = TimerService(interval, job)
        loop.clock = reactor
        loop.setServiceParent(master)
    return master
