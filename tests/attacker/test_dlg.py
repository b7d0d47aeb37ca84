"""DLG and iDLG reconstruct a digit from its gradient, and fail loudly but safely."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from attacker.api import (
    ATTACKS,
    AttackConfig,
    Observation,
    create_attack,
)
from attacker.metrics import psnr, score_batch

BUDGET = AttackConfig(max_iters=300, seed=0)  # DLG's published budget; converges far sooner


@pytest.mark.parametrize("index", [0, 7])
def test_dlg_reconstructs_batch1_digit(digits, dlg_lenet, make_observation, index):
    images, labels = digits
    x, y = images[index : index + 1], labels[index : index + 1]
    recon = create_attack("dlg", BUDGET).reconstruct(dlg_lenet, make_observation(dlg_lenet, x, y))
    assert psnr(recon.images[0], x[0]) >= 30.0
    assert recon.labels.tolist() == y.tolist()
    assert recon.stats["label_source"] == "optimised"
    assert recon.stats["diverged"] is False
    assert recon.stats["stop_reason"] == "converged"
    assert recon.stats["grad_distance"] < BUDGET.grad_tol


@pytest.mark.parametrize("index", [0, 7])
def test_idlg_reconstructs_batch1_digit_with_analytic_label(
    digits, dlg_lenet, make_observation, index
):
    images, labels = digits
    x, y = images[index : index + 1], labels[index : index + 1]
    recon = create_attack("idlg", BUDGET).reconstruct(dlg_lenet, make_observation(dlg_lenet, x, y))
    assert psnr(recon.images[0], x[0]) >= 30.0
    assert recon.labels.dtype == torch.int64
    assert recon.labels.tolist() == y.tolist()
    assert recon.stats["label_source"] == "analytic"
    assert recon.stats["iterations"] <= BUDGET.max_iters
    assert recon.images.shape == x.shape
    assert 0.0 <= recon.images.min() and recon.images.max() <= 1.0


def test_attack_leaves_callers_model_untouched(digits, dlg_lenet, make_observation):
    images, labels = digits
    obs = make_observation(dlg_lenet, images[:1], labels[:1])
    before = {k: v.clone() for k, v in dlg_lenet.state_dict().items()}
    dlg_lenet.classifier.bias.requires_grad_(False)  # a caller's choice the attack must keep
    dlg_lenet.train(False)
    create_attack("dlg", AttackConfig(max_iters=3)).reconstruct(dlg_lenet, obs)
    after = dlg_lenet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in dlg_lenet.parameters())
    assert dlg_lenet.classifier.bias.requires_grad is False
    assert dlg_lenet.training is False


def test_unknown_attack_lists_known_names():
    with pytest.raises(ValueError) as info:
        create_attack("nope")
    assert "dlg" in str(info.value) and "idlg" in str(info.value)
    assert {"dlg", "idlg"} <= set(ATTACKS)


@pytest.mark.parametrize("name", ["dlg", "idlg"])
def test_nan_gradient_is_reported_as_divergence(digits, dlg_lenet, make_observation, name):
    images, labels = digits
    obs = make_observation(dlg_lenet, images[:1], labels[:1])
    poisoned = list(obs.gradients)
    poisoned[0] = poisoned[0].clone()
    poisoned[0][0, 0, 0, 0] = float("nan")
    obs = dataclasses.replace(obs, gradients=tuple(poisoned))
    recon = create_attack(name, BUDGET).reconstruct(dlg_lenet, obs)
    assert recon.stats["diverged"] is True
    assert recon.stats["stop_reason"] == "diverged"
    assert recon.stats["iterations"] == 1  # stopped at once, not after the whole budget
    assert torch.isfinite(recon.images).all()
    assert recon.images.min() >= 0.0 and recon.images.max() <= 1.0


class _ExpNet(nn.Module):
    """A victim whose exp activation overflows to inf once inputs grow large."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(16 * 16, 8)
        self.out = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.exp(self.hidden(x.flatten(1))))


def test_overflow_is_diverged_and_keeps_best_finite_iterate(digits, make_observation):
    torch.manual_seed(0)
    model = _ExpNet()
    images, labels = digits
    obs = make_observation(model, images[:1], labels[:1])
    recon = create_attack("dlg", AttackConfig(max_iters=50, lr=1e6)).reconstruct(model, obs)
    assert recon.stats["diverged"] is True
    assert recon.stats["stop_reason"] == "diverged"
    assert recon.stats["iterations"] < 50
    assert torch.isfinite(recon.raw_images).all()
    assert recon.stats["grad_distance"] < float("inf")


def test_saturated_sigmoids_stop_as_stalled(digits, dlg_lenet, make_observation):
    """A huge fixed step saturates LeNet's sigmoids; L-BFGS stops moving, so must we."""
    images, labels = digits
    obs = make_observation(dlg_lenet, images[:1], labels[:1])
    recon = create_attack("dlg", AttackConfig(max_iters=300, lr=1e10)).reconstruct(dlg_lenet, obs)
    assert recon.stats["stop_reason"] == "stalled"
    assert recon.stats["iterations"] < 10
    assert recon.stats["diverged"] is False


def test_patience_ends_a_plateau_without_losing_the_result(digits, dlg_lenet, make_observation):
    """With grad_tol 0 only the plateau (float32's floor) can stop a converged run."""
    images, labels = digits
    obs = make_observation(dlg_lenet, images[:1], labels[:1])
    config = AttackConfig(grad_tol=0.0, patience=3)
    recon = create_attack("idlg", config).reconstruct(dlg_lenet, obs)
    assert recon.stats["stop_reason"] == "plateau"
    assert recon.stats["iterations"] < 50
    assert psnr(recon.images[0], images[0]) >= 30.0


@pytest.mark.parametrize("name, config", [("idlg", BUDGET), ("ig", AttackConfig(max_iters=100, seed=0))])
def test_callback_stops_early_and_sees_only_images(name, config, digits, dlg_lenet, make_observation):
    images, labels = digits
    obs = make_observation(dlg_lenet, images[:1], labels[:1])
    seen: list[tuple[int, tuple[int, ...]]] = []

    def stop_at_two(iteration: int, current: torch.Tensor) -> bool:
        seen.append((iteration, tuple(current.shape)))
        assert 0.0 <= current.min() and current.max() <= 1.0
        return iteration >= 2

    recon = create_attack(name, config).reconstruct(dlg_lenet, obs, callback=stop_at_two)
    assert seen == [(1, (1, 1, 16, 16)), (2, (1, 1, 16, 16))]
    assert recon.stats["stop_reason"] == "callback"
    assert recon.stats["iterations"] == 2


def test_same_seed_same_reconstruction(digits, dlg_lenet, make_observation):
    images, labels = digits
    obs = make_observation(dlg_lenet, images[3:4], labels[3:4])
    short = AttackConfig(max_iters=2, seed=5)
    first = create_attack("dlg", short).reconstruct(dlg_lenet, obs)
    again = create_attack("dlg", short).reconstruct(dlg_lenet, obs)
    other = create_attack("dlg", dataclasses.replace(short, seed=6)).reconstruct(dlg_lenet, obs)
    assert torch.equal(first.raw_images, again.raw_images)
    assert not torch.equal(first.raw_images, other.raw_images)


def test_observation_carries_no_ground_truth():
    fields = {f.name for f in dataclasses.fields(Observation)}
    # Public headers only; the FedAvg fields say how the update was made, not what from;
    # label_prior is the attacker's own shard (tests/attacker/test_label_prior.py).
    assert fields == {"gradients", "batch_size", "input_shape", "num_classes",
                      "update_kind", "local_steps", "local_lr", "label_prior"}


def test_mismatched_observation_is_rejected(digits, dlg_lenet, make_observation):
    images, labels = digits
    obs = make_observation(dlg_lenet, images[:1], labels[:1])
    short = dataclasses.replace(obs, gradients=obs.gradients[:-1])
    with pytest.raises(ValueError, match="gradients"):
        create_attack("idlg").reconstruct(dlg_lenet, short)
    with pytest.raises(ValueError):
        AttackConfig(init="zeros")
    with pytest.raises(ValueError):
        AttackConfig(patience=-1)
    with pytest.raises(ValueError):
        Observation(obs.gradients, batch_size=0, input_shape=(1, 16, 16), num_classes=10)


def test_idlg_batch2_reads_certified_labels_else_optimises(digits, dlg_lenet, make_observation):
    images, labels = digits
    obs = make_observation(dlg_lenet, images[:2], labels[:2])
    recon = create_attack("idlg", AttackConfig(max_iters=2)).reconstruct(dlg_lenet, obs)
    assert recon.stats["label_source"] == "analytic" and recon.stats["attack"] == "idlg"
    assert recon.labels.tolist() == sorted(labels[:2].tolist())
    assert recon.images.shape == (2, 1, 16, 16)
    noisy = dataclasses.replace(obs, gradients=tuple(  # noise: no exact separation, no certificate
        g + 1e-2 * torch.randn(g.shape, generator=torch.Generator().manual_seed(0))
        for g in obs.gradients))
    recon = create_attack("idlg", AttackConfig(max_iters=2)).reconstruct(dlg_lenet, noisy)
    assert recon.stats["label_source"] == "optimised"
    told = AttackConfig(max_iters=2, label_recovery="optimised")
    recon = create_attack("idlg", told).reconstruct(dlg_lenet, obs)
    assert recon.stats["label_source"] == "optimised" and recon.labels.shape == (2,)


def test_dlg_batch2_recovers_both_digits(digits, dlg_lenet, make_observation):
    images, labels = digits
    x, y = images[[1, 4]], labels[[1, 4]]
    recon = create_attack("dlg", BUDGET).reconstruct(dlg_lenet, make_observation(dlg_lenet, x, y))
    score = score_batch(recon.images, recon.labels, x, y)
    assert score["mean_psnr"] >= 25.0
    assert score["label_accuracy"] == 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_idlg_runs_on_cuda(digits, dlg_lenet, make_observation):
    images, labels = digits
    model = dlg_lenet.cuda()
    obs = make_observation(model, images[:1].cuda(), labels[:1].cuda())
    recon = create_attack("idlg", BUDGET).reconstruct(model, obs)
    assert recon.images.is_cuda and recon.stats["device"].startswith("cuda")
    assert psnr(recon.images[0], images[0]) >= 30.0
