"""A fleet's own certificate authority: the CA, server and client certificates ``shoal up
--tls`` makes (with the ``cryptography`` library), and the files it keeps them in.

The functions that make certificates are pure (PEM bytes in, PEM bytes out); ``fleet_pki``
writes them under a directory with the secret-file writer (0600, never through a planted
file or symlink) and reuses what is there while it is still good: the CA lives as long as the
directory, so the CA path clients were given stays valid across restarts. Keys are ECDSA
P-256: small, fast to make, and what nats-server (Go) and browsers accept.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .config import write_secret_file

CA_DAYS = 3650
LEAF_DAYS = 397  # what browsers accept for a server certificate
RENEW_BEFORE = dt.timedelta(days=30)  # a leaf this close to its end is made again
LOCAL_NAMES = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shoal"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_ca(common_name: str = "shoal fleet CA", days: int = CA_DAYS) -> Pem:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = _key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_cert(ca: Pem, common_name: str, *, sans: tuple[str, ...] = (), server: bool = False,
              client: bool = False, days: int = LEAF_DAYS) -> Pem:
    """A leaf certificate signed by ``ca``: for a server (``sans``: the IP addresses and DNS
    names clients reach it by), for a client (mutual TLS), or both."""
    if not (server or client):
        raise ValueError("a certificate is for a server, a client, or both")
    if server and not sans:
        raise ValueError("a server certificate needs at least one name (SAN)")
    ca_cert = x509.load_pem_x509_certificate(ca.cert)
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an ECDSA key")
    key = _key()
    now = _now()
    usages = [u for u, on in ((ExtendedKeyUsageOID.SERVER_AUTH, server),
                              (ExtendedKeyUsageOID.CLIENT_AUTH, client)) if on]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False,
                                     crl_sign=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san(n) for n in dict.fromkeys(sans)]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def spki_sha256(cert_pem: bytes) -> str:
    """Base64 of the SHA-256 of the certificate's public key (SubjectPublicKeyInfo): the pin
    that Chromium's ``--ignore-certificate-errors-spki-list`` and HPKP-style checks take."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    der = cert.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def still_good(cert_pem: bytes, ca_pem: bytes, sans: tuple[str, ...] = ()) -> bool:
    """True if the certificate was issued by this CA, is not near its end, and names every
    one of ``sans``."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    if cert.not_valid_after_utc - _now() < RENEW_BEFORE:
        return False
    if not sans:
        return True
    try:
        have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return all(_san(n) in have for n in sans)


def _usages(cert_pem: bytes) -> tuple[bool, bool]:
    """Whether the certificate is for a server, and for a client (its extended usages)."""
    try:
        eku = x509.load_pem_x509_certificate(cert_pem).extensions.get_extension_for_class(
            x509.ExtendedKeyUsage).value
    except (ValueError, x509.ExtensionNotFound):
        return False, False
    return ExtendedKeyUsageOID.SERVER_AUTH in eku, ExtendedKeyUsageOID.CLIENT_AUTH in eku


@dataclass(frozen=True)
class FleetTls:
    """The files of a fleet's TLS: the CA (clients verify against it), the servers'
    certificate (NATS and the controller), and one client certificate per NATS user."""

    ca: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]  # user -> (cert, key)

    def client(self, user: str) -> tuple[str, str]:
        cert, key = self.clients[user]
        return str(cert), str(key)


def server_names(extra: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    """The loopback names, then the configured ones (a wildcard bind names no host)."""
    wanted = [*LOCAL_NAMES, *(n for n in extra if n and n not in ("0.0.0.0", "::"))]
    return tuple(dict.fromkeys(wanted))


def fleet_pki(directory: Path, names: tuple[str, ...], users: tuple[str, ...]) -> FleetTls:
    """The CA and certificates under ``directory``: made if missing, the leaves made again if
    they no longer fit (another CA, a name missing, close to their end)."""
    ca_path, ca_key_path = directory / "ca.pem", directory / "ca-key.pem"
    if ca_path.exists() and ca_key_path.exists():
        ca = Pem(ca_path.read_bytes(), ca_key_path.read_bytes())
    else:
        ca = make_ca()
        write_secret_file(ca_key_path, ca.key.decode())
        write_secret_file(ca_path, ca.cert.decode())

    def leaf(stem: str, sans: tuple[str, ...], server: bool, client: bool) -> tuple[Path, Path]:
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
        if not (cert_path.exists() and key_path.exists()
                and still_good(cert_path.read_bytes(), ca.cert, sans)
                and _usages(cert_path.read_bytes()) == (server, client)):
            pem = make_cert(ca, stem, sans=sans, server=server, client=client)
            write_secret_file(key_path, pem.key.decode())
            write_secret_file(cert_path, pem.cert.decode())
        return cert_path, key_path

    # The servers' certificate is a client's too: clustered nats-servers dial each other's
    # routes with it (mutual TLS). A NATS client still needs its password besides.
    server_cert, server_key = leaf("server", names, True, True)
    clients = {u: leaf(u, (), False, True) for u in users}
    return FleetTls(ca_path, server_cert, server_key, clients)
