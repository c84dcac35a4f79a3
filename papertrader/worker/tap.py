"""``twistd papertrader-worker``: command-line options and service wiring."""

from __future__ import annotations

import gc
import os
import socket

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.python import usage

from papertrader import tls
from papertrader.config import check_endpoint, positive_seconds
from papertrader.eventlog import BufferedFileLogObserver, EventLogService
from papertrader.protocol import check_worker_address
from papertrader.wire import Timeouts
from papertrader.worker.clients import ClientFactory
from papertrader.worker.service import WorkerConfig, WorkerService


class Options(usage.Options):
    """Options of a worker."""

    optParameters = [
        ["name", "n", None, "This worker's name (default: the host name)."],
        ["master", "m", "localhost:2048", "The master's HOST:PORT; HOST must match its certificate."],
        ["listen", "l", "tcp:2049:interface=127.0.0.1", "Endpoint to listen for clients on (TLS added)."],
        ["ca", None, None, "The deployment's CA certificate (PEM)."],
        ["cert", None, None, "This worker's certificate (PEM), issued by the CA."],
        ["key", None, None, "This worker's private key (PEM)."],
        ["gnupg-home", None, None, "GnuPG home with this worker's OpenPGP key (default: $GNUPGHOME, ~/.gnupg)."],
        ["key-fingerprint", None, None, "Fingerprint of the key to sign with (default: the home's only secret key)."],
        ["address-file", None, None, "Write the HOST:PORT clients can reach this worker on here."],
        [
            "public-address",
            None,
            None,
            "The HOST:PORT clients reach this worker on, for the master's worker directory "
            "(default: the address it listens on; set it when that is not reachable as it is).",
        ],
        ["event-log", None, "papertrader-worker-events.log", "The event log file."],
        ["log-memory-entries", None, "1000", "Event log entries held in memory before they are written."],
        ["handshake-timeout", None, "30", "Seconds for the TLS handshake, then for the first command."],
        ["idle-timeout", None, "300", "Seconds a client connection without a session may stay silent."],
        ["logged-in-idle-timeout", None, "3600", "Seconds a logged-in client connection may stay silent."],
        ["max-connections", None, "10000", "Client connections held at once; past it, new ones are closed."],
    ]

    optFlags = [
        ["exit-with-stdin", None, "Stop when standard input closes (how a master's local workers end with it)."],
    ]

    def postOptions(self) -> None:
        problems = []
        try:
            host, port = tls.split_address(self["master"], 2048)
        except ValueError as e:
            problems.append(f"--master: {e}")
        try:
            check_endpoint(self["listen"])
        except ValueError as e:
            problems.append(f"--listen: {e}")
        if self["public-address"] is not None:
            try:
                check_worker_address(self["public-address"])
            except ValueError as e:
                problems.append(f"--public-address: {e}")
        gnupg_home = self["gnupg-home"] or os.environ.get("GNUPGHOME") or os.path.expanduser("~/.gnupg")
        if not os.path.isdir(gnupg_home):
            problems.append(f"--gnupg-home: no directory {gnupg_home}")
        for option in ("ca", "cert", "key"):
            if not self[option]:
                problems.append(f"--{option} is required")
            elif not os.access(self[option], os.R_OK):
                problems.append(f"--{option}: cannot read {self[option]}")
        try:
            self["log-memory-entries"] = int(self["log-memory-entries"])
            if self["log-memory-entries"] < 1:
                raise ValueError
        except ValueError:
            problems.append("--log-memory-entries: expected a whole number of at least 1")
        try:
            self["max-connections"] = int(self["max-connections"])
            if self["max-connections"] < 1:
                raise ValueError
        except ValueError:
            problems.append("--max-connections: expected a whole number of at least 1")
        seconds = {}
        for option in ("handshake-timeout", "idle-timeout", "logged-in-idle-timeout"):
            try:
                seconds[option] = positive_seconds(self[option])
            except ValueError as e:
                problems.append(f"--{option}: {e}")
        if problems:
            raise usage.UsageError("invalid options:\n  " + "\n  ".join(problems))
        self.config = WorkerConfig(
            name=self["name"] or socket.gethostname(),
            master_host=host,
            master_port=port,
            listen=self["listen"],
            identity=tls.Identity(certificate=self["cert"], key=self["key"], ca=self["ca"]),
            gnupg_home=gnupg_home,
            key_fingerprint=self["key-fingerprint"] or None,
            address_file=self["address-file"],
            public_address=self["public-address"],
            exit_with_stdin=bool(self["exit-with-stdin"]),
            timeouts=Timeouts(
                handshake=seconds["handshake-timeout"],
                idle=seconds["idle-timeout"],
                session_idle=seconds["logged-in-idle-timeout"],
            ),
        )


# Net new tracked objects between young garbage collections (Python's default: 700).  A worker
# holds thousands of long-lived connections; pushing to them leaves a few hundred short-lived
# objects alive at any moment, and with the default each young collection promotes some of them,
# which brings on a full collection -- a pause of 100 ms and more with 10,000 connections -- every
# few updates.  With this, short-lived objects are freed by reference counting first.
GC_YOUNG_THRESHOLD = 50_000


def makeService(options: Options) -> IService:
    """Wire the worker: event log first (it starts first and stops last), the master link, the client listener."""
    from twisted.internet import reactor

    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    config = options.config
    worker = WorkerService(config, reactor)
    events = BufferedFileLogObserver(
        os.path.abspath(options["event-log"]),
        capacity=options["log-memory-entries"],
        run_in_thread=reactor.callInThread,
    )
    EventLogService(events, reactor).setServiceParent(worker)
    worker.link.service.setServiceParent(worker)
    StreamServerEndpointService(
        worker.client_endpoint(),
        ClientFactory(
            worker.new_locator,
            clock=reactor,
            timeouts=config.timeouts,
            max_connections=options["max-connections"],
        ),
    ).setServiceParent(worker)
    return worker
