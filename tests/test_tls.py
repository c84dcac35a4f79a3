"""Tests for L{papertrader.tls}: the deployment CA, its certificates and real TLS links."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from papertrader import tls

HOSTNAMES = ("localhost", "127.0.0.1")


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def load_certificate(path: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(read(path))


def common_name(name: x509.Name) -> str:
    return name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def write_old_style_leaf(
    directory: str, label: str, common_name: str, hostnames: tuple[str, ...], days: int, key_identifiers: bool
) -> bytes:
    """Issue ``label`` from the CA in ``directory`` the way older releases did; return the PEM.

    Older releases issued leaves for 825 days and without key identifiers.
    """
    ca_key = serialization.load_pem_private_key(read(os.path.join(directory, "ca.key")), None)
    ca = load_certificate(os.path.join(directory, "ca.pem"))
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    names = [x509.DNSName(hostnames[0]), x509.IPAddress(ipaddress.ip_address(hostnames[1]))]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if key_identifiers:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False
        )
    pem = builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    with open(os.path.join(directory, label + ".pem"), "wb") as f:
        f.write(pem)
    with open(os.path.join(directory, label + ".key"), "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return pem


class EnsureIdentityTests(SynchronousTestCase):
    """
    L{tls.ensure_identity} creates a private CA and certificates once, then reuses them.
    """

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        # A permissive umask must not leak into the private files' modes.
        old = os.umask(0)
        self.addCleanup(os.umask, old)

    def test_createsFiles(self) -> None:
        """The first call creates the CA and the certificate, and returns their paths."""
        identity = tls.ensure_identity(self.directory, "master", "papertrader-master", HOSTNAMES)
        self.assertEqual(
            identity,
            tls.Identity(
                certificate=os.path.join(self.directory, "master.pem"),
                key=os.path.join(self.directory, "master.key"),
                ca=os.path.join(self.directory, "ca.pem"),
            ),
        )
        for name in ("ca.pem", "ca.key", "master.pem", "master.key"):
            self.assertTrue(os.path.isfile(os.path.join(self.directory, name)), name)
        self.assertFalse([name for name in os.listdir(self.directory) if name.endswith(".tmp")])

    def test_privateModes(self) -> None:
        """Private keys are mode 0600 and the folder is private, whatever the umask."""
        identity = tls.ensure_identity(self.directory, "master", "papertrader-master", HOSTNAMES)
        for path in (identity.key, os.path.join(self.directory, "ca.key")):
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600, path)
        self.assertEqual(stat.S_IMODE(os.stat(self.directory).st_mode), 0o700)

    def test_reissuedKeyPrivate(self) -> None:
        """A key written again when the certificate is reissued is still mode 0600."""
        tls.ensure_identity(self.directory, "master", "papertrader-master", HOSTNAMES)
        identity = tls.ensure_identity(self.directory, "master", "papertrader-master", ["other.example"])
        self.assertEqual(stat.S_IMODE(os.stat(identity.key).st_mode), 0o600)

    def test_caCertificate(self) -> None:
        """The CA certificate is a self-signed CA."""
        identity = tls.ensure_identity(self.directory, "master", "papertrader-master", HOSTNAMES)
        ca = load_certificate(identity.ca)
        self.assertEqual(ca.subject, ca.issuer)
        self.assertTrue(ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        ca.verify_directly_issued_by(ca)

    def test_issuedCertificate(self) -> None:
        """The issued certificate is signed by the CA, named and valid for every hostname."""
        identity = tls.ensure_identity(self.directory, "worker-1", "papertrader-worker-1", HOSTNAMES)
        ca = load_certificate(identity.ca)
        cert = load_certificate(identity.certificate)
        cert.verify_directly_issued_by(ca)
        self.assertEqual(common_name(cert.subject), "papertrader-worker-1")
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(sans.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(sans.get_values_for_type(x509.IPAddress), [ipaddress.ip_address("127.0.0.1")])
        self.assertFalse(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertIn(ExtendedKeyUsageOID.SERVER_AUTH, usages)
        self.assertIn(ExtendedKeyUsageOID.CLIENT_AUTH, usages)

    def test_keyIdentifiers(self) -> None:
        """Leaves name their CA's key (AKI = the CA's SKI) and their own (SKI); the CA names itself."""
        identity = tls.ensure_identity(self.directory, "worker-1", "papertrader-worker-1", HOSTNAMES)
        ca = load_certificate(identity.ca)
        cert = load_certificate(identity.certificate)
        ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        self.assertEqual(ca_ski, x509.SubjectKeyIdentifier.from_public_key(ca.public_key()))
        for issued in (cert, ca):
            aki = issued.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
            self.assertEqual(aki.key_identifier, ca_ski.digest)
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        self.assertEqual(ski, x509.SubjectKeyIdentifier.from_public_key(cert.public_key()))

    def test_leafLifetime(self) -> None:
        """Leaves are valid for 397 days, the most strict validators accept."""
        identity = tls.ensure_identity(self.directory, "master", "papertrader-master", HOSTNAMES)
        cert = load_certificate(identity.certificate)
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        self.assertLessEqual(lifetime, datetime.timedelta(days=398))
        self.assertGreaterEqual(lifetime, datetime.timedelta(days=397))

    def test_opensslVerifiesChain(self) -> None:
        """OpenSSL's own chain verification accepts a leaf against the CA, and refuses another CA's leaf."""
        identity = tls.ensure_identity(self.directory, "master", "papertrader-master", HOSTNAMES)
        store = crypto.X509Store()
        store.add_cert(crypto.X509.from_cryptography(load_certificate(identity.ca)))
        store.set_flags(crypto.X509StoreFlags.X509_STRICT)
        leaf = crypto.X509.from_cryptography(load_certificate(identity.certificate))
        self.assertIsNone(crypto.X509StoreContext(store, leaf).verify_certificate())
        other = tls.ensure_identity(os.path.abspath(self.mktemp()), "master", "papertrader-master", HOSTNAMES)
        foreign = crypto.X509.from_cryptography(load_certificate(other.certificate))
        self.assertRaises(crypto.X509StoreContextError, crypto.X509StoreContext(store, foreign).verify_certificate)

    def test_oldStyleLeafReissued(self) -> None:
        """A leaf on disk without key identifiers, or valid for 825 days, is replaced by a current one."""
        tls.ensure_identity(self.directory, "master", "papertrader-master", HOSTNAMES)
        for days, key_identifiers in ((825, False), (397, False), (825, True)):
            old = write_old_style_leaf(self.directory, "master", "papertrader-master", HOSTNAMES, days, key_identifiers)
            identity = tls.ensure_identity(self.directory, "master", "papertrader-master", HOSTNAMES)
            self.assertNotEqual(read(identity.certificate), old, (days, key_identifiers))
            cert = load_certificate(identity.certificate)
            cert.verify_directly_issued_by(load_certificate(identity.ca))
            cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
            self.assertLessEqual(cert.not_valid_after_utc - cert.not_valid_before_utc, datetime.timedelta(days=398))

    def test_currentLeafKept(self) -> None:
        """A leaf with the CA's AKI and a 397-day lifetime written by other means is kept as it is."""
        tls.ensure_identity(self.directory, "master", "papertrader-master", HOSTNAMES)
        pem = write_old_style_leaf(self.directory, "master", "papertrader-master", HOSTNAMES, 397, True)
        identity = tls.ensure_identity(self.directory, "master", "papertrader-master", HOSTNAMES)
        self.assertEqual(read(identity.certificate), pem)

    def test_reusesFiles(self) -> None:
        """A second call with the same hostnames returns the very same CA, certificate and key."""
        first = tls.ensure_identity(self.directory, "master", "papertrader-master", HOSTNAMES)
        contents = {path: read(path) for path in (first.certificate, first.key, first.ca)}
        contents[os.path.join(self.directory, "ca.key")] = read(os.path.join(self.directory, "ca.key"))
        second = tls.ensure_identity(self.directory, "master", "papertrader-master", HOSTNAMES)
        self.assertEqual(second, first)
        for path, content in contents.items():
            self.assertEqual(read(path), content, path)

    def test_changedHostnamesReissue(self) -> None:
        """Different hostnames give a new certificate and key from the same CA."""
        first = tls.ensure_identity(self.directory, "master", "papertrader-master", HOSTNAMES)
        old_cert, old_key, old_ca = read(first.certificate), read(first.key), read(first.ca)
        second = tls.ensure_identity(self.directory, "master", "papertrader-master", ["pt.example", "10.1.2.3"])
        self.assertEqual(second, first)
        self.assertNotEqual(read(second.certificate), old_cert)
        self.assertNotEqual(read(second.key), old_key)
        self.assertEqual(read(second.ca), old_ca)
        cert = load_certificate(second.certificate)
        cert.verify_directly_issued_by(load_certificate(second.ca))
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(sans.get_values_for_type(x509.DNSName), ["pt.example"])
        self.assertEqual(sans.get_values_for_type(x509.IPAddress), [ipaddress.ip_address("10.1.2.3")])

    def test_missingKeyReissues(self) -> None:
        """A certificate whose key is gone is issued again."""
        first = tls.ensure_identity(self.directory, "master", "papertrader-master", HOSTNAMES)
        old_cert = read(first.certificate)
        os.remove(first.key)
        second = tls.ensure_identity(self.directory, "master", "papertrader-master", HOSTNAMES)
        self.assertTrue(os.path.exists(second.key))
        self.assertNotEqual(read(second.certificate), old_cert)

    def test_labelsShareCA(self) -> None:
        """Several identities in one folder share one CA."""
        master = tls.ensure_identity(self.directory, "master", "papertrader-master", HOSTNAMES)
        ca = read(master.ca)
        worker = tls.ensure_identity(self.directory, "worker", "papertrader-worker", HOSTNAMES)
        self.assertEqual(worker.ca, master.ca)
        self.assertEqual(read(worker.ca), ca)
        self.assertNotEqual(read(worker.certificate), read(master.certificate))
        load_certificate(worker.certificate).verify_directly_issued_by(load_certificate(master.ca))

    def test_separateCAsDiffer(self) -> None:
        """Two folders get two unrelated CAs."""
        one = tls.ensure_identity(self.directory, "master", "m", HOSTNAMES)
        other = tls.ensure_identity(os.path.abspath(self.mktemp()), "master", "m", HOSTNAMES)
        self.assertNotEqual(read(one.ca), read(other.ca))
        self.assertRaises(
            (ValueError, InvalidSignature),
            load_certificate(other.certificate).verify_directly_issued_by,
            load_certificate(one.ca),
        )


class SplitAddressTests(SynchronousTestCase):
    """
    L{tls.split_address} splits C{HOST[:PORT]}, bracketed IPv6 included.
    """

    def test_hostAndPort(self) -> None:
        """A host name and a port are split apart."""
        self.assertEqual(tls.split_address("pt.example:2049", 1), ("pt.example", 2049))
        self.assertEqual(tls.split_address("127.0.0.1:1", 2), ("127.0.0.1", 1))
        self.assertEqual(tls.split_address("localhost:65535", 2), ("localhost", 65535))

    def test_defaultPort(self) -> None:
        """Without a port, the default port is used."""
        self.assertEqual(tls.split_address("pt.example", 2048), ("pt.example", 2048))
        self.assertEqual(tls.split_address("10.0.0.1", 2048), ("10.0.0.1", 2048))

    def test_bracketedIPv6(self) -> None:
        """A bracketed IPv6 address, with or without port, loses its brackets."""
        self.assertEqual(tls.split_address("[::1]:2049", 1), ("::1", 2049))
        self.assertEqual(tls.split_address("[2001:db8::7]:443", 1), ("2001:db8::7", 443))
        self.assertEqual(tls.split_address("[::1]", 2048), ("::1", 2048))

    def test_bareIPv6(self) -> None:
        """An unbracketed IPv6 address is not mistaken for HOST:PORT."""
        try:
            result = tls.split_address("::1", 2048)
        except ValueError:
            return
        self.assertEqual(result, ("::1", 2048))

    def test_badInput(self) -> None:
        """Missing hosts and bad or out-of-range ports are refused, quoting the input."""
        for text in [
            "",
            ":2049",
            "[]:2049",
            "host:",
            "host:0",
            "host:65536",
            "host:abc",
            "host:-1",
            "host:20 49",
            "[::1]:",
            "host:1e3",
        ]:
            exc = self.assertRaises(ValueError, tls.split_address, text, 2048)
            self.assertIn(repr(text), str(exc))


class Echo(Protocol):
    """Echoes every byte; records the peer's certificate name and its own end."""

    def __init__(self, factory: EchoFactory) -> None:
        self.factory = factory
        self.reason: Failure | None = None
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        certificate = self.transport.getPeerCertificate()
        if certificate is not None:
            self.factory.peers.append(certificate.get_subject().commonName)
        self.factory.received.append(data)
        self.transport.write(data)

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason
        self.lost.callback(None)


class EchoFactory(Factory):
    def __init__(self) -> None:
        self.connections: list[Echo] = []
        self.received: list[bytes] = []
        self.peers: list[str] = []

    def buildProtocol(self, addr: object) -> Echo:
        protocol = Echo(self)
        self.connections.append(protocol)
        return protocol


class Probe(Protocol):
    """Sends C{ping}, hangs up once it is echoed, and reports how the connection ended."""

    def __init__(self) -> None:
        self.received = b""
        self.reason: Failure | None = None
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"ping")

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.received == b"ping":
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason
        self.lost.callback(None)


class HandshakeTests(TestCase):
    """
    Real TLS connections over loopback with L{tls.server_options}, L{tls.client_options},
    L{tls.tls_server_endpoint} and L{tls.tls_client_endpoint}.
    """

    timeout = 60

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        self.server = tls.ensure_identity(directory, "master", "papertrader-master", HOSTNAMES)
        self.client = tls.ensure_identity(directory, "worker", "papertrader-worker", HOSTNAMES)
        foreign = os.path.abspath(self.mktemp())
        self.foreign = tls.ensure_identity(foreign, "intruder", "intruder", HOSTNAMES)

    @inlineCallbacks
    def exchange(self, server_identity, creator, require_client_certificate=False):
        """Listen with C{server_identity}, connect with C{creator}, send C{ping}; wait until both ends close.

        Fires with the client's L{Probe}, the reason its connection ended, and the server's factory.
        """
        factory = EchoFactory()
        options = tls.server_options(server_identity, require_client_certificate)
        port = yield tls.tls_server_endpoint(reactor, "tcp:0:interface=127.0.0.1", options).listen(factory)
        self.addCleanup(port.stopListening)
        endpoint = tls.tls_client_endpoint(reactor, "127.0.0.1", port.getHost().port, creator)
        probe = Probe()
        connected = yield endpoint.connect(Factory.forProtocol(lambda: probe))
        self.assertIs(connected, probe)
        yield probe.lost
        yield gatherResults([connection.lost for connection in factory.connections])
        return probe, probe.reason, factory

    def assertEchoed(self, probe: Probe, reason: Failure, factory: EchoFactory) -> None:
        self.assertEqual(probe.received, b"ping")
        self.assertEqual(factory.received, [b"ping"])
        self.assertTrue(reason.check(ConnectionDone), reason)

    def assertRefused(self, probe: Probe, reason: Failure, factory: EchoFactory, *errors: type) -> None:
        self.assertEqual(probe.received, b"")
        self.assertEqual(factory.received, [])
        self.assertTrue(reason.check(*errors), reason)

    @inlineCallbacks
    def test_handshakeByName(self):
        """A client trusting the deployment CA and expecting C{localhost} talks to the server."""
        result = yield self.exchange(self.server, tls.client_options("localhost", self.server.ca))
        self.assertEchoed(*result)

    @inlineCallbacks
    def test_handshakeByIPAddress(self):
        """The server certificate is also valid for its IP address."""
        result = yield self.exchange(self.server, tls.client_options("127.0.0.1", self.server.ca))
        self.assertEchoed(*result)

    @inlineCallbacks
    def test_wrongHostname(self):
        """A client expecting another hostname refuses the server: no data flows either way."""
        result = yield self.exchange(self.server, tls.client_options("wrong.example", self.server.ca))
        self.assertRefused(*result, VerificationError)

    @inlineCallbacks
    def test_foreignServerCertificate(self):
        """A server certificate issued by another CA is refused by the client."""
        result = yield self.exchange(self.foreign, tls.client_options("localhost", self.server.ca))
        self.assertRefused(*result, SSL.Error)

    @inlineCallbacks
    def test_clientCertificateRequiredButMissing(self):
        """A server demanding client certificates refuses a client that presents none."""
        result = yield self.exchange(
            self.server, tls.client_options("localhost", self.server.ca), require_client_certificate=True
        )
        self.assertRefused(*result, SSL.Error)

    @inlineCallbacks
    def test_clientCertificateAccepted(self):
        """A server demanding client certificates accepts one issued by its CA, and sees who it is."""
        result = yield self.exchange(
            self.server,
            tls.client_options("localhost", self.client.ca, self.client),
            require_client_certificate=True,
        )
        self.assertEchoed(*result)
        self.assertEqual(result[2].peers, ["papertrader-worker"])

    @inlineCallbacks
    def test_foreignClientCertificate(self):
        """A server demanding client certificates refuses one issued by another CA."""
        result = yield self.exchange(
            self.server,
            tls.client_options("localhost", self.server.ca, self.foreign),
            require_client_certificate=True,
        )
        self.assertRefused(*result, SSL.Error)

    @inlineCallbacks
    def test_clientCertificateOptional(self):
        """Without the requirement, a server accepts clients with no certificate and asks for none."""
        result = yield self.exchange(self.server, tls.client_options("localhost", self.server.ca, self.client))
        self.assertEchoed(*result)
        self.assertEqual(result[2].peers, [])
