"""The JSON rows of order batches (SubmitOrders, PlaceOrders): what is sent is what is received, and
rows a peer could not have sent are refused; the client library's new client order ids."""

from __future__ import annotations

import json
import uuid

from twisted.trial.unittest import SynchronousTestCase

from papertrader.client.library import new_client_order_ids
from papertrader.errors import BadRequest, PurchaseFailed
from papertrader.protocol import (
    MAX_CLIENT_ORDER_ID_LENGTH,
    MAX_STAMP_LENGTH,
    MAX_SYMBOL_LENGTH,
    MAX_TOKEN_LENGTH,
    ClientOrder,
    OrderGroup,
    OrderRequest,
    OrderResult,
    PlacedOrder,
    plain_text,
)

TWO = [ClientOrder("buy", "AAPL", "2", "id"), ClientOrder("sell", "KO", "1")]


class RowTests(SynchronousTestCase):
    """Each row class's ``to_wire`` and ``from_wire``."""

    def test_round_trips(self) -> None:
        """Every row, with and without its optional fields, comes back equal; None fields are left out."""
        rows = [
            OrderRequest("buy", "t" * MAX_TOKEN_LENGTH, "AAPL", "3", "2026-01-01T00:00:00Z", "1.2.3.4:5", "id-1"),
            OrderRequest("sell", "tok", "KO", "1", "at", "addr"),
            OrderResult.queued(7, "alice"),
            OrderResult.refused(PurchaseFailed("no cash")),
            ClientOrder("buy", "AAPL", "2", "x" * MAX_CLIENT_ORDER_ID_LENGTH),
            ClientOrder("sell", "KO", "1"),
            PlacedOrder(order_id=9),
            PlacedOrder.refused(PurchaseFailed("no cash")),
            OrderGroup("t" * MAX_TOKEN_LENGTH, "at", "addr", TWO),
        ]
        for row in rows:
            wire = row.to_wire()
            self.assertNotIn(None, wire.values())
            self.assertEqual(type(row).from_wire(wire), row)
        self.assertEqual(OrderRequest("sell", "tok", "KO", "1", "at", "addr").to_wire(), {
            "side": "sell", "token": "tok", "symbol": "KO", "quantity": "1", "received_at": "at",
            "client_address": "addr",
        })
        self.assertEqual(
            OrderGroup("t", "at", "addr", TWO).to_wire(),
            {"token": "t", "received_at": "at", "client_address": "addr",
             "orders": [["buy", "AAPL", "2", "id"], ["sell", "KO", "1"]]},
        )
        self.assertEqual(OrderResult.queued(7, "alice").to_wire(), {"order_id": 7, "username": "alice"})
        refused = PlacedOrder.refused(PurchaseFailed("no")).to_wire()
        self.assertEqual(refused, {"code": "PURCHASE_FAILED", "reason": "no"})

    def test_malformed_requests_refused(self) -> None:
        """A row that is not an object, misses a field, or has one too long, not text or not ASCII: BadRequest."""
        good = OrderRequest("buy", "tok", "AAPL", "1", "at", "addr", "id").to_wire()
        bad = [
            ["buy"],
            None,
            {**good, "token": None},
            {key: value for key, value in good.items() if key != "received_at"},
            {**good, "symbol": "A" * (MAX_SYMBOL_LENGTH + 1)},
            {**good, "client_address": "a" * (MAX_STAMP_LENGTH + 1)},
            {**good, "quantity": 1},
            {**good, "client_order_id": 5},
            {**good, "client_order_id": "é"},
            {**good, "side": "b" * 9},
        ]
        for row in bad:
            self.assertRaises(BadRequest, OrderRequest.from_wire, row)

    def test_malformed_client_orders_refused(self) -> None:
        """A client's row with an unknown side, a missing or overlong field: BadRequest."""
        good = {"side": "buy", "symbol": "AAPL", "quantity": "1"}
        self.assertEqual(ClientOrder.from_wire(good), ClientOrder("buy", "AAPL", "1"))
        for row in (
            {**good, "side": "hold"},
            {"side": "buy", "symbol": "AAPL"},
            {**good, "client_order_id": "x" * (MAX_CLIENT_ORDER_ID_LENGTH + 1)},
            {**good, "symbol": ["AAPL"]},
            "buy AAPL 1",
        ):
            self.assertRaises(BadRequest, ClientOrder.from_wire, row)

    def test_client_order_fields_json_writes_plain(self) -> None:
        """A client's row whose symbol, quantity or client order id holds a character JSON escapes (a control
        character, '"', '\\') or DEL is refused: each accepted character costs one byte in a SubmitOrders."""
        good = {"side": "buy", "symbol": "AAPL", "quantity": "1", "client_order_id": "A.b_c:d-0"}
        self.assertEqual(ClientOrder.from_wire(good), ClientOrder("buy", "AAPL", "1", "A.b_c:d-0"))
        self.assertEqual(ClientOrder.from_wire({**good, "symbol": " aapl "}).symbol, " aapl ")
        for key in ("symbol", "quantity", "client_order_id"):
            for bad in ("\x00", "\x01", "\t", "\n", "\x1f", "\x7f", '"', "\\"):
                self.assertRaises(BadRequest, ClientOrder.from_wire, {**good, key: "1" + bad})
        printable = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in '"\\')
        for text in ("AAPL", " aapl ", "+12", "0190a1b2-c3d4-7e5f-8a6b-1c2d3e4f5a6b", printable):
            self.assertTrue(plain_text(text))
            self.assertEqual(len(json.dumps(text)), len(text) + 2)
        for text in ("\x01", "a\nb", "\x7f", '"', "\\", "é", "\u2028"):
            self.assertFalse(plain_text(text))


class ClientOrderIdTests(SynchronousTestCase):
    """`new_client_order_ids`."""

    def test_time_ordered_uuids(self) -> None:
        """Each id is the text of a version 7 UUID (RFC 4122 variant) stamped with the time in
        milliseconds, no two are the same, and ids of a later millisecond sort after."""
        ids = new_client_order_ids(500, now=1_767_225_600.123)
        self.assertEqual(len(set(ids)), 500)
        for text in ids:
            parsed = uuid.UUID(text)
            self.assertEqual(str(parsed), text)
            self.assertEqual(parsed.version, 7)
            self.assertEqual(parsed.variant, uuid.RFC_4122)
            self.assertEqual(parsed.int >> 80, 1_767_225_600_123)
        [later] = new_client_order_ids(1, now=1_767_225_600.124)
        self.assertGreater(later, max(ids))
        self.assertEqual(new_client_order_ids(0), [])
