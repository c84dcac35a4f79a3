"""AMP Commands and wire errors for every PaperTrader link.

Traffic in each direction:

- client -> worker: Register, Login, LoginWithToken, Logout, LogoutEverywhere,
  ChangePassword, GetAssetValue, GetAssetInfo, GetPriceHistory (the worker
  answers these from its cache where it can),
  PurchaseAsset, SellAsset, ListOrders, GetUserPortfolio,
  GetUserTransactionHistory, GetMarketStatus; Subscribe, which the worker answers itself
  (which price ticks the connection wants: none until it asks).
- worker -> master: WorkerHello and WorkerProof first (the handshake: the
  master's nonce signed with the worker's OpenPGP key), then each client
  command relayed with the envelope the worker stamps on it (the time it was
  received and the client's address) -- ``Relayed*`` below -- except orders,
  which travel in batches as SubmitOrders (the orders a client sent together
  as one group, stamped once); ListAssets fills the worker's cache;
  ServedUsers after the handshake names the users the worker has sessions of.
- master -> worker: PriceTick after every price update and OrderUpdates when
  queued orders settle or are rejected (only to the workers that serve the
  order's user); Ping when another connection claims the worker's name;
  WorkerStatus when an administrator asks for the worker's live figures;
  WorkerDirectory whenever the list of workers clients can use changes;
  BootOff when the worker is kicked (it tells its clients GoAway).
- client -> master's directory listener: ListWorkers, the only command there.
- worker -> client: PriceTick (the subscribed prices) and OrderUpdates (the
  user's own), pushed; GoAway (with the other workers) before the worker
  closes the connection because it was kicked.  A push is encoded once and the same bytes written to
  every connection that gets it (`push_bytes`).
- both ways on the worker-master link, and client -> worker: Heartbeat, so a
  silent link is noticed and closed (see `papertrader.wire`); a worker's
  Heartbeat to the master says how many clients it has.  Client -> worker:
  Ping, answered by the worker itself, so a client notices a worker it can no longer reach.

Money is integer cents (``*_cents``); instants are ISO 8601 UTC text.
Every expected failure is declared, from the one table `WIRE_CODES`:
anything undeclared makes AMP drop the connection.  Every command also
declares BadRequest (a request that could not be read) and
ServiceUnavailable.
"""

from __future__ import annotations

import json
from typing import Any

import attr
from twisted.protocols import amp

from papertrader.assets import MAX_ASSETS, MAX_STALE_REASON, MAX_TEXT
from papertrader.errors import (
    AdminRefused,
    BadRequest,
    Busy,
    DataFailed,
    LoginFailed,
    OrderConflict,
    PaperTraderError,
    PasswordChangeFailed,
    PurchaseFailed,
    RegisterFailed,
    SellFailed,
    ServiceUnavailable,
    SessionInvalid,
    UnknownWorker,
    WorkerExists,
    WorkerKeyRejected,
    WorkerRefused,
)
from papertrader.paging import BoundedText, page_fields, rows_per_page
from papertrader.wire import BAD_REQUEST
from papertrader.wire import Heartbeat as Heartbeat  # one of the commands, defined with the connection it keeps alive


class JSON(amp.Argument):
    """A JSON value: far cheaper to encode and parse than an AmpList of many small rows."""

    def toString(self, inObject: Any) -> bytes:
        return json.dumps(inObject, separators=(",", ":")).encode("utf-8")

    def fromString(self, inString: bytes) -> Any:
        return json.loads(inString)


# Longest accepted client-supplied fields of an order; they bound the size of a SubmitOrders batch.
MAX_TOKEN_LENGTH = 128
MAX_SYMBOL_LENGTH = 16
MAX_CURRENCY_LENGTH = 8
MAX_QUANTITY_LENGTH = 32
MAX_CLIENT_ORDER_ID_LENGTH = 64


def plain_text(value: str) -> bool:
    """Whether ``value`` is printable ASCII other than ``"`` and ``\\``: text JSON writes at one byte a character.

    The worker takes no other text in an order's token, symbol, quantity or
    client order id (none needs any other), so a field's length is its size
    in a SubmitOrders batch: control characters would cost six bytes each.
    """
    return value.isascii() and value.isprintable() and '"' not in value and "\\" not in value


# Longest text of the fields of a listed row (timestamps are 32 characters; reasons are cut to this).
MAX_TIMESTAMP_LENGTH = 40
MAX_ORDER_REASON = 200

# Every declared failure and its wire code: the one table both ends of every link use.
WIRE_CODES: dict[type[PaperTraderError], bytes] = {
    BadRequest: BAD_REQUEST,
    ServiceUnavailable: b"SERVICE_UNAVAILABLE",
    SessionInvalid: b"SESSION_INVALID",
    RegisterFailed: b"REGISTER_FAILED",
    LoginFailed: b"LOGIN_FAILED",
    PurchaseFailed: b"PURCHASE_FAILED",
    SellFailed: b"SELL_FAILED",
    DataFailed: b"DATA_FAILED",
    WorkerRefused: b"WORKER_REFUSED",
    OrderConflict: b"ORDER_CONFLICT",
    PasswordChangeFailed: b"PASSWORD_CHANGE_FAILED",
    Busy: b"BUSY",
    WorkerExists: b"WORKER_EXISTS",
    UnknownWorker: b"UNKNOWN_WORKER",
    WorkerKeyRejected: b"WORKER_KEY_REJECTED",
    AdminRefused: b"ADMIN_REFUSED",
}
_ERRORS_BY_CODE = {code.decode("ascii"): error for error, code in WIRE_CODES.items()}


def declared(*errors: type[PaperTraderError]) -> dict[type[PaperTraderError], bytes]:
    """The ``errors`` of a Command that can fail with ``errors``: those, BadRequest and ServiceUnavailable."""
    return {error: WIRE_CODES[error] for error in (BadRequest, ServiceUnavailable, *errors)}


def error_code(error: PaperTraderError) -> str:
    """The wire code of ``error``, as text (for results that travel inside JSON)."""
    return WIRE_CODES[type(error)].decode("ascii")


def error_from_code(code: str, reason: str) -> PaperTraderError:
    """The error that wire code ``code`` stands for (ServiceUnavailable for a code it does not know)."""
    return _ERRORS_BY_CODE.get(code, ServiceUnavailable)(reason)


_UNAVAILABLE = declared()
_SESSION = declared(SessionInvalid)

# The worker directory: each worker's name and the HOST:PORT its clients reach it on.
MAX_WORKER_NAME_LENGTH = 64
MAX_WORKER_ADDRESS_LENGTH = 260  # a DNS name (253) and a port
# Workers carried in one WorkerDirectory push, Login answer or GoAway (about 34 KB at worst):
# a client needs a few to fail over to; the directory listener lists every one, in pages.
MAX_LISTED_WORKERS = 100


def check_worker_address(text: str) -> str:
    """``text`` if it is a ``HOST:PORT`` a client can connect to (``[v6]:PORT`` too); ValueError if not."""
    host, sep, port = text.rpartition(":")
    if (
        not sep
        or not host
        or len(text) > MAX_WORKER_ADDRESS_LENGTH
        or not text.isascii()
        or not text.isprintable()
        or " " in text
        or not port.isdigit()
        or not 0 < int(port) < 65536
        or (":" in host and not (host.startswith("[") and host.endswith("]")))
    ):
        raise ValueError(f"expected HOST:PORT, got {text[:MAX_WORKER_ADDRESS_LENGTH]!r}")
    return text


class WorkerList(JSON):
    """A JSON list of at most MAX_LISTED_WORKERS ``{"name", "address"}`` rows, checked as it is received."""

    def fromString(self, inString: bytes) -> list[dict[str, str]]:
        rows = super().fromString(inString)
        if not isinstance(rows, list) or len(rows) > MAX_LISTED_WORKERS:
            raise BadRequest(f"expected a list of at most {MAX_LISTED_WORKERS} workers")
        workers = []
        for row in rows:
            if not isinstance(row, dict) or set(row) != {"name", "address"}:
                raise BadRequest("each worker must be an object with a name and an address")
            name, address = row["name"], row["address"]
            if not isinstance(name, str) or not 0 < len(name) <= MAX_WORKER_NAME_LENGTH:
                raise BadRequest(f"a worker's name must be text of 1-{MAX_WORKER_NAME_LENGTH} characters")
            try:
                check_worker_address(address if isinstance(address, str) else "")
            except ValueError as e:
                raise BadRequest(f"worker {name!r}: {e}") from None
            workers.append({"name": name, "address": address})
        return workers


# ---------------------------------------------------------------- client -> worker


class Register(amp.Command):
    """Create an account; the password is hashed with bcrypt on the master."""

    arguments = [
        (b"username", amp.Unicode()),
        (b"email", amp.Unicode()),
        (b"password", amp.Unicode()),
    ]
    response = [(b"username", amp.Unicode())]
    errors = declared(RegisterFailed, Busy)


class Login(amp.Command):
    """Log in with username and password; answers a new session token."""

    arguments = [
        (b"username", amp.Unicode()),
        (b"password", amp.Unicode()),
        (b"remember", amp.Boolean(optional=True)),
    ]
    response = [
        (b"token", amp.Unicode()),
        (b"username", amp.Unicode()),
        (b"expires_at", amp.Unicode()),
        # The workers clients may use (added by the worker; the master's answer has none).
        (b"workers", WorkerList(optional=True)),
    ]
    errors = declared(LoginFailed, Busy)


class LoginWithToken(amp.Command):
    """Log in with an existing session token (the spec's second login method)."""

    arguments = [(b"token", amp.Unicode())]
    response = [
        (b"username", amp.Unicode()),
        (b"expires_at", amp.Unicode()),
        (b"workers", WorkerList(optional=True)),  # as in Login's answer
    ]
    errors = dict(_SESSION)


class Logout(amp.Command):
    """End a session; its token stops working everywhere."""

    arguments = [(b"token", amp.Unicode())]
    response: list = []
    errors = dict(_SESSION)


class LogoutEverywhere(amp.Command):
    """End every session of the token's user, on every device and worker; answers how many ended."""

    arguments = [(b"token", amp.Unicode())]
    response = [(b"sessions", amp.Integer())]
    errors = dict(_SESSION)


class ChangePassword(amp.Command):
    """Replace the password; every session of the user ends, this one too (log in again)."""

    arguments = [
        (b"token", amp.Unicode()),
        (b"old_password", amp.Unicode()),
        (b"new_password", amp.Unicode()),
    ]
    response = [(b"sessions", amp.Integer())]
    errors = declared(SessionInvalid, PasswordChangeFailed, Busy)


# A list request without ``cursor`` asks for the first page; each answer is
# page ``page`` of ``pages`` and, but on the last, gives the next page's ``next_cursor``.
_PAGE_REQUEST = [(b"cursor", amp.Unicode(optional=True))]


class GetAssetValue(amp.Command):
    """The current price of one asset, as of the latest price update.

    ``stale`` says why, when the latest retrieval of the symbol failed:
    ``price_cents`` is then its last good price, and its orders wait.
    """

    arguments = [(b"symbol", amp.Unicode())]
    response = [
        (b"symbol", amp.Unicode()),
        (b"name", amp.Unicode()),
        (b"exchange", amp.Unicode()),
        (b"price_cents", amp.Integer()),
        (b"as_of", amp.Unicode()),
        (b"stale", amp.Unicode(optional=True)),
    ]
    errors = declared(DataFailed)


class GetAssetInfo(amp.Command):
    """What the asset list says of one company, with its latest price if it has one (spec 2.3.1).

    ``price_cents``, ``as_of`` and ``stale`` as for GetAssetValue, left out
    while the market has no price for it.  An unknown symbol: DataFailed.
    """

    arguments = [(b"symbol", amp.Unicode())]
    response = [
        (b"symbol", amp.Unicode()),
        (b"name", amp.Unicode()),
        (b"exchange", amp.Unicode()),
        (b"sector", amp.Unicode()),
        (b"industry", amp.Unicode()),
        (b"currency", amp.Unicode()),
        (b"price_cents", amp.Integer(optional=True)),
        (b"as_of", amp.Unicode(optional=True)),
        (b"stale", amp.Unicode(optional=True)),
    ]
    errors = declared(DataFailed)


class GetMarketStatus(amp.Command):
    """Whether the deployment's market is open now, and when that next changes (its trading calendar).

    Times are ISO 8601 in the market's time zone (``time_zone``); ``hours``
    (``09:30-16:00``) and ``days`` (``mon-fri``) are its sessions' local times
    and weekdays.  ``next_change`` (the next opening while closed, the next
    closing while open) is left out when the market is ``always_open``.
    """

    arguments: list[tuple[bytes, amp.Argument]] = []
    response = [
        (b"open", amp.Boolean()),
        (b"always_open", amp.Boolean()),
        (b"now", amp.Unicode()),
        (b"next_change", amp.Unicode(optional=True)),
        (b"time_zone", amp.Unicode()),
        (b"hours", amp.Unicode()),
        (b"days", amp.Unicode()),
    ]
    errors = declared()


# The ranges of price history one can ask for, longest last.
HISTORY_RANGES = ("day", "week", "month", "year", "all")

BAR_FIELDS = [
    # The bar's first instant (ISO 8601 UTC); it spans the answer's ``bar_seconds``.
    (b"start", BoundedText(MAX_TIMESTAMP_LENGTH, ascii=True)),
    (b"open_cents", amp.Integer()),
    (b"high_cents", amp.Integer()),
    (b"low_cents", amp.Integer()),
    (b"close_cents", amp.Integer()),
]
BARS_PER_PAGE = rows_per_page(BAR_FIELDS)


class GetPriceHistory(amp.Command):
    """A page of one asset's price history over ``range`` (HISTORY_RANGES) as OHLC bars, oldest first.

    Each range has its own bar length (``bar_seconds``: minutes for a day,
    days for a year), and ends at the symbol's latest price.  Paged like
    ListOrders: the pages of one reading hold the history as of its first
    page, whatever updates come meanwhile.  An unknown symbol or range, or a
    cursor not from this reading: DataFailed.
    """

    arguments = [(b"symbol", amp.Unicode()), (b"range", amp.Unicode()), *_PAGE_REQUEST]
    response = [
        (b"symbol", amp.Unicode()),
        (b"range", amp.Unicode()),
        (b"bar_seconds", amp.Integer()),
        (b"bars", amp.AmpList(BAR_FIELDS)),
        (b"as_of", amp.Unicode(optional=True)),
        *page_fields(),
    ]
    errors = declared(DataFailed)


class PurchaseAsset(amp.Command):
    """Queue a market buy; answered only once the order is stored.

    ``quantity`` is text so that a malformed number gets a declared error.
    """

    arguments = [
        (b"token", amp.Unicode()),
        (b"symbol", amp.Unicode()),
        (b"quantity", amp.Unicode()),
        # The client's own id for the order: sending it again returns the same
        # order instead of placing a second one (so a retry is always safe).
        (b"client_order_id", amp.Unicode(optional=True)),
    ]
    response = [(b"order_id", amp.Integer())]
    errors = declared(PurchaseFailed, SessionInvalid, OrderConflict)


class SellAsset(amp.Command):
    """Queue a market sell; answered only once the order is stored."""

    arguments = PurchaseAsset.arguments
    response = PurchaseAsset.response
    errors = declared(SellFailed, SessionInvalid, OrderConflict)


# Fields of listed rows: each text is bounded, so a page's size is known (see papertrader.paging).
_SIDE = BoundedText(8, ascii=True)
_SYMBOL = BoundedText(MAX_SYMBOL_LENGTH, ascii=True)

ORDER_FIELDS = [
    (b"order_id", amp.Integer()),
    (b"side", _SIDE),
    (b"symbol", _SYMBOL),
    (b"quantity", amp.Integer()),
    (b"status", BoundedText(8, ascii=True)),
    (b"reason", BoundedText(MAX_ORDER_REASON, optional=True)),
    (b"created_at", BoundedText(MAX_TIMESTAMP_LENGTH, ascii=True)),
    (b"settled_at", BoundedText(MAX_TIMESTAMP_LENGTH, ascii=True, optional=True)),
    (b"price_cents", amp.Integer(optional=True)),
    (b"client_order_id", BoundedText(MAX_CLIENT_ORDER_ID_LENGTH, ascii=True, optional=True)),
]
ORDERS_PER_PAGE = rows_per_page(ORDER_FIELDS)



class ListOrders(amp.Command):
    """A page of the user's orders, newest first, with their status.

    The pages of one listing hold the orders that existed at its first page.
    A cursor that is malformed or not from this user's listing gets DataFailed.
    """

    arguments = [(b"token", amp.Unicode()), *_PAGE_REQUEST]
    response = [(b"orders", amp.AmpList(ORDER_FIELDS)), *page_fields()]
    errors = declared(DataFailed, SessionInvalid)


POSITION_FIELDS = [
    (b"symbol", _SYMBOL),
    (b"quantity", amp.Integer()),
    (b"price_cents", amp.Integer()),
    (b"value_cents", amp.Integer()),
]
POSITIONS_PER_PAGE = rows_per_page(POSITION_FIELDS)


class GetUserPortfolio(amp.Command):
    """Cash and a page of the positions (by symbol), valued at the latest prices.

    Every page carries the whole portfolio's cash and total.  The pages of one
    reading are of one portfolio at one tick: if a price update or a fill
    changed it since the first page, the next page is refused with DataFailed
    and the reading starts again.
    """

    arguments = [(b"token", amp.Unicode()), *_PAGE_REQUEST]
    response = [
        (b"username", amp.Unicode()),
        (b"cash_cents", amp.Integer()),
        (b"positions", amp.AmpList(POSITION_FIELDS)),
        (b"total_cents", amp.Integer()),
        (b"as_of", amp.Unicode()),
        *page_fields(),
    ]
    errors = declared(DataFailed, SessionInvalid)


TRANSACTION_FIELDS = [
    (b"order_id", amp.Integer()),
    (b"side", _SIDE),
    (b"symbol", _SYMBOL),
    (b"quantity", amp.Integer()),
    (b"price_cents", amp.Integer()),
    (b"total_cents", amp.Integer()),
    (b"cash_after_cents", amp.Integer()),
    (b"settled_at", BoundedText(MAX_TIMESTAMP_LENGTH, ascii=True)),
]
TRANSACTIONS_PER_PAGE = rows_per_page(TRANSACTION_FIELDS)


class GetUserTransactionHistory(amp.Command):
    """A page of the user's settled trades, newest first, each with the time it went through.

    Paged like ListOrders: a listing holds the trades that existed at its first page.
    """

    arguments = [(b"token", amp.Unicode()), *_PAGE_REQUEST]
    response = [(b"transactions", amp.AmpList(TRANSACTION_FIELDS)), *page_fields()]
    errors = declared(DataFailed, SessionInvalid)


# The most symbols one Subscribe may list; past it, subscribe to all prices.
MAX_SUBSCRIBED_SYMBOLS = 100


class Subscribe(amp.Command):
    """Which price ticks to push to this connection; answered by the worker itself, never relayed.

    Replaces the connection's earlier choice.  ``all_prices`` asks for every
    price of every tick; otherwise ``prices`` lists the symbols wanted (at most
    MAX_SUBSCRIBED_SYMBOLS; none, the default of a new connection: no ticks).
    A logged-in connection gets its user's order updates whatever it chose.
    An unknown symbol, too many symbols, or both arguments: DataFailed.  The
    answer says what the connection now gets.
    """

    arguments = [
        (b"prices", amp.ListOf(amp.Unicode(), optional=True)),
        (b"all_prices", amp.Boolean(optional=True)),
    ]
    response = [(b"prices", amp.ListOf(amp.Unicode())), (b"all_prices", amp.Boolean())]
    errors = declared(DataFailed)


# ---------------------------------------------------------------- worker -> master

ENVELOPE = [(b"received_at", amp.Unicode()), (b"client_address", amp.Unicode())]


def _relayed(command: type[amp.Command]) -> type[amp.Command]:
    """The worker-to-master form of a client command: its arguments plus the envelope."""
    return type(
        "Relayed" + command.__name__,
        (amp.Command,),
        {
            "__doc__": f"{command.__name__}, stamped by the worker that received it.",
            "__module__": __name__,
            "arguments": list(command.arguments) + ENVELOPE,
            "response": command.response,
            "errors": command.errors,
        },
    )


# Each client command the worker passes on, and its relayed twin.  (Orders
# travel in SubmitOrders batches instead.)
RELAYED: dict[type[amp.Command], type[amp.Command]] = {
    command: _relayed(command)
    for command in (
        Register,
        Login,
        LoginWithToken,
        Logout,
        LogoutEverywhere,
        ChangePassword,
        GetAssetValue,
        GetAssetInfo,
        GetPriceHistory,
        ListOrders,
        GetUserPortfolio,
        GetUserTransactionHistory,
        GetMarketStatus,
    )
}
RelayedRegister = RELAYED[Register]
RelayedLogin = RELAYED[Login]
RelayedLoginWithToken = RELAYED[LoginWithToken]
RelayedLogout = RELAYED[Logout]
RelayedLogoutEverywhere = RELAYED[LogoutEverywhere]
RelayedChangePassword = RELAYED[ChangePassword]
RelayedGetAssetValue = RELAYED[GetAssetValue]
RelayedGetAssetInfo = RELAYED[GetAssetInfo]
RelayedGetPriceHistory = RELAYED[GetPriceHistory]
RelayedListOrders = RELAYED[ListOrders]
RelayedGetUserPortfolio = RELAYED[GetUserPortfolio]
RelayedGetUserTransactionHistory = RELAYED[GetUserTransactionHistory]
RelayedGetMarketStatus = RELAYED[GetMarketStatus]


class WorkerHello(amp.Command):
    """The worker's handshake, first step: the first command on a worker's connection.

    The worker names itself (and says where clients reach it: ``client_address``,
    HOST:PORT); the master answers a fresh ``nonce`` for it to sign (WorkerProof),
    or refuses: the name is not registered, is disabled, or may not connect from
    this address.
    """

    arguments = [
        (b"name", amp.Unicode()),
        (b"version", amp.Unicode()),
        # The HOST:PORT clients reach this worker on (none: the worker is not listed in the directory).
        (b"client_address", amp.Unicode(optional=True)),
    ]
    response = [(b"nonce", amp.Unicode())]
    errors = declared(WorkerRefused)


class WorkerProof(amp.Command):
    """The worker's handshake, second step: its OpenPGP signature (an armored signed message) over
    `papertrader.gpg.proof_statement` of its name and the nonce.

    The master answers with how the link runs from here on, or refuses (and
    closes the connection): not the worker's registered key, not this nonce, the
    nonce expired or spent, the key expired or revoked.
    """

    arguments = [(b"signature", amp.Unicode())]
    response = [
        (b"update_interval", amp.Float()),
        # Seconds between the Heartbeats each side sends; a link silent for two is closed.
        (b"heartbeat_interval", amp.Float(optional=True)),
        # Whether SubmitOrders may carry ``groups`` (a master that does not say takes rows only).
        (b"order_groups", amp.Boolean(optional=True)),
    ]
    errors = declared(WorkerRefused)


class Ping(amp.Command):
    """Answer if alive.  Master -> worker: decides whether a second connection may take a worker's name.
    Client -> worker: the worker answers it itself, so a client learns that the worker and the way to it are up."""

    arguments: list = []
    response: list = []
    errors = declared()


class WorkerStatus(amp.Command):
    """Master -> worker: the worker's live figures (for ``papertrader-admin worker info``).

    ``commands_relayed`` counts client commands and orders passed on to the
    master since the worker started; ``uptime`` is in seconds; ``tick`` and
    ``as_of`` are those of the cached quotes (tick 0, no ``as_of``: none yet).
    """

    arguments: list = []
    response = [
        (b"clients", amp.Integer()),
        (b"sessions", amp.Integer()),
        (b"commands_relayed", amp.Integer()),
        (b"uptime", amp.Float()),
        (b"tick", amp.Integer()),
        (b"as_of", amp.Unicode(optional=True)),
    ]
    errors = declared()


class WorkerDirectory(amp.Command):
    """Master -> worker: the workers clients may use now (connected, enabled, with a client address).

    Sent after the handshake and whenever the list changes; the worker passes
    it on in its Login and LoginWithToken answers.
    """

    arguments = [(b"workers", WorkerList())]
    requiresAnswer = False


class BootOff(amp.Command):
    """Master -> worker: you are kicked.  The worker tells each client GoAway (pointing it to ``workers``,
    the others) and closes its connection, answers how many clients it told, and then the master
    closes the link; the worker reconnects only after its refusal back-off."""

    arguments = [(b"reason", amp.Unicode()), (b"workers", WorkerList())]
    response = [(b"clients", amp.Integer())]
    errors = declared()


class GoAway(amp.Command):
    """Worker -> client, pushed just before the worker closes the connection: resume on one of ``workers``."""

    arguments = [(b"reason", amp.Unicode()), (b"workers", WorkerList())]
    requiresAnswer = False


# ---------------------------------------------------------------- client -> master's directory listener

DIRECTORY_FIELDS = [
    (b"name", BoundedText(MAX_WORKER_NAME_LENGTH)),
    (b"address", BoundedText(MAX_WORKER_ADDRESS_LENGTH, ascii=True)),
]
WORKERS_PER_PAGE = rows_per_page(DIRECTORY_FIELDS)


class ListWorkers(amp.Command):
    """A page of the worker directory: connected, enabled workers and the HOST:PORT clients reach each on.

    The only command the master's directory listener answers.  Paged like
    ListOrders (a cursor from another listing, or stale: DataFailed).
    """

    arguments = [(b"cursor", amp.Unicode(optional=True))]
    response = [(b"workers", amp.AmpList(DIRECTORY_FIELDS)), *page_fields()]
    errors = declared(DataFailed)


ASSET_FIELDS = [
    (b"symbol", _SYMBOL),
    (b"name", BoundedText(MAX_TEXT)),
    (b"exchange", BoundedText(MAX_TEXT)),
    (b"sector", BoundedText(MAX_TEXT)),
    (b"industry", BoundedText(MAX_TEXT)),
    (b"price_cents", amp.Integer(optional=True)),
    (b"currency", BoundedText(MAX_CURRENCY_LENGTH, ascii=True, optional=True)),
    (b"stale", BoundedText(MAX_STALE_REASON, optional=True)),
]
ASSETS_PER_PAGE = rows_per_page(ASSET_FIELDS)


class ListAssets(amp.Command):
    """A page of the tradable assets with their prices as of ``tick``, for the worker's cache.

    Paged like ListOrders; the worker reads every page at its handshake.
    """

    arguments = list(_PAGE_REQUEST)
    response = [
        (b"assets", amp.AmpList(ASSET_FIELDS)),
        (b"tick", amp.Integer()),
        (b"as_of", amp.Unicode(optional=True)),
        *page_fields(),
    ]
    errors = declared(DataFailed)


# Orders per SubmitOrders box.  With every field at its bound, 150 orders of
# one client each come to 67 KB as groups (72 KB as rows), over the 64 KiB an
# AMP value may hold (with real tokens and stamps: 47 KB): so a worker measures
# each batch it packs (`pack_order_groups`) and splits one that is too long.
MAX_ORDER_BATCH = 150
# The most bytes an AMP value may hold.
MAX_VALUE_BYTES = amp.MAX_VALUE_LENGTH

# The longest ``received_at`` and ``client_address`` of a relayed order.
MAX_STAMP_LENGTH = 64


def _text(row: dict[str, Any], key: str, limit: int, optional: bool = False) -> str | None:
    value = row.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > limit or not value.isascii():
        raise BadRequest(f"order field {key!r} must be ASCII text of at most {limit} characters")
    return value


def _texts(row: Any, fields: tuple[tuple[str, int, bool], ...]) -> list[str | None]:
    """The values of ``fields`` (key, limit, optional) of a received row, checked as `_text` does.

    One loop over a row instead of a call per field: these rows arrive by the
    thousand per second, and every received row is checked.  Any ASCII passes
    here, though a worker sends only `plain_text`: a master that refused a row
    would refuse its whole SubmitOrders, other users' orders too, where the
    exchange refuses just the one order.
    """
    if type(row) is not dict:
        raise BadRequest("each order must be an object")
    values = []
    get = row.get
    for key, limit, optional in fields:
        value = get(key)
        if type(value) is str and len(value) <= limit and value.isascii():
            values.append(value)
        elif value is None and optional:
            values.append(None)
        else:
            values.append(_text(row, key, limit, optional))  # raises BadRequest, or accepts a str subclass
    return values


def _without_none(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` without the keys whose value is None (how optional fields travel: left out)."""
    return {key: value for key, value in row.items() if value is not None}


@attr.s(frozen=True, auto_attribs=True)
class OrderRequest:
    """One PurchaseAsset/SellAsset inside a SubmitOrders batch, with its envelope."""

    side: str
    token: str
    symbol: str
    quantity: str
    received_at: str
    client_address: str
    client_order_id: str | None = None

    @classmethod
    def from_wire(cls, row: Any) -> OrderRequest:
        """Check one received row; BadRequest if it is not an order the worker could have sent."""
        return cls(*_texts(row, _ORDER_REQUEST_FIELDS))

    def to_wire(self) -> dict[str, str]:
        row = {
            "side": self.side,
            "token": self.token,
            "symbol": self.symbol,
            "quantity": self.quantity,
            "received_at": self.received_at,
            "client_address": self.client_address,
        }
        if self.client_order_id is not None:
            row["client_order_id"] = self.client_order_id
        return row


# The fields of an OrderRequest row, in the class's order: (key, longest, optional).
_ORDER_REQUEST_FIELDS = (
    ("side", 8, False),
    ("token", MAX_TOKEN_LENGTH, False),
    ("symbol", MAX_SYMBOL_LENGTH, False),
    ("quantity", MAX_QUANTITY_LENGTH, False),
    ("received_at", MAX_STAMP_LENGTH, False),
    ("client_address", MAX_STAMP_LENGTH, False),
    ("client_order_id", MAX_CLIENT_ORDER_ID_LENGTH, True),
)


@attr.s(frozen=True, auto_attribs=True)
class OrderResult:
    """What became of one OrderRequest: queued (``order_id``, ``username``) or an error (``code``, ``reason``)."""

    order_id: int | None = None
    username: str | None = None
    code: str | None = None
    reason: str | None = None

    @classmethod
    def queued(cls, order_id: int, username: str) -> OrderResult:
        return cls(order_id=order_id, username=username)

    @classmethod
    def refused(cls, error: PaperTraderError) -> OrderResult:
        return cls(code=error_code(error), reason=str(error))

    @classmethod
    def from_wire(cls, row: Any) -> OrderResult:
        if not isinstance(row, dict):
            raise BadRequest("each order result must be an object")
        if isinstance(row.get("order_id"), int) and isinstance(row.get("username"), str):
            return cls.queued(row["order_id"], row["username"])
        return cls(code=str(row.get("code")), reason=str(row.get("reason", "")))

    def to_wire(self) -> dict[str, Any]:
        if self.code is None and self.reason is None and self.order_id is not None and self.username is not None:
            return {"order_id": self.order_id, "username": self.username}  # the usual row, built directly
        return _without_none(
            {"order_id": self.order_id, "username": self.username, "code": self.code, "reason": self.reason}
        )

    def error(self) -> PaperTraderError | None:
        """The error this result stands for, or None for a queued order."""
        return None if self.code is None else error_from_code(self.code, self.reason or "")


class _Rows(JSON):
    """A JSON list of rows of one attrs class, checked as it is received."""

    def __init__(self, row: Any, limit: int) -> None:
        super().__init__()
        self.row = row
        self.limit = limit

    def toString(self, inObject: list[Any] | bytes) -> bytes:
        if isinstance(inObject, bytes):
            return inObject  # packed already (`pack_order_requests`)
        return super().toString([row.to_wire() for row in inObject])

    def fromString(self, inString: bytes) -> list[Any]:
        rows = super().fromString(inString)
        if not isinstance(rows, list) or len(rows) > self.limit:
            raise BadRequest(f"expected a list of at most {self.limit} rows")
        return [self.row.from_wire(row) for row in rows]


# ---------------------------------------------------------------- client -> worker: several orders at once

# Orders in one PlaceOrders: with every field at its bound (and `plain_text`) a batch is near 20 KiB, far under 64 KiB.
MAX_CLIENT_BATCH = 100


@attr.s(frozen=True, auto_attribs=True)
class ClientOrder:
    """One buy or sell inside a PlaceOrders batch (the fields of PurchaseAsset/SellAsset, and the side)."""

    side: str
    symbol: str
    quantity: str
    client_order_id: str | None = None

    @classmethod
    def from_wire(cls, row: Any) -> ClientOrder:
        """Check one received row; BadRequest if it is not an order."""
        if not isinstance(row, dict):
            raise BadRequest("each order must be an object")
        side, symbol, quantity, client_order_id = _texts(row, _CLIENT_ORDER_FIELDS)
        if side not in ("buy", "sell"):
            raise BadRequest("order field 'side' must be 'buy' or 'sell'")
        for value in (symbol, quantity, client_order_id):
            if value is not None and not plain_text(value):
                raise BadRequest('order fields must be printable ASCII text other than " and \\')
        return cls(side, symbol, quantity, client_order_id)

    def to_wire(self) -> dict[str, str]:
        row = {"side": self.side, "symbol": self.symbol, "quantity": self.quantity}
        if self.client_order_id is not None:
            row["client_order_id"] = self.client_order_id
        return row


# The fields of a ClientOrder row, in the class's order: (key, longest, optional).
_CLIENT_ORDER_FIELDS = (
    ("side", 8, False),
    ("symbol", MAX_SYMBOL_LENGTH, False),
    ("quantity", MAX_QUANTITY_LENGTH, False),
    ("client_order_id", MAX_CLIENT_ORDER_ID_LENGTH, True),
)


@attr.s(frozen=True, auto_attribs=True)
class PlacedOrder:
    """What became of one ClientOrder: queued (``order_id``) or refused (``code``, ``reason``)."""

    order_id: int | None = None
    code: str | None = None
    reason: str | None = None

    @classmethod
    def refused(cls, error: PaperTraderError) -> PlacedOrder:
        return cls(code=error_code(error), reason=str(error)[:MAX_ORDER_REASON])

    @classmethod
    def from_wire(cls, row: Any) -> PlacedOrder:
        if not isinstance(row, dict):
            raise BadRequest("each order result must be an object")
        if isinstance(row.get("order_id"), int):
            return cls(order_id=row["order_id"])
        return cls(code=str(row.get("code")), reason=str(row.get("reason", "")))

    def to_wire(self) -> dict[str, Any]:
        if self.code is None and self.reason is None and self.order_id is not None:
            return {"order_id": self.order_id}  # the usual row, built directly
        return _without_none({"order_id": self.order_id, "code": self.code, "reason": self.reason})

    def error(self) -> PaperTraderError | None:
        """The error this result stands for (PurchaseFailed, OrderConflict, ...), or None for a queued order."""
        return None if self.code is None else error_from_code(self.code, self.reason or "")


@attr.s(frozen=True, auto_attribs=True)
class OrderGroup:
    """Orders a client sent together (a PlaceOrders, or one PurchaseAsset/SellAsset) inside a
    SubmitOrders batch: one token and one envelope for all of them."""

    token: str
    received_at: str
    client_address: str
    orders: list[ClientOrder]

    @classmethod
    def from_wire(cls, group: Any) -> OrderGroup:
        """Check one received group; BadRequest if it is not one the worker could have sent."""
        token, received_at, client_address = _texts(group, _ORDER_GROUP_FIELDS)
        rows = group.get("orders")
        if type(rows) is not list or not rows:
            raise BadRequest("each order group must list its orders")
        orders = []
        for row in rows:
            if type(row) is not list or not 3 <= len(row) <= 4:
                raise BadRequest("each order of a group must be [side, symbol, quantity] or [..., client order id]")
            values = [
                value if type(value) is str and len(value) <= limit and value.isascii() else _bad_row_text(limit)
                for value, limit in zip(row, _GROUP_ROW_LIMITS)
            ]
            orders.append(ClientOrder(*values))
        return cls(token, received_at, client_address, orders)

    def to_wire(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "received_at": self.received_at,
            "client_address": self.client_address,
            "orders": [
                [o.side, o.symbol, o.quantity]
                if o.client_order_id is None
                else [o.side, o.symbol, o.quantity, o.client_order_id]
                for o in self.orders
            ],
        }


# The fields of an OrderGroup, and of each of its orders (a list, in the ClientOrder's order).
_ORDER_GROUP_FIELDS = (
    ("token", MAX_TOKEN_LENGTH, False),
    ("received_at", MAX_STAMP_LENGTH, False),
    ("client_address", MAX_STAMP_LENGTH, False),
)
_GROUP_ROW_LIMITS = (8, MAX_SYMBOL_LENGTH, MAX_QUANTITY_LENGTH, MAX_CLIENT_ORDER_ID_LENGTH)


def _bad_row_text(limit: int) -> str:
    """Refuse a field of a group's order that is not ASCII text of at most ``limit`` characters."""
    raise BadRequest(f"the orders of a group have ASCII text fields of at most {limit} characters")


class _Groups(JSON):
    """A JSON list of `OrderGroup`, of at most ``limit`` orders in all, checked as it is received."""

    def __init__(self, limit: int, optional: bool = False) -> None:
        super().__init__(optional=optional)
        self.limit = limit

    def toString(self, inObject: list[OrderGroup] | bytes) -> bytes:
        if isinstance(inObject, bytes):
            return inObject  # packed already (`pack_order_groups`)
        return super().toString([group.to_wire() for group in inObject])

    def fromString(self, inString: bytes) -> list[OrderGroup]:
        groups = super().fromString(inString)
        if type(groups) is not list or len(groups) > self.limit:
            raise BadRequest(f"expected a list of order groups of at most {self.limit} orders")
        parsed = [OrderGroup.from_wire(group) for group in groups]
        if sum(len(group.orders) for group in parsed) > self.limit:
            raise BadRequest(f"expected a list of order groups of at most {self.limit} orders")
        return parsed


_ORDER_REQUESTS = _Rows(OrderRequest, MAX_ORDER_BATCH)
_ORDER_GROUPS = _Groups(MAX_ORDER_BATCH, optional=True)


def pack_order_groups(groups: list[OrderGroup]) -> bytes:
    """The ``groups`` value of a SubmitOrders, packed: to see that it fits one AMP value before it is sent."""
    return _ORDER_GROUPS.toString(groups)


def pack_order_requests(rows: list[OrderRequest]) -> bytes:
    """The ``orders`` value of a SubmitOrders, packed (see `pack_order_groups`)."""
    return _ORDER_REQUESTS.toString(rows)


class SubmitOrders(amp.Command):
    """A batch of orders: PurchaseAsset/SellAsset each with its envelope (``orders``, `OrderRequest`),
    and orders that arrived together with one envelope for all (``groups``, `OrderGroup`).

    The answer has one `OrderResult` per order, in the same order: those of
    ``orders``, then those of each group's orders.  Every queued order is
    already durable.  A worker sends every order in ``groups`` (a group of one
    for a single order); ``orders`` is how workers before groups sent them.  At
    most MAX_ORDER_BATCH orders in all, and (like any AMP value) at most
    MAX_VALUE_BYTES in each argument.  A master that predates ``groups``
    would answer nothing for them, so a worker sends groups only to a master whose WorkerHello
    answer said ``order_groups``, and rows to any other.
    """

    arguments = [
        (b"orders", _ORDER_REQUESTS),
        (b"groups", _ORDER_GROUPS),
    ]
    response = [(b"results", _Rows(OrderResult, MAX_ORDER_BATCH))]
    errors = dict(_UNAVAILABLE)


class PlaceOrders(amp.Command):
    """Several buys and sells in one message: one receive stamp for all, one `PlacedOrder` each, in order.

    Each order is answered on its own (queued with its id, or refused with the
    error PurchaseAsset/SellAsset would give); the batch fails as a whole only
    when the session is invalid or the master is unreachable.  The client
    library sends one when several orders are waiting.
    """

    arguments = [(b"token", amp.Unicode()), (b"orders", _Rows(ClientOrder, MAX_CLIENT_BATCH))]
    response = [(b"results", _Rows(PlacedOrder, MAX_CLIENT_BATCH))]
    errors = declared(SessionInvalid)


# Usernames per ServedUsers box (at most 32 ASCII characters each: far under 64 KiB).
MAX_SERVED_USERS_BATCH = 500
MAX_USERNAME_LENGTH = 64


class _Usernames(JSON):
    """A JSON list of at most MAX_SERVED_USERS_BATCH usernames, checked as it is received."""

    def fromString(self, inString: bytes) -> list[str]:
        names = super().fromString(inString)
        if (
            not isinstance(names, list)
            or len(names) > MAX_SERVED_USERS_BATCH
            or not all(isinstance(n, str) and 0 < len(n) <= MAX_USERNAME_LENGTH for n in names)
        ):
            raise BadRequest(f"expected a list of at most {MAX_SERVED_USERS_BATCH} usernames")
        return names


class ServedUsers(amp.Command):
    """Worker -> master after the handshake: users this worker holds sessions of, so their order updates reach it.

    The master learns the same from each relayed Login, LoginWithToken and
    SubmitOrders; this catches it up after the link was down.
    """

    arguments = [(b"usernames", _Usernames())]
    response: list = []
    errors = dict(_UNAVAILABLE)


# ---------------------------------------------------------------- pushes (master -> worker -> client)


def push_bytes(command: type[amp.Command], **arguments: Any) -> bytes:
    """The wire bytes of push ``command`` (one that wants no answer), to encode once and write to many peers.

    Writing them to a connection's transport is what ``callRemote`` would do,
    without encoding the box again for every connection.
    """
    assert not command.requiresAnswer
    box = command.makeArguments(arguments, None)
    box[amp.COMMAND] = command.commandName
    return box.serialize()


class PriceList(amp.Argument):
    """Prices as one compact JSON object ``{symbol: cents}`` on the wire.

    In Python it is a list of ``{"symbol", "price_cents"}`` rows, or, to send,
    the JSON already packed (`pack_prices`).  About 34 bytes an asset at worst,
    so the prices of MAX_ASSETS assets stay far under 64 KiB.
    """

    def toString(self, inObject: list[dict[str, Any]] | bytes) -> bytes:
        if isinstance(inObject, bytes):
            return inObject
        prices = {row["symbol"]: row["price_cents"] for row in inObject}
        return json.dumps(prices, separators=(",", ":")).encode("ascii")

    def fromString(self, inString: bytes) -> list[dict[str, Any]]:
        return [{"symbol": symbol, "price_cents": cents} for symbol, cents in json.loads(inString).items()]


def price_fragments(prices: dict[str, int]) -> dict[str, bytes]:
    """Each price as its ``"SYMBOL":cents`` piece of a packed PriceList, to join for any subset."""
    return {symbol: json.dumps(symbol).encode("ascii") + b":%d" % cents for symbol, cents in prices.items()}


def pack_prices(fragments: list[bytes]) -> bytes:
    """A PriceList value packed from `price_fragments` pieces."""
    return b"{" + b",".join(fragments) + b"}"


class StaleList(JSON):
    """Stale symbols and why, as one JSON object ``{symbol: reason}`` checked as it is received.

    At most MAX_ASSETS symbols, each reason at most MAX_STALE_REASON characters
    (a sender cuts them): about 60 bytes an asset, so it fits one AMP value.
    """

    def toString(self, inObject: dict[str, str]) -> bytes:
        return super().toString({symbol: reason[:MAX_STALE_REASON] for symbol, reason in inObject.items()})

    def fromString(self, inString: bytes) -> dict[str, str]:
        stale = super().fromString(inString)
        if not isinstance(stale, dict) or len(stale) > MAX_ASSETS:
            raise BadRequest(f"expected an object of at most {MAX_ASSETS} stale symbols")
        for symbol, reason in stale.items():
            if len(symbol) > MAX_SYMBOL_LENGTH or not isinstance(reason, str) or len(reason) > MAX_STALE_REASON:
                raise BadRequest("malformed stale symbol")
        return stale


class PriceTick(amp.Command):
    """New prices after an update; the settlement of that tick follows.

    ``prices`` holds the latest good price of every symbol priced so far;
    ``stale`` (left out when none is) the symbols whose latest retrieval
    failed, and why: their prices are the last good ones.
    """

    arguments = [
        (b"tick", amp.Integer()),
        (b"as_of", amp.Unicode()),
        (b"prices", PriceList()),
        (b"stale", StaleList(optional=True)),
    ]
    requiresAnswer = False


# An order update travels as a JSON array of these columns (``settled_at`` is the box's, shared by its rows):
# username, order_id, side, symbol, quantity, status ("filled" or "rejected"), price_cents or null, reason or null.
UPDATE_COLUMNS = ("username", "order_id", "side", "symbol", "quantity", "status", "price_cents", "reason")
# The most updates in one OrderUpdates box, and the bytes a sender packs into one (far under 64 KiB).
MAX_UPDATES_PER_BOX = 1000
MAX_UPDATE_BYTES = 32 * 1024


def pack_update(
    username: str,
    order_id: int,
    side: str,
    symbol: str,
    quantity: int,
    status: str,
    price_cents: int | None,
    reason: str | None,
) -> bytes:
    """One order update as a packed row (at most ~1.5 KB: the reason is cut to MAX_ORDER_REASON)."""
    if reason is not None:
        reason = reason[:MAX_ORDER_REASON]
    row = [username, order_id, side, symbol, quantity, status, price_cents, reason]
    return json.dumps(row, separators=(",", ":")).encode("ascii")


def pack_updates(rows: list[bytes]) -> bytes:
    """An UpdateRows value packed from `pack_update` rows."""
    return b"[" + b",".join(rows) + b"]"


def _column(value: Any, kind: type, limit: int | None = None, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) or (limit is not None and len(value) > limit):
        raise BadRequest("malformed order update")
    return value


class UpdateRows(amp.Argument):
    """Order updates as one JSON array of packed rows (`UPDATE_COLUMNS`), checked as it is received.

    In Python a list of dicts with the columns as keys (a null column left out),
    or, to send, the rows already packed (`pack_updates`).
    """

    def toString(self, inObject: list[dict[str, Any]] | bytes) -> bytes:
        if isinstance(inObject, bytes):
            return inObject
        return pack_updates([pack_update(*(row.get(column) for column in UPDATE_COLUMNS)) for row in inObject])

    def fromString(self, inString: bytes) -> list[dict[str, Any]]:
        rows = json.loads(inString)
        if not isinstance(rows, list) or len(rows) > MAX_UPDATES_PER_BOX:
            raise BadRequest(f"expected a list of at most {MAX_UPDATES_PER_BOX} order updates")
        updates = []
        for row in rows:
            if not isinstance(row, list) or len(row) != len(UPDATE_COLUMNS):
                raise BadRequest("malformed order update")
            username, order_id, side, symbol, quantity, status, price_cents, reason = row
            update = {
                "username": _column(username, str, MAX_USERNAME_LENGTH),
                "order_id": _column(order_id, int),
                "side": _column(side, str, 8),
                "symbol": _column(symbol, str, MAX_SYMBOL_LENGTH),
                "quantity": _column(quantity, int),
                "status": _column(status, str, 8),
            }
            if _column(price_cents, int, optional=True) is not None:
                update["price_cents"] = price_cents
            if _column(reason, str, MAX_ORDER_REASON, optional=True) is not None:
                update["reason"] = reason
            updates.append(update)
        return updates


class OrderUpdates(amp.Command):
    """Orders that settled or were rejected at the update of ``settled_at``.

    Master -> worker: the updates of the users the worker serves.  Worker ->
    client: those of the connection's user.  Each box holds at most
    MAX_UPDATES_PER_BOX updates.
    """

    arguments = [(b"settled_at", amp.Unicode()), (b"updates", UpdateRows())]
    requiresAnswer = False
