"""A private PostgreSQL server for tests that must stop and start a database.

Never stop the machine's shared server: this one lives in the test's own
temporary directory, on a free port, and is removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest

_SERVER_USER = "postgres"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivatePostgreSQL:
    """``initdb`` and ``pg_ctl`` into a new temporary directory, on a free loopback port."""

    def __init__(self) -> None:
        # Under the system's temporary folder: the server's user must be able to reach it.
        self.directory = tempfile.mkdtemp(prefix="papertrader-pg-")
        self.data = os.path.join(self.directory, "cluster")
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_user: list[str] = []

    def _command(self, name: str, *args: str) -> tuple[str, list[str]]:
        program = shutil.which(name)
        if program is None:
            if os.environ.get("CI") == "true":
                raise AssertionError(f"{name} is required in CI")
            raise SkipTest(f"{name} is not installed; cannot run a private PostgreSQL")
        argv = [program, *args]
        if self._as_user:
            return self._as_user[0], [*self._as_user, *argv]
        return program, argv

    @inlineCallbacks
    def _run(self, name: str, *args: str) -> Any:
        executable, argv = self._command(name, *args)
        out, err, code = yield getProcessOutputAndValue(executable, argv[1:], env=dict(os.environ))
        if code != 0:
            raise AssertionError(f"{name} failed ({code}): {out.decode()}{err.decode()}")

    @inlineCallbacks
    def create(self) -> Any:
        """Make a new cluster (as the ``postgres`` user when running as root) and start it."""
        if os.geteuid() == 0:
            import pwd

            runuser = shutil.which("runuser")
            if runuser is None:
                raise SkipTest("running as root without runuser; cannot run initdb")
            account = pwd.getpwnam(_SERVER_USER)
            os.chown(self.directory, account.pw_uid, account.pw_gid)
            self._as_user = [runuser, "-u", _SERVER_USER, "--"]
        yield self._run("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
        yield self.start()

    def start(self) -> Any:
        """Start (or restart after `stop`) the server on its port."""
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.directory} -c fsync=off"
        return self._run("pg_ctl", "-D", self.data, "-o", options, "-w", "-l", os.path.join(self.directory, "log"),
                         "start")

    def stop(self) -> Any:
        """Stop the server at once, dropping every connection."""
        return self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")

    @inlineCallbacks
    def destroy(self) -> Any:
        """Stop the server if it runs and remove its files."""
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            yield self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
