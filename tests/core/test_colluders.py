"""Where colluding malicious peers sit: ids that sort into their slots, spread or seeded, recorded."""

from __future__ import annotations

import pytest

from gradleak.core.colluders import attacker_ids, attacker_slots, honest_ids, placement_record
from gradleak.core.graphs import build_graph


def _positions(honest: int, ids: list[str]) -> list[int]:
    order = sorted(honest_ids(honest) + ids)
    return [order.index(a) for a in ids]


def test_one_attacker_is_mallory_at_the_start_of_the_member_order() -> None:
    assert attacker_ids(12) == ["mallory"]
    assert attacker_ids(12, 1, "spread", seed=7) == ["mallory"]  # the default run is unchanged


@pytest.mark.parametrize("honest", [3, 8, 12, 31])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_each_attacker_sorts_into_its_slot(honest: int, count: int) -> None:
    for placement in ("spread", "random"):
        slots = attacker_slots(honest, count, placement, seed=5)
        ids = attacker_ids(honest, count, placement, seed=5)
        assert len(set(ids)) == count
        # slot k: k honest ids sort before it, so its graph position is k plus the attackers before it
        assert _positions(honest, ids) == [k + j for j, k in enumerate(slots)]


def test_spread_puts_colluders_apart_on_a_line() -> None:
    ids = attacker_ids(8, 2, "spread")
    assert ids == ["mallory", "peer-3.mallory"]
    members = sorted(honest_ids(8) + ids)
    graph = build_graph("line", members)
    assert not set(graph[ids[0]]) & set(graph[ids[1]])  # no shared neighbour: disjoint views
    rec = placement_record("line", members, ids)
    assert rec["attackers"]["mallory"] == {"position": 0, "neighbours": ["peer-0"], "hops_to_colluder": 5}
    assert rec["attackers"]["peer-3.mallory"]["neighbours"] == ["peer-3", "peer-4"]
    assert rec["neighbour_honest"] == ["peer-0", "peer-3", "peer-4"] and rec["neighbour_share"] == 3 / 8


def test_random_placement_is_seeded() -> None:
    a = attacker_slots(20, 3, "random", seed=1)
    assert a == attacker_slots(20, 3, "random", seed=1)
    assert any(attacker_slots(20, 3, "random", seed=s) != a for s in range(2, 6))


def test_bad_counts_and_placements_raise() -> None:
    with pytest.raises(ValueError, match=r"1\.\.4"):
        attacker_slots(4, 5)
    with pytest.raises(ValueError, match=r"1\.\.4"):
        attacker_slots(4, 0)
    with pytest.raises(ValueError, match="known: spread, random"):
        attacker_slots(4, 2, "corner")
