"""The roster: who the members of a gossip network are and where they listen.

A roster file is JSON: `{"peers": [{"id": "h0", "address": "127.0.0.1:50051"}, ...]}`.
Peer ids are what member certificates name (p2p.identity); addresses are what the
members dial. A peer accepts updates only from roster members (under mutual TLS).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

# Ids appear in file names, certificate SANs, metric labels and update ids.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class RosterError(ValueError):
    """Raised for a missing, unreadable or malformed roster; says which entry and why."""


def check_peer_id(peer_id: object) -> str:
    """peer_id itself, or RosterError: 1-64 characters of letters, digits, `_.-`."""
    if not isinstance(peer_id, str) or not _ID.match(peer_id):
        raise RosterError(f"bad peer id {str(peer_id)[:80]!r}: 1-64 letters, digits, '_', '.', '-'")
    return peer_id


def _check_address(address: object, peer_id: str) -> str:
    if not isinstance(address, str) or ":" not in address or len(address) > 300:
        raise RosterError(f"peer {peer_id}: bad address {str(address)[:80]!r}, want HOST:PORT")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RosterError(f"peer {peer_id}: bad address {address!r}, want HOST:PORT with a port 1-65535")
    return address


@dataclass(frozen=True)
class Roster:
    """The members, id -> address, in file order."""

    members: Mapping[str, str]

    def __post_init__(self) -> None:
        for peer_id, address in self.members.items():
            _check_address(address, check_peer_id(peer_id))

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self.members

    def __iter__(self) -> Iterator[str]:
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)

    def address(self, peer_id: str) -> str:
        return self.members[peer_id]

    def to_json(self) -> str:
        return json.dumps({"peers": [{"id": i, "address": a} for i, a in self.members.items()]}, indent=1)


def parse_roster(text: str, source: str = "roster") -> Roster:
    """A Roster from JSON text. Raises RosterError naming source and the bad entry."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RosterError(f"{source}: not JSON ({exc})") from exc
    peers = data.get("peers") if isinstance(data, dict) else None
    if not isinstance(peers, list) or not peers:
        raise RosterError(f"{source}: want {{\"peers\": [{{\"id\": ..., \"address\": ...}}, ...]}}")
    members: dict[str, str] = {}
    for k, entry in enumerate(peers):
        if not isinstance(entry, dict) or set(entry) != {"id", "address"}:
            raise RosterError(f"{source}: entry {k} must have exactly 'id' and 'address'")
        peer_id = check_peer_id(entry["id"])
        if peer_id in members:
            raise RosterError(f"{source}: peer {peer_id} listed twice")
        members[peer_id] = _check_address(entry["address"], peer_id)
    return Roster(members)


def load_roster(path: str | os.PathLike[str]) -> Roster:
    """Read a roster file. Raises RosterError for a missing or malformed file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise RosterError(f"cannot read roster {p}: {exc.strerror or exc}") from exc
    return parse_roster(text, str(p))


def write_roster(path: str | os.PathLike[str], roster: Roster) -> Path:
    """Write roster as JSON (atomically: a reader never sees half a file)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(roster.to_json() + "\n")
    tmp.replace(p)
    return p


__all__ = ["Roster", "RosterError", "check_peer_id", "load_roster", "parse_roster", "write_roster"]
