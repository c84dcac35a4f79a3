"""TLS for every link: a deployment's private CA, its certificates, and options.

When no certificates are configured the master creates a private certificate
authority in its data directory and issues certificates for itself and its
local workers.  Clients trust that CA; hostnames are always verified with
service_identity (through ``optionsForClientTLS``).  Everything here does file
and key work, so callers run it in a thread.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from collections.abc import Sequence
from typing import Any

import attr
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import ssl
from twisted.internet.endpoints import HostnameEndpoint, serverFromString, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOFactory

# Leaves live 397 days, the most that browsers and strict validators accept;
# an existing leaf valid for longer in total is reissued.
_VALIDITY = datetime.timedelta(days=397)
_MAX_VALIDITY = datetime.timedelta(days=398)


@attr.s(frozen=True, auto_attribs=True)
class Identity:
    """Paths of one party's PEM certificate and key, and of the CA it trusts."""

    certificate: str
    key: str
    ca: str


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def _write_public(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _general_names(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for name in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    return names


def create_ca(directory: str, name: str | None = None) -> str:
    """Create a CA certificate and key in ``directory``; return the certificate path.

    Each deployment's CA gets its own name, so certificates of different
    deployments never even claim the same issuer.
    """
    name = name or f"PaperTrader deployment CA {secrets.token_hex(8)}"
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(directory, mode=0o700, exist_ok=True)
    _write_private(os.path.join(directory, "ca.key"), _key_pem(key))
    path = os.path.join(directory, "ca.pem")
    _write_public(path, cert.public_bytes(serialization.Encoding.PEM))
    return path


def _authority_key_identifier(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """The AKI naming ``ca_cert``'s key: its SKI when it has one, else derived from its public key."""
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _current_style(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``cert`` carries the AKI of ``ca`` and a lifetime strict validators accept."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return False
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return aki.key_identifier == _authority_key_identifier(ca).key_identifier and lifetime <= _MAX_VALIDITY


def issue_certificate(directory: str, label: str, common_name: str, hostnames: Sequence[str]) -> Identity:
    """Issue ``label.pem``/``label.key`` in ``directory``, signed by the CA there.

    The certificate is valid for ``hostnames`` (DNS names or IP addresses) and
    for both TLS server and client use, so a worker can present it to the master.
    """
    with open(os.path.join(directory, "ca.key"), "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), None)
    with open(os.path.join(directory, "ca.pem"), "rb") as f:
        ca_cert = x509.load_pem_x509_certificate(f.read())
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectAlternativeName(_general_names(hostnames)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_identifier(ca_cert), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_path = os.path.join(directory, label + ".key")
    cert_path = os.path.join(directory, label + ".pem")
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return Identity(certificate=cert_path, key=key_path, ca=os.path.join(directory, "ca.pem"))


def ensure_identity(directory: str, label: str, common_name: str, hostnames: Sequence[str]) -> Identity:
    """Return ``label``'s identity in ``directory``, creating the CA and certificate if missing."""
    if not os.path.exists(os.path.join(directory, "ca.pem")):
        create_ca(directory)
    cert_path = os.path.join(directory, label + ".pem")
    key_path = os.path.join(directory, label + ".key")
    if os.path.exists(cert_path) and os.path.exists(key_path):
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(os.path.join(directory, "ca.pem"), "rb") as f:
            ca = x509.load_pem_x509_certificate(f.read())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        fresh = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc) > datetime.timedelta(days=30)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        same_name = [n.value for n in names] == [common_name]
        current = _current_style(cert, ca)
        if list(sans) == _general_names(hostnames) and cert.issuer == ca.subject and fresh and same_name and current:
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                pass
            else:
                return Identity(certificate=cert_path, key=key_path, ca=os.path.join(directory, "ca.pem"))
    return issue_certificate(directory, label, common_name, hostnames)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def server_options(identity: Identity, require_client_certificate: bool = False) -> ssl.CertificateOptions:
    """TLS options for a listening side; optionally demand a certificate signed by our CA."""
    own = ssl.PrivateCertificate.loadPEM(_read(identity.key) + _read(identity.certificate))
    if require_client_certificate:
        return own.options(ssl.Certificate.loadPEM(_read(identity.ca)))
    return own.options()


def client_options(
    hostname: str, ca_path: str, identity: Identity | None = None
) -> IOpenSSLClientConnectionCreator:
    """TLS options for a connecting side: trust only ``ca_path``, verify ``hostname``."""
    trust = ssl.Certificate.loadPEM(_read(ca_path))
    own = None
    if identity is not None:
        own = ssl.PrivateCertificate.loadPEM(_read(identity.key) + _read(identity.certificate))
    return ssl.optionsForClientTLS(hostname, trustRoot=trust, clientCertificate=own)


def peer_common_name(transport: Any) -> str | None:
    """The common name in the certificate the other side of ``transport`` presented, if any."""
    get_certificate = getattr(transport, "getPeerCertificate", None)
    certificate = get_certificate() if get_certificate is not None else None
    return certificate.get_subject().CN if certificate is not None else None


class _TLSServerFactory(TLSMemoryBIOFactory):
    """Wraps each connection in TLS, or refuses it (closes it at once) when the wrapped factory does."""

    def buildProtocol(self, addr):
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:
            return None
        return self.protocol(self, wrapped)


def tls_server_endpoint(reactor, description: str, options: ssl.CertificateOptions):
    """A listening endpoint for ``description`` (``tcp:PORT...``) that speaks TLS."""
    inner = serverFromString(reactor, description)

    class _TLSServerEndpoint:
        def listen(self, factory):
            return inner.listen(_TLSServerFactory(options, False, factory))

    return _TLSServerEndpoint()


def tls_client_endpoint(
    reactor, host: str, port: int, options: IOpenSSLClientConnectionCreator, timeout: float = 30.0
):
    """A connecting endpoint to ``host:port`` that speaks TLS with ``options``."""
    return wrapClientTLS(options, HostnameEndpoint(reactor, host, port, timeout=timeout))


def split_address(text: str, default_port: int) -> tuple[str, int]:
    """Split ``HOST[:PORT]`` (``[v6]:PORT`` too) into host and port."""
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port or (text.count(":") > 1 and not text.startswith("[")):
        host, port = text, str(default_port)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)
