"""Aggregation rules (p2p.aggregate): the maths, robustness to one outlier, and peers that learn."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from gradleak.core.models import create_model, init_model
from gradleak.data import load_dataset, split
from p2p.aggregate import Contribution, l2_norm, parse_aggregate
from p2p.defences import parse_defence
from p2p.peer import Peer
from p2p.update import Update, UpdateHeader


def _honest(n: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    centre = {"w": torch.randn(5, 7, generator=g), "b": torch.randn(7, generator=g)}
    return [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in centre.items()} for _ in range(n)]


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return l2_norm({k: a[k].double() - b[k].double() for k in a})


def test_specs_parse_to_canonical_names_and_bad_ones_say_why() -> None:
    assert [parse_aggregate(s).name for s in ("mean", " median ", "trimmed:0.20", "clip:1e1")] == [
        "mean", "median", "trimmed:0.2", "clip:10"]
    bad = {"avg": "unknown aggregation rule", "median:1": "takes no parameter",
           "trimmed": "takes one parameter", "trimmed:x": "non-numeric", "trimmed:0.5": "0 < F < 0.5",
           "trimmed:0": "0 < F < 0.5", "clip:0": "C > 0", "clip:inf": "finite", "clip:1:2": "one parameter"}
    for spec, why in bad.items():
        with pytest.raises(ValueError, match=why):
            parse_aggregate(spec)


def test_mean_is_the_float64_weighted_mean() -> None:
    ups = _honest(3)
    got = parse_aggregate("mean")([Contribution(u, w) for u, w in zip(ups, (1.0, 2.0, 5.0))])
    assert got is not None and got["w"].dtype == torch.float64
    want = (ups[0]["w"].double() + 2 * ups[1]["w"].double() + 5 * ups[2]["w"].double()) / 8
    assert torch.allclose(got["w"], want, rtol=0, atol=1e-12)
    assert parse_aggregate("mean")([Contribution(ups[0], 0.0)]) is None  # nothing counts


def test_median_and_trimmed_resist_one_outlier_that_wrecks_the_mean() -> None:
    honest = _honest(4)
    honest_mean = parse_aggregate("mean")([Contribution(u, 1.0) for u in honest])
    assert honest_mean is not None
    outlier = {k: torch.full_like(v, 1e6) for k, v in honest[0].items()}
    # The outlier claims far more weight than the others: median and trimmed count votes, not claims.
    items = [Contribution(u, 1.0) for u in honest] + [Contribution(outlier, 8.0)]
    mean = parse_aggregate("mean")(items)
    assert mean is not None and _distance(mean, honest_mean) > 1e6
    for rule in ("median", "trimmed:0.2", "trimmed:0.3"):
        got = parse_aggregate(rule)(items)
        assert got is not None
        assert _distance(got, honest_mean) < 0.1, rule  # honest spread is 0.01 per entry


def test_median_and_trimmed_on_known_values() -> None:
    def one(values: list[float], rule: str, votes: list[float] | None = None) -> float:
        votes = votes or [1.0] * len(values)
        got = parse_aggregate(rule)([Contribution({"x": torch.tensor([v])}, 1.0, vote)
                                     for v, vote in zip(values, votes)])
        assert got is not None
        return float(got["x"])

    assert one([3, 1, 2], "median") == 2.0
    assert one([4, 1, 3, 2], "median") == 2.5  # an even count: the two middle values averaged
    assert one([0, 1, 10], "median", [1, 1, 3]) == 10.0  # 3 of the 5 votes lie at 10
    assert one([0, 1, 10], "median", [1, 1, 0.5]) == 1.0  # a late outlier's vote counts less
    assert one([100, 1, 2, 3, -100], "trimmed:0.2") == 2.0  # one of five cut at each end
    assert one([-100, 1, 3, 100], "trimmed:0.25") == 2.0
    assert one([0, 4, 8], "trimmed:0.25") == 4.0  # a quarter of 3 votes cut at each end, in part


def test_clip_bounds_each_updates_influence() -> None:
    honest = _honest(4)
    bound = 2 * max(l2_norm(u) for u in honest)  # above every honest norm: honest ones pass as they are
    outlier = {k: torch.full_like(v, 1e6) for k, v in honest[0].items()}
    items = [Contribution(u, 2.0) for u in honest]
    without = parse_aggregate(f"clip:{bound}")(items)
    with_outlier = parse_aggregate(f"clip:{bound}")([*items, Contribution(outlier, 8.0)])
    assert without is not None and with_outlier is not None
    shift = _distance(with_outlier, without)
    # The outlier's share of the weight (8 of 16) times the bound, at most.
    assert 0.1 * bound < shift <= (8.0 / 16.0) * bound + 2 * max(l2_norm(u) for u in honest)
    unclipped = parse_aggregate("mean")([*items, Contribution(outlier, 8.0)])
    assert unclipped is not None and _distance(unclipped, without) > 1e6


# ------------------------------------------------------------------ peers


def _peer(digits_data, lenet, pid: str, rule: str, **kw) -> Peer:
    args = {"batch_size": 2, "defence": parse_defence("none"), "lr": 0.1, "keep_versions": 3, "seed": 1,
            "optimizer": "sgd", "aggregate": parse_aggregate(rule)}
    args.update(kw)
    return Peer(pid, lenet, digits_data.images[:100], digits_data.labels[:100], **args)


def test_a_peer_with_median_ignores_a_poisoned_update_within_the_bounds(digits_data, lenet) -> None:
    """The attacker's update passes validation (norm under the bound), yet moves nothing."""
    peers = {rule: _peer(digits_data, copy.deepcopy(lenet), "a", rule) for rule in ("mean", "median")}
    before = {n: p.detach().clone() for n, p in lenet.named_parameters()}
    honest = []
    for i in range(2):
        tensors = _peer(digits_data, copy.deepcopy(lenet), f"h{i}", "mean", seed=7 + i).local_update(1)[0].tensors
        honest.append(Update(UpdateHeader(f"h{i}/r1", f"h{i}", f"h{i}", 1, 0, 2), tensors))
    own = {rule: p.local_update(1)[0] for rule, p in peers.items()}
    big = {k: torch.full_like(v, 5.0) for k, v in own["mean"].tensors.items()}  # norm ~490 < 1e4
    evil = Update(UpdateHeader("m/r1", "m", "m", 1, 0, 4096), big)
    applied = {}
    for rule, p in peers.items():
        for u in [*honest, evil]:
            p.accept_update(u)
        p.apply_pending()
        applied[rule] = {n: (before[n] - q.detach()) / 0.1 for n, q in p.model.named_parameters()}  # SGD, lr 0.1
    # Mean: dragged most of the way to 5.0. Median: every coordinate inside the honest values' range.
    assert min(float(g.min()) for g in applied["mean"].values()) > 4.0
    for n, g in applied["median"].items():
        stack = torch.stack([own["median"].tensors[n], *(u.tensors[n] for u in honest)])
        assert bool((g >= stack.min(0).values - 1e-5).all() and (g <= stack.max(0).values + 1e-5).all()), n


def test_arrival_order_does_not_change_the_weights_bit_for_bit(digits_data, lenet) -> None:
    for rule in ("mean", "median", "trimmed:0.2", "clip:1"):
        results = []
        for order in (1, -1):
            p = _peer(digits_data, copy.deepcopy(lenet), "a", rule)
            others = [_peer(digits_data, copy.deepcopy(lenet), f"o{i}", "mean", seed=5 + i) for i in range(4)]
            ups = [Update(UpdateHeader(f"o{i}/r1", f"o{i}", f"o{i}", 1, 0, 2), o.local_update(1)[0].tensors)
                   for i, o in enumerate(others)]
            p.local_update(1)
            for u in ups[::order]:
                p.accept_update(u)
            p.apply_pending()
            results.append(p.model_at(None)[1])
        assert all(torch.equal(results[0][n], results[1][n]) for n in results[0]), rule


def _gossip(rule: str, rounds: int, seed: int = 0) -> list[float]:
    """Lock-step rounds of 4 peers (batch 2, 4, 4, 8), fanout 2, mixing every 5: honest accuracy."""
    torch.set_num_threads(1)
    data = load_dataset("digits", limit=2000, seed=seed)
    sizes = (2, 4, 4, 8)
    shards, test = split(data, len(sizes), test_fraction=0.2, seed=seed)
    peers = [Peer(f"p{i}", init_model(create_model("lenet", in_channels=1, num_classes=10, image_size=16),
                                      "sigmoid", seed),
                  s.images, s.labels, batch_size=sizes[i], defence=parse_defence("none"), lr=0.005,
                  keep_versions=2, seed=seed * 1000 + i + 1, aggregate=parse_aggregate(rule), max_samples=8)
             for i, s in enumerate(shards)]
    rng = random.Random(seed)
    for r in range(1, rounds + 1):
        if r % 5 == 0:
            states = [p.model_at(None)[1] for p in peers]
            for i, p in enumerate(peers):
                p.mix(states[rng.choice([k for k in range(len(peers)) if k != i])], 0.5)
        sent = [p.local_update(r)[0] for p in peers]
        for i, u in enumerate(sent):
            for j in rng.sample([k for k in range(len(peers)) if k != i], 2):
                peers[j].accept_update(u)
        for p in peers:
            p.apply_pending()
    assert all(p.aggregate_stats["refused_steps"] == 0 for p in peers)
    return [p.accuracy(test.images, test.labels) for p in peers]


def test_peers_still_learn_with_the_median() -> None:
    acc = _gossip("median", 200)
    assert min(acc) >= 0.75, acc
