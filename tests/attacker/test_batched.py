"""Many captured updates in one stacked optimisation: each gets its own image back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attacker.attacks import AttackConfig, create_attack
from attacker.batched import reconstruct_many
from attacker.metrics import psnr
from gradleak.models import create_model, init_dlg_uniform

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
