"""Inverting Gradients reconstructs a digit, honours the attack contract, runs on ResNet."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attacker.api import ATTACKS, AttackConfig, Observation, compute_gradients, create_attack
from attacker.metrics import psnr
from gradleak.core.models import create_model

BUDGET = AttackConfig(max_iters=100, seed=0)  # the live attacker's default budget


def test_registry_lists_the_three_attacks():
    assert {"dlg", "idlg", "ig"} <= set(ATTACKS)
    with pytest.raises(ValueError, match="ig"):
        create_attack("nope")


@pytest.mark.parametrize("index", [0, 7])
def test_ig_reconstructs_batch1_digit(digits, dlg_lenet, make_observation, index):
    images, labels = digits
    x, y = images[index : index + 1], labels[index : index + 1]
    recon = create_attack("ig", BUDGET).reconstruct(dlg_lenet, make_observation(dlg_lenet, x, y))
    assert psnr(recon.images[0], x[0]) >= 30.0
    assert recon.labels.tolist() == y.tolist()
    stats = recon.stats
    assert stats["attack"] == "ig" and stats["label_source"] == "analytic"
    assert stats["restarts"] == BUDGET.restarts and 0 <= stats["best_restart"] < BUDGET.restarts
    assert stats["stop_reason"] == "converged" and stats["diverged"] is False
    assert stats["grad_loss"] <= BUDGET.ig_tol and stats["iterations"] <= BUDGET.max_iters
    assert stats["seconds"] > 0 and stats["device"] == "cpu"


def test_ig_nan_gradient_is_divergence(digits, dlg_lenet, make_observation):
    images, labels = digits
    obs = make_observation(dlg_lenet, images[:1], labels[:1])
    poisoned = [g.clone() for g in obs.gradients]
    poisoned[0][0, 0, 0, 0] = float("nan")
    obs = dataclasses.replace(obs, gradients=tuple(poisoned))
    recon = create_attack("ig", BUDGET).reconstruct(dlg_lenet, obs)
    assert recon.stats["diverged"] is True and recon.stats["stop_reason"] == "diverged"
    assert recon.stats["iterations"] == 1
    assert torch.isfinite(recon.images).all()


def test_ig_same_seed_same_start_and_caller_model_untouched(digits, dlg_lenet, make_observation):
    images, labels = digits
    obs = make_observation(dlg_lenet, images[3:4], labels[3:4])
    before = {k: v.clone() for k, v in dlg_lenet.state_dict().items()}
    short = AttackConfig(max_iters=2, seed=5)
    first = create_attack("ig", short).reconstruct(dlg_lenet, obs)
    again = create_attack("ig", short).reconstruct(dlg_lenet, obs)
    other = create_attack("ig", dataclasses.replace(short, seed=6)).reconstruct(dlg_lenet, obs)
    assert torch.equal(first.images, again.images)
    assert not torch.equal(first.images, other.images)
    assert all(torch.equal(before[k], v) for k, v in dlg_lenet.state_dict().items())
    assert all(p.grad is None for p in dlg_lenet.parameters())


def test_ig_learns_labels_when_told_to(digits, dlg_lenet, make_observation):
    images, labels = digits
    obs = make_observation(dlg_lenet, images[:2], labels[:2])
    config = AttackConfig(max_iters=3, label_recovery="optimised")
    recon = create_attack("ig", config).reconstruct(dlg_lenet, obs)
    assert recon.stats["label_source"] == "optimised"
    assert recon.images.shape == (2, 1, 16, 16) and recon.labels.shape == (2,)


@pytest.mark.parametrize(
    "bad",
    [
        {"ig_lr": 0.0},
        {"restarts": 0},
        {"ig_inner": 0},
        {"tv_weight": -1.0},
        {"ig_tol": -1.0},
        {"label_recovery": "guess"},
        {"layer_weights": "random"},
        {"line_search": "backtracking"},
    ],
)
def test_bad_ig_settings_are_rejected(bad):
    with pytest.raises(ValueError):
        AttackConfig(**bad)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", ["dlg", "idlg", "ig"])
def test_attacks_run_on_resnet18_with_batchnorm(name, training):
    """BatchNorm in the victim's mode: no crash, right shapes, model left as it was."""
    torch.manual_seed(0)
    model = create_model("resnet18", in_channels=3, num_classes=10, image_size=16)
    model.train(training)
    x, y = torch.rand(2, 3, 16, 16), torch.tensor([1, 4])
    obs = Observation(compute_gradients(model, x, y), 2, (3, 16, 16), 10)
    config = AttackConfig(max_iters=1, lbfgs_inner=2, ig_inner=2, restarts=1)
    recon = create_attack(name, config).reconstruct(model, obs)
    assert recon.images.shape == (2, 3, 16, 16) and recon.labels.shape == (2,)
    assert torch.isfinite(recon.images).all()
    assert model.training is training
    if name == "ig":  # batch label recovery: distinct labels, untrained ReLU net
        assert recon.labels.tolist() == [1, 4]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ig_and_batched_run_on_cuda(digits, dlg_lenet, make_observation):
    from attacker.batched import reconstruct_many

    images, labels = digits
    model = dlg_lenet.cuda()
    obs = make_observation(model, images[:1].cuda(), labels[:1].cuda())
    recon = create_attack("ig", BUDGET).reconstruct(model, obs)
    assert recon.images.is_cuda and recon.stats["device"].startswith("cuda")
    assert psnr(recon.images[0], images[0]) >= 30.0
    many = reconstruct_many("ig", model, [obs, obs], BUDGET)
    assert all(r.images.is_cuda for r in many)
