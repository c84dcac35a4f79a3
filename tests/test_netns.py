"""End to end across a real (private) network: master and workers each on a host of their own.

Every host is a network namespace with its own address on a veth bridge
(`tests.netns`); the master stores in the local PostgreSQL through its UNIX
socket; clients run in the test's own namespace and reach the workers over
the bridge.  Skipped, with the reason, where the machine cannot make
network namespaces.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.defer import inlineCallbacks, returnValue
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from papertrader import tls
from tests.databases import fresh_postgresql
from tests.netns import PrivateNetwork, postgresql_socket_url
from tests.processes import ROOT, SAMPLE_CONFIG, TWISTD, _Watcher


class _Host:
    """A twistd process inside one host's namespace."""

    def __init__(self, network: PrivateNetwork, host: str, args: list[str], env: dict[str, str], path: str) -> None:
        self.watcher = _Watcher()
        argv = network.command(host, [sys.executable, *args])
        self.process = reactor.spawnProcess(self.watcher, argv[0], argv, env=env, path=path)

    def stop(self) -> Any:
        if not self.watcher.ended.called:
            self.process.signalProcess(signal.SIGTERM)
        return self.watcher.ended


class NetworkDeployment:
    """A master and remote workers on hosts of a `PrivateNetwork`, with the CLI run from the test's namespace."""

    def __init__(self, base: str, network: PrivateNetwork, database: str) -> None:
        self.base = os.path.abspath(base)
        self.data = os.path.join(self.base, "master")
        self.network = network
        self.database = database
        os.makedirs(self.data, mode=0o700)
        self.env = dict(os.environ)
        self.env.update(
            PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
            XDG_CONFIG_HOME=os.path.join(self.base, "config"),
            XDG_DATA_HOME=os.path.join(self.base, "share"),
        )
        self.master_address = network.addresses["master"]
        self.hosts: dict[str, _Host] = {}

    def start_master(self) -> _Host:
        """Start ``twistd papertrader-master`` on the master host, with no local workers."""
        args = [
            "-c", TWISTD, "--nodaemon", "--pidfile=",
            "--logfile", os.path.join(self.base, "master.log"),
            "papertrader-master",
            "--config", SAMPLE_CONFIG,
            "--data-dir", self.data,
            "--database", self.database,
            "--workers", "0",
            "--listen", f"tcp:2048:interface={self.master_address}",
            "--hostnames", self.master_address,
            "--update-interval", "1",
            "--bcrypt-cost", "4",
        ]
        self.hosts["master"] = _Host(self.network, "master", args, self.env, self.base)
        return self.hosts["master"]

    def worker_identity(self, name: str) -> tls.Identity:
        """A certificate from the deployment's CA for worker ``name``, valid for its host's address (the
        CA is made here on first use; the master takes it as its own when it starts)."""
        directory = os.path.join(self.data, "tls")
        return tls.ensure_identity(directory, f"worker-{name}", name, [self.network.addresses[name]])

    def start_worker(self, name: str) -> _Host:
        """Start ``twistd papertrader-worker`` on host ``name``, listening for clients on its address."""
        identity = self.worker_identity(name)
        address = self.network.addresses[name]
        args = [
            "-c", TWISTD, "--nodaemon", "--pidfile=",
            "--logfile", os.path.join(self.base, f"{name}.log"),
            "papertrader-worker",
            "--name", name,
            "--master", f"{self.master_address}:2048",
            "--listen", f"tcp:2049:interface={address}",
            "--ca", identity.ca,
            "--cert", identity.certificate,
            "--key", identity.key,
            "--event-log", os.path.join(self.base, f"{name}-events.log"),
        ]
        self.hosts[name] = _Host(self.network, name, args, self.env, self.base)
        return self.hosts[name]

    @inlineCallbacks
    def cli(self, worker: str, *args: str) -> Any:
        """Run ``papertrader ARGS`` against ``worker``; fires with (exit code, stdout, stderr)."""
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            [
                "-m", "papertrader.client.cli", *args,
                "--server", f"{self.network.addresses[worker]}:2049",
                "--ca", os.path.join(self.data, "tls", "ca.pem"),
            ],
            env=self.env,
            path=self.base,
        )
        returnValue((code, out.decode("utf-8"), err.decode("utf-8")))

    @inlineCallbacks
    def wait_until_serving(self, worker: str, attempts: int = 600) -> Any:
        """Wait until ``worker`` answers a quote (so it reached the master)."""
        for _ in range(attempts):
            for name, host in self.hosts.items():
                if host.watcher.ended.called:
                    raise AssertionError(f"{name} exited early:\n{self.log()}")
            code, out, err = yield self.cli(worker, "quote", "AAPL")
            if code == 0:
                return
            yield deferLater(reactor, 0.1, lambda: None)
        raise AssertionError(f"{worker} did not come up:\n{self.log()}")

    def log(self) -> str:
        parts = []
        for name in ["master", *(n for n in self.hosts if n != "master")]:
            try:
                with open(os.path.join(self.base, f"{name}.log"), encoding="utf-8") as f:
                    parts.append(f"--- {name}.log\n{f.read()[-3000:]}")
            except OSError:
                pass
        return "\n".join(parts)

    @inlineCallbacks
    def stop(self) -> Any:
        for name in sorted(self.hosts, key=lambda n: n == "master"):
            yield self.hosts[name].stop()


class PrivateNetworkTests(TestCase):
    """A master and a worker on hosts of their own, on PostgreSQL."""

    timeout = 240

    @inlineCallbacks
    def setUp(self) -> Any:
        database = postgresql_socket_url(fresh_postgresql(self))
        self.network = yield threads.deferToThread(PrivateNetwork, ["master", "w1"])
        self.addCleanup(self.network.close)
        self.deployment = NetworkDeployment(self.mktemp(), self.network, database)
        self.addCleanup(self.deployment.stop)

    @inlineCallbacks
    def test_worker_on_another_host(self) -> Any:
        """A worker on its own host serves clients, through the master on another host."""
        d = self.deployment
        yield threads.deferToThread(d.worker_identity, "w1")
        d.start_master()
        d.start_worker("w1")
        yield d.wait_until_serving("w1")
