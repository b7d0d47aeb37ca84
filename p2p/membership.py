"""The identity rules: who may push updates to a peer, as whom, how often, and who may pull.

A receiving peer checks every update against the caller the transport authenticated
(p2p.identity) before it looks at a tensor:

Under mutual TLS (`authenticate=True`):
1. the caller is authenticated: its certificate names exactly one valid peer id, else
   UNAUTHENTICATED (a certificate from the run's CA without a `gradleak://peer/` name);
2. the caller is a member (on the roster, when the peer was given one), else
   PERMISSION_DENIED;
3. `header.sender` is the caller's peer id, else PERMISSION_DENIED.

Always, over plaintext too:
4. `header.origin == header.sender`, else PERMISSION_DENIED: nothing relays updates
   today, and a relayed update would need the origin's own signature, since the TLS
   identity names only the last hop;
5. the origin is not the receiving peer itself, else PERMISSION_DENIED;
6. with a roster, the origin is on it, else PERMISSION_DENIED;
7. one update per origin per local step (`header.round`), else ALREADY_EXISTS and
   nothing filed. ALREADY_EXISTS, not RESOURCE_EXHAUSTED: the origin's slot for that
   step is taken for good, so a retry can never succeed, while RESOURCE_EXHAUSTED tells a
   client to back off and try again.

GetModel under mutual TLS answers only rules 1-2's callers (UNAUTHENTICATED /
PERMISSION_DENIED otherwise); over plaintext anyone who can reach the port may pull.

Over plaintext nothing is authenticated, so rules 4-7 bind only what a header claims:
anyone who reaches the port can claim any other member's origin (and take its slot for a
step). That is why plaintext is for the loopback demo, and a non-loopback bind needs
`--insecure` (p2p.identity.is_loopback_host).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from p2p.errors import PermissionDenied, Unauthenticated
from p2p.identity import Caller, cert_peer_id
from p2p.roster import check_peer_id
from p2p.update import UpdateHeader


class Membership:
    """One peer's view of who belongs: its own id, the members, whether callers must be authenticated.

    Args:
        peer_id: the receiving peer.
        members: the roster's peer ids (the receiver among them or not); None: no
            roster, every caller the CA vouches for is a member (and over plaintext, anyone).
        authenticate: True under mutual TLS: every call must come from a certificate
            that names a member.
    """

    def __init__(self, peer_id: str, members: Iterable[str] | None = None, *, authenticate: bool = False) -> None:
        self.peer_id = check_peer_id(peer_id)
        self.members = None if members is None else frozenset(check_peer_id(m) for m in members)
        self.authenticate = authenticate

    def _known(self, peer_id: str) -> bool:
        return self.members is None or peer_id in self.members

    def caller_id(self, caller: Caller | None) -> str | None:
        """The authenticated member behind caller (rules 1-2), None when not authenticating."""
        if not self.authenticate:
            return None
        if caller is None or caller.peer_id is None:
            raise Unauthenticated("this peer requires a member's certificate naming its peer id")
        if not self._known(caller.peer_id):
            raise PermissionDenied(f"{caller.peer_id} is not a member of this network")
        return caller.peer_id

    def check_update(self, header: UpdateHeader, caller: Caller | None) -> None:
        """Rules 1-6 for one pushed update; raises Unauthenticated or PermissionDenied."""
        who = self.caller_id(caller)
        if who is not None and header.sender != who:
            raise PermissionDenied(f"caller {who} may only send as itself, not as sender {header.sender[:64]!r}")
        if header.origin != header.sender:
            raise PermissionDenied(
                f"origin {header.origin[:64]!r} is not the sender {header.sender[:64]!r}: relayed updates are refused"
            )
        if header.origin == self.peer_id:
            raise PermissionDenied(f"an update claiming to come from this peer ({self.peer_id}) itself")
        if not self._known(header.origin):
            raise PermissionDenied(f"origin {header.origin[:64]!r} is not a member of this network")

    def check_reader(self, caller: Caller | None) -> None:
        """Who may pull this peer's model: under mutual TLS only members."""
        self.caller_id(caller)


def membership_for(peer_id: str, members: Iterable[str] | None, cert_pem: bytes | None) -> Membership:
    """The Membership of a peer with this certificate (None: plaintext).

    Raises:
        ValueError: when the peer's own certificate does not name it: its updates
            would be refused by every other member.
    """
    if cert_pem is not None:
        named = cert_peer_id(cert_pem)
        if named != peer_id:
            raise ValueError(f"peer {peer_id}'s certificate names {named!r}, want gradleak://peer/{peer_id}")
    return Membership(peer_id, members, authenticate=cert_pem is not None)


class StepSlots:
    """Rule 7's memory: which (origin, step) pairs already delivered an update.

    Bounded: past `capacity` pairs the oldest is forgotten (the inbox's window of
    steps bounds how old an update can be anyway).
    """

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._order: deque[tuple[str, int]] = deque()
        self._taken: set[tuple[str, int]] = set()
        self._capacity = capacity

    def __contains__(self, slot: object) -> bool:
        return slot in self._taken

    def take(self, origin: str, step: int) -> None:
        slot = (origin, step)
        if slot in self._taken:
            return
        if len(self._order) >= self._capacity:
            self._taken.discard(self._order.popleft())
        self._order.append(slot)
        self._taken.add(slot)

    def __len__(self) -> int:
        return len(self._taken)


__all__ = ["Membership", "StepSlots", "membership_for"]
