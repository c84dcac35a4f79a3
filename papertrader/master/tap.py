"""``twistd papertrader-master``: command-line options and service wiring."""

from __future__ import annotations

import os

from twisted.application.service import IService
from twisted.python import usage

from papertrader.config import KEYS, load_master_config
from papertrader.errors import ConfigError
from papertrader.eventlog import BufferedFileLogObserver, EventLogService
from papertrader.master.service import MasterService


class Options(usage.Options):
    """Options of the master; each setting of the configuration file can be overridden."""

    synopsis = "[--config FILE] [--SETTING VALUE ...]"
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
    from twisted.internet import reactor

    config = options.config
    master = MasterService(config, reactor)
    events = BufferedFileLogObserver(
        os.path.join(config.data_dir, "logs", "master-events.log"),
        capacity=config.log_memory_entries,
        run_in_thread=reactor.callInThread,
    )
    EventLogService(events, reactor).setServiceParent(master)  # first child: starts first, stops last
    return master
