"""Every list answer (history, orders, assets) travels in numbered pages, sized by bytes."""

from __future__ import annotations

import csv
import math
import os
import sqlite3
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase, TestCase

from papertrader import paging
from papertrader.assets import MAX_ASSETS, MAX_TEXT, Asset, parse_assets
from papertrader.errors import DataFailed
from papertrader.master import protocol as master_protocol
from papertrader.money import format_cents
from papertrader.protocol import (
    ASSETS_PER_PAGE,
    MAX_ORDER_REASON,
    ORDERS_PER_PAGE,
    POSITIONS_PER_PAGE,
    TRANSACTIONS_PER_PAGE,
    GetUserPortfolio,
    GetUserTransactionHistory,
    ListAssets,
    ListOrders,
    PriceTick,
)
from papertrader.timestamps import iso
from papertrader.worker import upstream
from tests.processes import RunningDeployment
from tests.support import ASSETS, Deployment

AMP_VALUE_LIMIT = 0xFFFF

_WORDS = ("Northern", "Pacific", "Consolidated", "American", "Global", "Atlantic", "United", "Advanced")
_KINDS = ("Semiconductor", "Pharmaceuticals", "Industries", "Financial", "Biotechnology", "Energy", "Logistics")
_SUFFIXES = ("Holdings Corporation", "Group Incorporated", "International Holdings plc", "Technologies Limited")
_SECTORS = ("Technology", "Healthcare", "Financial Services", "Consumer Defensive", "Industrials", "Energy")
_INDUSTRIES = (
    "Semiconductor Equipment & Materials",
    "Drug Manufacturers—Specialty & Generic",
    "Banks—Diversified",
    "Software—Infrastructure",
    "Specialty Industrial Machinery",
    "Oil & Gas Exploration & Production",
)


def realistic_assets(count: int) -> dict[str, Asset]:
    """``count`` assets shaped like a real listing (AAPL first), with names of 30-55 characters."""
    assets = {"AAPL": ASSETS["AAPL"]}
    n = 0
    while len(assets) < count:
        symbol = "".join(chr(ord("A") + (n // 26**i) % 26) for i in range(4))
        name = f"{_WORDS[n % 8]} {_KINDS[n % 7]} {_SUFFIXES[n % 4]}"
        assets.setdefault(
            symbol,
            Asset(symbol, name, ("NASDAQ", "NYSE")[n % 2], _SECTORS[n % 6], _INDUSTRIES[n % 6], 1_000 + n),
        )
        n += 1
    return assets


def encoded_size(fields: list[tuple[bytes, amp.Argument]], rows: list[dict[str, Any]]) -> int:
    """How many bytes ``rows`` take as one AmpList value."""
    return len(amp.AmpList(fields).toStringProto(rows, None))


def longest_assets(count: int) -> dict[str, Asset]:
    """``count`` assets with the longest symbols allowed and every text at its longest, in 4-byte characters."""
    assets = {}
    for n in range(count):
        symbol = "X" + f"{n:09d}"
        text = ("\U0001f4c8" * MAX_TEXT)[: MAX_TEXT - 4] + f"{n:04d}"
        assets[symbol] = Asset(symbol, text, text, text, text, 2**62 + n)
    return assets


def insert_trades(connection: sqlite3.Connection, user_id: int, count: int, start: float = 1_800_000_000) -> None:
    """Store ``count`` filled orders and their transactions for ``user_id``, as settlement would."""
    for n in range(count):
        settled = iso(start + 60 * n)
        cursor = connection.execute(
            "INSERT INTO orders (user_id, side, symbol, quantity, status, created_at, received_at, "
            "client_address, worker, price_cents, settled_at) "
            "VALUES (?, 'buy', 'AAPL', ?, 'filled', ?, ?, '192.168.1.1:40001', 'test-worker', ?, ?)",
            (user_id, 1 + n % 97, settled, settled, 19_000 + n, settled),
        )
        connection.execute(
            "INSERT INTO transactions (user_id, order_id, side, symbol, quantity, price_cents, total_cents, "
            "cash_after_cents, settled_at) VALUES (?, ?, 'buy', 'AAPL', ?, ?, ?, ?, ?)",
            (user_id, cursor.lastrowid, 1 + n % 97, 19_000 + n, (1 + n % 97) * (19_000 + n), 9_000_000 - n, settled),
        )
    connection.commit()


class LongListTests(SynchronousTestCase):
    """Lists longer than one AMP value reach the client whole."""

    def setUp(self) -> None:
        self.deployment = Deployment(self.mktemp())
        self.client = self.deployment.logged_in("alice")
        self.connection = self.deployment.pool.connection
        [(self.user_id,)] = self.connection.execute("SELECT id FROM users WHERE username = 'alice'").fetchall()

    def stored_history(self) -> list[dict[str, Any]]:
        rows = self.connection.execute(
            "SELECT order_id, side, symbol, quantity, price_cents, total_cents, cash_after_cents, settled_at "
            "FROM transactions WHERE user_id = ? ORDER BY id DESC",
            (self.user_id,),
        ).fetchall()
        keys = ("order_id", "side", "symbol", "quantity", "price_cents", "total_cents", "cash_after_cents",
                "settled_at")
        return [dict(zip(keys, row)) for row in rows]

    def test_whole_history_larger_than_an_amp_value(self) -> None:
        """A history of 600 trades (well over 64 KiB encoded) comes back whole, newest first, as stored."""
        insert_trades(self.connection, self.user_id, 600)
        stored = self.stored_history()
        fields = dict(GetUserTransactionHistory.response)[b"transactions"].subargs
        self.assertGreater(encoded_size(fields, stored), AMP_VALUE_LIMIT)
        answer = self.deployment.result(self.client.history(limit=None))
        self.assertEqual(answer["transactions"], stored)

    def test_history_limit_past_two_hundred(self) -> None:
        """Asking for 450 trades gives the newest 450, not 200."""
        insert_trades(self.connection, self.user_id, 600)
        answer = self.deployment.result(self.client.history(limit=450))
        self.assertEqual(answer["transactions"], self.stored_history()[:450])

    def test_every_order_listed(self) -> None:
        """All 300 orders are listed, newest first."""
        insert_trades(self.connection, self.user_id, 300)
        orders = self.deployment.result(self.client.orders(limit=None))["orders"]
        self.assertEqual(len(orders), 300)
        ids = [row[0] for row in self.connection.execute("SELECT id FROM orders ORDER BY id DESC")]
        self.assertEqual([o["order_id"] for o in orders], ids)


class ManyAssetsTests(SynchronousTestCase):
    """A deployment with many assets: the worker's cache holds them all."""

    def test_four_hundred_realistic_assets(self) -> None:
        """400 realistic assets (more than one AMP value) load into the worker, which quotes the last."""
        assets = realistic_assets(400)
        fields = dict(ListAssets.response)[b"assets"].subargs
        rows = [{"symbol": a.symbol, "name": a.name, "exchange": a.exchange, "sector": a.sector,
                 "industry": a.industry, "price_cents": a.reference_cents} for a in assets.values()]
        self.assertGreater(encoded_size(fields, rows), AMP_VALUE_LIMIT)
        deployment = Deployment(self.mktemp(), assets=assets)
        self.assertEqual(len(deployment.cache.assets), 400)
        client = deployment.client()
        last = list(assets)[-1]
        self.assertEqual(deployment.result(client.quote(last))["price_cents"], assets[last].reference_cents)


class PortfolioTests(SynchronousTestCase):
    """A portfolio with a position in each of 1,000 assets (far over one AMP value) reaches the client whole."""

    def setUp(self) -> None:
        self.assets = realistic_assets(1000)
        self.deployment = Deployment(self.mktemp(), assets=self.assets)
        self.client = self.deployment.logged_in("alice")
        connection = self.deployment.pool.connection
        [(user_id,)] = connection.execute("SELECT id FROM users WHERE username = 'alice'").fetchall()
        connection.executemany(
            "INSERT INTO positions (user_id, symbol, quantity) VALUES (?, ?, ?)",
            [(user_id, symbol, 1 + n) for n, symbol in enumerate(self.assets)],
        )
        connection.commit()

    def expected_positions(self) -> list[dict[str, Any]]:
        prices = self.deployment.board.prices
        quantities = {symbol: n + 1 for n, symbol in enumerate(self.assets)}
        return [
            {"symbol": s, "quantity": q, "price_cents": prices[s], "value_cents": prices[s] * q}
            for s, q in sorted(quantities.items())
        ]

    def test_every_position(self) -> None:
        """All 1,000 positions come back in symbol order with the whole total, and the worker's link stays up.

        Before, the one answer was too long for AMP and the master dropped the worker's connection.
        """
        expected = self.expected_positions()
        fields = dict(GetUserPortfolio.response)[b"positions"].subargs
        self.assertGreater(encoded_size(fields, expected), AMP_VALUE_LIMIT)
        answer = self.deployment.result(self.client.portfolio())
        self.assertEqual(answer["positions"], expected)
        self.assertEqual(answer["total_cents"], 10_000_000 + sum(p["value_cents"] for p in expected))
        self.assertIn("test-worker", self.deployment.registry.workers)
        first = self.deployment.result(self.client.portfolio_page())
        self.assertEqual((first["page"], first["pages"]), (1, math.ceil(1000 / POSITIONS_PER_PAGE)))

    def test_price_update_between_pages(self) -> None:
        """A page asked for after a price update is refused; the library reads again, so every value is of one tick."""
        original = self.client.portfolio_page
        asked: list[str | None] = []

        def racing(cursor: str | None = None) -> Any:
            asked.append(cursor)
            if len(asked) == 2:
                self.deployment.source.prices = {s: c + 1 for s, c in self.deployment.source.prices.items()}
                self.deployment.exchange.tick()  # the pushes go out with the next flush
            return original(cursor)

        self.client.portfolio_page = racing  # type: ignore[method-assign]
        answer = self.deployment.result(self.client.portfolio())
        self.assertEqual(answer["positions"], self.expected_positions())
        self.assertEqual(asked[2], None)  # the reading started again from the first page

    def test_stale_and_bad_cursors_refused(self) -> None:
        """A cursor from before a fill, or not a portfolio cursor at all, gets DataFailed."""
        cursor = self.deployment.result(self.client.portfolio_page())["next_cursor"]
        self.deployment.result(self.client.sell("AAPL", 1))
        self.deployment.tick()
        self.assertRaises(DataFailed, self.deployment.result, self.client.portfolio_page(cursor))
        for bad in ("2", "x", "99.1.1", "2." + cursor):
            self.assertRaises(DataFailed, self.deployment.result, self.client.portfolio_page(bad))


class RealProcessesTests(TestCase):
    """A real deployment (twistd master and local worker, the CLI) with 1,000 assets and a long history."""

    timeout = 240

    @inlineCallbacks
    def test_thousand_assets_and_long_history(self) -> Any:
        """1,000 realistic assets: the worker starts and quotes the last; ``history --limit 250`` gives 250 rows."""
        assets = realistic_assets(1000)
        assets_file = os.path.abspath(self.mktemp())
        with open(assets_file, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(("symbol", "name", "exchange", "sector", "industry", "reference_price"))
            for a in assets.values():
                writer.writerow((a.symbol, a.name, a.exchange, a.sector, a.industry, f"{a.reference_cents / 100:.2f}"))
        deployment = RunningDeployment(self.mktemp(), "--assets", assets_file)
        self.addCleanup(deployment.stop)
        yield deployment.start()
        last = list(assets)[-1]
        quote = yield deployment.cli_json("quote", last)
        self.assertEqual((quote["symbol"], quote["name"]), (last, assets[last].name))

        password = deployment.password_file("correct horse battery")
        code, out, err = yield deployment.cli("register", "alice", "alice@example.com", "--password-file", password)
        self.assertEqual(code, 0, err)
        code, out, err = yield deployment.cli("login", "alice", "--password-file", password)
        self.assertEqual(code, 0, err)
        fill = yield deployment.cli_json("buy", "AAPL", "1", "--wait")
        self.assertEqual(fill["status"], "filled")

        # The saved session names this run's worker port; the next run listens elsewhere.
        code, out, err = yield deployment.cli("logout")
        self.assertEqual(code, 0, err)
        yield deployment.stop()
        with sqlite3.connect(os.path.join(deployment.data, "papertrader.sqlite")) as connection:
            [(user_id,)] = connection.execute("SELECT id FROM users WHERE username = 'alice'").fetchall()
            insert_trades(connection, user_id, 300)
            stored = [row[0] for row in connection.execute(
                "SELECT order_id FROM transactions WHERE user_id = ? ORDER BY id DESC", (user_id,)
            )]
        connection.close()
        self.assertEqual(len(stored), 301)
        deployment.spawn()
        yield deployment.wait_until_serving()
        code, out, err = yield deployment.cli("login", "alice", "--password-file", password)
        self.assertEqual(code, 0, err)

        newest = yield deployment.cli_json("history", "--limit", "250")
        self.assertEqual([t["order_id"] for t in newest], stored[:250])
        code, out, err = yield deployment.cli("history", "--limit", "250")
        self.assertEqual((code, len(out.splitlines())), (0, 251), err)
        everything = yield deployment.cli_json("history", "--all")
        self.assertEqual([t["order_id"] for t in everything], stored)


class PageSizeTests(SynchronousTestCase):
    """A page of worst-case rows fits, and is as full as the budget allows."""

    def check(self, command: type[amp.Command], key: str, per_page: int, extra: dict[str, Any]) -> None:
        fields = dict(command.response)[key.encode()].subargs
        worst = paging.worst_case_row(fields)
        page = [worst] * per_page
        self.assertLessEqual(encoded_size(fields, page), paging.PAGE_BUDGET)
        self.assertGreater(encoded_size(fields, page + [worst]), paging.PAGE_BUDGET)
        answer = {key: page, "page": 2**62, "pages": 2**62, "next_cursor": "9" * paging.MAX_CURSOR_LENGTH, **extra}
        box = command.makeResponse(answer, None)
        self.assertLess(max(len(value) for value in box.values()), AMP_VALUE_LIMIT)
        box.serialize()  # raises TooLong if any value is over AMP's limit

    def test_history_page(self) -> None:
        """TRANSACTIONS_PER_PAGE worst-case trades fit in the page budget, one more would not."""
        self.check(GetUserTransactionHistory, "transactions", TRANSACTIONS_PER_PAGE, {})

    def test_orders_page(self) -> None:
        """ORDERS_PER_PAGE worst-case orders (longest reasons, in 4-byte characters) fit, one more would not."""
        self.check(ListOrders, "orders", ORDERS_PER_PAGE, {})

    def test_assets_page(self) -> None:
        """ASSETS_PER_PAGE worst-case assets fit, one more would not."""
        self.check(ListAssets, "assets", ASSETS_PER_PAGE, {"tick": 2**62, "as_of": iso(0)})

    def test_long_text_is_cut(self) -> None:
        """Text longer than its field's bound is cut when encoded, so it can never overfill a page."""
        fields = dict(ListOrders.response)[b"orders"].subargs
        worst = encoded_size(fields, [paging.worst_case_row(fields)])
        row = dict(paging.worst_case_row(fields), reason="\U0001f4c8" * 100_000, symbol="\u00e9" * 1000)
        self.assertLessEqual(encoded_size(fields, [row]), worst)

    def test_unbounded_field_refused(self) -> None:
        """A field without a size bound cannot be part of a paged row."""
        self.assertRaises(TypeError, paging.rows_per_page, [(b"note", amp.Unicode())])


class CursorTests(SynchronousTestCase):
    """Pages of one listing stay put while rows arrive; bad cursors are refused with DataFailed."""

    def setUp(self) -> None:
        self.deployment = Deployment(self.mktemp())
        self.client = self.deployment.logged_in("alice")
        self.connection = self.deployment.pool.connection
        [(self.user_id,)] = self.connection.execute("SELECT id FROM users WHERE username = 'alice'").fetchall()
        insert_trades(self.connection, self.user_id, 2 * TRANSACTIONS_PER_PAGE + 5)

    def pages(self, fetch: Any, during: Any = None) -> list[dict[str, Any]]:
        answers = [self.deployment.result(fetch())]
        if during is not None:
            during()
        while answers[-1]["next_cursor"] is not None:
            answers.append(self.deployment.result(fetch(answers[-1]["next_cursor"])))
        numbers = [(a["page"], a["pages"]) for a in answers]
        self.assertEqual(numbers, [(n, len(answers)) for n in range(1, len(answers) + 1)])
        return answers

    def test_history_stable_while_trades_arrive(self) -> None:
        """Trades settled after the first page neither shift the later pages nor change their count."""
        before = self.deployment.result(self.client.history())["transactions"]

        def trade_more() -> None:
            insert_trades(self.connection, self.user_id, TRANSACTIONS_PER_PAGE + 1, start=1_900_000_000)
            self.deployment.result(self.client.buy("AAPL", 1))
            self.deployment.tick()

        answers = self.pages(self.client.history_page, trade_more)
        self.assertEqual(len(answers), 3)
        self.assertEqual([row for a in answers for row in a["transactions"]], before)
        after = self.deployment.result(self.client.history())["transactions"]
        self.assertEqual(len(after), len(before) + TRANSACTIONS_PER_PAGE + 2)
        self.assertEqual(after[-len(before):], before)

    def test_orders_stable_while_orders_arrive(self) -> None:
        """Orders placed after the first page stay out of that listing."""
        before = self.deployment.result(self.client.orders())["orders"]
        answers = self.pages(self.client.orders_page, lambda: self.deployment.result(self.client.buy("KO", 1)))
        self.assertEqual([row for a in answers for row in a["orders"]], before)
        self.assertEqual(len(answers), -(-len(before) // ORDERS_PER_PAGE))

    def test_limit(self) -> None:
        """``limit`` gives the newest rows, however many pages they span; it must be positive."""
        everything = self.deployment.result(self.client.history())["transactions"]
        for limit in (1, TRANSACTIONS_PER_PAGE, TRANSACTIONS_PER_PAGE + 1, 10_000):
            self.assertEqual(self.deployment.result(self.client.history(limit))["transactions"], everything[:limit])
        self.assertRaises(ValueError, self.deployment.result, self.client.history(0))

    def test_empty_list_is_one_page(self) -> None:
        """A user with no trades gets page 1 of 1, empty, with no next cursor."""
        bob = self.deployment.logged_in("bob")
        self.assertEqual(
            self.deployment.result(bob.history_page()),
            {"transactions": [], "page": 1, "pages": 1, "next_cursor": None},
        )

    def test_bad_cursors_refused(self) -> None:
        """Malformed, forged and foreign cursors get DataFailed; the connection keeps working."""
        first = self.deployment.result(self.client.history_page())
        second = self.deployment.result(self.client.history_page(first["next_cursor"]))
        top, after, page = (int(n) for n in first["next_cursor"].split("."))
        bob = self.deployment.logged_in("bob")
        bad = [
            "", "garbage", "1.2", "1.2.3.4", "-1.2.2", "1.2.x", "1" * 200, f"{2**63}.{after}.2",
            f"{top}.{after}.1",  # page 1 has no cursor
            f"{top}.{after}.3",  # the wrong page for this position
            f"{top}.{after + 1}.2",  # a position that is not where page 1 ended
            f"{top}.{top + 1}.2",  # after past the top
            f"{top}.{after}.99",  # past the last page
            f"{top}.{second['next_cursor'].split('.')[1]}.2",  # where page 2 ended, numbered as page 2
        ]
        for cursor in bad:
            for fetch in (self.client.history_page, self.client.orders_page):
                self.assertRaises(DataFailed, self.deployment.result, fetch(cursor))
        self.assertRaises(DataFailed, self.deployment.result, bob.history_page(first["next_cursor"]))
        self.assertEqual(self.deployment.result(self.client.history_page(first["next_cursor"])), second)

    def test_bad_asset_cursor_refused(self) -> None:
        """ListAssets refuses a cursor that does not fit the asset list, with DataFailed."""
        connection = self.deployment.link.connection
        for cursor in ("x", "2.3", f"2.{len(ASSETS) + 1}", "1.3", "0.3"):
            self.assertRaises(DataFailed, self.deployment.result, connection.callRemote(ListAssets, cursor=cursor))
        self.assertEqual(self.deployment.result(connection.callRemote(ListAssets))["pages"], 1)

    def test_reason_cut_to_its_bound(self) -> None:
        """An order with an absurdly long stored reason is listed with the reason cut to its bound."""
        self.connection.execute("UPDATE orders SET status = 'rejected', reason = ? WHERE user_id = ?",
                                ("\U0001f4c8" * 50_000, self.user_id))
        self.connection.commit()
        orders = self.deployment.result(self.client.orders())["orders"]
        self.assertEqual({o["reason"] for o in orders}, {"\U0001f4c8" * MAX_ORDER_REASON})


class AssetCapTests(SynchronousTestCase):
    """MAX_ASSETS assets with the longest symbols and texts allowed work end to end."""

    def test_cap_with_longest_assets(self) -> None:
        """The asset list accepts them, the worker loads every page, quotes the last, and ticks carry them all."""
        assets = longest_assets(MAX_ASSETS)
        self.assertEqual(MAX_ASSETS, 1000)
        lines = ["symbol,name,exchange,sector,industry,reference_price"] + [
            f"{a.symbol},{a.name},{a.exchange},{a.sector},{a.industry},{format_cents(a.reference_cents)}"
            for a in assets.values()
        ]
        parsed, problems = parse_assets(lines)
        self.assertEqual((problems, list(parsed)), ([], list(assets)))

        deployment = Deployment(self.mktemp(), assets=assets)
        self.assertEqual(len(deployment.cache.assets), MAX_ASSETS)
        client = deployment.client()
        last = list(assets)[-1]
        self.assertEqual(deployment.result(client.quote(last))["name"], assets[last].name)

        ticks: list[dict[str, Any]] = []
        client.on_price_tick(ticks.append)
        deployment.result(client.subscribe("all"))
        deployment.source.prices = {symbol: 2**63 - 1 for symbol in assets}
        deployment.tick()
        [tick] = ticks
        self.assertEqual(len(tick["prices"]), MAX_ASSETS)
        self.assertEqual(deployment.result(client.quote(last))["price_cents"], 2**63 - 1)

    def test_price_tick_at_cap(self) -> None:
        """A PriceTick for MAX_ASSETS longest symbols at the largest prices stays within the page budget."""
        prices = [{"symbol": symbol, "price_cents": paging.WORST_INTEGER} for symbol in longest_assets(MAX_ASSETS)]
        box = PriceTick.makeArguments({"tick": 2**62, "as_of": iso(0), "prices": prices}, None)
        self.assertLessEqual(len(box[b"prices"]), 36 * 1024)
        self.assertEqual(PriceTick.parseArguments(amp.AmpBox(box), None)["prices"], prices)
        box.serialize()


class HandshakeTests(SynchronousTestCase):
    """The worker's cache holds one consistent asset list, read page by page."""

    def test_price_update_between_pages(self) -> None:
        """If prices change while the worker reads the pages, it reads them again, so all prices are of one tick."""
        assets = realistic_assets(3 * ASSETS_PER_PAGE)
        deployment = Deployment(self.mktemp(), assets=assets)
        requests: list[str | None] = []
        original = master_protocol.page_of_sequence

        def racing(items: Any, per_page: int, cursor: str | None) -> Any:
            requests.append(cursor)
            if len(requests) == 2:
                deployment.source.prices = {symbol: cents + 1 for symbol, cents in deployment.source.prices.items()}
                deployment.exchange.tick()
            return original(items, per_page, cursor)

        self.patch(master_protocol, "page_of_sequence", racing)
        deployment.connect_worker()
        self.assertEqual(len(requests), 6)
        self.assertEqual(deployment.cache.prices, deployment.board.prices)
        self.assertEqual(deployment.cache.tick, deployment.board.tick)

    def test_too_many_assets_refused(self) -> None:
        """A master that lists more than MAX_ASSETS assets fails the worker's handshake."""
        deployment = Deployment(self.mktemp(), assets=realistic_assets(2 * ASSETS_PER_PAGE))
        self.patch(upstream, "MAX_ASSETS", ASSETS_PER_PAGE)
        deployment.connect_worker()
        self.assertIsNone(deployment.link.connection)
        self.assertEqual(deployment.registry.workers, {})


