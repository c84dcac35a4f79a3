"""The worker handshake in memory, with real GnuPG keys: every way a worker is refused, and the
master serving its other worker throughout.

The deployment's master and worker (``test-worker``) are wired through iosim;
each test connects another, bare, worker connection to the master and tries
the handshake with a key or signature that must fail.  gpg runs for real, at
once (no thread), with keys made once per test process or, for keys a test
changes, in a short home of its own.
"""

from __future__ import annotations

import subprocess
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.trial.unittest import SynchronousTestCase

from papertrader import gpg
from papertrader.errors import ServiceUnavailable, WorkerRefused
from papertrader.master.handshake import Stage
from papertrader.protocol import ListAssets, SubmitOrders, WorkerHello, WorkerProof
from papertrader.wire import PEER_LOG
from tests.gpgkeys import WorkerKey, cached_key, fresh_home, new_key
from tests.support import Deployment
from tests.test_wire import LoggedEvents, RawPeer

# A time before now at which keys for the expired-key test are made and used.
PAST = "20200101T000000!"
PAST_NEXT_DAY = "20200102T000000!"


class HandshakeRefusalTests(SynchronousTestCase):
    """A worker is accepted only with its registered, usable key, over its own fresh nonce."""

    def setUp(self) -> None:
        PEER_LOG.__init__()
        self.deployment = Deployment(self.mktemp())
        self.alice = self.deployment.logged_in("alice")
        self.log = LoggedEvents(self)
        self.port = 51000

    def peer(self, name: str) -> RawPeer:
        """A bare connection to the master whose certificate (in memory: the given name) says ``name``."""
        self.deployment.certified_names[0] = name
        self.port += 1
        return RawPeer(self.deployment, self.deployment.master_factory, self.port)

    def hello(self, peer: RawPeer, name: str) -> str:
        """Say hello as ``name``; return the nonce."""
        return self.deployment.result(peer.protocol.callRemote(WorkerHello, name=name, version="0"))["nonce"]

    def prove(self, peer: RawPeer, signature: str) -> Any:
        return self.deployment.result(peer.protocol.callRemote(WorkerProof, signature=signature))

    def refused(self, d: Any, reason: str, peer: RawPeer) -> None:
        """``d`` fails with WorkerRefused saying ``reason``, which is logged; the connection is closed,
        holds no name, and the deployment's own worker still serves."""
        error = self.assertRaises(WorkerRefused, self.deployment.result, d)
        self.assertIn(reason, str(error))
        [line] = self.log.about("refused worker")
        self.assertIn(reason, line["reason"])
        self.assertTrue(peer.closed)
        self.assertEqual(list(self.deployment.registry.workers), ["test-worker"])
        self.assertNotIn(peer.server, [r.connection for r in self.deployment.registry.workers.values()])
        handshake = peer.server.locator.handshake
        self.assertIs(handshake.stage, Stage.REFUSED)
        self.assertIsNone(handshake._nonce)
        self.assert_serving()

    def assert_serving(self) -> None:
        """The deployment's worker still relays orders to the master."""
        self.assertIn("order_id", self.deployment.result(self.alice.buy("AAPL", 1)))

    def attempt(self, peer: RawPeer, name: str, key: WorkerKey, nonce: str | None = None) -> Any:
        """Hello as ``name``, then a proof signed with ``key`` (over ``nonce`` instead of the master's, if given)."""
        issued = self.hello(peer, name)
        return peer.protocol.callRemote(
            WorkerProof, signature=key.sign(gpg.proof_statement(name, nonce or issued))
        )

    # ------------------------------------------------------------ accepted

    def test_registered_worker_accepted(self) -> None:
        """A registered worker signing its nonce with its key gets the link's settings and its name,
        and may then send commands; its client address is kept."""
        self.deployment.register("w-good")
        peer = self.peer("w-good")
        answer = self.deployment.result(
            peer.protocol.callRemote(WorkerHello, name="w-good", version="1.2", client_address="w.example:2049")
        )
        self.assertEqual(len(answer["nonce"]), 64)
        key = cached_key("w-good")
        answer = self.prove(peer, key.sign(gpg.proof_statement("w-good", answer["nonce"])))
        self.assertEqual(answer["update_interval"], 60.0)
        self.assertIs(self.deployment.registry.workers["w-good"].connection, peer.server)
        self.assertEqual(peer.server.locator.client_address, "w.example:2049")
        self.assertIn("assets", self.deployment.result(peer.protocol.callRemote(ListAssets)))
        self.assert_serving()

    def test_nonces_are_fresh(self) -> None:
        """Every hello gets a new nonce."""
        self.deployment.register("w-good")
        nonces = {self.hello(self.peer("w-good"), "w-good") for _ in range(3)}
        self.assertEqual(len(nonces), 3)

    # ------------------------------------------------------------ refused at the hello

    def test_unknown_name(self) -> None:
        """A name nobody registered is refused at the hello: no nonce is issued."""
        peer = self.peer("w-nobody")
        d = peer.protocol.callRemote(WorkerHello, name="w-nobody", version="0")
        self.refused(d, "no worker named 'w-nobody' is registered", peer)

    def test_disabled_worker(self) -> None:
        """A disabled worker is refused at the hello; enabled again, it is accepted."""
        self.deployment.register("w-off")
        self.deployment.result(self.deployment.registrations.set_enabled("w-off", False))
        peer = self.peer("w-off")
        self.refused(peer.protocol.callRemote(WorkerHello, name="w-off", version="0"), "is disabled", peer)
        self.deployment.result(self.deployment.registrations.set_enabled("w-off", True))
        other = self.peer("w-off")
        self.assertIn("update_interval", self.deployment.result(self.deployment.handshake(other.protocol, "w-off")))

    def test_disabled_while_signing(self) -> None:
        """A worker disabled between its hello and its proof is refused at the proof."""
        self.deployment.register("w-off")
        peer = self.peer("w-off")
        nonce = self.hello(peer, "w-off")
        self.deployment.result(self.deployment.registrations.set_enabled("w-off", False))
        signature = cached_key("w-off").sign(gpg.proof_statement("w-off", nonce))
        d = peer.protocol.callRemote(WorkerProof, signature=signature)
        self.refused(d, "is disabled", peer)

    def test_outside_allowed_networks(self) -> None:
        """A connection from outside the worker's networks is refused; from inside, accepted."""
        self.deployment.register("w-net", ("192.168.0.0/16", "2001:db8::/32"))
        peer = self.peer("w-net")  # from 10.9.8.7
        d = peer.protocol.callRemote(WorkerHello, name="w-net", version="0")
        self.refused(d, "may not connect from 10.9.8.7", peer)
        self.deployment.register("w-net-in", ("192.168.0.0/16", "10.9.0.0/16"))
        inside = self.peer("w-net-in")
        self.assertIn("update_interval", self.deployment.result(self.deployment.handshake(inside.protocol, "w-net-in")))

    def test_client_pretending_to_be_a_worker(self) -> None:
        """A connection whose certificate names no worker (a client's) is refused at its hello."""
        peer = self.peer("")
        self.deployment.certified_names[0] = None
        d = peer.protocol.callRemote(WorkerHello, name="test-worker", version="0")
        self.refused(d, "this certificate is not for a worker named 'test-worker'", peer)

    # ------------------------------------------------------------ refused at the proof

    def test_unknown_fingerprint(self) -> None:
        """A signature by a key the master has never seen is refused."""
        self.deployment.register("w-one")
        stranger = new_key(fresh_home(self), "stranger")
        peer = self.peer("w-one")
        self.refused(self.attempt(peer, "w-one", stranger), "not a good signature by a key this master knows", peer)

    def test_valid_signature_of_another_key(self) -> None:
        """A good signature by a key the master knows, but registered to another worker, is refused."""
        self.deployment.register("w-one")
        other = self.deployment.register("w-two")
        peer = self.peer("w-one")
        self.refused(
            self.attempt(peer, "w-one", other), f"signed by key {other.fingerprint}, not by worker 'w-one''s key", peer
        )

    def test_wrong_nonce(self) -> None:
        """The registered key's signature over another nonce is refused."""
        key = self.deployment.register("w-one")
        peer = self.peer("w-one")
        d = self.attempt(peer, "w-one", key, nonce="0" * 64)
        self.refused(d, "the signed nonce is not the one issued to this connection", peer)

    def test_statement_of_another_worker(self) -> None:
        """A signature over the right nonce but another worker's name is refused."""
        key = self.deployment.register("w-one")
        peer = self.peer("w-one")
        nonce = self.hello(peer, "w-one")
        d = peer.protocol.callRemote(WorkerProof, signature=key.sign(gpg.proof_statement("w-other", nonce)))
        self.refused(d, "the signed statement is for worker 'w-other'", peer)

    def test_replayed_nonce(self) -> None:
        """A proof that was accepted once is refused when sent again, on the same connection or another."""
        key = self.deployment.register("w-one")
        first = self.peer("w-one")
        nonce = self.hello(first, "w-one")
        signature = key.sign(gpg.proof_statement("w-one", nonce))
        self.prove(first, signature)
        again = first.protocol.callRemote(WorkerProof, signature=signature)
        self.assertIn("out of turn", str(self.assertRaises(WorkerRefused, self.deployment.result, again)))
        self.assertTrue(first.closed)  # a proved worker that misbehaves loses its connection too
        self.log.events.clear()
        second = self.peer("w-one")
        self.hello(second, "w-one")
        d = second.protocol.callRemote(WorkerProof, signature=signature)
        self.refused(d, "the signed nonce is not the one issued to this connection", second)

    def test_expired_nonce(self) -> None:
        """A proof that comes after the nonce's lifetime is refused; one just within it is accepted."""
        self.deployment.nonce_lifetime = 5.0
        key = self.deployment.register("w-one")
        late = self.peer("w-one")
        nonce = self.hello(late, "w-one")
        self.deployment.advance(6, step=1)
        d = late.protocol.callRemote(WorkerProof, signature=key.sign(gpg.proof_statement("w-one", nonce)))
        self.refused(d, "the nonce expired", late)
        prompt = self.peer("w-one")
        nonce = self.hello(prompt, "w-one")
        self.deployment.advance(4, step=1)
        self.assertIn("update_interval", self.prove(prompt, key.sign(gpg.proof_statement("w-one", nonce))))

    def test_expired_key(self) -> None:
        """A signature by the registered key after it expired is refused.

        The key is made (and registered) as of 2020; it is then given an expiry
        date of a day later, imported by the master as an update, and the
        worker signs as of a time the key was still good.
        """
        home = fresh_home(self)
        key = new_key(home, "w-old", options=["--faked-system-time", PAST])
        self.deployment.result(self.deployment.registrations.add("w-old", key.public_key))
        subprocess.run(
            ["gpg", "--homedir", home, "--batch", "--faked-system-time", PAST_NEXT_DAY,
             "--quick-set-expire", key.fingerprint, "1d"],
            check=True, capture_output=True,
        )
        self.deployment.result(
            self.deployment.registrations.update_key("w-old", gpg.export_public_key(home, key.fingerprint))
        )
        peer = self.peer("w-old")
        nonce = self.hello(peer, "w-old")
        signature = key.sign(gpg.proof_statement("w-old", nonce), ["--faked-system-time", PAST_NEXT_DAY])
        d = peer.protocol.callRemote(WorkerProof, signature=signature)
        self.refused(d, "expired", peer)

    def test_revoked_key(self) -> None:
        """A signature by the registered key after its revocation was imported is refused."""
        home = fresh_home(self)
        key = new_key(home, "w-rev")
        self.deployment.result(self.deployment.registrations.add("w-rev", key.public_key))
        with open(f"{home}/openpgp-revocs.d/{key.fingerprint}.rev", encoding="ascii") as f:
            revocation = f.read().replace(":-----BEGIN", "-----BEGIN")
        self.deployment.result(self.deployment.registrations.update_key("w-rev", revocation))
        peer = self.peer("w-rev")
        self.refused(self.attempt(peer, "w-rev", key), "revoked", peer)

    def test_garbage_proof(self) -> None:
        """A proof that is no signature at all is refused."""
        self.deployment.register("w-one")
        peer = self.peer("w-one")
        self.hello(peer, "w-one")
        d = peer.protocol.callRemote(WorkerProof, signature="not a signature")
        self.refused(d, "not a good signature", peer)

    # ------------------------------------------------------------ out of order

    def test_commands_before_the_proof(self) -> None:
        """A worker that said hello but sends a command before its proof is refused and closed; its
        nonce is forgotten."""
        self.deployment.register("w-one")
        peer = self.peer("w-one")
        self.hello(peer, "w-one")
        d = peer.protocol.callRemote(SubmitOrders, orders=[])
        error = self.assertRaises(ServiceUnavailable, self.deployment.result, d)
        self.assertIn("has not completed its handshake", str(error))
        self.assertTrue(peer.closed)
        self.assertIs(peer.server.locator.handshake.stage, Stage.REFUSED)
        self.assertIsNone(peer.server.locator.handshake._nonce)
        self.assertEqual(len(self.log.about("before completing the worker handshake")), 1)
        self.assert_serving()

    def test_proof_before_hello(self) -> None:
        """A proof without a hello is refused out of turn."""
        peer = self.peer("w-one")
        d = peer.protocol.callRemote(WorkerProof, signature="x")
        self.refused(d, "a proof out of turn", peer)

    def test_second_hello(self) -> None:
        """A second hello on one connection is refused, and the first nonce dies with it."""
        self.deployment.register("w-one")
        peer = self.peer("w-one")
        self.hello(peer, "w-one")
        d = peer.protocol.callRemote(WorkerHello, name="w-one", version="0")
        self.refused(d, "a hello out of turn", peer)

    def test_many_refusals_keep_the_master_serving(self) -> None:
        """Refused handshakes of every kind, one after another, cost the serving worker nothing,
        and each refused connection is closed."""
        key = self.deployment.register("w-one")
        peers = []
        for nonce in ("a" * 64, "b" * 64, None):
            peer = self.peer("w-one")
            d = self.attempt(peer, "w-one", key, nonce=nonce) if nonce else peer.protocol.callRemote(ListAssets)
            d.addErrback(lambda f: f.trap(WorkerRefused, ServiceUnavailable, ConnectionDone))
            peers.append(peer)
        self.deployment.flush()
        self.assertTrue(all(peer.closed for peer in peers))
        self.assertEqual(list(self.deployment.registry.workers), ["test-worker"])
        self.assert_serving()


class DuplicateNameTests(SynchronousTestCase):
    """Two workers with the same registered key: the name stays with the live connection."""

    def setUp(self) -> None:
        PEER_LOG.__init__()
        self.deployment = Deployment(self.mktemp())

    def test_duplicate_refused_while_alive(self) -> None:
        """A second, fully proved, connection as test-worker is refused while the first answers pings."""
        intruder = RawPeer(self.deployment, self.deployment.master_factory, 52000)
        d = self.deployment.handshake(intruder.protocol, "test-worker")
        error = self.assertRaises(WorkerRefused, self.deployment.result, d)
        self.assertIn("already connected", str(error))
        self.assertTrue(intruder.closed)
        self.assertIs(self.deployment.registry.workers["test-worker"].connection, self.deployment.master_pump.server)

    def test_duplicate_replaces_a_dead_one(self) -> None:
        """When the old connection does not answer the ping, the newly proved one takes the name."""
        self.deployment.pumps.remove(self.deployment.master_pump)
        newcomer = RawPeer(self.deployment, self.deployment.master_factory, 52001)
        d = self.deployment.handshake(newcomer.protocol, "test-worker")
        self.deployment.advance(11, step=1)
        self.assertEqual(self.successResultOf(d)["update_interval"], 60.0)
        self.assertIs(self.deployment.registry.workers["test-worker"].connection, newcomer.server)
