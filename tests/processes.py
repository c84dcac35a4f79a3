"""Real processes for end-to-end tests: a twistd master (with its local worker) and the CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, returnValue
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

import papertrader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(papertrader.__file__)))
SAMPLE_CONFIG = os.path.join(ROOT, "etc", "papertrader.ini")
TWISTD = "from twisted.scripts.twistd import run; run()"


class _Watcher(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[Any] = Deferred()
        self.output = b""
        self._waiting: list[tuple[bytes, Deferred[None]]] = []

    def wait_for(self, text: bytes) -> Deferred[None]:
        """Fires as soon as ``text`` appears in the output (from now on)."""
        d: Deferred[None] = Deferred()
        self._waiting.append((text, d))
        return d

    def outReceived(self, data: bytes) -> None:
        self.output += data
        for text, d in list(self._waiting):
            if text in data:
                self._waiting.remove((text, d))
                d.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value)


def worker_args(
    name: str, master: str, identity: Any, log: str, *extra: str, listen: str = "tcp:0:interface=127.0.0.1"
) -> list[str]:
    """The arguments of ``python`` that run ``twistd papertrader-worker`` as ``name`` with the TLS
    ``identity``, connecting to ``master`` (HOST:PORT) and logging to ``log``; ``extra`` options follow."""
    return [
        "-c", TWISTD, "--nodaemon", "--pidfile=", "--logfile", log,
        "papertrader-worker",
        "--name", name,
        "--master", master,
        "--listen", listen,
        "--ca", identity.ca, "--cert", identity.certificate, "--key", identity.key,
        *extra,
    ]


@inlineCallbacks
def run_admin(data: str, env: dict[str, str], path: str, *args: str) -> Any:
    """Run ``papertrader-admin ARGS --data-dir DATA``; fires with (exit code, stdout, stderr) as text."""
    out, err, code = yield getProcessOutputAndValue(
        sys.executable, ["-m", "papertrader.admin.cli", *args, "--data-dir", data], env=env, path=path
    )
    returnValue((code, out.decode("utf-8"), err.decode("utf-8")))


class RunningDeployment:
    """``twistd papertrader-master`` in a temporary directory, on free ports, with a local worker."""

    def __init__(self, base: str, *extra: str, log_to_stdout: bool = False) -> None:
        self.base = os.path.abspath(base)
        self.data = os.path.join(self.base, "data")
        os.makedirs(self.base)
        self.env = dict(os.environ)
        self.env.update(
            PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
            XDG_CONFIG_HOME=os.path.join(self.base, "config"),
            XDG_DATA_HOME=os.path.join(self.base, "share"),
        )
        self.args = [
            "-c", TWISTD, "--nodaemon", "--pidfile=",
            "--logfile", "-" if log_to_stdout else os.path.join(self.base, "master.log"),
            "papertrader-master",
            "--config", SAMPLE_CONFIG,
            "--data-dir", self.data,
            "--listen", "tcp:0:interface=127.0.0.1",
            "--worker-listen", "tcp:0:interface=127.0.0.1",
            "--directory-listen", "tcp:0:interface=127.0.0.1",
            "--update-interval", "1",
            "--bcrypt-cost", "4",
            *extra,
        ]
        self.process: Any = None
        self.watcher = _Watcher()

    def spawn(self) -> _Watcher:
        """Start the master process; returns what watches its output and exit."""
        self.watcher = _Watcher()
        self.process = reactor.spawnProcess(
            self.watcher, sys.executable, [sys.executable, *self.args], env=self.env, path=self.base
        )
        return self.watcher

    @inlineCallbacks
    def start(self, attempts: int = 600) -> Any:
        """Start the master and wait until its local worker answers quotes."""
        self.spawn()
        yield self.wait_until_serving(attempts)

    @inlineCallbacks
    def wait_until_serving(self, attempts: int = 600) -> Any:
        """Wait until the local worker answers quotes through the master."""
        for _ in range(attempts):
            if self.watcher.ended.called:
                raise AssertionError(f"master exited early:\n{self.log()}")
            if os.path.exists(os.path.join(self.data, "worker-local-1.address")):
                code, out, err = yield self.cli("quote", "AAPL")
                if code == 0:
                    return
            yield deferLater(reactor, 0.05, lambda: None)
        raise AssertionError(f"deployment did not come up:\n{self.log()}")

    def log(self) -> str:
        parts = [f"--- master output\n{self.watcher.output.decode('utf-8', 'replace')[-4000:]}"]
        for name in ("master.log", os.path.join("data", "logs", "worker-local-1.log")):
            try:
                with open(os.path.join(self.base, name), encoding="utf-8") as f:
                    parts.append(f"--- {name}\n{f.read()[-4000:]}")
            except OSError:
                pass
        return "\n".join(parts)

    def master_port(self) -> int:
        """The port the master listens for workers on, as its log says."""
        with open(os.path.join(self.base, "master.log"), encoding="utf-8") as f:
            return int(re.search(r"listening for workers on .*port=(\d+)", f.read()).group(1))

    def admin(self, *args: str) -> Any:
        """Run ``papertrader-admin ARGS`` against this master; fires with (exit code, stdout, stderr)."""
        return run_admin(self.data, self.env, self.base, *args)

    def worker_address(self, number: int = 1) -> tuple[str, int]:
        """The HOST and PORT local worker ``number`` listens for clients on."""
        with open(os.path.join(self.data, f"worker-local-{number}.address"), encoding="ascii") as f:
            host, port = f.read().strip().rsplit(":", 1)
        return host, int(port)

    def directory_address(self) -> tuple[str, int]:
        """The HOST and PORT of the master's worker directory listener."""
        with open(os.path.join(self.data, "directory.address"), encoding="ascii") as f:
            host, port = f.read().strip().rsplit(":", 1)
        return host, int(port)

    @inlineCallbacks
    def cli(self, *args: str, stdin_password: str | None = None) -> Any:
        """Run ``papertrader ARGS --data-dir DATA``; fires with (exit code, stdout, stderr) as text."""
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-m", "papertrader.client.cli", *args, "--data-dir", self.data],
            env=self.env,
            path=self.base,
        )
        returnValue((code, out.decode("utf-8"), err.decode("utf-8")))

    @inlineCallbacks
    def cli_json(self, *args: str) -> Any:
        """Run a CLI command with ``--json`` that must succeed; fires with the parsed output."""
        code, out, err = yield self.cli(*args, "--json")
        if code != 0:
            raise AssertionError(f"papertrader {' '.join(args)} exited {code}: {err}")
        returnValue(json.loads(out))

    def password_file(self, password: str) -> str:
        path = os.path.join(self.base, f"password-{abs(hash(password))}")
        with open(path, "w", encoding="utf-8") as f:
            f.write(password + "\n")
        return path

    @inlineCallbacks
    def kill(self) -> Any:
        """SIGKILL the master and wait for it to be gone."""
        self.process.signalProcess("KILL")
        yield self.watcher.ended

    @inlineCallbacks
    def stop(self) -> Any:
        """SIGTERM the master (which stops its worker) and wait for it to exit."""
        if self.process is not None and not self.watcher.ended.called:
            self.process.signalProcess(signal.SIGTERM)
        yield self.watcher.ended


def replay_deployment(base: str, assets: str, prices: str) -> RunningDeployment:
    """A `RunningDeployment` (not started) under ``base`` whose master replays ``prices``, looping,
    for the asset list ``assets`` (both CSV text, written to files there)."""
    base = os.path.abspath(base)
    os.makedirs(base)
    files = os.path.join(base, "assets.csv"), os.path.join(base, "prices.csv")
    for path, text in zip(files, (assets, prices)):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return RunningDeployment(
        os.path.join(base, "deployment"),
        "--assets", files[0],
        "--price-source", "replay",
        "--price-replay-file", files[1],
        "--price-replay-loop", "yes",
    )  # fmt: skip


class DeploymentTestCase(TestCase):
    """A test case with a `RunningDeployment` started for each test (``self.deployment``)."""

    timeout = 240

    @inlineCallbacks
    def setUp(self) -> Any:
        self.deployment = RunningDeployment(self.mktemp())
        self.addCleanup(self.deployment.stop)
        yield self.deployment.start()
