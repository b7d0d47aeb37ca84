"""The analytic attack on batches: features separated exactly, labels corrected, images recovered."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacker.analytic_batch import EXACT_RESIDUAL, search_labels, separate_features
from attacker.api import AttackConfig, create_attack
from attacker.batched import reconstruct_many
from attacker.metrics import match_batch, psnr


def _distinct(labels: torch.Tensor, count: int, start: int = 0) -> list[int]:
    """Indices of the first `count` samples from `start` with pairwise distinct labels."""
    seen: set[int] = set()
    out = []
    for i in range(start, labels.numel()):
        if int(labels[i]) not in seen:
            seen.add(int(labels[i]))
            out.append(i)
        if len(out) == count:
            return out
    raise AssertionError("not enough classes")


def _last_layer(model, obs):
    w = model.classifier.weight.detach().double()
    b = model.classifier.bias.detach().double()
    return w, b, obs.gradients[-2].double(), obs.gradients[-1].double()


def test_separates_every_samples_features_exactly(digits, dlg_lenet, make_observation):
    images, labels = digits
    idx = _distinct(labels, 6)
    x, y = images[idx], labels[idx]
    obs = make_observation(dlg_lenet, x, y)
    order = torch.argsort(y)  # the separation answers in sorted-label order
    with torch.no_grad():
        truth = dlg_lenet.features(x).flatten(1).double()[order]
    sep = separate_features(*_last_layer(dlg_lenet, obs), y[order], (0.0, 1.0))
    assert sep.exact and sep.residual <= EXACT_RESIDUAL
    error = torch.linalg.vector_norm(sep.features - truth, dim=1) / torch.linalg.vector_norm(truth, dim=1)
    assert float(error.max()) < 1e-4
    assert sep.all_reliable and torch.all(sep.reliability == 1.0)


def test_wrong_labels_leave_a_residual_and_the_search_corrects_them(digits, dlg_lenet,
                                                                   make_observation):
    images, labels = digits
    idx = _distinct(labels, 4, start=50)
    x, y = images[idx], labels[idx]
    obs = make_observation(dlg_lenet, x, y)
    truth = y.sort().values
    wrong = truth.clone()
    wrong[1] = wrong[0]  # one label lost to a repeat: what count estimates get wrong
    args = _last_layer(dlg_lenet, obs)
    assert separate_features(*args, wrong, (0.0, 1.0)).residual > 100 * EXACT_RESIDUAL
    sep, changes, start = search_labels(*args, wrong, (0.0, 1.0))
    assert sep.labels.tolist() == truth.tolist() and changes == 1 and sep.exact
    assert start > 100 * EXACT_RESIDUAL


@pytest.mark.parametrize(("batch", "start"), [(2, 0), (4, 100), (8, 300)])
def test_recovers_batches_of_digits(digits, dlg_lenet, make_observation, batch, start):
    images, labels = digits
    idx = _distinct(labels, batch, start)
    x, y = images[idx], labels[idx]
    recon = create_attack("analytic", AttackConfig(max_iters=60)).reconstruct(
        dlg_lenet, make_observation(dlg_lenet, x, y))
    assert sorted(recon.labels.tolist()) == sorted(y.tolist())
    perm = match_batch(recon.images.numpy(), x.numpy())
    scores = [psnr(recon.images[int(perm[j])], x[j]) for j in range(batch)]
    assert float(np.mean(scores)) >= 27.0 and min(scores) >= 18.0  # DLG: ~5-10 dB here
    stats = recon.stats
    # B = 8: the second convolution's batch solve has fewer equations than unknowns, so
    # the two lowest layers are solved together in the pixels
    assert stats["batch_method"] == ("layers" if batch <= 4 else "pixels")
    assert stats["separation_residual"] <= EXACT_RESIDUAL
    assert stats["label_source"] == "analytic" and stats["attack"] == "analytic"
    assert recon.images.shape == x.shape and float(recon.images.min()) >= 0.0


def test_callback_sees_the_solved_batch_and_can_stop(digits, dlg_lenet, make_observation):
    images, labels = digits
    idx = _distinct(labels, 3)
    seen = []

    def stop(step, imgs):
        seen.append((step, tuple(imgs.shape)))
        return True

    recon = create_attack("analytic").reconstruct(
        dlg_lenet, make_observation(dlg_lenet, images[idx], labels[idx]), callback=stop)
    assert seen == [(0, (3, 1, 16, 16))]  # iteration 0: the layers' closed-form images
    assert recon.stats["stop_reason"] == "callback" and recon.stats["iterations"] == 0


def test_previous_path_callback_sees_each_step_and_can_stop(digits, dlg_lenet, make_observation):
    from attacker.analytic import Analytic

    images, labels = digits
    idx = _distinct(labels, 3)
    seen = []

    def stop_at_three(step, imgs):
        seen.append((step, tuple(imgs.shape)))
        return step >= 3

    recon = Analytic(batch_method="features").reconstruct(
        dlg_lenet, make_observation(dlg_lenet, images[idx], labels[idx]), callback=stop_at_three)
    assert [s for s, _ in seen] == [1, 2, 3] and seen[0][1] == (3, 1, 16, 16)
    assert recon.stats["stop_reason"] == "callback" and recon.stats["iterations"] == 3


def test_refuses_more_samples_than_classes(digits, dlg_lenet, make_observation):
    images, labels = digits
    obs = make_observation(dlg_lenet, images[:11], labels[:11])
    with pytest.raises(ValueError, match="at most num_classes = 10"):
        create_attack("analytic").reconstruct(dlg_lenet, obs)


def test_refuses_a_last_layer_narrower_than_the_batch(digits, make_observation):
    from torch import nn

    images, labels = digits
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 3), nn.Sigmoid(), nn.Linear(3, 10))
    idx = _distinct(labels, 4)
    with pytest.raises(ValueError, match="3 input features"):
        create_attack("analytic").reconstruct(model, make_observation(model, images[idx], labels[idx]))


def test_reconstruct_many_takes_batches_beside_stacked_batch1(digits, dlg_lenet, make_observation):
    images, labels = digits
    idx = _distinct(labels, 3, start=200)
    obs = [make_observation(dlg_lenet, images[:1], labels[:1]),
           make_observation(dlg_lenet, images[idx], labels[idx]),
           make_observation(dlg_lenet, images[1:2], labels[1:2])]
    out = reconstruct_many("analytic", [dlg_lenet] * 3, obs, AttackConfig(max_iters=40))
    assert [r.images.shape[0] for r in out] == [1, 3, 1]
    assert out[0].stats["stacked"] == 2 and "separation_residual" in out[1].stats
    assert psnr(out[0].images[0], images[0]) >= 30.0 and psnr(out[2].images[0], images[1]) >= 30.0


def test_recovers_a_batch_through_the_mlp(digits, make_observation):
    from gradleak.core.models import create_model

    images, labels = digits
    torch.manual_seed(0)
    model = create_model("mlp", in_channels=1, num_classes=10, image_size=16)
    idx = _distinct(labels, 6, start=20)
    x, y = images[idx], labels[idx]
    recon = create_attack("analytic", AttackConfig(max_iters=60)).reconstruct(
        model, make_observation(model, x, y))
    perm = match_batch(recon.images.numpy(), x.numpy())
    assert min(psnr(recon.images[int(perm[j])], x[j]) for j in range(6)) >= 40.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_runs_on_cuda(digits, make_observation):
    from gradleak.core.models import create_model, init_dlg_uniform

    images, labels = digits
    model = init_dlg_uniform(create_model("lenet", in_channels=1, num_classes=10, image_size=16),
                             torch.Generator().manual_seed(1234)).cuda()
    idx = _distinct(labels, 4)
    x, y = images[idx].cuda(), labels[idx].cuda()
    recon = create_attack("analytic", AttackConfig(max_iters=60)).reconstruct(
        model, make_observation(model, x, y))
    assert recon.images.is_cuda and recon.stats["device"].startswith("cuda")
    assert sorted(recon.labels.tolist()) == sorted(y.tolist())
    perm = match_batch(recon.images.cpu().numpy(), x.cpu().numpy())
    assert float(np.mean([psnr(recon.images[int(perm[j])].cpu(), x[j].cpu())
                          for j in range(4)])) >= 28.0
