"""End to end, with real processes: the CLI's failures stay one line, a refused worker says why once."""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater

from papertrader import tls
from tests.processes import DeploymentTestCase, _Watcher, worker_args


class CLIFailureTests(DeploymentTestCase):
    """Whatever goes wrong, the real ``papertrader`` command prints one error line and exits non-zero."""

    def assertOneLineError(self, err: str) -> None:
        """``err`` is exactly one ``papertrader: error: ...`` line, with no traceback."""
        self.assertNotIn("Traceback", err)
        self.assertEqual(len(err.splitlines()), 1, err[:2000])
        self.assertTrue(err.startswith("papertrader: error: "), err[:2000])

    @inlineCallbacks
    def test_oversized_arguments(self) -> Any:
        """Arguments too long for an AMP value (64 KiB) are refused on this side with exit code 2."""
        d = self.deployment
        password = d.password_file("correct horse battery")
        huge = "A" * 65_536
        for args in (
            ("quote", huge),
            ("quote", "é" * 40_000),  # 80,000 bytes in UTF-8
            ("buy", huge, "1"),
            ("sell", "AAPL", "1" * 70_000),
            ("register", huge, "a@example.com", "--password-file", password),
            ("login", huge, "--password-file", password),
        ):
            code, out, err = yield d.cli(*args)
            self.assertEqual((code, out), (2, ""), args[0])
            self.assertOneLineError(err)
            self.assertIn("too long", err)
        code, out, err = yield d.cli("quote", "AAPL")
        self.assertEqual(code, 0, err)  # the worker is still serving

    @inlineCallbacks
    def test_long_but_sendable_symbol(self) -> Any:
        """A long symbol that still fits in AMP is the server's to judge: refused with exit code 1."""
        code, out, err = yield self.deployment.cli("quote", "A" * 60_000)
        self.assertEqual(code, 1, err[:2000])
        self.assertOneLineError(err)

    @inlineCallbacks
    def test_oversized_password(self) -> Any:
        """A password file whose first line cannot be sent is refused locally with exit code 2."""
        password = self.deployment.password_file("p" * 70_000)
        code, out, err = yield self.deployment.cli("login", "alice", "--password-file", password)
        self.assertEqual(code, 2, err[:2000])
        self.assertOneLineError(err)
        self.assertIn("too long", err)


class RefusedWorkerTests(DeploymentTestCase):
    """A real ``twistd papertrader-worker`` that the master will not accept says why, once, and backs off."""

    @inlineCallbacks
    def setUp(self) -> Any:
        yield super().setUp()
        self.master_port = self.deployment.master_port()

    @inlineCallbacks
    def run_worker(self, identity: tls.Identity, name: str, expected: str) -> Any:
        """Run a worker with ``identity`` until it logged ``expected`` and scheduled its retry; return its log."""
        base = os.path.join(self.deployment.base, f"worker-{name}")
        os.makedirs(base)
        log = os.path.join(base, "worker.log")
        args = worker_args(
            name,
            f"localhost:{self.master_port}",
            identity,
            log,
            # local-1's key (registered as local-1 only): what these workers are refused for is their certificate.
            "--gnupg-home", os.path.join(self.deployment.data, "workers", "local-1", "gnupg"),
            "--event-log", os.path.join(base, "events.log"),
        )
        watcher = _Watcher()
        process = reactor.spawnProcess(watcher, sys.executable, [sys.executable, *args], env=self.deployment.env,
                                       path=base)
        try:
            for _ in range(600):
                if watcher.ended.called:
                    raise AssertionError(f"worker exited early:\n{watcher.output.decode()}")
                if os.path.exists(log):
                    with open(log, encoding="utf-8") as f:
                        text = f.read()
                    if expected in text and "Scheduling retry" in text:
                        break
                yield deferLater(reactor, 0.05, lambda: None)
            else:
                raise AssertionError(f"{expected!r} and a scheduled retry never logged")
        finally:
            process.signalProcess("TERM")
            yield watcher.ended
        with open(log, encoding="utf-8") as f:
            return f.read()

    def assertRefusedOnce(self, text: str, reason: str) -> None:
        """The worker log names ``reason`` on one line, has no traceback (stop included), and waits 30+ s to retry."""
        self.assertNotIn("Traceback", text)
        self.assertNotIn("NoTransition", text)
        lines = [line for line in text.splitlines() if reason in line]
        self.assertEqual(len(lines), 1, text[-4000:])
        self.assertNotIn("connected to the master", text)
        delays = [float(d) for d in re.findall(r"retry \d+ to connect .* in ([\d.]+) seconds", text)]
        self.assertTrue(delays, text[-4000:])
        self.assertGreaterEqual(min(delays), 30.0, text[-4000:])

    @inlineCallbacks
    def test_certificate_from_another_ca(self) -> Any:
        """A worker whose certificate another CA issued fails the TLS handshake and says so."""
        foreign = os.path.join(self.deployment.base, "foreign-tls")
        issued = yield threads.deferToThread(tls.ensure_identity, foreign, "worker", "other-1", ["localhost"])
        identity = tls.Identity(issued.certificate, issued.key, os.path.join(self.deployment.data, "tls", "ca.pem"))
        text = yield self.run_worker(identity, "other-1", "TLS handshake with the master failed")
        self.assertRefusedOnce(text, "TLS handshake with the master failed")
        self.assertIn("unknown ca", text)
        with open(os.path.join(self.deployment.base, "master.log"), encoding="utf-8") as f:
            master_log = f.read()
        self.assertRegex(master_log, r"TLS handshake with 127\.0\.0\.1:\d+ failed: .*certificate verify failed")

    @inlineCallbacks
    def test_master_from_another_ca(self) -> Any:
        """A worker that trusts another CA cannot verify the master's certificate, and says so."""
        tls_dir = os.path.join(self.deployment.data, "tls")
        foreign = os.path.join(self.deployment.base, "foreign-tls")
        ca = yield threads.deferToThread(tls.create_ca, foreign)
        issued = yield threads.deferToThread(tls.ensure_identity, tls_dir, "worker-other", "other-1", ["localhost"])
        identity = tls.Identity(issued.certificate, issued.key, ca)
        text = yield self.run_worker(identity, "other-1", "TLS handshake with the master failed")
        self.assertRefusedOnce(text, "TLS handshake with the master failed")
        self.assertIn("certificate verify failed", text)

    @inlineCallbacks
    def test_certificate_for_another_name(self) -> Any:
        """A worker whose certificate names another worker is refused by the master and says why."""
        tls_dir = os.path.join(self.deployment.data, "tls")
        identity = yield threads.deferToThread(tls.ensure_identity, tls_dir, "worker-other", "other-1", ["localhost"])
        text = yield self.run_worker(identity, "impostor", "the master refused this worker")
        self.assertRefusedOnce(text, "the master refused this worker")
        self.assertIn("this certificate is not for a worker named 'impostor'", text)

    @inlineCallbacks
    def test_duplicate_name_refused_while_first_answers(self) -> Any:
        """A second worker under a live worker's name is refused (no flapping), says why, and backs off.

        Before, the two replaced each other dozens of times a minute and about
        half of a client's requests failed.
        """
        tls_dir = os.path.join(self.deployment.data, "tls")
        identity = tls.Identity(
            os.path.join(tls_dir, "worker-local-1.pem"),
            os.path.join(tls_dir, "worker-local-1.key"),
            os.path.join(tls_dir, "ca.pem"),
        )
        text = yield self.run_worker(identity, "local-1", "the master refused this worker")
        self.assertRefusedOnce(text, "the master refused this worker")
        self.assertIn("a worker named 'local-1' is already connected", text)
        with open(os.path.join(self.deployment.base, "master.log"), encoding="utf-8") as f:
            master_log = f.read()
        self.assertEqual(master_log.count("refused worker local-1"), 1, master_log[-4000:])
        self.assertNotIn("replacing it", master_log)
        self.assertEqual(master_log.count("worker local-1 (version"), 1)
        password = self.deployment.password_file("correct horse battery")
        yield self.deployment.cli_json("register", "dup", "dup@example.com", "--password-file", password)
        yield self.deployment.cli_json("login", "dup", "--password-file", password)
        fill = yield self.deployment.cli_json("buy", "KO", "1", "--wait")
        self.assertEqual(fill["status"], "filled")
