"""The ``papertrader`` command: trade from a terminal or a script.

Exit codes: 0 success, 1 the server refused or failed (the message says why),
2 bad usage, a local problem or no connection.  Every failure is one
``papertrader: error: ...`` line on stderr.  ``--json`` prints machine-readable results.

Commands go through a `Session` (``papertrader.client.session``): if the
worker tried first cannot be reached, or goes away during the command, the
next one in the list is used and the session resumed there.  The session
file keeps the worker list (from the login answer) so later commands can do
the same.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import glob
import json
import os
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from OpenSSL.crypto import Error as CertificateError
from twisted.internet import task
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.error import ConnectionClosed
from twisted.protocols import amp

from papertrader import tls
from papertrader.client.chart import chart_width, render
from papertrader.client.library import PaperTraderClient, RequestTimedOut, new_client_order_ids
from papertrader.client.session import (
    DEFAULT_DIRECTORY_PORT,
    DEFAULT_WORKER_PORT,
    REQUEST_TIMEOUT,
    DirectoryUnavailable,
    NoWorkerReachable,
    Session,
    read_directory,
    tls_connector,
)
from papertrader.config import default_data_dir
from papertrader.errors import PaperTraderError, ServiceUnavailable
from papertrader.money import format_cents
from papertrader.protocol import HISTORY_RANGES

EXIT_REFUSED = 1
EXIT_USAGE = 2

# Arguments sent to the server as they are typed; none may exceed one AMP value.
_SENT_ARGUMENTS = ("username", "email", "symbol", "quantity", "symbols")
# Seconds between the Pings of a connection that only listens (``watch``, ``buy --wait``), so the worker
# keeps it and a worker that can no longer be reached is noticed (no answer within --timeout).
WATCH_HEARTBEAT = 60.0


class CommandError(Exception):
    """A problem on this side (usage, files, connection), reported with exit code 2."""


def config_dir() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "papertrader")


def session_path() -> str:
    return os.path.join(config_dir(), "session.json")


def save_session(session: dict[str, Any]) -> None:
    """Write the session file readable by the user alone (mode 0600)."""
    os.makedirs(config_dir(), mode=0o700, exist_ok=True)
    path = session_path()
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(session, f)
    os.chmod(path + ".tmp", 0o600)
    os.replace(path + ".tmp", path)


def load_session() -> dict[str, Any] | None:
    try:
        with open(session_path(), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def forget_session() -> None:
    try:
        os.unlink(session_path())
    except FileNotFoundError:
        pass


def read_password(
    args: argparse.Namespace,
    confirm: bool = False,
    option: str = "password_file",
    prompt: str = "Password",
) -> str:
    """From the file option ``option`` (first line) or a prompt; never from the command line."""
    path = getattr(args, option)
    flag = "--" + option.replace("_", "-")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
        except OSError as e:
            raise CommandError(f"cannot read password file: {e.strerror}") from None
        if not password:
            raise CommandError("password file is empty")
        _check_sendable("the password", password)
        return password
    if not sys.stdin.isatty():
        raise CommandError(f"no terminal to prompt for a password; use {flag} FILE")
    password = getpass.getpass(f"{prompt}: ")
    if confirm and getpass.getpass(f"{prompt} again: ") != password:
        raise CommandError("the passwords do not match")
    return password


def _check_sendable(what: str, value: str) -> None:
    """Refuse ``value`` here if it is longer than AMP can carry in one value."""
    size = len(value.encode("utf-8", "surrogateescape"))
    if size > amp.MAX_VALUE_LENGTH:
        raise CommandError(f"{what} is too long to send ({size:,} bytes; at most {amp.MAX_VALUE_LENGTH:,})")


def check_argument_sizes(args: argparse.Namespace) -> None:
    """Refuse, before connecting, any argument too long to send to the server."""
    for name in _SENT_ARGUMENTS:
        value = getattr(args, name, None)
        if name == "symbol" and isinstance(value, list):  # several symbols, each sent on its own
            for symbol in value:
                _check_sendable(name.upper(), symbol)
        elif isinstance(value, list):  # sent as one value: each item with a 2-byte length
            _check_sendable(name.upper(), "".join(value) + "  " * len(value))
        elif isinstance(value, str):
            _check_sendable(name.upper(), value)


def resolve_server(args: argparse.Namespace, session: dict[str, Any] | None) -> tuple[str, int, str]:
    """Which worker to talk to and which CA to trust.

    ``--server``/``--ca`` win over everything; then an explicit ``--data-dir``
    (its worker address file and CA); then the session's remembered server and
    CA; then the local deployment in the default data directory.
    """
    remembered = {} if args.data_dir else (session or {})
    data_dir = args.data_dir or default_data_dir()
    server = args.server or remembered.get("server")
    if server is None:
        addresses = sorted(glob.glob(os.path.join(data_dir, "worker-*.address")))
        if not addresses:
            raise CommandError(
                f"no --server given and no local deployment found in {data_dir}; "
                "start one with 'twistd -n papertrader-master' or pass --server HOST:PORT"
            )
        with open(addresses[0], encoding="ascii") as f:
            server = f.read().strip()
    try:
        host, port = tls.split_address(server, DEFAULT_WORKER_PORT)
    except ValueError as e:
        raise CommandError(str(e)) from None
    ca = args.ca or remembered.get("ca") or os.path.join(data_dir, "tls", "ca.pem")
    if not os.access(ca, os.R_OK):
        raise CommandError(f"cannot read the CA certificate {ca}; pass --ca FILE")
    return host, port, os.path.abspath(ca)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _address_files(data_dir: str) -> list[str]:
    """The client addresses the local deployment's workers wrote in ``data_dir``."""
    addresses = []
    for path in sorted(glob.glob(os.path.join(data_dir, "worker-*.address"))):
        try:
            with open(path, encoding="ascii") as f:
                addresses.append(f.read().strip())
        except (OSError, UnicodeDecodeError):
            continue
    return [address for address in addresses if address]


def resolve_workers(args: argparse.Namespace, session: dict[str, Any] | None) -> tuple[list[str], str]:
    """The workers to try, in order, and the CA to trust.

    The first is `resolve_server`'s.  ``--server`` names the only one; else
    the others follow: those of the saved session (the workers its login
    answer listed) unless ``--data-dir`` is given, and the local deployment's.
    """
    host, port, ca = resolve_server(args, session)
    first = _address(host, port)
    if args.server:
        return [first], ca
    others: list[str] = []
    if not args.data_dir and session:
        others.extend(w for w in session.get("workers", []) if isinstance(w, str))
    if args.data_dir or not (session or {}).get("server"):
        others.extend(_address_files(args.data_dir or default_data_dir()))
    return list(dict.fromkeys([first, *others])), ca


def resolve_directory(args: argparse.Namespace, session: dict[str, Any] | None) -> tuple[str, str]:
    """Where the master's worker directory is (``--directory``, else the local deployment's, else
    localhost:2050), and the CA to trust."""
    remembered = {} if args.data_dir else (session or {})
    data_dir = args.data_dir or default_data_dir()
    address = args.directory
    if address is None:
        try:
            with open(os.path.join(data_dir, "directory.address"), encoding="ascii") as f:
                address = f.read().strip()
        except OSError:
            address = f"localhost:{DEFAULT_DIRECTORY_PORT}"
    ca = args.ca or remembered.get("ca") or os.path.join(data_dir, "tls", "ca.pem")
    if not os.access(ca, os.R_OK):
        raise CommandError(f"cannot read the CA certificate {ca}; pass --ca FILE")
    return address, os.path.abspath(ca)


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)


def _session_token(session: dict[str, Any] | None) -> str:
    if not session or not session.get("token"):
        raise CommandError("not logged in; run 'papertrader login USERNAME' first")
    return session["token"]


# ------------------------------------------------------------------ commands


@inlineCallbacks
def cmd_register(client: PaperTraderClient, args: argparse.Namespace, session: Any, where: Any) -> Any:
    password = read_password(args, confirm=True)
    answer = yield client.register(args.username, args.email, password)
    _print(args, answer, f"registered {answer['username']}; now run 'papertrader login {answer['username']}'")


@inlineCallbacks
def cmd_login(client: PaperTraderClient, args: argparse.Namespace, session: Any, where: Any) -> Any:
    password = read_password(args)
    answer = yield client.login(args.username, password, remember=args.remember)
    save_session(
        {
            "token": answer["token"],
            "username": answer["username"],
            "expires_at": answer["expires_at"],
            "server": client.address,
            "workers": client.workers,
            "ca": where,
        }
    )
    _print(
        args,
        {"username": answer["username"], "expires_at": answer["expires_at"]},
        f"logged in as {answer['username']} until {answer['expires_at']}",
    )


@inlineCallbacks
def cmd_logout(client: PaperTraderClient, args: argparse.Namespace, session: Any, where: Any) -> Any:
    client.token = _session_token(session)
    try:
        if args.everywhere:
            answer = yield client.logout_everywhere()
        else:
            answer = yield client.logout()
    finally:
        forget_session()
    if args.everywhere:
        _print(args, answer, f"logged out everywhere ({answer['sessions']} sessions ended)")
    else:
        _print(args, {}, "logged out")


@inlineCallbacks
def cmd_passwd(client: PaperTraderClient, args: argparse.Namespace, session: Any, where: Any) -> Any:
    client.token = _session_token(session)
    old = read_password(args, prompt="Current password")
    new = read_password(args, confirm=True, option="new_password_file", prompt="New password")
    answer = yield client.change_password(old, new)
    forget_session()
    _print(
        args,
        answer,
        f"password changed; {answer['sessions']} sessions ended everywhere; log in again with the new password",
    )


def _stale_note(quote: dict[str, Any]) -> str:
    """How text output marks a price that is the last good one (the latest retrieval failed), or ""."""
    return f"  STALE ({quote['stale']}): last good price" if quote.get("stale") else ""


def _quote_line(q: dict[str, Any]) -> str:
    return (
        f"{q['symbol']}  {format_cents(q['price_cents'])}  {q['name']} ({q['exchange']}) as of {q['as_of']}"
        + _stale_note(q)
    )


@inlineCallbacks
def cmd_quote(client: PaperTraderClient, args: argparse.Namespace, session: Any, where: Any) -> Any:
    """The price of each symbol (one line each; --json: an object for one symbol, a list for several).

    Those that could be quoted are printed; a symbol that could not be is the
    error (exit 1), naming every one that failed.
    """
    symbols = list(dict.fromkeys(args.symbol))
    results = yield DeferredList([client.quote(symbol) for symbol in symbols], consumeErrors=True)
    quotes = [{**q, "price": format_cents(q["price_cents"])} for ok, q in results if ok]
    if quotes:
        _print(args, quotes[0] if len(symbols) == 1 else quotes, "\n".join(_quote_line(q) for q in quotes))
    failures = [failure for ok, failure in results if not ok]
    if failures:
        first = failures[0].value
        if len(failures) > 1 and all(isinstance(f.value, PaperTraderError) for f in failures):
            raise type(first)("; ".join(str(f.value) for f in failures))
        failures[0].raiseException()


@inlineCallbacks
def cmd_info(client: PaperTraderClient, args: argparse.Namespace, session: Any, where: Any) -> Any:
    """What the asset list says of a company, and its latest price."""
    info = yield client.asset_info(args.symbol)
    lines = [f"{info['symbol']}  {info['name']}"]
    for key in ("exchange", "sector", "industry", "currency"):
        lines.append(f"  {key:9} {info[key]}")
    if info.get("price_cents") is not None:
        lines.append(f"  {'price':9} {format_cents(info['price_cents'])} as of {info['as_of']}{_stale_note(info)}")
        info = {**info, "price": format_cents(info["price_cents"])}
    else:
        lines.append(f"  {'price':9} none yet")
    _print(args, info, "\n".join(lines))


def _until(seconds: float) -> str:
    """``2 h 15 min``, ``3 d 4 h``: how long until a change, to the minute (rounded down)."""
    minutes = max(0, int(seconds // 60))
    if minutes == 0:
        return "less than a minute"
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    parts = [f"{days} d"] if days else []
    if hours:
        parts.append(f"{hours} h")
    if minutes and not days:
        parts.append(f"{minutes} min")
    return " ".join(parts)


def market_text(status: dict[str, Any]) -> str:
    """The ``market`` command's line: open or closed, the sessions, and the next change (and how soon)."""
    if status["always_open"]:
        return "market open around the clock"
    sessions = f"hours {status['hours']} {status['days']} {status['time_zone']}"
    when = datetime.datetime.fromisoformat(status["next_change"])
    wait = _until((when - datetime.datetime.fromisoformat(status["now"])).total_seconds())
    if status["open"]:
        return f"market open ({sessions}); closes at {status['next_change']} (in {wait})"
    return f"market closed ({sessions}); opens at {status['next_change']} (in {wait})"


@inlineCallbacks
def cmd_market(client: PaperTraderClient, args: argparse.Namespace, session: Any, where: Any) -> Any:
    """Whether the market is open, and when it next opens or closes (by the server's clock)."""
    status = yield client.market_status()
    _print(args, status, market_text(status))


def terminal_columns() -> int:
    """The terminal's width in columns (``COLUMNS``, else the terminal's, else 80)."""
    return shutil.get_terminal_size((80, 24)).columns


def _duration(seconds: int) -> str:
    for unit, length in (("day", 86400), ("hour", 3600), ("min", 60)):
        if seconds >= length and seconds % length == 0:
            return f"{seconds // length} {unit}"
    return f"{seconds} s"


@inlineCallbacks
def cmd_chart(client: PaperTraderClient, args: argparse.Namespace, session: Any, where: Any) -> Any:
    """A price chart of the symbol over the range, drawn in the terminal's width (--json: every bar)."""
    history = yield client.price_history(args.symbol, args.range)
    bars = history["bars"]
    if args.json:
        _print(args, history, "")
        return
    lines = [f"{history['symbol']} over the last {history['range']}"]
    if bars:
        low = min(b["low_cents"] for b in bars)
        high = max(b["high_cents"] for b in bars)
        lines[0] += (
            f": {len(bars)} bars of {_duration(history['bar_seconds'])}, low {format_cents(low)}, "
            f"high {format_cents(high)}, last {format_cents(bars[-1]['close_cents'])} as of {history['as_of']}"
        )
    width = chart_width(terminal_columns())
    lines.extend(render(bars, history["bar_seconds"], width))
    print("\n".join(lines))


def _order_command(side: str) -> Any:
    @inlineCallbacks
    def run(client: PaperTraderClient, args: argparse.Namespace, session: Any, where: Any) -> Any:
        client.token = _session_token(session)
        place = client.buy if side == "buy" else client.sell
        client_order_id = args.client_order_id or new_client_order_ids(1)[0]
        try:
            answer = yield place(args.symbol, args.quantity, client_order_id)
        except ServiceUnavailable as e:
            # The order may or may not be stored: the same id makes a retry safe.
            raise ServiceUnavailable(
                f"{e}; to retry without placing it twice, run the same command with "
                f"--client-order-id {client_order_id}"
            ) from None
        order_id = answer["order_id"]
        if not args.wait:
            _print(
                args,
                {"order_id": order_id, "status": "queued", "client_order_id": client_order_id},
                f"order {order_id} queued: {side} {args.quantity} {args.symbol.upper()} "
                "at the next price update",
            )
            return
        client.keep_alive(WATCH_HEARTBEAT)  # a worker cut off while we wait is noticed and replaced
        try:
            update = yield client.wait_for_settlement(order_id)
        except (ConnectionClosed, NoWorkerReachable):
            raise CommandError(
                f"order {order_id} is queued, but no worker could be reached before it settled; "
                "see 'papertrader orders'"
            ) from None
        if update["status"] == "filled":
            text = (
                f"order {order_id} filled: {side} {update['quantity']} {update['symbol']} at "
                f"{format_cents(update['price_cents'])} on {update['settled_at']}"
            )
        else:
            text = f"order {order_id} rejected: {update.get('reason') or 'no reason given'}"
        _print(args, update, text)
        if update["status"] != "filled":
            raise SystemExit(EXIT_REFUSED)

    return run


@inlineCallbacks
def cmd_orders(client: PaperTraderClient, args: argparse.Namespace, session: Any, where: Any) -> Any:
    client.token = _session_token(session)
    answer = yield client.orders(None if args.all else args.limit)
    lines = [f"{'ID':>8}  {'SIDE':4}  {'SYMBOL':6}  {'QTY':>8}  {'STATUS':8}  {'PRICE':>10}  DETAIL"]
    for o in answer["orders"]:
        price = format_cents(o["price_cents"]) if o.get("price_cents") is not None else "-"
        detail = o.get("reason") or o.get("settled_at") or f"placed {o['created_at']}"
        lines.append(
            f"{o['order_id']:>8}  {o['side']:4}  {o['symbol']:6}  {o['quantity']:>8}  "
            f"{o['status']:8}  {price:>10}  {detail}"
        )
    _print(args, answer["orders"], "\n".join(lines))


@inlineCallbacks
def cmd_portfolio(client: PaperTraderClient, args: argparse.Namespace, session: Any, where: Any) -> Any:
    client.token = _session_token(session)
    p = yield client.portfolio()
    lines = [f"{p['username']}: cash {format_cents(p['cash_cents'])}"]
    for pos in p["positions"]:
        lines.append(
            f"  {pos['symbol']:6} {pos['quantity']:>8} x {format_cents(pos['price_cents']):>10}"
            f" = {format_cents(pos['value_cents']):>12}"
        )
    lines.append(f"total {format_cents(p['total_cents'])} (prices as of {p['as_of'] or 'n/a'})")
    _print(args, p, "\n".join(lines))


@inlineCallbacks
def cmd_history(client: PaperTraderClient, args: argparse.Namespace, session: Any, where: Any) -> Any:
    client.token = _session_token(session)
    answer = yield client.history(None if args.all else args.limit)
    lines = [f"{'SETTLED AT':32}  {'ORDER':>7}  {'SIDE':4}  {'SYMBOL':6}  {'QTY':>8}  {'PRICE':>10}  {'TOTAL':>12}"]
    for t in answer["transactions"]:
        lines.append(
            f"{t['settled_at']:32}  {t['order_id']:>7}  {t['side']:4}  {t['symbol']:6}  {t['quantity']:>8}  "
            f"{format_cents(t['price_cents']):>10}  {format_cents(t['total_cents']):>12}"
        )
    _print(args, answer["transactions"], "\n".join(lines))


@inlineCallbacks
def cmd_watch(client: PaperTraderClient, args: argparse.Namespace, session: Any, where: Any) -> Any:
    if bool(args.symbols) == bool(args.all):
        raise CommandError("name the symbols to watch, or --all (not both)")
    done: Deferred[None] = Deferred()
    shown = 0

    def show(tick: dict[str, Any]) -> None:
        nonlocal shown
        prices = sorted(tick["prices"], key=lambda p: p["symbol"])
        if args.json:
            print(json.dumps({**tick, "prices": prices}, sort_keys=True), flush=True)
        else:
            stale = tick.get("stale") or {}
            cents = {p["symbol"]: p["price_cents"] for p in prices}
            quoted = "  ".join(
                f"{symbol} {format_cents(cents[symbol]) if symbol in cents else '-'}"
                + (f" (stale: {stale[symbol]})" if symbol in stale else "")
                for symbol in sorted({*cents, *stale})
            )
            print(f"update {tick['tick']} as of {tick['as_of']}: {quoted}", flush=True)
        shown += 1
        if args.count is not None and shown >= args.count and not done.called:
            done.callback(None)

    client.on_price_tick(show)
    yield client.subscribe("all" if args.all else args.symbols)
    client.keep_alive(WATCH_HEARTBEAT)  # and a lost worker is replaced at once
    restore = _on_interrupt(lambda: None if done.called else done.callback(None))
    try:
        result, which = yield DeferredList(
            [done, client.when_given_up()], fireOnOneCallback=True, consumeErrors=True
        )
    finally:
        restore()
    if which == 1:
        raise result


def _on_interrupt(callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback`` in the reactor when the user presses Ctrl-C (SIGINT), instead of the reactor
    stopping under the command's feet; returns what restores the previous handling."""
    from twisted.internet import reactor

    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: reactor.callFromThread(callback))
    except ValueError:  # not the main thread: leave Ctrl-C as it is
        return lambda: None
    return lambda: signal.signal(signal.SIGINT, previous)


@inlineCallbacks
def cmd_workers(reactor: Any, args: argparse.Namespace, session: Any) -> Any:
    """Print the master's worker directory."""
    address, ca = resolve_directory(args, session)
    workers = yield read_directory(reactor, address, ca, args.timeout)
    lines = [f"{'NAME':20}  ADDRESS"] + [f"{w['name']:20}  {w['address']}" for w in workers]
    _print(args, workers, "\n".join(lines) if workers else "no workers are connected to the master")


# ------------------------------------------------------------------ parsing and running


def _seconds(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        number = 0.0
    if not 0 < number < 86400:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0 and below a day, got {text!r}")
    return number


def _positive(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return number


def _add_limit(parser: argparse.ArgumentParser, default: int, what: str) -> None:
    """``--limit N`` (the newest N, default ``default``) or ``--all``."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--limit", type=_positive, default=default, metavar="N",
                       help=f"show the newest N {what} (default {default})")
    group.add_argument("--all", action="store_true", help=f"show every one of your {what}")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument("--server", metavar="HOST:PORT", help="worker to connect to (default: the local deployment)")
    common.add_argument("--ca", metavar="FILE", help="CA certificate to trust (default: the local deployment's)")
    common.add_argument("--data-dir", metavar="DIR", help="local deployment's data directory")
    common.add_argument(
        "--directory",
        metavar="HOST:PORT",
        help="the master's worker directory (default: the local deployment's, or localhost:2050); "
        "commands then use the workers it lists",
    )
    common.add_argument("--json", action="store_true", help="print machine-readable JSON")
    common.add_argument(
        "--timeout",
        type=_seconds,
        default=REQUEST_TIMEOUT,
        metavar="SECONDS",
        help=f"give up on a worker that does not connect or answer a request within SECONDS, and use the next "
        f"(default {REQUEST_TIMEOUT:g})",
    )

    parser = argparse.ArgumentParser(
        prog="papertrader", description="Trade stocks with fake money on PaperTrader.", allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, run: Any, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help, allow_abbrev=False)
        p.set_defaults(run=run)
        return p

    p = add("register", cmd_register, "create an account")
    p.add_argument("username")
    p.add_argument("email")
    p.add_argument("--password-file", metavar="FILE", help="read the password from FILE's first line")
    p = add("login", cmd_login, "log in and keep the session for later commands")
    p.add_argument("username")
    p.add_argument("--remember", action="store_true", help="keep the session for longer")
    p.add_argument("--password-file", metavar="FILE", help="read the password from FILE's first line")
    p = add("logout", cmd_logout, "end the saved session")
    p.add_argument("--everywhere", action="store_true", help="end every session of this account, on every device")
    p = add("passwd", cmd_passwd, "change your password (ends every session: log in again)")
    p.add_argument("--password-file", metavar="FILE", help="read the current password from FILE's first line")
    p.add_argument("--new-password-file", metavar="FILE", help="read the new password from FILE's first line")
    p = add("quote", cmd_quote, "show the latest price of one or more assets (a stale one says so, and why)")
    p.add_argument("symbol", nargs="+", metavar="SYMBOL")
    p = add("info", cmd_info, "show what the asset list says of a company, and its latest price")
    p.add_argument("symbol")
    p = add("chart", cmd_chart, "draw an asset's price history in the terminal (--json: the bars)")
    p.add_argument("symbol")
    p.add_argument("--range", choices=HISTORY_RANGES, default="day", help="how far back (default: day)")
    for side in ("buy", "sell"):
        p = add(side, _order_command(side), f"queue a market {side} order for the next price update")
        p.add_argument("symbol")
        p.add_argument("quantity", help="whole number of shares")
        p.add_argument("--wait", action="store_true", help="wait until the order settles and show the fill")
        p.add_argument(
            "--client-order-id",
            metavar="ID",
            help="your id for this order (default: a new UUID); the same id again returns the same order",
        )
    p = add("orders", cmd_orders, "list your recent orders and their status")
    _add_limit(p, 20, "orders")
    add("portfolio", cmd_portfolio, "show your cash and positions")
    p = add("history", cmd_history, "list your settled trades with the time each went through")
    _add_limit(p, 50, "trades")
    p = add(
        "watch",
        cmd_watch,
        "print the prices of every update as it comes, a stale one with its reason, until interrupted "
        "(--json: one JSON object a line)",
    )
    p.add_argument("symbols", nargs="*", metavar="SYMBOL", help="the symbols to watch")
    p.add_argument("--all", action="store_true", help="watch every symbol")
    p.add_argument("--count", type=_positive, metavar="N", help="stop after N updates (default: until interrupted)")
    add("market", cmd_market, "show whether the market is open, and when it next opens or closes")
    add("workers", cmd_workers, "list the workers the master's directory names, and where clients reach each")
    return parser


@inlineCallbacks
def _workers_from_directory(reactor: Any, args: argparse.Namespace, session: Any) -> Any:
    address, ca = resolve_directory(args, session)
    rows = yield read_directory(reactor, address, ca, args.timeout)
    if not rows:
        raise CommandError(f"the worker directory at {address} lists no workers")
    return [row["address"] for row in rows], ca


def _remember_workers(saved: dict[str, Any] | None, session: Session) -> None:
    """Keep in the session file the worker list and the worker used, if they changed."""
    if not saved or not saved.get("token") or session.token != saved["token"] or session.address is None:
        return
    if saved.get("server") != session.address or saved.get("workers") != session.workers:
        save_session({**saved, "server": session.address, "workers": session.workers})


@inlineCallbacks
def run(reactor: Any, args: argparse.Namespace) -> Any:
    saved = load_session()
    try:
        check_argument_sizes(args)
        if args.command == "workers":
            yield cmd_workers(reactor, args, saved)
            return
        if args.directory and not args.server:
            workers, ca = yield _workers_from_directory(reactor, args, saved)
        else:
            workers, ca = resolve_workers(args, saved)
        session = Session(reactor, tls_connector(reactor, ca, args.timeout), workers, request_timeout=args.timeout)
        try:
            yield args.run(session, args, saved, ca)
        except NoWorkerReachable as e:
            raise CommandError(f"cannot connect: {e}") from None
        except CertificateError as e:
            raise CommandError(f"cannot use the CA certificate {ca}: {e}") from None
        finally:
            session.close()
        if args.command not in ("logout", "passwd", "login"):
            _remember_workers(saved, session)
    except DirectoryUnavailable as e:
        _fail(str(e), EXIT_USAGE)
    except CommandError as e:
        _fail(str(e), EXIT_USAGE)
    except PaperTraderError as e:
        _fail(str(e), EXIT_REFUSED)
    except RequestTimedOut as e:
        _fail(str(e), EXIT_USAGE)
    except ConnectionClosed:
        _fail("the server closed the connection", EXIT_USAGE)
    except amp.TooLong as e:
        name = e.keyName.decode("ascii", "replace") if e.keyName else "a key"
        _fail(f"{name} is too long to send (at most {amp.MAX_VALUE_LENGTH:,} bytes)", EXIT_USAGE)
    except amp.RemoteAmpError as e:
        _fail(f"the server could not answer: {e.description}", EXIT_REFUSED)
    except Exception as e:
        # Anything else is a bug here; still one line, naming the exception to report.
        _fail(f"unexpected {type(e).__name__}: {e}", EXIT_USAGE)


def _fail(message: str, code: int) -> None:
    print(f"papertrader: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    task.react(run, (args,))


if __name__ == "__main__":
    main()
