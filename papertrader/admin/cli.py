"""The ``papertrader-admin`` command: manage a master's workers through its admin socket.

It talks AMP to the master over the UNIX socket in the master's data
directory (``DATA_DIR/admin.sock``, mode 0600: only the user the master runs
as can use it).  Exit codes, as for ``papertrader``: 0 success, 1 the master
refused or failed (the message says why), 2 bad usage, a local problem or no
connection.  Every failure is one ``papertrader-admin: error: ...`` line on
stderr.  ``--json`` prints machine-readable results.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet import task
from twisted.internet.defer import TimeoutError, inlineCallbacks
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.protocols import amp

from papertrader.admin.protocol import (
    MAX_KEY_BYTES,
    MAX_NETWORKS,
    AddWorker,
    DisableWorker,
    EnableWorker,
    KickWorker,
    ListAllWorkers,
    RemoveWorker,
    WorkerInfo,
)
from papertrader.admin.unixsocket import admin_socket_path, reachable
from papertrader.config import default_data_dir
from papertrader.errors import PaperTraderError
from papertrader.protocol import WIRE_CODES

EXIT_REFUSED = 1
EXIT_USAGE = 2
# Seconds the master has to answer one request (WorkerInfo waits for the worker: up to 10 s).
ANSWER_TIMEOUT = 30.0
# Pages of the worker list read at most (each holds a dozen or more workers).
MAX_PAGES = 10_000


class CommandError(Exception):
    """A problem on this side (usage, files, connection), reported with exit code 2."""


def socket_path(args: argparse.Namespace) -> str:
    """``--socket``, else the admin socket of ``--data-dir`` (default: the local deployment's)."""
    return args.socket or admin_socket_path(args.data_dir or default_data_dir())


def read_key(path: str) -> str:
    """The ASCII-armored OpenPGP public key in ``path``; CommandError if it is not one."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_BYTES + 1)
    except OSError as e:
        raise CommandError(f"cannot read the key file {path}: {e.strerror}") from None
    if len(data) > MAX_KEY_BYTES:
        raise CommandError(f"{path} is larger than {MAX_KEY_BYTES} bytes; export the public key only")
    text = data.decode("ascii", "replace")
    if "PRIVATE KEY BLOCK" in text:
        raise CommandError(f"{path} holds a private key; give the public key (gpg --armor --export NAME)")
    if "-----BEGIN PGP PUBLIC KEY BLOCK-----" not in text:
        raise CommandError(f"{path} is not an ASCII-armored public key; export one with gpg --armor --export NAME")
    return text


def parse_networks(texts: Sequence[str]) -> list[str]:
    """The ``--allow`` networks in CIDR form; CommandError for one that is not a network."""
    if len(texts) > MAX_NETWORKS:
        raise CommandError(f"at most {MAX_NETWORKS} --allow networks")
    networks = []
    for text in texts:
        try:
            networks.append(str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            raise CommandError(f"--allow {text!r} is not a network such as 192.0.2.0/24 or 2001:db8::/32") from None
    return networks


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)


def _call(reactor: Any, connection: amp.AMP, command: type[amp.Command], **arguments: Any) -> Any:
    return connection.callRemote(command, **arguments).addTimeout(ANSWER_TIMEOUT, reactor)


# ------------------------------------------------------------------ commands


def _state(row: dict[str, Any]) -> str:
    if not row["registered"]:
        return "unregistered"
    return "enabled" if row.get("enabled") else "disabled"


def _present(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` without the fields it does not have (AMP gives absent optional ones as None)."""
    return {key: value for key, value in row.items() if value is not None}


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


@inlineCallbacks
def cmd_list(reactor: Any, connection: amp.AMP, args: argparse.Namespace) -> Any:
    rows: list[dict[str, Any]] = []
    cursor = None
    for _ in range(MAX_PAGES):
        page = yield _call(reactor, connection, ListAllWorkers, cursor=cursor)
        rows.extend(_present(row) for row in page["workers"])
        cursor = page.get("next_cursor")
        if cursor is None:
            break
    if not rows:
        _print(args, [], "no workers are registered or connected")
        return
    header = ("NAME", "STATE", "CONNECTED", "ADDRESS", "CLIENT ADDRESS", "VERSION", "CONNECTED SINCE",
              "CLIENTS", "FORWARDED", "LAST HEARTBEAT")
    table = [header]
    for row in rows:
        table.append((
            row["name"], _state(row), "yes" if row["connected"] else "no", _dash(row.get("address")),
            _dash(row.get("client_address")), _dash(row.get("version")), _dash(row.get("connected_since")),
            _dash(row.get("clients")), _dash(row.get("commands_forwarded")), _dash(row.get("last_heartbeat")),
        ))
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    text = "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table)
    _print(args, rows, text)


# The fields of ``worker info``, in order, with their labels.
_INFO_FIELDS = (
    ("name", "name"), ("state", "state"), ("uuid", "uuid"), ("fingerprint", "key fingerprint"),
    ("all_networks", "allowed networks"), ("added_at", "registered at"), ("connected", "connected"),
    ("address", "address"), ("client_address", "client address"), ("version", "version"),
    ("connected_since", "connected since"), ("clients", "clients"),
    ("commands_forwarded", "commands forwarded"), ("last_heartbeat", "last heartbeat"),
)
_LIVE_FIELDS = (
    ("clients", "clients connected"), ("sessions", "logged-in sessions"), ("commands_relayed", "commands relayed"),
    ("uptime", "uptime"), ("tick", "quotes of update"), ("as_of", "quotes as of"),
)


def _duration(seconds: float) -> str:
    """``seconds`` as ``[Nd ]HH:MM:SS``."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    text = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


@inlineCallbacks
def cmd_info(reactor: Any, connection: amp.AMP, args: argparse.Namespace) -> Any:
    info = yield _call(reactor, connection, WorkerInfo, name=args.name)
    info = _present(info)
    shown = {**info, "state": _state(info), "connected": "yes" if info["connected"] else "no"}
    if "all_networks" in shown:
        shown["all_networks"] = ", ".join(shown["all_networks"]) or "any"
    lines = [f"{label + ':':20} {shown[key]}" for key, label in _INFO_FIELDS if key in shown]
    live = info.get("live")
    if live is not None:
        lines.append("live figures (asked from the worker now):")
        shown_live = {**live, "uptime": _duration(live.get("uptime", 0))}
        lines.extend(
            f"  {label + ':':20} {shown_live[key]}" for key, label in _LIVE_FIELDS if live.get(key) is not None
        )
    else:
        lines.append(f"live figures: unavailable ({info.get('live_error', 'no answer')})")
    _print(args, info, "\n".join(lines))


@inlineCallbacks
def cmd_add(reactor: Any, connection: amp.AMP, args: argparse.Namespace) -> Any:
    key = read_key(args.key)
    networks = parse_networks(args.allow or ())
    stored = yield _call(reactor, connection, AddWorker, name=args.name, key=key, networks=networks)
    where = ", ".join(stored["networks"]) or "any address"
    _print(
        args,
        stored,
        f"registered worker {stored['name']} (uuid {stored['uuid']}, key {stored['fingerprint']}); "
        f"it may connect from {where}",
    )


def _change(command: type[amp.Command], done: str) -> Any:
    @inlineCallbacks
    def run(reactor: Any, connection: amp.AMP, args: argparse.Namespace) -> Any:
        answer = yield _call(reactor, connection, command, name=args.name)
        text = f"worker {answer['name']} {done}"
        if answer["disconnected"]:
            text += "; it was connected and has been disconnected"
        _print(args, answer, text)

    return run


# ------------------------------------------------------------------ parsing and running


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument("--data-dir", metavar="DIR", help="the master's data directory (its socket: DIR/admin.sock)")
    common.add_argument("--socket", metavar="PATH", help="the master's admin socket (overrides --data-dir)")
    common.add_argument("--json", action="store_true", help="print machine-readable JSON")

    parser = argparse.ArgumentParser(
        prog="papertrader-admin",
        description="Manage a PaperTrader master's workers (run as the user the master runs as).",
        allow_abbrev=False,
    )
    topics = parser.add_subparsers(dest="topic", required=True, metavar="TOPIC")
    worker = topics.add_parser("worker", help="registered and connected workers", allow_abbrev=False)
    sub = worker.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, run: Any, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help, allow_abbrev=False)
        p.set_defaults(run=run)
        return p

    add("list", cmd_list, "list every registered or connected worker, with what the master tracks")
    p = add("info", cmd_info, "show one worker: stored facts, tracked facts, and live figures from the worker")
    p.add_argument("name")
    p = add("add", cmd_add, "register a worker by its OpenPGP public key")
    p.add_argument("name")
    p.add_argument("--key", metavar="FILE.asc", required=True, help="the worker's ASCII-armored public key")
    p.add_argument("--allow", metavar="CIDR", action="append",
                   help="a network the worker may connect from (repeat for more; default: anywhere)")
    for name, command, done, help in (
        ("kick", KickWorker, "kicked", "disconnect a worker now (its clients go to other workers)"),
        ("disable", DisableWorker, "disabled", "stop a worker from connecting (disconnects it)"),
        ("enable", EnableWorker, "enabled", "let a disabled worker connect again"),
        ("remove", RemoveWorker, "removed", "forget a registered worker (disconnects it)"),
    ):
        p = add(name, _change(command, done), help)
        p.add_argument("name")
    return parser


@inlineCallbacks
def connect(reactor: Any, path: str) -> Any:
    """An AMP connection to the admin socket at ``path``; CommandError saying why there is none."""
    try:
        with reachable(path) as name:
            connection = yield connectProtocol(UNIXClientEndpoint(reactor, name, timeout=10), amp.AMP())
    except (ConnectError, OSError) as e:
        raise CommandError(_connect_problem(path, e)) from None
    return connection


def _connect_problem(path: str, error: Exception) -> str:
    code = getattr(error, "osError", None) or getattr(error, "errno", None)
    text = str(error)
    if code == errno.ENOENT or "No such file" in text:
        return f"no master is listening at {path} (is it running? is this its --data-dir?)"
    if code == errno.EACCES or "Permission denied" in text:
        return f"permission denied on {path}: run this as the user the master runs as"
    if code == errno.ECONNREFUSED or "Connection refused" in text:
        return f"nothing answers at {path} (a master that has stopped?)"
    return f"cannot connect to {path}: {error}"


@inlineCallbacks
def run(reactor: Any, args: argparse.Namespace) -> Any:
    try:
        path = socket_path(args)
        if args.command == "add":  # local problems first, before connecting
            read_key(args.key)
            parse_networks(args.allow or ())
        connection = yield connect(reactor, path)
        try:
            yield args.run(reactor, connection, args)
        finally:
            connection.transport.loseConnection()
    except CommandError as e:
        _fail(args, str(e), EXIT_USAGE)
    except PaperTraderError as e:
        _fail(args, str(e), EXIT_REFUSED, WIRE_CODES.get(type(e), b"").decode("ascii") or None)
    except TimeoutError:
        _fail(args, f"the master did not answer within {ANSWER_TIMEOUT:g} s", EXIT_USAGE)
    except ConnectionClosed:
        _fail(args, "the master closed the connection", EXIT_USAGE)
    except amp.TooLong as e:
        name = e.keyName.decode("ascii", "replace") if e.keyName else "a key"
        _fail(args, f"{name} is too long to send (at most {amp.MAX_VALUE_LENGTH:,} bytes)", EXIT_USAGE)
    except amp.RemoteAmpError as e:
        _fail(args, f"the master could not answer: {e.description}", EXIT_REFUSED)
    except Exception as e:
        # Anything else is a bug here; still one line, naming the exception to report.
        _fail(args, f"unexpected {type(e).__name__}: {e}", EXIT_USAGE)


def _fail(args: argparse.Namespace, message: str, code: int, error: str | None = None) -> None:
    """One error line on stderr (and, with ``--json``, ``{"error", "message"}`` on stdout); exit ``code``."""
    print(f"papertrader-admin: error: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps({"error": error or ("REFUSED" if code == EXIT_REFUSED else "USAGE"), "message": message}))
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    task.react(run, (args,))


if __name__ == "__main__":
    main()
