"""Who a peer may send to: topologies by name and the seeded choice of `fanout` neighbours."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

# A topology maps (me, all peer ids in a fixed order) to the peers I may send to.
Topology = Callable[[str, Sequence[str]], list[str]]
TOPOLOGIES: dict[str, Topology] = {}


def register_topology(name: str) -> Callable[[Topology], Topology]:
    def wrap(fn: Topology) -> Topology:
        TOPOLOGIES[name] = fn
        return fn

    return wrap


@register_topology("complete")
def complete(me: str, peers: Sequence[str]) -> list[str]:
    """Every other peer is a neighbour."""
    return [p for p in peers if p != me]


@register_topology("ring")
def ring(me: str, peers: Sequence[str]) -> list[str]:
    """The previous and the next peer in the fixed order."""
    i = list(peers).index(me)
    n = len(peers)
    return sorted({peers[(i - 1) % n], peers[(i + 1) % n]} - {me})


def neighbours(topology: str, me: str, peers: Sequence[str]) -> list[str]:
    """The peers `me` may send to under `topology`; ValueError on an unknown name."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"unknown topology '{topology}' (known: {', '.join(sorted(TOPOLOGIES))})")
    if me not in peers:
        raise ValueError(f"peer '{me}' is not a member")
    return TOPOLOGIES[topology](me, peers)


def choose_targets(
    topology: str, me: str, peers: Sequence[str], fanout: int, rng: random.Random
) -> list[str]:
    """Pick up to `fanout` distinct neighbours at random (the rng is the peer's seeded one)."""
    candidates = neighbours(topology, me, peers)
    return rng.sample(candidates, min(fanout, len(candidates)))
