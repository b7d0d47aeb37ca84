"""The active malicious peer in live model gossip (in-process nodes, gRPC on 127.0.0.1, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from attacker.metrics import psnr
from gradleak.config import (
    AttackSettings,
    DataConfig,
    GossipConfig,
    PeerConfig,
    RunConfig,
    TelemetryConfig,
)
from gradleak.runtime.active_strategy import crafted_target
from gradleak.runtime.malicious_node import MaliciousNode
from gradleak.runtime.peer_node import PeerNode

from .model_replay import run_specs

STEPS = 3


def _cfg(tmp_path, strategy: str, model: str = "lenet") -> RunConfig:
    return RunConfig(
        seed=3, out_dir=str(tmp_path), data=DataConfig(limit=600),
        peers=PeerConfig(honest=3, batch_sizes=(1,), optimizer="sgd", lr=0.3, model=model),
        gossip=GossipConfig(sync="rounds", rounds=STEPS, exchange="models", topology="complete", mix_rounds=1,
                            period_s=(0.0,)),
        attack=AttackSettings(attacks=("idlg",), transcript_bytes=0, strategy=strategy),
        telemetry=TelemetryConfig(metrics_port=0),
    ).validate()


def _run(tmp_path, strategy: str, model: str = "lenet"):
    specs = run_specs(_cfg(tmp_path, strategy, model))
    honest = [PeerNode(s) for s in specs[:-1]]
    mallory = MaliciousNode(specs[-1], model_strategy=strategy)
    rows: list[dict] = []
    mallory.log_row = rows.append  # type: ignore[method-assign]
    # No evaluator here: the truth the victims file and the attacker's reports are kept aside.
    truths: dict[str, np.ndarray] = {}
    for n in honest:
        n.register_truth = (lambda uid, _r, _v, batch, defence="none": truths.__setitem__(uid, batch.images))  # type: ignore[method-assign]
    reports: list = []
    mallory.malicious._report = lambda h, attack, rec, _at: reports.append((h.update_id, attack, rec))
    x0 = {n: p.detach().numpy().copy() for n, p in mallory.peer.model.named_parameters()}
    if mallory._active is not None and strategy == "crafted":  # the target it chose
        x0 = {n: t.numpy().copy() for n, t in crafted_target(mallory).items()}
    nodes = [*honest, mallory]
    after_first: dict[str, dict[str, np.ndarray]] = {}
    try:
        book = {n.spec.peer_id: n.server.address for n in nodes}
        for n in nodes:
            n.set_members(book)
        for s in range(1, STEPS + 1):
            for r in range(1):
                for n in nodes:  # the attacker last: it rushes, as the driver lets it
                    assert n.model_send(s, r)["failed"] == 0
                for n in nodes:
                    n.model_mix(s, r)
            if s == 1:
                after_first = {n.spec.peer_id: n.model_weights() for n in honest}
        assert mallory.wait_idle(60)
    finally:
        for n in nodes:
            n.stop()
    leaks = {uid: (attack, psnr(rec.images[0].numpy(), truths[uid][0])) for uid, attack, rec in reports}
    return x0, after_first, rows, leaks


@pytest.mark.slow  # four nodes start, twice (~6 s)
def test_state_override_sets_every_victim_to_x0_and_records_it(tmp_path) -> None:
    x0, active, rows, leaks = _run(tmp_path / "a", "state-override")
    _x0, honest, honest_rows, honest_leaks = _run(tmp_path / "h", "honest")
    for peer, weights in active.items():
        gap = max(float(np.max(np.abs(t - x0[n]))) for n, t in weights.items())
        assert gap <= 1e-5, peer  # complete graph: every neighbourhood observed, the override is exact
        moved = max(float(np.max(np.abs(t - x0[n]))) for n, t in honest[peer].items())
        assert moved > 1e-3, peer  # honest gossip moves the victims off x0
    sent = [r for r in rows if r["kind"] == "override"]
    assert len(sent) == 3 * STEPS and all(r["sent"] and r["exact"] and not r["estimated"] for r in sent)
    # detection scores as the victim computes them, over neighbours the attacker sees (all here)
    assert all(r["l2"] > 0 and r["l2_ratio"] > 0 and -1 <= r["cosine"] <= 1 for r in sent)
    read = [r for r in rows if r["kind"] == "override_read"]
    assert len(read) == 3 * (STEPS - 1) and all(r["grad_norm"] > 0 for r in read)
    assert not [r for r in honest_rows if r["kind"].startswith("override")]
    # every read-back gradient was attacked live at x0 and leaks the victim's image; honest: nothing
    assert len(leaks) == 3 * (STEPS - 1) and all(db >= 30 for _, db in leaks.values()), leaks
    assert not honest_leaks


@pytest.mark.slow  # four nodes start (~3 s)
def test_crafted_sets_a_relu_mlp_network_to_the_imprint(tmp_path) -> None:
    target, after, rows, leaks = _run(tmp_path, "crafted", "relu-mlp")
    first_weight, first_bias = (n for n in list(target)[:2])
    assert np.all(np.diff(-target[first_bias]) >= 0)  # the imprint's ascending brightness thresholds
    assert np.ptp(target[first_weight]) == 0  # every first-layer unit measures mean brightness
    for peer, weights in after.items():
        assert max(float(np.max(np.abs(t - target[n]))) for n, t in weights.items()) <= 1e-5, peer
    assert all(r["exact"] and r["target"] == "crafted" for r in rows if r["kind"] == "override")
    assert len(leaks) == 3 * (STEPS - 1) and all(a == "imprint" and db >= 30 for a, db in leaks.values()), leaks
