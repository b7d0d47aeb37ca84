"""The multi-hop gossip attack: what the knowledge system determines, and the values it recovers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacker.gossip_algebra import X0, build_knowledge, determined_unknowns, solve
from attacker.gossip_async import build_async_knowledge, lockstep_events
from attacker.gossip_attack import invert_gradients, node_status
from attacker.gossip_exact import exact_determined
from attacker.metrics import psnr
from gradleak.core.graphs import build_graph, hops, mixing_fractions, mixing_matrix
from gradleak.gossip_sim import (
    decattack_graph,
    decattack_iterations,
    flat_parameters,
    sgd_update,
    simulate,
    simulate_async,
)


def _line(n: int) -> tuple[list[str], dict[str, tuple[str, ...]], np.ndarray]:
    members = [f"p{i}" for i in range(n)]
    graph = build_graph("line", members)
    return members, graph, mixing_matrix(graph, members)


def _planted(d: int, seed: int = 0, constant: bool = False):
    """Random updates, drawn once per (node, step) (or per node: the constant model)."""
    rng = np.random.default_rng(seed)
    table: dict = {}

    def update(node: str, step: int, _x: np.ndarray) -> np.ndarray:
        return table.setdefault(node if constant else (node, step), rng.standard_normal(d) * 0.1)

    return update, rng.standard_normal(d)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _brute_force_determined(knowledge, run) -> dict:
    """K rebuilt column by column by running the protocol (`run(update) -> view`) on one unit
    update at a time; checked equal to knowledge.rows; then the determined set by plain ranks."""
    columns = []
    for node, step in knowledge.unknowns:
        def unit(k: str, s: int, _x: np.ndarray, target=(node, step)) -> np.ndarray:
            return np.ones(1) if (k, s) == target else np.zeros(1)
        view = run(unit)
        columns.append([view.observations[o][0] for o in knowledge.observed])
    brute = np.array(columns).T
    np.testing.assert_allclose(brute, knowledge.rows, atol=1e-12)
    rank = np.linalg.matrix_rank(brute)
    return {key: np.linalg.matrix_rank(np.vstack([brute, np.eye(len(columns))[i]])) == rank
            for i, key in enumerate(knowledge.unknowns)}


def _run(graph, members, w, attackers, *, steps, rounds, dtype=np.float64, model="exact",
         constant=False, drop_rate=0.0, seed=0):
    update, x0 = _planted(40, seed, constant)
    view, truth = simulate(graph, members, w, attackers, x0, steps=steps, rounds=rounds,
                           local_update=update, drop_rate=drop_rate, seed=seed, dtype=dtype)
    knowledge = build_knowledge(graph, members, w, attackers, steps=steps, rounds=rounds,
                                model=model, drops=view.drops)
    return view, truth, solve(knowledge, view.observations, view.known)


def test_planted_non_neighbour_values_are_recovered_exactly() -> None:
    members, graph, w = _line(6)
    _, truth, sol = _run(graph, members, w, ["p0"], steps=2, rounds=6)
    assert all(sol.determined.values()) and sol.rank == 10
    for key, u in truth.updates.items():
        if key[0] != "p0":
            assert _rel(sol.estimates[key], u) <= 1e-9, key
    for state in [("p4", 1, 0), ("p5", 2, 3), ("p3", 2, 6)]:  # none is p0's neighbour
        value = sol.state(*state)
        assert value is not None and _rel(value, truth.states[state]) <= 1e-9, state
    recovered = sol.recovered_states()
    assert ("p4", 1, 0) in recovered and ("p1", 1, 0) not in recovered  # p1's was observed
    assert len(recovered) == 6 * 2 * 7 - len(sol.knowledge.observed)  # all the rest
    assert max(_rel(v, truth.states[key]) for key, v in recovered.items()) <= 1e-9
    weights = sol.weights("p5", 2)
    assert weights is not None and _rel(weights, truth.states[("p5", 1, 6)]) <= 1e-9


def test_float32_messages_recover_what_is_determined_within_1e_6() -> None:
    members, graph, w = _line(6)
    view, truth, sol = _run(graph, members, w, ["p0"], steps=2, rounds=6, dtype=np.float32)
    assert all(a.dtype == np.float32 for a in view.observations.values())
    # Non-neighbours two and three hops away (the error grows ~3x a hop on this line).
    for state in [("p2", 1, 0), ("p3", 1, 0), ("p3", 2, 6), ("p2", 2, 3), ("p3", 2, 0)]:
        value = sol.state(*state)
        assert value is not None and _rel(value, truth.states[state].astype(np.float64)) <= 1e-6
    # The gradients carry x0's rounding amplified along the path; the estimate says so.
    for key in [("p2", 1), ("p5", 1)]:
        err = _rel(sol.estimates[key], truth.updates[key].astype(np.float64))
        assert err <= 3 * sol.expected_error[key], key


def test_too_few_rounds_leave_far_nodes_undetermined() -> None:
    members, graph, w = _line(6)
    _, _, sol = _run(graph, members, w, ["p0"], steps=1, rounds=2)
    # Round r's message of p1 mixes in p_{1+r}: two rounds reach p2, not p3.
    assert [sol.determined[(f"p{i}", 1)] for i in range(1, 6)] == [True, True, False, False, False]
    assert sol.state("p4", 1, 0) is None and ("p4", 1) not in sol.estimates
    status = node_status(sol, graph)
    assert status["p2"].hops == 2 and status["p2"].determined == (1,)
    assert status["p4"].determined == ()


def test_symmetric_leaves_of_a_star_are_never_determined() -> None:
    members = ["hub", "a", "l1", "l2", "l3"]
    graph = {"hub": ("a", "l1", "l2", "l3"), "a": ("hub",), "l1": ("hub",), "l2": ("hub",),
             "l3": ("hub",)}
    w = mixing_matrix(graph, members)
    _, truth, sol = _run(graph, members, w, ["a"], steps=2, rounds=8)
    # The attacker hears only the hub, which mixes the interchangeable leaves alike.
    assert sol.determined[("hub", 1)]
    assert not any(sol.determined[(leaf, s)] for leaf in ("l1", "l2", "l3") for s in (1, 2))
    assert sol.state("l1", 1, 0) is None and sol.weights("l2", 2) is None
    # Their sum is what leaks: it is in the row space.
    row = sum(sol.knowledge.state_row(leaf, 1, 0) for leaf in ("l1", "l2", "l3"))
    value = sol.value_of(row)
    assert value is not None
    assert _rel(value, sum(truth.states[(leaf, 1, 0)] for leaf in ("l1", "l2", "l3"))) <= 1e-9


def test_determined_set_matches_a_brute_force_rank_check() -> None:
    members = [f"p{i}" for i in range(8)]
    graph = build_graph("er:2.5", members, seed=3)
    w = mixing_matrix(graph, members)
    attackers, steps, rounds = ["p0", "p5"], 2, 2
    knowledge = build_knowledge(graph, members, w, attackers, steps=steps, rounds=rounds)
    expected = _brute_force_determined(knowledge, lambda unit: simulate(
        graph, members, w, attackers, np.zeros(1), steps=steps, rounds=rounds, local_update=unit,
        dtype=np.float64)[0])
    update, x0 = _planted(5)
    view, _ = simulate(graph, members, w, attackers, x0, steps=steps, rounds=rounds,
                       local_update=update, dtype=np.float64)
    sol = solve(knowledge, view.observations, view.known)
    assert sol.determined == expected
    assert 0 < sum(expected.values()) < len(expected)  # the check means something here


def test_constant_model_and_plain_averaging() -> None:
    members = [f"p{i}" for i in range(12)]
    graph = build_graph("er:3", members, seed=1)
    w = mixing_matrix(graph, members)
    _, truth, sol = _run(graph, members, w, ["p0"], steps=12, rounds=1, model="constant",
                         constant=True)
    far = [p for p in members[1:] if p not in graph["p0"]]
    assert all(sol.determined[(p, 1)] for p in far)
    assert max(_rel(sol.estimates[(p, 1)], truth.updates[(p, 1)]) for p in far) <= 1e-9
    # Gossip averaging of private values v: x0 = 0 and u = -v, one step of R rounds.
    private = {p: np.random.default_rng(i).standard_normal(3) for i, p in enumerate(members)}
    view, _ = simulate(graph, members, w, ["p0"], np.zeros(3), steps=1, rounds=8,
                       local_update=lambda k, s, x: -private[k], dtype=np.float64)
    knowledge = build_knowledge(graph, members, w, ["p0"], steps=1, rounds=8)
    avg = solve(knowledge, view.observations, view.known)
    assert all(avg.determined[(p, 1)] for p in far)
    assert max(_rel(-avg.estimates[(p, 1)], private[p]) for p in far) <= 1e-9


def test_drops_known_are_modelled_and_unknown_ones_show_in_the_residual() -> None:
    members, graph, w = _line(6)
    view, truth, sol = _run(graph, members, w, ["p0"], steps=2, rounds=6, drop_rate=0.15, seed=2)
    assert truth.drops - view.drops and view.drops  # some known (to p0), some not
    clean = _run(graph, members, w, ["p0"], steps=2, rounds=6)[2]
    assert max(clean.residual.values()) < 1e-12 < max(sol.residual.values())
    # With every drop known, the system is exact again.
    knowledge = build_knowledge(graph, members, w, ["p0"], steps=2, rounds=6, drops=truth.drops)
    told = solve(knowledge, view.observations, view.known)
    for key in told.estimates:
        assert _rel(told.estimates[key], truth.updates[key]) <= 1e-8, key


def test_bad_input_is_refused() -> None:
    members, graph, w = _line(4)
    with pytest.raises(ValueError, match="unknown gradient model"):
        build_knowledge(graph, members, w, ["p0"], steps=1, rounds=1, model="linear")
    with pytest.raises(ValueError, match="members"):
        build_knowledge(graph, members, w, ["zz"], steps=1, rounds=1)
    knowledge = build_knowledge(graph, members, w, ["p0"], steps=1, rounds=2)
    with pytest.raises(ValueError, match="missing"):
        solve(knowledge, {}, {X0: np.zeros(3)})


def test_the_image_of_a_hop_2_node_is_recovered(dlg_lenet, digits) -> None:
    images, labels = digits
    members, graph, w = _line(4)
    lr = 0.1

    def batch(node: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = 10 * members.index(node) + step
        return images[i:i + 1], labels[i:i + 1]

    x0 = flat_parameters(dlg_lenet)
    view, _ = simulate(graph, members, w, ["p0"], x0, steps=1, rounds=4,
                       local_update=sgd_update(dlg_lenet, batch, lr))
    knowledge = build_knowledge(graph, members, w, ["p0"], steps=1, rounds=4)
    sol = solve(knowledge, view.observations, view.known)
    leaks = invert_gradients(sol, dlg_lenet, lr=lr, batch_size=1, input_shape=(1, 16, 16),
                             num_classes=10, own_weights=view.own_weights, targets=[("p2", 1)])
    leak = leaks[("p2", 1)]
    truth_image, truth_label = batch("p2", 1)
    assert leak.weights_exact
    assert psnr(leak.reconstruction.images.detach().numpy()[0], truth_image.numpy()[0]) >= 30
    assert int(leak.reconstruction.labels[0]) == int(truth_label[0])


def test_async_lossy_system_recovers_planted_values_and_marks_the_rest() -> None:
    members = [f"p{i}" for i in range(8)]
    graph = build_graph("er:3", members, seed=2)
    w = mixing_matrix(graph, members)
    steps, rounds, seed = 2, 4, 1
    update, x0 = _planted(6, seed)
    view, truth = simulate_async(graph, members, w, ["p0"], x0, steps=steps, rounds=rounds,
                                 local_update=update, drop_rate=0.1, seed=seed, dtype=np.float64)
    lagged = [ev for ev in truth.events for _, pos in ev.used if pos not in (None, (ev.step, ev.mix_round))]
    assert truth.drops and lagged  # messages were lost and rounds used other rounds' messages
    knowledge = build_async_knowledge(graph, members, w, ["p0"], steps=steps, rounds=rounds,
                                      events=truth.events, received=view.received)
    sol = solve(knowledge, view.observations, view.known)
    assert 0 < len(sol.estimates) < len(knowledge.unknowns)
    for key, value in sol.estimates.items():
        assert _rel(value, truth.updates[key]) <= 1e-9, key
    # K against brute force: the same seed replays the same event order with unit updates.
    expected = _brute_force_determined(knowledge, lambda unit: simulate_async(
        graph, members, w, ["p0"], np.zeros(1), steps=steps, rounds=rounds, local_update=unit,
        drop_rate=0.1, seed=seed, dtype=np.float64)[0])
    assert sol.determined == expected == determined_unknowns(knowledge)


def test_async_line_far_nodes_are_not_determined_in_two_rounds() -> None:
    members, graph, w = _line(6)
    update, x0 = _planted(3, 0)
    view, truth = simulate_async(graph, members, w, ["p0"], x0, steps=1, rounds=2, local_update=update,
                                 drop_rate=0.1, seed=4, dtype=np.float64)
    knowledge = build_async_knowledge(graph, members, w, ["p0"], steps=1, rounds=2, events=truth.events,
                                      received=view.received)
    det = determined_unknowns(knowledge)
    # p1's two messages reach back at most to p2's first one, whatever the event order.
    assert not any(det[(f"p{i}", 1)] for i in (3, 4, 5))
    with pytest.raises(ValueError, match="before"):
        build_async_knowledge(graph, members, w, ["p0"], steps=1, rounds=2, events=truth.events[::-1],
                              received=view.received)


def test_lockstep_events_rebuild_the_lockstep_system() -> None:
    members = [f"p{i}" for i in range(8)]
    graph = build_graph("er:3", members, seed=2)
    w = mixing_matrix(graph, members)
    lock = build_knowledge(graph, members, w, ["p0", "p3"], steps=2, rounds=3)
    received = [(j, a, s, r) for a in ("p0", "p3") for j in graph[a] for s in (1, 2) for r in range(3)]
    events = lockstep_events(graph, members, steps=2, rounds=3)
    rebuilt = build_async_knowledge(graph, members, w, ["p0", "p3"], steps=2, rounds=3, events=events,
                                    received=received)
    assert set(rebuilt.observed) == set(lock.observed) and lock.unknowns == rebuilt.unknowns
    np.testing.assert_allclose(rebuilt.states, lock.states, atol=1e-15)
    assert determined_unknowns(rebuilt) == determined_unknowns(lock)


def test_decattack_setting_reproduces_their_figure_1() -> None:
    # El Mrini et al., Figure 1 (and src/consensus.py's example): attackers 0 and 1, T = 3.
    edges = [(0, 2), (1, 2), (2, 3), (2, 4), (1, 5), (1, 7), (1, 8), (5, 9), (9, 10), (9, 11), (11, 6),
             (7, 8), (7, 9), (7, 11)]
    members = [f"n{i}" for i in range(12)]
    adj: dict[str, set[str]] = {p: set() for p in members}
    for a, b in edges:
        adj[members[a]].add(members[b])
        adj[members[b]].add(members[a])
    graph = {p: tuple(sorted(v, key=members.index)) for p, v in adj.items()}
    w = mixing_matrix(graph, members)
    det = determined_unknowns(build_knowledge(graph, members, w, ["n0", "n1"], steps=1, rounds=3))
    assert sorted(p for (p, _), ok in det.items() if not ok) == ["n3", "n4"]
    # With T = 2 far fewer are: the count moves with T as their experiment does.
    fewer = determined_unknowns(build_knowledge(graph, members, w, ["n0", "n1"], steps=1, rounds=2))
    assert sum(fewer.values()) < sum(det.values())
    # Their T = int(min(n * p / |A|, n / 2)) with p = D / 20, and G(n, D / n) connected.
    assert [decattack_iterations(n, d, a) for n, d, a in ((20, 3, 1), (20, 6, 3), (50, 3, 1), (100, 6, 1))] \
        == [3, 2, 7, 30]
    drawn = decattack_graph([f"p{i}" for i in range(20)], 3, seed=0)
    assert len(hops(drawn, ["p0"])) == 20 and all(q in drawn[p] for q in drawn for p in drawn[q])


def test_exact_determination_agrees_where_float_is_well_conditioned_and_sees_past_the_cut() -> None:
    members = [f"p{i}" for i in range(8)]
    graph = build_graph("er:3", members, seed=2)
    w, exact_w = mixing_matrix(graph, members), mixing_fractions(graph, members)
    np.testing.assert_allclose(np.array(exact_w, dtype=float), w, atol=1e-15)
    for attackers, steps, rounds in ((["p0"], 1, 3), (["p0", "p5"], 2, 2), (["p0"], 1, 1)):
        knowledge = build_knowledge(graph, members, w, attackers, steps=steps, rounds=rounds)
        assert exact_determined(graph, members, exact_w, attackers, steps=steps, rounds=rounds) \
            == determined_unknowns(knowledge)
    # Async: the same events give the same answer as the float system of the test above.
    update, x0 = _planted(2, 1)
    view, truth = simulate_async(graph, members, w, ["p0"], x0, steps=2, rounds=4, local_update=update,
                                 drop_rate=0.1, seed=1, dtype=np.float64)
    knowledge = build_async_knowledge(graph, members, w, ["p0"], steps=2, rounds=4, events=truth.events,
                                      received=view.received)
    assert exact_determined(graph, members, exact_w, ["p0"], steps=2, rounds=4, observed=knowledge.observed,
                            events=truth.events) == determined_unknowns(knowledge)
    # The star's leaves stay undetermined exactly too.
    star = {"hub": ("a", "l1", "l2"), "a": ("hub",), "l1": ("hub",), "l2": ("hub",)}
    order = ["hub", "a", "l1", "l2"]
    det = exact_determined(star, order, mixing_fractions(star, order), ["a"], steps=1, rounds=6)
    assert det == {("hub", 1): True, ("l1", 1): False, ("l2", 1): False}
    # decAttack's n = 100, D = 6, one attacker, T = 30: rows W^t[j] near consensus fall below
    # the float rank cut; in exact arithmetic every node is determined.
    members = [f"p{i}" for i in range(100)]
    graph = decattack_graph(members, 6, seed=3)
    knowledge = build_knowledge(graph, members, mixing_matrix(graph, members), ["p0"], steps=1, rounds=30)
    exact = exact_determined(graph, members, mixing_fractions(graph, members), ["p0"], steps=1, rounds=30)
    assert sum(exact.values()) == 99 > sum(determined_unknowns(knowledge).values())


def test_float64_messages_determine_the_far_nodes_a_float32_wire_hides() -> None:
    # A line of 20 and the attacker at its end, R = 20: exact arithmetic determines every
    # node; float32 messages hide the far ones (the rank cut), float64 ones do not.
    members, graph, w = _line(21)
    exact = exact_determined(graph, members, mixing_fractions(graph, members), ["p0"], steps=1, rounds=20)
    assert all(exact.values())
    _, _, narrow = _run(graph, members, w, ["p0"], steps=1, rounds=20, dtype=np.float32)
    _view, truth, wide = _run(graph, members, w, ["p0"], steps=1, rounds=20, dtype=np.float64)
    assert sum(narrow.determined.values()) < 20 == sum(wide.determined.values())
    near = [k for k in truth.updates if k[0] != "p0" and int(k[0][1:]) <= 15]
    assert all(_rel(wide.estimates[k], truth.updates[k]) <= 1e-6 for k in near)
