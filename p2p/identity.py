"""Who is calling: the identity a gossip server binds to every request.

Under mutual TLS a peer's certificate names it with a URI subject alternative name
`gradleak://peer/<peer_id>` (p2p.tls writes it); the server reads the caller's
certificate from the call's auth context and takes that name as the caller's peer id.
Over plaintext nobody is authenticated: the caller is only an address.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


def peer_ids_in_cert(cert_pem: bytes) -> list[str]:
    """The peer ids a certificate's URI SANs name (usually one)."""
    from cryptography import x509  # only TLS callers pay for the import

    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return [u[len(PEER_URI_PREFIX):] for u in uris if u.startswith(PEER_URI_PREFIX) and len(u) > len(PEER_URI_PREFIX)]


def caller_of(context: Any) -> Caller:
    """The caller of a gRPC servicer context: its address, and its peer id under mutual TLS.

    A certificate that names no peer, or more than one, authenticates nobody.
    """
    address = context.peer() or "unknown"
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        return Caller(address)
    ids = peer_ids_in_cert(pems[0])
    return Caller(address, ids[0] if len(ids) == 1 else None)


__all__ = ["PEER_URI_PREFIX", "Caller", "caller_of", "peer_ids_in_cert"]
