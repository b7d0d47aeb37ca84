"""Many captured updates in one stacked optimisation: each gets its own image back."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacker.analytic_layers import ConvOps, solve_conv_input, solve_conv_inputs
from attacker.api import AttackConfig, create_attack
from attacker.batched import reconstruct_many
from attacker.metrics import psnr
from gradleak.core.models import create_model, init_dlg_uniform

CONFIG = AttackConfig(max_iters=100, seed=0, restarts=1)
INDICES = [0, 7, 3, 11]  # four digits, two captured at each of two model versions


def _lenet(seed: int) -> nn.Module:
    model = create_model("lenet", in_channels=1, num_classes=10, image_size=16)
    return init_dlg_uniform(model, torch.Generator().manual_seed(seed))


def test_four_updates_at_two_versions_each_get_their_own_image(digits, make_observation):
    images, labels = digits
    versions = [_lenet(1234), _lenet(1234), _lenet(99), _lenet(99)]
    versions[1] = versions[0]  # the same object twice, as a peer would hand it
    versions[3] = versions[2]
    obs = [
        make_observation(m, images[i : i + 1], labels[i : i + 1])
        for m, i in zip(versions, INDICES, strict=True)
    ]
    recons = reconstruct_many("ig", versions, obs, CONFIG)
    for recon, i in zip(recons, INDICES, strict=True):
        assert psnr(recon.images[0], images[i]) >= 30.0
        assert recon.labels.tolist() == [int(labels[i])]
        assert recon.stats["stacked"] == 4 and recon.stats["attack"] == "ig"
    # Same seed, same start: one by one gives the same quality for the same update.
    single = create_attack("ig", CONFIG).reconstruct(versions[2], obs[2])
    assert abs(psnr(single.images[0], images[3]) - psnr(recons[2].images[0], images[3])) < 3.0


def test_wrong_version_does_not_reconstruct(digits, make_observation):
    """Weights matter: attacking an update at another version's weights fails."""
    images, labels = digits
    obs = make_observation(_lenet(1234), images[:1], labels[:1])
    short = AttackConfig(max_iters=30, seed=0, restarts=1)
    right, wrong = reconstruct_many("ig", [_lenet(1234), _lenet(99)], [obs, obs], short)
    assert psnr(right.images[0], images[0]) > psnr(wrong.images[0], images[0]) + 10.0


def test_lbfgs_attacks_run_one_by_one_with_the_same_results(digits, dlg_lenet, make_observation):
    images, labels = digits
    obs = [make_observation(dlg_lenet, images[i : i + 1], labels[i : i + 1]) for i in (0, 1)]
    short = AttackConfig(max_iters=2, seed=0)
    many = reconstruct_many("idlg", dlg_lenet, obs, short)
    for recon, o in zip(many, obs, strict=True):
        alone = create_attack("idlg", short).reconstruct(dlg_lenet, o)
        assert torch.equal(recon.raw_images, alone.raw_images)


def test_mixed_batch_sizes_are_grouped_and_returned_in_order(digits, dlg_lenet, make_observation):
    images, labels = digits
    obs = [
        make_observation(dlg_lenet, images[:2], labels[:2]),
        make_observation(dlg_lenet, images[2:3], labels[2:3]),
    ]
    seen: list[int] = []

    def count(iteration: int, best: list[torch.Tensor]) -> bool:
        seen.append(len(best))
        return iteration >= 1

    recons = reconstruct_many("ig", dlg_lenet, obs, AttackConfig(max_iters=5), callback=count)
    assert [r.images.shape[0] for r in recons] == [2, 1]
    assert sorted(seen) == [1, 1]  # one call per group, each with its group's updates
    assert all(r.stats["stop_reason"] == "callback" for r in recons)


def test_bad_arguments_raise(digits, dlg_lenet, make_observation):
    images, labels = digits
    obs = [make_observation(dlg_lenet, images[:1], labels[:1])]
    with pytest.raises(ValueError, match="models"):
        reconstruct_many("ig", [dlg_lenet, dlg_lenet], obs)
    with pytest.raises(ValueError, match="unknown attack"):
        reconstruct_many("nope", dlg_lenet, obs)
    mlp = create_model("mlp", in_channels=1, num_classes=10, image_size=16)
    with pytest.raises(ValueError, match="architecture"):
        reconstruct_many("ig", [dlg_lenet, mlp], obs * 2)


# --- the analytic attack, stacked: one CG solve per convolution for all updates ---


def _colour_lenet(seed: int) -> nn.Module:
    model = create_model("lenet", in_channels=3, num_classes=10, image_size=16)
    return init_dlg_uniform(model, torch.Generator().manual_seed(seed))


def _colour_images(count: int) -> torch.Tensor:
    """(count, 3, 16, 16) smooth colour images in [0, 1] (no data files needed)."""
    g = torch.Generator().manual_seed(5)
    coarse = torch.rand((count, 3, 4, 4), generator=g)
    return F.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)


def test_analytic_six_updates_at_two_versions_match_one_by_one(make_observation):
    images = _colour_images(6)
    labels = torch.tensor([3, 1, 4, 1, 5, 9])
    first, second = _colour_lenet(7), _colour_lenet(8)
    versions = [first, second, first, second, first, second]
    obs = [make_observation(m, images[j:j + 1], labels[j:j + 1])
           for j, m in enumerate(versions)]
    config = AttackConfig(seed=0)
    many = reconstruct_many("analytic", versions, obs, config)
    attack = create_attack("analytic", config)
    for j, (recon, model) in enumerate(zip(many, versions, strict=True)):
        alone = attack.reconstruct(model, obs[j])
        ours, theirs = psnr(recon.images[0], images[j]), psnr(alone.images[0], images[j])
        assert ours >= 30.0 and abs(ours - theirs) <= 0.5
        assert torch.allclose(recon.images, alone.images, rtol=0.0, atol=1e-4)
        assert recon.labels.tolist() == [int(labels[j])] == alone.labels.tolist()
        assert recon.stats["stacked"] == 6 and recon.stats["attack"] == "analytic"
        assert recon.stats["cg_iterations"] == alone.stats["cg_iterations"]
        assert [s["name"] for s in recon.stats["layers"]] == [
            s["name"] for s in alone.stats["layers"]]


def test_analytic_unsupported_update_is_named_before_any_work(digits, dlg_lenet, make_observation):
    images, labels = digits
    obs = [make_observation(dlg_lenet, images[i:i + 1], labels[i:i + 1]) for i in range(2)]
    obs.append(make_observation(dlg_lenet, images[2:13], labels[2:13]))  # 11 > 10 classes
    with pytest.raises(ValueError, match="update 2: analytic attack separates at most num_class"):
        reconstruct_many("analytic", dlg_lenet, obs)
    poisoned = [g.clone() for g in obs[1].gradients]
    poisoned[0][0, 0, 0, 0] = float("nan")
    bad = [obs[0], dataclasses.replace(obs[1], gradients=tuple(poisoned))]
    with pytest.raises(ValueError, match="update 1: analytic attack needs a finite gradient"):
        reconstruct_many("analytic", dlg_lenet, bad)


def test_analytic_callback_sees_every_analytic_image_once(digits, dlg_lenet, make_observation):
    images, labels = digits
    obs = [make_observation(dlg_lenet, images[i:i + 1], labels[i:i + 1]) for i in (0, 1, 2)]
    seen: list[tuple[int, int]] = []

    def stop(iteration: int, best: list[torch.Tensor]) -> bool:
        seen.append((iteration, len(best)))
        return True

    recons = reconstruct_many("analytic", dlg_lenet, obs, callback=stop)
    assert seen == [(0, 3)]
    assert all(r.stats["stop_reason"] == "callback" for r in recons)
    assert all(psnr(r.images[0], images[i]) >= 30.0 for r, i in zip(recons, (0, 1, 2), strict=True))


def test_analytic_grouped_convolutions_and_mixed_shapes(digits, make_observation):
    """Grouped convs take the per-problem operator; other input shapes form their own stack."""
    torch.manual_seed(0)
    grouped = nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1), nn.Tanh(),
        nn.Conv2d(12, 12, 3, padding=2, dilation=2, groups=3, bias=False), nn.Sigmoid(),
        nn.Flatten(), nn.Linear(12 * 16 * 16, 10),
    )
    images = _colour_images(2)
    digit_images, digit_labels = digits
    lenet = create_model("lenet", in_channels=1, num_classes=10, image_size=16)
    obs = [make_observation(grouped, images[:1], torch.tensor([2])),
           make_observation(lenet, digit_images[:1], digit_labels[:1]),
           make_observation(grouped, images[1:], torch.tensor([7]))]
    recons = reconstruct_many("analytic", [grouped, lenet, grouped], obs, AttackConfig(seed=0))
    truth = [images[0], digit_images[0], images[1]]
    assert [r.stats["stacked"] for r in recons] == [2, 1, 2]
    assert [int(r.labels) for r in recons] == [2, int(digit_labels[0]), 7]
    assert all(psnr(r.images[0], t) >= 30.0 for r, t in zip(recons, truth, strict=True))


@pytest.mark.parametrize("max_iters", [3, 3000])
@pytest.mark.parametrize("shared", [True, False])
def test_stacked_conv_solve_equals_each_solve_alone(max_iters, shared):
    """Per-problem CG scalars: capped or converged, each problem stops where it would alone,
    with one weight tensor for all or per-problem weights."""
    g = torch.Generator().manual_seed(0)
    shape = (1, 3, 9, 9)
    a, b = (ConvOps.of(nn.Conv2d(3, 6, 3, stride=2, padding=1).double(), shape, torch.float64)
            for _ in range(2))
    ops = [a, a, a] if shared else [a, b, a]
    xs = torch.rand((3, 3, 9, 9), generator=g, dtype=torch.float64)
    z = torch.cat([o.forward(xs[j:j + 1]) for j, o in enumerate(ops)])
    slope = torch.rand(z.shape, generator=g, dtype=torch.float64) + 0.1
    delta = torch.randn(z.shape, generator=g, dtype=torch.float64)
    grads = [o.gradient(xs[j:j + 1], delta[j:j + 1]) for j, o in enumerate(ops)]
    start = torch.full_like(xs, 0.5)
    start[1] = xs[1]  # already solved: zero iterations
    x, infos = solve_conv_inputs(ops, [None] * 3, z, slope, delta, grads, start,
                                 tol=1e-9, max_iters=max_iters)
    for j, o in enumerate(ops):
        alone, info = solve_conv_input(o, None, z[j:j + 1], slope[j:j + 1], delta[j:j + 1],
                                       grads[j], start[j:j + 1], tol=1e-9, max_iters=max_iters)
        # Up to matmul summation order, which an ill-conditioned solve may stretch by a step.
        assert torch.allclose(x[j:j + 1], alone, rtol=0.0, atol=1e-7)
        assert abs(infos[j].iterations - info.iterations) <= 2
        assert infos[j].converged == info.converged
    assert infos[1].iterations == 0 and infos[1].converged
    if max_iters == 3:
        assert [i.iterations for i in infos] == [3, 0, 3]
