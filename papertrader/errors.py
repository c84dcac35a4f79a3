"""Failures every tier can report, each carrying a human-readable reason.

These are plain exceptions so that domain code raises them without knowing
about the wire; `papertrader.protocol` declares them on each AMP Command so
they cross every link intact.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.python.failure import Failure

# Reasons are cut to this length, so one always fits in an AMP value (64 KiB).
MAX_REASON = 1000


class PaperTraderError(Exception):
    """Base of every expected failure; ``str(error)`` is the reason shown to users."""

    def __init__(self, reason: str = "") -> None:
        if len(reason) > MAX_REASON:
            reason = reason[:MAX_REASON] + "..."
        super().__init__(reason)


class RegisterFailed(PaperTraderError):
    """A registration was refused (taken username or email, malformed input)."""


class LoginFailed(PaperTraderError):
    """Wrong username or password; deliberately does not say which."""


class SessionInvalid(PaperTraderError):
    """The session token is missing, unknown, forged or expired."""


class PasswordChangeFailed(PaperTraderError):
    """A password change was refused (wrong current password, unacceptable new one)."""


class PurchaseFailed(PaperTraderError):
    """A buy order was refused before it was queued."""


class SellFailed(PaperTraderError):
    """A sell order was refused before it was queued."""


class DataFailed(PaperTraderError):
    """Requested market or account data does not exist."""


class ServiceUnavailable(PaperTraderError):
    """A tier behind this one (master, database) cannot be reached right now."""


class WorkerRefused(PaperTraderError):
    """The master refused a worker's handshake."""


class WorkerNotConnected(PaperTraderError):
    """No worker of that name is connected to the master (say, to be kicked)."""


class AdminRefused(PaperTraderError):
    """The master refused an administrator's request (a taken name, an unusable key, ...); the reason says why."""


class Busy(PaperTraderError):
    """The server cannot take this request right now (e.g. too many passwords being checked); retry shortly."""


class BadRequest(PaperTraderError):
    """A request that could not be read: a missing or malformed argument, or an unknown command."""


def expected_or_unavailable(failure: Failure, reason: str, log: Logger | None = None) -> Failure:
    """Pass an expected failure on; make anything else a ServiceUnavailable saying ``reason``.

    Every Command declares ServiceUnavailable, so what comes out of here can
    always cross AMP without dropping the connection.  ``log``, if given,
    records the unexpected failure.
    """
    if failure.check(PaperTraderError):
        return failure
    if log is not None:
        log.failure("unexpected failure, answered as unavailable: {reason}", failure, reason=reason)
    return Failure(ServiceUnavailable(reason))


class ConfigError(PaperTraderError):
    """The configuration is invalid; carries every problem found at once."""

    def __init__(self, problems: list[str]) -> None:
        Exception.__init__(self, "; ".join(problems))  # never sent over AMP: keep it whole
        self.problems = problems


class OrderConflict(PaperTraderError):
    """A client order id was reused for a different order."""


class WorkerExists(PaperTraderError):
    """A worker registration was refused: its name, or its key, is registered already."""


class UnknownWorker(PaperTraderError):
    """No worker of that name is registered (or, to an administrator's request, connected either)."""


class WorkerKeyRejected(PaperTraderError):
    """A worker's OpenPGP key (or its update) cannot be used: not one signing key, expired, revoked, unreadable."""
