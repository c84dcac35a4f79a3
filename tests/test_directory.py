"""The worker directory, its listener, and kicking a worker (in memory, through iosim)."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from papertrader.client.library import ClientAMP
from papertrader.errors import BadRequest, DataFailed, WorkerNotConnected
from papertrader.master.directory import Directory, DirectoryFactory, DirectoryLocator
from papertrader.master.service import _nth_listen
from papertrader.master.workers import ConnectedWorker
from papertrader.protocol import (
    MAX_LISTED_WORKERS,
    WORKERS_PER_PAGE,
    ListWorkers,
    Login,
    WorkerList,
    check_worker_address,
)
from papertrader.worker.upstream import REFUSED_RETRY_DELAY
from tests.support import PASSWORD, Deployment, SimWorker

W1 = {"name": "w1", "address": "10.0.0.1:2049"}
W2 = {"name": "w2", "address": "10.0.0.2:2049"}


class DirectoryTests(SynchronousTestCase):
    """The master lists the workers that gave a client address and pushes the list to every worker."""

    def setUp(self) -> None:
        self.deployment = Deployment(self.mktemp())
        self.w1 = SimWorker(self.deployment, "w1", W1["address"])
        self.w2 = SimWorker(self.deployment, "w2", W2["address"])

    def test_listed_at_handshake(self) -> None:
        """Each worker is listed at its handshake and every worker holds the whole list; the
        deployment's worker, which gave no client address (as one from before the directory), is
        connected but neither listed nor sent the list."""
        self.assertEqual(self.deployment.registry.directory.entries(), [W1, W2])
        self.assertIn("test-worker", self.deployment.registry.workers)
        self.assertEqual(self.w1.cache.workers, [W1, W2])
        self.assertEqual(self.w2.cache.workers, [W1, W2])
        self.assertEqual(self.deployment.cache.workers, [])

    def test_unlisted_when_gone(self) -> None:
        """A worker whose link ends leaves the list, and the others are told."""
        self.w1.crash()
        self.assertEqual(self.deployment.registry.directory.entries(), [W2])
        self.assertEqual(self.w2.cache.workers, [W2])

    def test_login_answers_list_workers(self) -> None:
        """Login and LoginWithToken answers carry the directory, so a client knows where else to go."""
        client = self.w1.client()
        d = self.deployment
        d.result(client.register("alice", "alice@example.com", PASSWORD))
        answer = d.result(client.login("alice", PASSWORD))
        self.assertEqual(answer["workers"], [W1, W2])
        other = self.w2.client()
        self.assertEqual(d.result(other.login_with_token(answer["token"]))["workers"], [W1, W2])

    def test_unusable_client_address(self) -> None:
        """A worker whose client address is not a HOST:PORT is accepted but not listed."""
        odd = SimWorker(self.deployment, "w3", "not an address")
        self.assertIn("w3", self.deployment.registry.workers)
        self.assertEqual([e["name"] for e in self.deployment.registry.directory.entries()], ["w1", "w2"])
        self.assertEqual(odd.cache.workers, [W1, W2])


class KickTests(SynchronousTestCase):
    """`WorkerRegistry.kick`: the worker's clients are told where to go, then the worker is closed."""

    def setUp(self) -> None:
        self.deployment = Deployment(self.mktemp())
        self.w1 = SimWorker(self.deployment, "w1", W1["address"])
        self.w2 = SimWorker(self.deployment, "w2", W2["address"])

    def test_kick(self) -> None:
        """Kicked: every client of the worker gets GoAway naming only the other workers and is
        disconnected; the worker leaves the directory and its link is closed; it waits its refusal
        back-off before connecting again."""
        d = self.deployment
        clients = [self.w1.client(), self.w1.client()]
        d.result(clients[0].register("alice", "alice@example.com", PASSWORD))
        d.result(clients[0].login("alice", PASSWORD))
        told: list[tuple[str, list[dict[str, str]]]] = []
        closed = []
        for client in clients:
            client.on_go_away(lambda reason, workers: told.append((reason, workers)))
            client.when_closed().addBoth(closed.append)
        bystander = self.w2.client()

        count = d.result(d.registry.kick("w1", "maintenance"))
        self.assertEqual(count, 2)
        self.assertEqual(told, [("maintenance", [W2])] * 2)
        self.assertEqual(len(closed), 2)
        self.assertNotIn("w1", d.registry.workers)
        self.assertIsNone(self.w1.link.connection)
        self.assertEqual(d.registry.directory.entries(), [W2])
        self.assertEqual(self.w2.cache.workers, [W2])
        self.assertGreaterEqual(self.w1.link._retry_delay(0), REFUSED_RETRY_DELAY)
        self.assertIsNotNone(bystander.connection.transport)

    def test_kick_unknown(self) -> None:
        """Kicking a worker that is not connected fails with WorkerNotConnected, naming it."""
        failure = self.failureResultOf(self.deployment.registry.kick("nobody", "why"), WorkerNotConnected)
        self.assertIn("'nobody'", str(failure.value))

    def test_kick_silent_worker(self) -> None:
        """A worker that does not answer its BootOff is closed anyway after the timeout."""
        clock = Clock()
        registry = type(self.deployment.registry)(clock)
        silent = _SilentWorker()
        registry.workers["quiet"] = ConnectedWorker("quiet", silent, "10.0.0.9:40000", None, "1", 0.0)
        d = registry.kick("quiet", "going", timeout=10)
        self.assertNoResult(d)
        self.assertFalse(silent.closed)
        clock.advance(10)
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(silent.closed)


class _SilentWorker:
    """A worker connection that never answers."""

    transport = object()
    closed = False

    def callRemote(self, command: Any, **arguments: Any) -> Deferred:
        return Deferred()

    def close(self) -> None:
        self.closed = True


class DirectoryListenerTests(SynchronousTestCase):
    """The directory listener answers ListWorkers in numbered pages, and nothing else."""

    def test_pages(self) -> None:
        """A long directory comes in numbered pages holding every worker once, in name order."""
        directory = Directory()
        count = 2 * WORKERS_PER_PAGE + 3
        for i in range(count):
            directory.set(f"w{i:04d}", f"host{i}.example.org:2049")
        locator = DirectoryLocator(directory)
        rows, cursor, pages = [], None, []
        while True:
            page = locator.list_workers(cursor)
            rows.extend(page["workers"])
            pages.append((page["page"], page["pages"]))
            cursor = page.get("next_cursor")
            if cursor is None:
                break
        self.assertEqual(pages, [(1, 3), (2, 3), (3, 3)])
        self.assertEqual(rows, directory.entries())
        self.assertEqual(len(rows), count)

    def test_changed_between_pages(self) -> None:
        """A cursor from before the directory changed, or a malformed one, gets DataFailed."""
        directory = Directory()
        for i in range(WORKERS_PER_PAGE + 1):
            directory.set(f"w{i}", f"h{i}:1")
        locator = DirectoryLocator(directory)
        cursor = locator.list_workers()["next_cursor"]
        directory.discard("w0")
        self.assertRaises(DataFailed, locator.list_workers, cursor)
        self.assertRaises(DataFailed, locator.list_workers, "x")

    def test_over_the_wire(self) -> None:
        """Over a connection, ListWorkers is answered; any other command is a declared bad request."""
        clock = Clock()
        directory = Directory()
        directory.set("w1", W1["address"])
        factory = DirectoryFactory(lambda: DirectoryLocator(directory), clock=clock)
        client, _, pump = iosim.connectedServerAndClient(lambda: factory.buildProtocol(None), ClientAMP, clock=clock)
        answers: list[Any] = []
        client.callRemote(ListWorkers).addBoth(answers.append)
        client.callRemote(Login, username="a", password="b").addBoth(answers.append)
        pump.flush()
        self.assertEqual(answers[0]["workers"], [W1])
        self.assertEqual((answers[0]["page"], answers[0]["pages"]), (1, 1))
        answers[1].trap(BadRequest)
        self.assertIn("unknown command", str(answers[1].value))


class WorkerListTests(SynchronousTestCase):
    """What a worker list on the wire may hold."""

    def test_bounds(self) -> None:
        """More than MAX_LISTED_WORKERS rows, an unknown key, a bad name or address: BadRequest."""
        argument = WorkerList()
        row = {"name": "w", "address": "h:1"}
        self.assertEqual(argument.fromString(json.dumps([row]).encode()), [row])
        for bad in (
            [row] * (MAX_LISTED_WORKERS + 1),
            [{**row, "extra": 1}],
            [{"name": "", "address": "h:1"}],
            [{"name": "w", "address": "h"}],
            [{"name": "w", "address": "h:99999"}],
            {"name": "w"},
        ):
            self.assertRaises(BadRequest, argument.fromString, json.dumps(bad).encode())

    def test_addresses(self) -> None:
        """HOST:PORT and [v6]:PORT are client addresses; a bare v6 address, spaces or no port are not."""
        for good in ("example.org:2049", "10.0.0.1:1", "[::1]:2049"):
            self.assertEqual(check_worker_address(good), good)
        for bad in ("::1:2049", "host name:1", "host", ":2049", "h:0", "h:x"):
            self.assertRaises(ValueError, check_worker_address, bad)


class LocalWorkerPortsTests(SynchronousTestCase):
    """Local workers listen on consecutive ports, passing over the master's own listeners."""

    def test_ports(self) -> None:
        """From 2049 with the directory on 2050: 2049, 2051, 2052; port 0 stays 0 for every worker."""
        reserved = ("tcp:2048:interface=127.0.0.1", "tcp:2050:interface=127.0.0.1")
        self.assertEqual(
            [_nth_listen("tcp:2049:interface=127.0.0.1", i, reserved) for i in range(3)],
            ["tcp:2049:interface=127.0.0.1", "tcp:2051:interface=127.0.0.1", "tcp:2052:interface=127.0.0.1"],
        )
        self.assertEqual(_nth_listen("tcp:2047", 2, reserved), "tcp:2051")
        self.assertEqual([_nth_listen("tcp:0", i, reserved) for i in range(2)], ["tcp:0", "tcp:0"])
