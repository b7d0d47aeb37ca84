"""Who a peer may send to: the run's public graph (gradleak.core.graphs) and the seeded choice of `fanout` neighbours."""

from __future__ import annotations

import random
from collections.abc import Sequence

from gradleak.core.graphs import build_graph, parse_topology, topology_names

# The names help text lists (parametric ones as regular:K, er:D); check_topology validates one.
TOPOLOGIES = topology_names()


def check_topology(name: str) -> str:
    """The name back if it is a topology; ValueError naming the known ones otherwise."""
    parse_topology(name)
    return name


def neighbours(topology: str, me: str, peers: Sequence[str], seed: int = 0) -> list[str]:
    """The peers `me` may send to under `topology` over `peers` (seeded for random graphs)."""
    if me not in peers:
        raise ValueError(f"peer '{me}' is not a member")
    return list(build_graph(topology, sorted(peers), seed)[me])


def choose_targets(
    topology: str, me: str, peers: Sequence[str], fanout: int, rng: random.Random, seed: int = 0
) -> list[str]:
    """Pick up to `fanout` distinct neighbours at random (the rng is the peer's seeded one)."""
    candidates = neighbours(topology, me, peers, seed)
    return rng.sample(candidates, min(fanout, len(candidates)))
