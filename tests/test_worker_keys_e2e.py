"""End to end: remote workers proving themselves with GnuPG keys, as real twistd processes over TLS.

A master (with its local worker, whose key it made and registered itself)
runs as a real process.  Two more workers are started by hand with
certificates of the deployment: one whose registered key is in its GnuPG
home, one whose home holds another key.  The first serves clients; the
second is refused (both logs say why) while everything else keeps serving.
Registration goes through the admin tool, ``papertrader-admin worker add``,
as an operator registers a remote worker.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from OpenSSL import SSL
from twisted.internet import reactor, threads
from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.protocols import amp

from papertrader import gpg, tls
from papertrader.protocol import WorkerHello
from tests.gpgkeys import fresh_home, new_key
from tests.processes import DeploymentTestCase, _Watcher, worker_args


class WorkerKeyEndToEndTests(DeploymentTestCase):
    """A master and three workers as real processes: the one with a wrong key is refused."""

    @inlineCallbacks
    def setUp(self) -> Any:
        yield super().setUp()
        self.master_port = self.deployment.master_port()

    @inlineCallbacks
    def register(self, name: str, public_key: str) -> Any:
        """Register worker ``name`` with the running master: ``papertrader-admin worker add``."""
        key_file = os.path.join(self.deployment.base, f"{name}.asc")
        with open(key_file, "w", encoding="ascii") as f:
            f.write(public_key)
        code, out, err = yield self.deployment.admin("worker", "add", name, "--key", key_file, "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["name"], name)

    def start_worker(self, name: str, gnupg_home: str) -> tuple[_Watcher, str]:
        """Start ``twistd papertrader-worker`` as ``name`` with a certificate of the deployment and the
        key in ``gnupg_home``; return its watcher and its log file."""
        d = self.deployment
        hostnames = ["localhost", "127.0.0.1"]
        identity = tls.issue_certificate(os.path.join(d.data, "tls"), f"worker-{name}", name, hostnames)
        log = os.path.join(d.base, f"worker-{name}.log")
        args = worker_args(
            name,
            f"localhost:{self.master_port}",
            identity,
            log,
            "--gnupg-home", gnupg_home,
            "--address-file", os.path.join(d.base, f"{name}.address"),
            "--event-log", os.path.join(d.base, f"worker-{name}-events.log"),
            "--exit-with-stdin",
        )
        watcher = _Watcher()
        process = reactor.spawnProcess(watcher, sys.executable, [sys.executable, *args], env=d.env, path=d.base)

        def stop() -> Any:
            if not watcher.ended.called:
                process.signalProcess("TERM")
            return watcher.ended

        self.addCleanup(stop)
        return watcher, log

    @inlineCallbacks
    def wait_for_line(self, path: str, text: str, attempts: int = 1200) -> Any:
        """Wait until the file at ``path`` holds ``text``; return the file's text."""
        for _ in range(attempts):
            try:
                with open(path, encoding="utf-8") as f:
                    content = f.read()
                if text in content:
                    return content
            except OSError:
                pass
            yield deferLater(reactor, 0.05, lambda: None)
        raise AssertionError(f"{text!r} never appeared in {path}:\n{self.deployment.log()}")

    @inlineCallbacks
    def test_wrong_key_refused_while_the_right_ones_serve(self) -> Any:
        """remote-1 (its registered key) serves a client; remote-2 (signing with a key other than its
        registered one) is refused with the reason in both logs; local-1 serves throughout; a
        connection without a worker certificate fails TLS."""
        d = self.deployment
        good_home, registered_home, wrong_home = fresh_home(self), fresh_home(self), fresh_home(self)
        good = yield threads.deferToThread(new_key, good_home, "remote-1")
        registered = yield threads.deferToThread(new_key, registered_home, "remote-2")
        wrong = yield threads.deferToThread(new_key, wrong_home, "remote-2 (a copy)")
        yield self.register("remote-1", good.public_key)
        yield self.register("remote-2", registered.public_key)

        _, bad_log = self.start_worker("remote-2", wrong_home)
        _, good_log = self.start_worker("remote-1", good_home)
        line = yield self.wait_for_line(bad_log, "the master refused this worker")
        reason = (
            "not a good signature by a key this master knows: "
            f"the signature is not good (no public key, key {wrong.fingerprint[-16:]})"
        )
        self.assertIn(reason, line)
        master_log = yield self.wait_for_line(os.path.join(d.base, "master.log"), "refused worker remote-2")
        self.assertIn(reason, master_log)

        yield self.wait_for_line(good_log, "connected to the master as remote-1")
        address_file = os.path.join(d.base, "remote-1.address")
        yield self.wait_for_line(address_file, ":")
        with open(address_file, encoding="ascii") as f:
            address = f.read().strip()
        code, out, err = yield d.cli("quote", "AAPL", "--server", address)
        self.assertEqual(code, 0, err)
        self.assertIn("AAPL", out)
        code, out, err = yield d.cli("quote", "AAPL")  # local-1
        self.assertEqual(code, 0, err)
        self.assertIn("connected from", (yield self.wait_for_line(os.path.join(d.base, "master.log"), "remote-1 (")))
        self.assertNotIn("connected to the master", open(bad_log, encoding="utf-8").read())

        # A client of the deployment (it trusts the CA, but has no certificate) cannot even finish TLS.
        ca = os.path.join(d.data, "tls", "ca.pem")
        options = yield threads.deferToThread(tls.client_options, "localhost", ca)
        connection = yield tls.tls_client_endpoint(reactor, "localhost", self.master_port, options).connect(
            Factory.forProtocol(amp.AMP)
        )
        self.addCleanup(lambda: connection.transport and connection.transport.abortConnection())
        yield self.assertFailure(
            connection.callRemote(WorkerHello, name="remote-1", version="0"), SSL.Error, ConnectionDone, ConnectionLost
        )
        code, out, err = yield d.cli("quote", "AAPL", "--server", address)
        self.assertEqual(code, 0, err)

    @inlineCallbacks
    def test_local_worker_key_made_once(self) -> Any:
        """The master made local-1's key under its data directory and registered it; a restart keeps it."""
        d = self.deployment
        home = os.path.join(d.data, "workers", "local-1", "gnupg")
        [fingerprint] = yield threads.deferToThread(gpg.secret_keys, home)
        yield self.wait_for_line(os.path.join(d.base, "master.log"), f"key {fingerprint}) connected from")
        yield d.stop()
        yield d.start()
        self.assertEqual((yield threads.deferToThread(gpg.secret_keys, home)), [fingerprint])
