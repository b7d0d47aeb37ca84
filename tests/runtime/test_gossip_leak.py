"""The transcript-to-solver translation of the live gossip-algebra attack, on an in-process run.

gradleak.gossip_sim runs the protocol and holds the truth; its messages to and from the
attacker are written to a real transcript as the live malicious peer writes them, and the
adapter's solver inputs must be the simulation's attacker view.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacker.gossip_algebra import build_knowledge, solve
from attacker.gossip_attack import unflatten
from attacker.metrics import psnr
from gradleak.core.graphs import build_graph, mixing_matrix
from gradleak.data import load_dataset
from gradleak.gossip_sim import sgd_update, simulate
from gradleak.runtime.gossip_leak import (
    ATTACK_NAME,
    GossipPublic,
    join_scores,
    run_gossip_attack,
    shared_model,
    transcript_inputs,
)
from gradleak.runtime.transcript import TranscriptReader, TranscriptWriter
from p2p.update import Update, UpdateHeader

LR = 0.1


def _public(honest: int, steps: int, rounds: int) -> GossipPublic:
    ids = [f"peer-{i}" for i in range(honest)]
    return GossipPublic(tuple(sorted([*ids, "mallory"])), ("mallory",), "line", 0, "metropolis", rounds, steps,
                        LR, "lenet", "sigmoid", 0, "rounds", {p: 1 for p in ids})


def _run(tmp_path, public: GossipPublic, drop_rate: float = 0.0, seed: int = 0):
    data = load_dataset("digits", seed=0)
    images, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    model, x0, names = shared_model(public, (1, 16, 16), 10)
    members = list(public.members)

    def batch(node: str, step: int):
        i = (37 * members.index(node) + step) % len(labels)
        return images[i:i + 1], labels[i:i + 1]

    graph = build_graph("line", members, 0)
    w = mixing_matrix(graph, members)
    view, truth = simulate(graph, members, w, ["mallory"], x0, steps=public.steps, rounds=public.mix_rounds,
                           local_update=sgd_update(model, batch, LR), drop_rate=drop_rate, seed=seed)
    # What the live malicious peer writes: each neighbour's model it received, each of its own sends.
    writer = TranscriptWriter(tmp_path, max_bytes=64 << 20, model="lenet", input_shape=(1, 16, 16), num_classes=10)

    def update(sender: str, s: int, r: int, flat: np.ndarray) -> Update:
        header = UpdateHeader(update_id=f"{sender}/r{s}/m{r}", origin=sender, sender=sender, round=s,
                              model_version=s - 1, num_samples=1, mixing_weight=0.5, kind="model", mix_round=r)
        return Update(header, dict(zip(names, unflatten(model, flat), strict=True)))

    for s in range(1, public.steps + 1):
        for r in range(public.mix_rounds):
            for j in graph["mallory"]:
                if (j, "mallory", s, r) not in truth.drops:
                    writer.add_update(update(j, s, r, truth.states[(j, s, r)]))
                status = "dropped" if ("mallory", j, s, r) in truth.drops else "sent"
                writer.add_sent(update("mallory", s, r, truth.states[("mallory", s, r)]), j, status)
    writer.close()
    return TranscriptReader(tmp_path), view, truth, batch, (graph, members, w), (model, x0, names)


def test_transcript_inputs_are_the_attackers_view_and_solve_alike(tmp_path) -> None:
    public = _public(honest=3, steps=2, rounds=2)
    reader, view, truth, _batch, (graph, members, w), (_m, x0, names) = _run(tmp_path, public)
    got = transcript_inputs(reader, public, x0, names)
    assert got.steps == 2 and set(got.observations) == set(view.observations) and not got.drops
    for key, value in view.observations.items():
        assert np.array_equal(got.observations[key], value), key
    assert set(got.known) == set(view.known)
    for key, value in view.known.items():  # own lr * g redone from the sends: to float32 rounding
        np.testing.assert_allclose(got.known[key], value, atol=4e-7 * np.abs(x0).max(), err_msg=str(key))
    for s, x in view.own_weights.items():  # the simulation averages in float32, the peers in float64
        np.testing.assert_allclose(got.own_weights[s], x, atol=4e-7 * np.abs(x0).max(), err_msg=str(s))
    k = build_knowledge(graph, members, w, ["mallory"], steps=2, rounds=2)
    a, b = solve(k, got.observations, got.known), solve(k, view.observations, view.known)
    assert a.determined == b.determined and any(a.determined.values()) and not all(a.determined.values())
    for key in b.estimates:  # both recover the simulation's lr * g
        scale = np.abs(truth.updates[key]).max()
        np.testing.assert_allclose(a.estimates[key], truth.updates[key], atol=1e-3 * scale, err_msg=str(key))
        np.testing.assert_allclose(b.estimates[key], truth.updates[key], atol=1e-3 * scale, err_msg=str(key))


def test_losses_at_the_attacker_become_known_drops(tmp_path) -> None:
    public = _public(honest=1, steps=3, rounds=2)  # one edge: every loss touches the attacker
    reader, view, truth, _b, _g, (_m, x0, names) = _run(tmp_path, public, drop_rate=0.3, seed=4)
    assert truth.drops, "this seed must lose some messages"
    got = transcript_inputs(reader, public, x0, names)
    assert got.drops == view.drops == truth.drops
    assert set(got.observations) == set(view.observations)


def test_the_attack_scores_determined_nodes_and_reports_the_rest(tmp_path) -> None:
    public = _public(honest=4, steps=1, rounds=2)
    reader, _view, _truth, batch, _g, _model = _run(tmp_path, public)
    scored: dict[str, float] = {}

    def score(update_id: str, attack: str, images: np.ndarray, _labels: np.ndarray, _stats: dict) -> None:
        assert attack == ATTACK_NAME
        node, step = update_id.split("/r")
        scored[update_id] = psnr(images[0], batch(node, int(step))[0].numpy()[0])  # the test holds the truth

    report = run_gossip_attack(reader, public, score, budget_s=20)
    rows = [{"update_id": u, "attack": ATTACK_NAME, "mean_psnr": p} for u, p in scored.items()]
    report = join_scores(report, rows)
    hops = {n: v["hops"] for n, v in report["nodes"].items()}
    assert hops == {"peer-0": 1, "peer-1": 2, "peer-2": 3, "peer-3": 4}
    assert {n for n, v in report["nodes"].items() if v["determined_steps"]} == {"peer-0", "peer-1"}
    assert scored["peer-0/r1"] >= 30 and scored["peer-1/r1"] >= 30 and set(scored) <= {"peer-0/r1", "peer-1/r1"}
    assert report["determined_share"] == 0.5 and report["reconstructed_share"] == 0.5
    assert report["by_hop"]["3"] == {"nodes": 1, "determined": 0, "reconstructed": 0}


def test_async_and_truncated_runs_are_skipped_with_a_reason(tmp_path) -> None:
    public = _public(honest=1, steps=1, rounds=1)
    reader, *_ = _run(tmp_path, public)
    called = []
    out = run_gossip_attack(reader, GossipPublic(**{**public.__dict__, "sync": "async"}), lambda *a: called.append(a))
    assert out["status"] == "skipped" and "async" in out["reason"] and not called
    reader.meta["truncated"] = 2
    out = run_gossip_attack(reader, public, lambda *a: called.append(a))
    assert out["status"] == "skipped" and "truncated" in out["reason"] and not called
    assert join_scores(out, [])["status"] == "skipped"
    with pytest.raises(KeyError):
        out["nodes"]


def test_cli_refuses_bad_gossip_algebra_input(tmp_path, capsys) -> None:
    from gradleak.cli import main

    assert main(["attack", "--images", "x.npz", "--gossip-algebra", "--out", str(tmp_path / "o")]) == 2
    assert "needs --transcript" in capsys.readouterr().err
    assert main(["attack", "--transcript", str(tmp_path), "--gossip-algebra", "--out", str(tmp_path / "o")]) == 2
    assert "no config.yaml" in capsys.readouterr().err and not (tmp_path / "o").exists()
