"""AMP Commands and wire errors for every PaperTrader link.

Traffic in each direction:

- client -> worker: Register, Login, LoginWithToken, Logout, GetAssetValue,
  PurchaseAsset, SellAsset, ListOrders, GetUserPortfolio,
  GetUserTransactionHistory.
- worker -> master: WorkerHello first (the handshake), then each client
  command relayed with the envelope the worker stamps on it (the time it was
  received and the client's address) -- ``Relayed*`` below -- except orders,
  which travel in batches as SubmitOrders; ListAssets fills the worker's cache.
- master -> worker: PriceTick after every price update and OrderUpdates when
  queued orders settle or are rejected.
- worker -> client: PriceTick and OrderUpdate, pushed.

Money is integer cents (``*_cents``); instants are ISO 8601 UTC text.
Every expected failure is declared: anything undeclared makes AMP drop the
connection.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.protocols import amp

from papertrader.assets import MAX_TEXT
from papertrader.errors import (
    DataFailed,
    LoginFailed,
    PurchaseFailed,
    RegisterFailed,
    SellFailed,
    ServiceUnavailable,
    SessionInvalid,
    WorkerRefused,
)
from papertrader.paging import BoundedText, page_fields, rows_per_page


class JSON(amp.Argument):
    """A JSON value: far cheaper to encode and parse than an AmpList of many small rows."""

    def toString(self, inObject: Any) -> bytes:
        return json.dumps(inObject, separators=(",", ":")).encode("utf-8")

    def fromString(self, inString: bytes) -> Any:
        return json.loads(inString)


# Longest accepted client-supplied fields of an order; they bound the size of a SubmitOrders batch.
MAX_TOKEN_LENGTH = 128
MAX_SYMBOL_LENGTH = 16
MAX_QUANTITY_LENGTH = 32
# Longest text of the fields of a listed row (timestamps are 32 characters; reasons are cut to this).
MAX_TIMESTAMP_LENGTH = 40
MAX_ORDER_REASON = 200

# Wire codes of the declared errors, shared by every command.
_UNAVAILABLE = {ServiceUnavailable: b"SERVICE_UNAVAILABLE"}
_SESSION = {SessionInvalid: b"SESSION_INVALID", **_UNAVAILABLE}


# ---------------------------------------------------------------- client -> worker


class Register(amp.Command):
    """Create an account; the password is hashed with bcrypt on the master."""

    arguments = [
        (b"username", amp.Unicode()),
        (b"email", amp.Unicode()),
        (b"password", amp.Unicode()),
    ]
    response = [(b"username", amp.Unicode())]
    errors = {RegisterFailed: b"REGISTER_FAILED", **_UNAVAILABLE}


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
    ]
    errors = {LoginFailed: b"LOGIN_FAILED", **_UNAVAILABLE}


class LoginWithToken(amp.Command):
    """Log in with an existing session token (the spec's second login method)."""

    arguments = [(b"token", amp.Unicode())]
    response = [(b"username", amp.Unicode()), (b"expires_at", amp.Unicode())]
    errors = dict(_SESSION)


class Logout(amp.Command):
    """End a session; its token stops working everywhere."""

    arguments = [(b"token", amp.Unicode())]
    response: list = []
    errors = dict(_SESSION)


class GetAssetValue(amp.Command):
    """The current price of one asset, as of the latest price update."""

    arguments = [(b"symbol", amp.Unicode())]
    response = [
        (b"symbol", amp.Unicode()),
        (b"name", amp.Unicode()),
        (b"exchange", amp.Unicode()),
        (b"price_cents", amp.Integer()),
        (b"as_of", amp.Unicode()),
    ]
    errors = {DataFailed: b"DATA_FAILED", **_UNAVAILABLE}


class PurchaseAsset(amp.Command):
    """Queue a market buy; answered only once the order is stored.

    ``quantity`` is text so that a malformed number gets a declared error.
    """

    arguments = [
        (b"token", amp.Unicode()),
        (b"symbol", amp.Unicode()),
        (b"quantity", amp.Unicode()),
    ]
    response = [(b"order_id", amp.Integer())]
    errors = {PurchaseFailed: b"PURCHASE_FAILED", **_SESSION}


class SellAsset(amp.Command):
    """Queue a market sell; answered only once the order is stored."""

    arguments = PurchaseAsset.arguments
    response = PurchaseAsset.response
    errors = {SellFailed: b"SELL_FAILED", **_SESSION}


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
]
ORDERS_PER_PAGE = rows_per_page(ORDER_FIELDS)

# A list request without ``cursor`` asks for the first page; each answer is
# page ``page`` of ``pages`` and, but on the last, gives the next page's ``next_cursor``.
_PAGE_REQUEST = [(b"cursor", amp.Unicode(optional=True))]


class ListOrders(amp.Command):
    """A page of the user's orders, newest first, with their status.

    The pages of one listing hold the orders that existed at its first page.
    A cursor that is malformed or not from this user's listing gets DataFailed.
    """

    arguments = [(b"token", amp.Unicode()), *_PAGE_REQUEST]
    response = [(b"orders", amp.AmpList(ORDER_FIELDS)), *page_fields()]
    errors = {DataFailed: b"DATA_FAILED", **_SESSION}


class GetUserPortfolio(amp.Command):
    """Cash and positions, valued at the latest prices."""

    arguments = [(b"token", amp.Unicode())]
    response = [
        (b"username", amp.Unicode()),
        (b"cash_cents", amp.Integer()),
        (
            b"positions",
            amp.AmpList(
                [
                    (b"symbol", amp.Unicode()),
                    (b"quantity", amp.Integer()),
                    (b"price_cents", amp.Integer()),
                    (b"value_cents", amp.Integer()),
                ]
            ),
        ),
        (b"total_cents", amp.Integer()),
        (b"as_of", amp.Unicode()),
    ]
    errors = dict(_SESSION)


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
    errors = {DataFailed: b"DATA_FAILED", **_SESSION}


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


RelayedRegister = _relayed(Register)
RelayedLogin = _relayed(Login)
RelayedLoginWithToken = _relayed(LoginWithToken)
RelayedLogout = _relayed(Logout)
RelayedGetAssetValue = _relayed(GetAssetValue)
RelayedListOrders = _relayed(ListOrders)
RelayedGetUserPortfolio = _relayed(GetUserPortfolio)
RelayedGetUserTransactionHistory = _relayed(GetUserTransactionHistory)


class WorkerHello(amp.Command):
    """The worker's handshake: the first command on a worker's connection."""

    arguments = [(b"name", amp.Unicode()), (b"version", amp.Unicode())]
    response = [(b"update_interval", amp.Float())]
    errors = {WorkerRefused: b"WORKER_REFUSED"}


ASSET_FIELDS = [
    (b"symbol", _SYMBOL),
    (b"name", BoundedText(MAX_TEXT)),
    (b"exchange", BoundedText(MAX_TEXT)),
    (b"sector", BoundedText(MAX_TEXT)),
    (b"industry", BoundedText(MAX_TEXT)),
    (b"price_cents", amp.Integer(optional=True)),
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
    errors = {DataFailed: b"DATA_FAILED", **_UNAVAILABLE}


# Orders per SubmitOrders box; keeps each value well under 64 KiB.
MAX_ORDER_BATCH = 150

# ``outcome`` of each submitted order.
OUTCOME_QUEUED = "queued"
OUTCOME_SESSION_INVALID = "session_invalid"
OUTCOME_REFUSED = "refused"
OUTCOME_UNAVAILABLE = "unavailable"


class SubmitOrders(amp.Command):
    """A batch of PurchaseAsset/SellAsset, each with its envelope.

    ``orders`` is a JSON list of objects with ``side``, ``token``, ``symbol``,
    ``quantity``, ``received_at`` and ``client_address``; ``results`` a JSON
    list, in the same order, of objects with ``outcome`` (one of the OUTCOME_*
    values) and ``order_id`` and ``username`` or ``reason``.  Every ``queued``
    order is already durable.
    """

    arguments = [(b"orders", JSON())]
    response = [(b"results", JSON())]
    errors = dict(_UNAVAILABLE)


# ---------------------------------------------------------------- pushes (master -> worker -> client)


class PriceList(amp.Argument):
    """Prices as one compact JSON object ``{symbol: cents}`` on the wire.

    In Python it is a list of ``{"symbol", "price_cents"}`` rows.  About 34 bytes
    an asset at worst, so the prices of MAX_ASSETS assets stay far under 64 KiB.
    """

    def toString(self, inObject: list[dict[str, Any]]) -> bytes:
        prices = {row["symbol"]: row["price_cents"] for row in inObject}
        return json.dumps(prices, separators=(",", ":")).encode("ascii")

    def fromString(self, inString: bytes) -> list[dict[str, Any]]:
        return [{"symbol": symbol, "price_cents": cents} for symbol, cents in json.loads(inString).items()]


class PriceTick(amp.Command):
    """New prices after an update; the settlement of that tick follows."""

    arguments = [
        (b"tick", amp.Integer()),
        (b"as_of", amp.Unicode()),
        (b"prices", PriceList()),
    ]
    requiresAnswer = False


UPDATE_FIELDS = [
    (b"username", amp.Unicode()),
    (b"order_id", amp.Integer()),
    (b"side", amp.Unicode()),
    (b"symbol", amp.Unicode()),
    (b"quantity", amp.Integer()),
    (b"status", amp.Unicode()),
    (b"reason", amp.Unicode(optional=True)),
    (b"price_cents", amp.Integer(optional=True)),
    (b"settled_at", amp.Unicode()),
]


class OrderUpdates(amp.Command):
    """Master -> worker: orders that settled or were rejected in a tick."""

    arguments = [(b"updates", amp.AmpList(UPDATE_FIELDS))]
    requiresAnswer = False


# Updates per OrderUpdates box.
MAX_UPDATE_BATCH = 150


class OrderUpdate(amp.Command):
    """Worker -> client: one of the client's orders settled or was rejected."""

    arguments = UPDATE_FIELDS
    requiresAnswer = False
