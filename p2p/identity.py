"""Who is calling: the identity a gossip server binds to every request.

Under mutual TLS a peer's certificate names it with a URI subject alternative name
`gradleak://peer/<peer_id>` (p2p.tls writes it); the server reads the caller's leaf
certificate from the call's auth context (gRPC's `x509_pem_cert` property, present
only when the TLS handshake verified a client certificate against the server's CA)
and takes that name as the caller's peer id. Over plaintext nobody is authenticated:
the caller is only an address. What a peer then allows a caller is p2p.membership.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from p2p.roster import RosterError, check_peer_id

PEER_URI_PREFIX = "gradleak://peer/"


@dataclass(frozen=True)
class Caller:
    """The other end of one RPC."""

    address: str  # gRPC's peer string, e.g. "ipv4:127.0.0.1:54321"
    peer_id: str | None = None  # from the client certificate's SAN; None over plaintext

    @property
    def authenticated(self) -> bool:
        return self.peer_id is not None

    @property
    def key(self) -> str:
        """What per-caller limits count by: the peer id, else the caller's host."""
        if self.peer_id is not None:
            return f"peer:{self.peer_id}"
        host = self.address.rsplit(":", 1)[0] if self.address.count(":") >= 2 else self.address
        return f"host:{host}"


def peer_uri(peer_id: str) -> str:
    """The URI SAN that names peer_id in its certificate."""
    return PEER_URI_PREFIX + check_peer_id(peer_id)


def _valid_id(text: str) -> bool:
    try:
        check_peer_id(text)
    except RosterError:
        return False
    return True


@lru_cache(maxsize=256)  # a peer's certificate is the same on every call: parse it once
def _ids_in_cert(cert_pem: bytes) -> tuple[str, ...]:
    from cryptography import x509  # only TLS callers pay for the import

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return ()
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return tuple(u[len(PEER_URI_PREFIX):] for u in uris if u.startswith(PEER_URI_PREFIX))


def peer_ids_in_cert(cert_pem: bytes) -> list[str]:
    """The peer ids a certificate's `gradleak://peer/` URI SANs name (usually one).

    A name that is not a valid peer id (p2p.roster.check_peer_id) is returned as well,
    so that a certificate naming one good and one bad id still counts as naming two.
    """
    return list(_ids_in_cert(bytes(cert_pem)))


def cert_peer_id(cert_pem: bytes) -> str | None:
    """The one valid peer id the certificate names, else None (none, several, or malformed)."""
    ids = _ids_in_cert(bytes(cert_pem))
    return ids[0] if len(ids) == 1 and _valid_id(ids[0]) else None


def caller_of(context: Any) -> Caller:
    """The caller of a gRPC servicer context: its address, and its peer id under mutual TLS.

    A certificate that names no peer, more than one, or a malformed id authenticates nobody.
    """
    address = context.peer() or "unknown"
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        return Caller(address)
    return Caller(address, cert_peer_id(pems[0]))


def is_loopback_host(host: str) -> bool:
    """True for an address only this machine can reach: 127.0.0.0/8, ::1, "localhost".

    Everything else (another IP, a hostname, 0.0.0.0, "auto") may be reachable from the
    network, where a plaintext gossip server lets anyone read and forge updates.
    """
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


__all__ = ["PEER_URI_PREFIX", "Caller", "caller_of", "cert_peer_id", "is_loopback_host", "peer_ids_in_cert",
           "peer_uri"]
