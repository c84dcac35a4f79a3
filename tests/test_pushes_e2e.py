"""Subscriptions end to end: real twistd processes on loopback, clients over TLS."""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from papertrader.client.library import PaperTraderClient, connect
from tests.processes import RunningDeployment

PASSWORD = "correct horse battery"


class Listener:
    """What one client connection is pushed: every price tick on the wire, and its order updates."""

    def __init__(self, client: PaperTraderClient) -> None:
        self.ticks: list[dict[str, Any]] = []
        self.updates: list[dict[str, Any]] = []
        self._waiting: list[tuple[Any, Deferred[None]]] = []
        pushes = client.connection.locator
        forward = pushes.on_price_tick

        def tick(pushed: dict[str, Any]) -> None:
            self.ticks.append(pushed)
            self._check()
            forward(pushed)

        pushes.on_price_tick = tick  # every tick the worker sends, whatever the library does with it
        client.on_order_update(self._update)

    def _update(self, update: dict[str, Any]) -> None:
        self.updates.append(update)
        self._check()

    def _check(self) -> None:
        for condition, d in list(self._waiting):
            if condition():
                self._waiting.remove((condition, d))
                d.callback(None)

    def until(self, condition: Any) -> Deferred[None]:
        """Fires once ``condition()`` holds (checked at each push)."""
        d: Deferred[None] = Deferred()
        self._waiting.append((condition, d))
        self._check()
        return d


class SubscriptionEndToEndTests(TestCase):
    """A deployment whose clients choose their pushes."""

    timeout = 240

    @inlineCallbacks
    def test_subscribed_and_unsubscribed_clients(self) -> Any:
        """A client subscribed to AAPL gets AAPL ticks and its fill; one not subscribed gets its fill but no ticks."""
        deployment = RunningDeployment(self.mktemp())
        self.addCleanup(deployment.stop)
        yield deployment.start()
        host, port = deployment.worker_address()
        ca = os.path.join(deployment.data, "tls", "ca.pem")
        clients = {}
        for name in ("alice", "bob"):
            client = yield connect(reactor, host, port, ca)
            self.addCleanup(client.close)
            yield client.register(name, f"{name}@example.com", PASSWORD)
            yield client.login(name, PASSWORD)
            clients[name] = client
        alice, bob = Listener(clients["alice"]), Listener(clients["bob"])
        answer = yield clients["alice"].subscribe(["AAPL"])
        self.assertEqual(answer, {"prices": ["AAPL"], "all_prices": False})

        alice_order = (yield clients["alice"].buy("AAPL", 1))["order_id"]
        bob_order = (yield clients["bob"].buy("KO", 2))["order_id"]
        yield alice.until(lambda: alice.updates)
        yield bob.until(lambda: bob.updates)
        self.assertEqual([(u["order_id"], u["status"]) for u in alice.updates], [(alice_order, "filled")])
        self.assertEqual([(u["order_id"], u["status"]) for u in bob.updates], [(bob_order, "filled")])
        # Two more updates reach alice: any tick bob was sent would have been written to him by then.
        seen = len(alice.ticks)
        yield alice.until(lambda: len(alice.ticks) >= seen + 2)
        self.assertEqual(bob.ticks, [])
        self.assertEqual({tuple(p["symbol"] for p in tick["prices"]) for tick in alice.ticks}, {("AAPL",)})

        code, out, err = yield deployment.cli("watch", "KO", "MSFT", "--count", "1", "--json")
        self.assertEqual(code, 0, err)
        [line] = out.splitlines()
        self.assertEqual([p["symbol"] for p in json.loads(line)["prices"]], ["KO", "MSFT"])
        code, out, err = yield deployment.cli("watch", "NOPE")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("unknown symbol 'NOPE'", err)
