"""The active state override: exact where the victim's neighbourhood is observed, estimated elsewhere."""

from __future__ import annotations

import numpy as np
import pytest

from attacker.active import detection_scores, override_message, recover_gradient
from gradleak.active_sim import simulate_override
from gradleak.core.graphs import build_graph, mixing_matrix

LR = 0.05


def _star(n: int):
    members = [f"p{i}" for i in range(n)]
    graph = {"p0": tuple(members[1:]), **{m: ("p0",) for m in members[1:]}}  # p0 the hub
    return members, graph, mixing_matrix(graph, members)


def _planted(d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    table: dict = {}

    def update(node: str, step: int, _x: np.ndarray) -> np.ndarray:
        return table.setdefault((node, step), (rng.standard_normal(d) * 0.01).astype(np.float32))

    return update, rng.standard_normal(d).astype(np.float32)


def _scale(a: np.ndarray) -> float:
    return float(np.max(np.abs(a)))


@pytest.mark.parametrize("shape", ["star", "complete"])
def test_observed_neighbourhood_gives_the_target_and_the_true_gradient(shape: str) -> None:
    if shape == "star":
        members, graph, w = _star(5)
    else:
        members = [f"p{i}" for i in range(5)]
        graph = build_graph("complete", members)
        w = mixing_matrix(graph, members)
    update, x0 = _planted(300)
    target = (np.random.default_rng(9).standard_normal(300) * 0.5).astype(np.float32)
    victims = members[1:]
    view, truth = simulate_override(graph, members, w, ["p0"], victims, x0, steps=4, rounds=2,
                            local_update=update, target=target)
    eps = np.finfo(np.float32).eps
    for v in victims:
        for s in range(2, 5):
            assert view.sent[(v, s - 1)].exact and not view.sent[(v, s - 1)].estimated
            x = truth.weights[(v, s)]
            # float32 precision: a few ulps of the largest term the victim sums
            bound = 8 * eps * max(_scale(target), w[1, 0] * _scale(view.sent[(v, s - 1)].message))
            assert _scale(x - target) <= bound
            g = recover_gradient(target, view.half_steps[(v, s)], LR)
            true = truth.updates[(v, s)] / LR
            assert np.linalg.norm(g - true) <= 1e-4 * np.linalg.norm(true)


def test_an_unobserved_neighbour_is_estimated_and_its_gap_lands_in_the_gradient() -> None:
    members = [f"p{i}" for i in range(5)]
    graph = build_graph("ring", members)  # p1's neighbours: p0 (attacker) and p2 (unseen)
    w = mixing_matrix(graph, members)
    update, x0 = _planted(200, seed=3)
    target = np.zeros(200, dtype=np.float32)
    view, truth = simulate_override(graph, members, w, ["p0"], ["p1"], x0, steps=3, rounds=1,
                            local_update=update, target=target)
    ov = view.sent[("p1", 2)]
    assert not ov.exact and ov.estimated == ("p2",)
    # the honest p2 state of step 2 round 0 is its half-step: x_p2(2) - u_p2(2)
    z_p2 = truth.weights[("p2", 2)] - truth.updates[("p2", 2)]
    z_p1 = view.half_steps[("p1", 2)]
    expected = target + w[1, 2] * (z_p2.astype(np.float64) - z_p1)
    assert np.allclose(truth.weights[("p1", 3)], expected, atol=1e-5)
    g = recover_gradient(target, view.half_steps[("p1", 3)], LR)
    true = truth.updates[("p1", 3)] / LR
    assert np.linalg.norm(g - true) > 0.1 * np.linalg.norm(true)  # not exact: the gap is O(g)


def test_colluder_makes_a_ring_victim_exact() -> None:
    members = [f"p{i}" for i in range(6)]
    graph = build_graph("ring", members)  # p1 between colluders p0 and p2
    w = mixing_matrix(graph, members)
    update, x0 = _planted(100, seed=5)
    target = np.ones(100, dtype=np.float32)
    view, truth = simulate_override(graph, members, w, ["p0", "p2"], ["p1"], x0, steps=3, rounds=1,
                            local_update=update, target=target)
    assert view.sent[("p1", 1)].exact and view.sent[("p1", 1)].attacker == "p0"
    assert np.allclose(truth.weights[("p1", 3)], target, atol=1e-6)


def test_detection_flags_a_far_override() -> None:
    own = np.zeros(50)
    rng = np.random.default_rng(0)
    drift = rng.standard_normal(50) * 0.01
    received = {"a": own + 40 * rng.standard_normal(50) * 0.01, "u1": drift + 0.001, "u2": drift - 0.001}
    scores = detection_scores(own, received)
    assert scores["a"].l2_ratio > 10 and scores["u1"].l2_ratio < 1
    assert abs(scores["a"].cosine) < 0.5
    honest = detection_scores(own, {"u1": received["u1"], "u2": received["u2"]})
    assert honest["u1"].cosine > 0.9 and honest["u1"].l2_ratio == pytest.approx(1, abs=0.2)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="not a neighbour"):
        override_message(row={"v": 0.5, "u": 0.5}, victim="v", attacker="a", target=np.zeros(2),
                         held={"v": np.zeros(2)})
    with pytest.raises(ValueError, match="own round message"):
        override_message(row={"v": 0.5, "a": 0.5}, victim="v", attacker="a", target=np.zeros(2), held={})
    with pytest.raises(ValueError, match="lr"):
        recover_gradient(np.zeros(2), np.zeros(2), 0.0)
