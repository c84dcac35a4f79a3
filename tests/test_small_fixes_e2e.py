"""End to end, with real processes: the CLI's failures stay one line, a refused worker says why once."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.processes import RunningDeployment


class CLIFailureTests(TestCase):
    """Whatever goes wrong, the real ``papertrader`` command prints one error line and exits non-zero."""

    timeout = 240

    @inlineCallbacks
    def setUp(self) -> Any:
        self.deployment = RunningDeployment(self.mktemp())
        self.addCleanup(self.deployment.stop)
        yield self.deployment.start()

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
