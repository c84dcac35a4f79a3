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


ORDER_FIELDS = [
    (b"order_id", amp.Integer()),
    (b"side", amp.Unicode()),
    (b"symbol", amp.Unicode()),
    (b"quantity", amp.Integer()),
    (b"status", amp.Unicode()),
    (b"reason", amp.Unicode(optional=True)),
    (b"created_at", amp.Unicode()),
    (b"settled_at", amp.Unicode(optional=True)),
    (b"price_cents", amp.Integer(optional=True)),
]


class ListOrders(amp.Command):
    """The user's most recent orders, newest first, with their status."""

    arguments = [(b"token", amp.Unicode()), (b"limit", amp.Integer(optional=True))]
    response = [(b"orders", amp.AmpList(ORDER_FIELDS))]
    errors = dict(_SESSION)


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


class GetUserTransactionHistory(amp.Command):
    """Settled trades, newest first, each with the time it went through."""

    arguments = [(b"token", amp.Unicode()), (b"limit", amp.Integer(optional=True))]
    response = [
        (
            b"transactions",
            amp.AmpList(
                [
                    (b"order_id", amp.Integer()),
                    (b"side", amp.Unicode()),
                    (b"symbol", amp.Unicode()),
                    (b"quantity", amp.Integer()),
                    (b"price_cents", amp.Integer()),
                    (b"total_cents", amp.Integer()),
                    (b"cash_after_cents", amp.Integer()),
                    (b"settled_at", amp.Unicode()),
                ]
            ),
        )
    ]
    errors = dict(_SESSION)


# Results are bounded so one answer stays under AMP's 64 KiB value limit.
MAX_LIST_LIMIT = 200


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


class ListAssets(amp.Command):
    """Every tradable asset with its latest price, for the worker's cache."""

    arguments: list = []
    response = [
        (
            b"assets",
            amp.AmpList(
                [
                    (b"symbol", amp.Unicode()),
                    (b"name", amp.Unicode()),
                    (b"exchange", amp.Unicode()),
                    (b"sector", amp.Unicode()),
                    (b"industry", amp.Unicode()),
                    (b"price_cents", amp.Integer(optional=True)),
                ]
            ),
        ),
        (b"tick", amp.Integer()),
        (b"as_of", amp.Unicode(optional=True)),
    ]
    errors = dict(_UNAVAILABLE)


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


class PriceTick(amp.Command):
    """New prices after an update; the settlement of that tick follows."""

    arguments = [
        (b"tick", amp.Integer()),
        (b"as_of", amp.Unicode()),
        (b"prices", amp.AmpList([(b"symbol", amp.Unicode()), (b"price_cents", amp.Integer())])),
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
