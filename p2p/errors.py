"""Errors of the gossip layer. The gRPC servicer maps each to a status code."""

from __future__ import annotations


class GossipError(Exception):
    """Base class of every error the gossip layer raises on purpose."""


class MalformedMessage(GossipError):
    """Raised when frames cannot be decoded: missing header, unknown dtype, byte
    counts that do not match the declared shape, out-of-range sparse indices, or a
    message larger than the configured limit. Maps to INVALID_ARGUMENT."""


class UpdateRejected(GossipError):
    """Raised when a well-formed update does not fit the receiving peer: unknown or
    missing parameter names, wrong shapes, non-finite values, a non-positive sample
    count. Maps to INVALID_ARGUMENT."""


class DuplicateUpdate(GossipError):
    """Raised when an update_id was already accepted. Maps to ALREADY_EXISTS."""


class VersionNotFound(GossipError):
    """Raised when a model version is asked for that the peer no longer (or never)
    held. Maps to NOT_FOUND."""


class TransportError(GossipError):
    """Raised by the client when an RPC fails; carries the gRPC status code name."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class Unauthenticated(GossipError):
    """Raised when a call needs an authenticated caller (a member's certificate) and has
    none. Maps to UNAUTHENTICATED."""


class PermissionDenied(GossipError):
    """Raised when an authenticated caller asks for what it may not do: send as another
    peer, join without being on the roster, take another member's masked slot. Maps to
    PERMISSION_DENIED."""


class ResourceExhausted(GossipError):
    """Raised when a caller exceeds a bound: concurrent streams, updates per step, the
    inbox's window. Maps to RESOURCE_EXHAUSTED."""
