"""Where the malicious peers of a run sit in the gossip graph, and what they are called.

Every graph of a run is built over the members in sorted order (gradleak.core.graphs:
member i of the sorted list is node i of the line, ring, torus, ...), so a peer's place
in the topology is where its id sorts. The honest peers are peer-0 .. peer-(H-1); an
attacker placed in slot k (0 <= k <= H, the number of honest ids that sort before it) is
named so that it sorts right there: "mallory" in slot 0 (before every "peer-..."), and
"<the honest id before it>.mallory" elsewhere ('.' sorts below every digit, so
"peer-3.mallory" comes after "peer-3" and before "peer-30"). One attacker in slot 0 is
the run every earlier version made: "mallory" at one end of a line.

Placements (seeded where random):
- spread: slots evenly spaced over the member order, the first in slot 0, so colluders
  on a line or ring see disjoint parts of it;
- random: `count` distinct slots drawn with the run seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from gradleak.core.graphs import build_graph, hops

PLACEMENTS = ("spread", "random")
FIRST = "mallory"  # the id of an attacker in slot 0 (and of the only one of a default run)


def honest_ids(honest: int) -> list[str]:
    """The honest peers' ids, in the runner's index order (not sorted)."""
    return [f"peer-{i}" for i in range(honest)]


def attacker_slots(honest: int, count: int, placement: str = "spread", seed: int = 0) -> list[int]:
    """The slots (honest ids sorted before each attacker) of `count` attackers, ascending.

    Raises:
        ValueError: count outside 1..honest, or an unknown placement.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement '{placement}' (known: {', '.join(PLACEMENTS)})")
    if not 1 <= count <= honest:
        raise ValueError(f"the number of malicious peers must be in 1..{honest} (the honest peers), got {count}")
    if placement == "spread":
        return [j * (honest + 1) // count for j in range(count)]
    return sorted(random.Random(f"colluders:{seed}").sample(range(honest + 1), count))


def attacker_ids(honest: int, count: int = 1, placement: str = "spread", seed: int = 0) -> list[str]:
    """The attackers' ids in slot order; each sorts into its slot among the honest ids."""
    order = sorted(honest_ids(honest))
    return [FIRST if k == 0 else f"{order[k - 1]}.{FIRST}"
            for k in attacker_slots(honest, count, placement, seed)]


def placement_record(topology: str, members: Sequence[str], attackers: Sequence[str],
                     seed: int = 0) -> dict[str, Any]:
    """Where the attackers sit: graph position, neighbours, and hops to the nearest other attacker.

    Plus the honest peers within one hop of any attacker (what the colluders see directly).
    """
    order = sorted(members)
    graph = build_graph(topology, order, seed)
    out: dict[str, Any] = {}
    for a in attackers:
        others = [b for b in attackers if b != a]
        dist = hops(graph, others) if others else {}
        out[a] = {"position": order.index(a), "neighbours": list(graph[a]),
                  "hops_to_colluder": dist.get(a)}
    seen = sorted({n for a in attackers for n in graph[a] if n not in set(attackers)})
    return {"attackers": out, "topology": topology, "neighbour_honest": seen,
            "neighbour_share": len(seen) / max(1, len(order) - len(attackers))}


__all__ = ["FIRST", "PLACEMENTS", "attacker_ids", "attacker_slots", "honest_ids", "placement_record"]
