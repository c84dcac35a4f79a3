"""End to end across a real (private) network: master and workers each on a host of their own.

Every host is a network namespace with its own address on a veth bridge
(`tests.netns`); the master stores in the local PostgreSQL through its UNIX
socket; clients run in the test's own namespace and reach the workers over
the bridge.  Skipped, with the reason, where the machine cannot make
network namespaces.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, returnValue
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from papertrader import tls
from papertrader.client.session import Session, read_directory, tls_connector
from tests.databases import fresh_postgresql, query
from tests.netns import PrivateNetwork, postgresql_socket_url
from tests.processes import ROOT, SAMPLE_CONFIG, TWISTD, _Watcher, run_admin, worker_args

PASSWORD = "correct horse battery"


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
        self.ca = os.path.join(self.data, "tls", "ca.pem")
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
            "--directory-listen", f"tcp:2050:interface={self.master_address}",
            "--hostnames", self.master_address,
            # A silent worker is given up on after two intervals.
            "--heartbeat-interval", "1",
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

    def start_worker(self, name: str, gnupg_home: str) -> _Host:
        """Start ``twistd papertrader-worker`` on host ``name``, listening for clients on its address and
        proving who it is with the key in ``gnupg_home``."""
        identity = self.worker_identity(name)
        address = self.network.addresses[name]
        args = worker_args(
            name,
            f"{self.master_address}:2048",
            identity,
            os.path.join(self.base, f"{name}.log"),
            "--gnupg-home", gnupg_home,
            "--event-log", os.path.join(self.base, f"{name}-events.log"),
            listen=f"tcp:2049:interface={address}",
        )
        self.hosts[name] = _Host(self.network, name, args, self.env, self.base)
        return self.hosts[name]

    @inlineCallbacks
    def worker_key(self, name: str, home: str) -> Any:
        """Make worker ``name``'s OpenPGP key in ``home`` and export its public key, with the gpg
        commands an operator runs (README); fires with the exported file's path."""
        gpg = shutil.which("gpg") or "gpg"
        for argv in (
            ["--batch", "--passphrase", "", "--quick-gen-key", f"PaperTrader worker {name}"]
            + ["ed25519", "sign", "never"],
            ["--armor", "--output", os.path.join(self.base, f"{name}.asc"), "--export", f"PaperTrader worker {name}"],
        ):
            out, err, code = yield getProcessOutputAndValue(gpg, ["--homedir", home, *argv], env=self.env)
            if code != 0:
                raise AssertionError(f"gpg {' '.join(argv)} exited {code}: {err.decode('utf-8', 'replace')}")
        returnValue(os.path.join(self.base, f"{name}.asc"))

    def admin(self, *args: str) -> Any:
        """Run ``papertrader-admin ARGS`` against the master's socket; fires with (exit code, stdout, stderr)."""
        return run_admin(self.data, self.env, self.base, *args)

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


def _short_home(test: TestCase) -> str:
    """A GnuPG home with a short path (gpg-agent's socket lives in it), removed after ``test``."""
    home = tempfile.mkdtemp(prefix="pt-gpg-", dir="/tmp")

    def remove() -> None:
        subprocess.run(["gpgconf", "--homedir", home, "--kill", "gpg-agent"], capture_output=True, timeout=30)
        shutil.rmtree(home, ignore_errors=True)

    test.addCleanup(remove)
    return home


class RegionalDeploymentTests(TestCase):
    """The master and three registered workers each on a host of its own, on PostgreSQL; one worker's
    link is cut under its clients."""

    timeout = 300
    users_per_worker = 2
    orders_per_user = 20

    @inlineCallbacks
    def setUp(self) -> Any:
        self.database = fresh_postgresql(self)
        self.network = yield threads.deferToThread(PrivateNetwork, ["master", "w1", "w2", "w3"])
        self.addCleanup(self.network.close)
        self.deployment = NetworkDeployment(self.mktemp(), self.network, postgresql_socket_url(self.database))
        self.addCleanup(self.deployment.stop)

    @inlineCallbacks
    def start(self) -> Any:
        """Start the master, register each worker's key with ``papertrader-admin`` (allowed from the
        private network only) and start the workers; fires with the directory once it lists all three."""
        d = self.deployment
        workers = ["w1", "w2", "w3"]
        for name in workers:
            yield threads.deferToThread(d.worker_identity, name)
        d.start_master()
        homes = {name: _short_home(self) for name in workers}
        keys = {}
        for name in workers:
            keys[name] = yield d.worker_key(name, homes[name])
        for _ in range(600):
            if os.path.exists(os.path.join(d.data, "admin.sock")):
                break
            yield deferLater(reactor, 0.05, lambda: None)
        for name in workers:
            allow = f"{self.network.prefix}.0/24"
            code, out, err = yield d.admin("worker", "add", name, "--key", keys[name], "--allow", allow)
            self.assertEqual(code, 0, (out, err, d.log()))
        for name in workers:
            d.start_worker(name, homes[name])
        directory = f"{d.master_address}:2050"
        for _ in range(600):
            listed = yield read_directory(reactor, directory, d.ca).addErrback(lambda _: [])
            if len(listed) == len(workers):
                returnValue({row["name"]: row["address"] for row in listed})
            yield deferLater(reactor, 0.1, lambda: None)
        raise AssertionError(f"the directory never listed the three workers:\n{d.log()}")

    @inlineCallbacks
    def test_cut_link_clients_fail_over(self) -> Any:
        """Clients spread over three workers order steadily; one worker's link is cut mid-stream.  Its
        clients move to the others with their session tokens (no new login), the master drops it from
        the directory, and every acknowledged order is in the database exactly once and settles; no
        order is stored twice."""
        d = self.deployment
        listed = yield self.start()
        addresses = self.network.addresses
        self.assertEqual(sorted(listed.values()), sorted(f"{addresses[n]}:2049" for n in ("w1", "w2", "w3")))
        names = sorted(listed)
        sessions: dict[str, Session] = {}
        first_worker: dict[str, str] = {}
        for index in range(self.users_per_worker * len(names)):
            user = f"trader{index}"
            start = names[index % len(names)]
            order = [listed[start], *(listed[n] for n in names if n != start)]
            session = Session(reactor, tls_connector(reactor, d.ca, timeout=5), order, request_timeout=3)
            self.addCleanup(session.close)
            yield session.register(user, f"{user}@example.com", PASSWORD)
            yield session.login(user, PASSWORD)
            self.assertEqual(session.address, listed[start])
            sessions[user] = session
            first_worker[user] = start
        tokens = {user: s.token for user, s in sessions.items()}

        acknowledged: dict[str, int] = {}  # client order id -> order id
        cut = Deferred()

        @inlineCallbacks
        def trade(user: str, session: Session) -> Any:
            for k in range(self.orders_per_user):
                placed = yield session.buy("AAPL", 1, f"{user}-{k}")
                acknowledged[f"{user}-{k}"] = placed["order_id"]
                if len(acknowledged) == len(sessions) * 4 and not cut.called:
                    self.network.cut("w2")  # while every client still has orders to place
                    cut.callback(None)

        yield gatherResults([trade(user, session) for user, session in sessions.items()], consumeErrors=True)
        self.assertTrue(cut.called)
        moved = [user for user, name in first_worker.items() if name == "w2"]
        for user, session in sessions.items():
            if user in moved:
                self.assertNotEqual(session.address, listed["w2"])
                self.assertGreaterEqual(session.failovers, 1)
            self.assertEqual(session.token, tokens[user])  # resumed, never logged in again
        yield gatherResults(
            [
                sessions[cid.rsplit("-", 1)[0]].wait_for_settlement(order_id)
                for cid, order_id in acknowledged.items()
            ],
            consumeErrors=True,
        )

        rows = yield threads.deferToThread(
            query,
            self.database,
            "SELECT o.client_order_id, o.id, o.status FROM orders o JOIN users u ON u.id = o.user_id",
        )
        stored: dict[str, list[tuple[int, str]]] = {}
        for client_order_id, order_id, status in rows:
            stored.setdefault(client_order_id, []).append((order_id, status))
        self.assertEqual({cid: len(v) for cid, v in stored.items() if len(v) != 1}, {})  # none twice
        self.assertEqual(len(acknowledged), len(sessions) * self.orders_per_user)
        for cid, order_id in acknowledged.items():
            self.assertEqual(stored.get(cid), [(order_id, "filled")], cid)
        # Nothing stored that no client was told about.
        self.assertEqual(set(stored), set(acknowledged))
        for _ in range(100):
            now = yield read_directory(reactor, f"{d.master_address}:2050", d.ca)
            if sorted(row["name"] for row in now) == ["w1", "w3"]:
                break
            yield deferLater(reactor, 0.1, lambda: None)
        else:
            self.fail(f"the master still lists {now}")
