import random

import pytest

from p2p.topology import choose_targets, neighbours

PEERS = ["a", "b", "c", "d", "e"]


def test_complete_and_ring() -> None:
    assert neighbours("complete", "c", PEERS) == ["a", "b", "d", "e"]
    assert neighbours("ring", "a", PEERS) == ["b", "e"]


def test_targets_are_distinct_neighbours_and_seeded() -> None:
    picks = choose_targets("complete", "a", PEERS, 3, random.Random(5))
    assert len(set(picks)) == 3 and "a" not in picks
    assert picks == choose_targets("complete", "a", PEERS, 3, random.Random(5))
    assert sorted(choose_targets("ring", "a", PEERS, 9, random.Random(0))) == ["b", "e"]


def test_unknown_topology_and_member() -> None:
    with pytest.raises(ValueError, match="unknown topology 'star'.*complete"):
        neighbours("star", "a", PEERS)
    with pytest.raises(ValueError, match="not a member"):
        neighbours("ring", "z", PEERS)


def test_random_topology_is_the_same_for_every_member() -> None:
    ids = [f"p{i}" for i in range(12)]
    one = {p: neighbours("er:3", p, ids, seed=7) for p in ids}
    assert all(p in one[q] for p in ids for q in one[p])  # symmetric: both ends agree
    assert neighbours("er:3", "p0", list(reversed(ids)), seed=7) == one["p0"]  # order of the list does not matter
