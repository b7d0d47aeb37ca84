"""Mutual-TLS material for the gossip transport: load, write, validate, and a test PKI.

Every peer holds one `TlsMaterial`: the CA certificate(s) it trusts, its own
certificate (issued directly by that CA) and the certificate's private key. A peer is
both a server and a client, so each certificate is valid for both roles; the server
requires a client certificate signed by the CA, so a peer without one is refused.

What TLS buys here is confidentiality and integrity *on the wire*: a network
eavesdropper sees only ciphertext. It does nothing against a malicious peer, which is
an endpoint of the TLS session and receives the plaintext update like any neighbour.

The material is validated when it is built (PEM parses, the key matches the
certificate, the certificate is issued by the CA and is within its validity period),
so a bad file fails here with its name in the message instead of later as an opaque
handshake failure.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import (
    PrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2p.identity import peer_uri
from p2p.roster import check_peer_id

CA_FILE = "ca.pem"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"

# Certificates that start "now" fail on a peer whose clock is slightly behind.
_CLOCK_SKEW = dt.timedelta(minutes=5)


class TlsError(ValueError):
    """Raised for missing, unreadable or inconsistent TLS material; says which and why."""


@dataclass(frozen=True)
class TlsMaterial:
    """What one peer needs for mutual TLS, as PEM bytes.

    Attributes:
        ca_pem: the CA certificate(s) trusted for the other side's certificate.
        cert_pem: this peer's certificate, issued directly by one of those CAs.
        key_pem: the unencrypted private key of cert_pem (never shown by repr).

    Raises:
        TlsError: when any part does not parse or the parts do not fit together.
    """

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _validate(self.ca_pem, self.cert_pem, self.key_pem, names=("ca_pem", "cert_pem", "key_pem"))


def _load_certs(pem: bytes, what: str) -> list[x509.Certificate]:
    """Parse one or more PEM certificates, or raise TlsError naming what."""
    if not isinstance(pem, bytes):
        raise TlsError(f"{what}: expected PEM bytes, got {type(pem).__name__}")
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise TlsError(f"{what}: not a PEM certificate ({exc})") from exc
    if not certs:
        raise TlsError(f"{what}: no certificate found")
    return certs


def _load_key(pem: bytes, what: str) -> PrivateKeyTypes:
    """Parse an unencrypted PEM private key, or raise TlsError naming what."""
    if not isinstance(pem, bytes):
        raise TlsError(f"{what}: expected PEM bytes, got {type(pem).__name__}")
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError as exc:  # raised for an encrypted key without a password
        raise TlsError(f"{what}: encrypted private keys are not supported ({exc})") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TlsError(f"{what}: not a PEM private key ({exc})") from exc


def _spki(public_key: PublicKeyTypes) -> bytes:
    """DER SubjectPublicKeyInfo of a public key, to compare two keys."""
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _validate(ca_pem: bytes, cert_pem: bytes, key_pem: bytes, names: Sequence[str]) -> None:
    """Check that the three PEM blobs form usable mutual-TLS material."""
    ca_name, cert_name, key_name = names
    cas = _load_certs(ca_pem, ca_name)
    for ca in cas:
        if not _is_ca(ca):
            raise TlsError(f"{ca_name}: {ca.subject.rfc4514_string()} is not a CA certificate")
    certs = _load_certs(cert_pem, cert_name)
    if len(certs) != 1:
        raise TlsError(f"{cert_name}: expected one certificate, found {len(certs)}")
    cert = certs[0]
    key = _load_key(key_pem, key_name)
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise TlsError(f"{key_name}: the private key does not match {cert_name}")
    if not any(_issued_by(cert, ca) for ca in cas):
        raise TlsError(
            f"{cert_name}: {cert.subject.rfc4514_string()} is not issued by a CA in {ca_name}"
        )
    now = dt.datetime.now(dt.UTC)
    for what, c in [(cert_name, cert), *((ca_name, ca) for ca in cas)]:
        if c.not_valid_after_utc < now:
            raise TlsError(
                f"{what}: certificate expired at {c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
            )
        if c.not_valid_before_utc > now + _CLOCK_SKEW:
            raise TlsError(
                f"{what}: certificate not valid before {c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
            )


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """True when ca's key signed cert and ca's subject is cert's issuer."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def load_tls(directory: str | os.PathLike[str]) -> TlsMaterial:
    """Read ca.pem, cert.pem and key.pem from directory and validate them.

    Raises:
        TlsError: when a file is missing or unreadable, does not parse, or the three
            do not fit together; the message names the file.
    """
    base = Path(directory)
    blobs: list[bytes] = []
    for name in (CA_FILE, CERT_FILE, KEY_FILE):
        path = base / name
        try:
            blobs.append(path.read_bytes())
        except FileNotFoundError as exc:
            raise TlsError(
                f"{path}: missing (a TLS directory holds {CA_FILE}, {CERT_FILE}, {KEY_FILE})"
            ) from exc
        except OSError as exc:
            raise TlsError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    ca_pem, cert_pem, key_pem = blobs
    _validate(
        ca_pem, cert_pem, key_pem, names=[str(base / n) for n in (CA_FILE, CERT_FILE, KEY_FILE)]
    )
    return TlsMaterial(ca_pem, cert_pem, key_pem)


def write_tls(directory: str | os.PathLike[str], material: TlsMaterial) -> Path:
    """Write material as ca.pem, cert.pem and key.pem (key readable by the owner only).

    Creates directory if needed and overwrites existing files; returns its path.
    """
    base = Path(directory)
    base.mkdir(parents=True, exist_ok=True)
    (base / CA_FILE).write_bytes(material.ca_pem)
    (base / CERT_FILE).write_bytes(material.cert_pem)
    key_path = base / KEY_FILE
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # an existing file keeps its old mode otherwise
        f.write(material.key_pem)
    return base


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: Iterable[str], peer_id: str | None) -> x509.SubjectAlternativeName:
    """The peer's URI SAN (its identity, p2p.identity; none for peer_id None), then
    IP-address SANs for IP literals and DNS-name SANs for every other host (what TLS
    checks the dialled host by)."""
    names: list[x509.GeneralName] = []
    if peer_id is not None:
        names.append(x509.UniformResourceIdentifier(peer_uri(peer_id)))
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_test_pki(
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    peers: Sequence[str] = ("peer",),
    *,
    days: int = 7,
    unnamed: Sequence[str] = (),
) -> tuple[bytes, dict[str, TlsMaterial]]:
    """Generate a private CA and one certificate per peer, in memory (ECDSA P-256).

    Each peer certificate has common name peer_id, a URI subject alternative name
    `gradleak://peer/<peer_id>` that names the peer (the identity a server binds to the
    caller's updates, p2p.identity), the given hosts as further SANs (IP SANs for IP
    literals) and is valid as server and client. The CA's private key is discarded, so
    no further certificate can be issued under it. Peers listed in `unnamed` get a
    certificate without the URI SAN: the CA vouches for it, but it names no peer (for
    tests of a caller that is encrypted yet authenticates nobody).

    Returns:
        (CA certificate PEM, {peer_id: TlsMaterial}).

    Raises:
        ValueError: for no hosts, no peers, a repeated peer id, one that is not 1-64
            letters, digits, '_', '.', '-' (p2p.roster.check_peer_id), or days < 1.
    """
    if not hosts:
        raise ValueError("make_test_pki needs at least one host")
    if not peers or any(not p for p in peers) or len(set(peers)) != len(peers):
        raise ValueError(f"peer ids must be non-empty and unique, got {list(peers)}")
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    if not set(unnamed) <= set(peers):
        raise ValueError(f"unnamed {sorted(set(unnamed) - set(peers))} are not among the peers")
    now = dt.datetime.now(dt.UTC)
    start, end = now - _CLOCK_SKEW, now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("gradleak test CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)

    materials: dict[str, TlsMaterial] = {}
    for peer_id in peers:
        check_peer_id(peer_id)  # also within X.509's 64-character bound of a common name
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(peer_id))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(_san(hosts, None if peer_id in unnamed else peer_id), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(aki, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        materials[peer_id] = TlsMaterial(
            ca_pem, cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)
        )
    return ca_pem, materials
