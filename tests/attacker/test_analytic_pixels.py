"""Batches of eight: the two lowest layers solved together in the pixels (analytic_pixels)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from attacker.analytic import Analytic
from attacker.analytic_layers import parse_chain
from attacker.analytic_pixels import _Pixels, pixel_counts, solve_pixels
from attacker.api import AttackConfig
from attacker.metrics import match_batch, psnr
from gradleak.core.models import create_model, init_model


def _lenet(channels: int, seed: int = 0) -> torch.nn.Module:
    model = create_model("lenet", in_channels=channels, num_classes=10, image_size=16)
    return init_model(model, "sigmoid", seed)  # the live runs' init


def _repeating(labels: torch.Tensor, count: int, start: int) -> list[int]:
    """`count` indices from `start` whose labels repeat exactly once (7 classes + 1 twin)."""
    out: list[int] = []
    seen: set[int] = set()
    for i in range(start, labels.numel()):
        label = int(labels[i])
        if label not in seen and len(seen) < count - 1:
            seen.add(label)
            out.append(i)
        elif label in seen and len(out) == count - 1:
            out.append(i)
        if len(out) == count:
            return out
    raise AssertionError("no such batch")


def _top_down(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """The true second-layer output and dL/dz2 (what the layers above hand down)."""
    c1, c2, c3 = model.features[0], model.features[2], model.features[4]
    z2 = c2(torch.sigmoid(c1(x))).detach().requires_grad_(True)
    loss = F.cross_entropy(model.classifier(torch.sigmoid(c3(torch.sigmoid(z2))).flatten(1)), y)
    return torch.sigmoid(z2).detach(), torch.autograd.grad(loss, z2)[0]


def test_jacobian_products_match_differences_and_each_other():
    model = _lenet(3).double()
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 1, 4, 9])
    grads = list(torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters())))
    h2, delta2 = _top_down(model, x, y)
    layers = parse_chain(copy.deepcopy(model), (3, 16, 16))
    system = _Pixels(layers, grads, h2, delta2, prior=1e-2)
    assert float(torch.linalg.vector_norm(system.at(x)[: -2 * 4 * 3 * 15 * 16])) < 1e-9  # truth fits
    point, v = torch.rand_like(x), torch.randn_like(x)
    step = 1e-5
    central = (system.at(point + step * v) - system.at(point - step * v)) / (2 * step)
    r = system.at(point)
    mine = system.jvp(v)
    assert float(torch.linalg.vector_norm(mine - central) / torch.linalg.vector_norm(central)) < 1e-7
    w = torch.randn_like(r)
    assert abs(float(w @ mine - torch.sum(system.vjp(w) * v))) < 1e-10 * abs(float(w @ mine))


def test_counts_say_grey_eight_is_determined_and_colour_eight_is_not():
    grey = parse_chain(_lenet(1), (1, 16, 16))
    colour = parse_chain(_lenet(3), (3, 16, 16))
    assert pixel_counts(grey, 8) == (2048, 1536 + 3600 + 300 + 12)
    assert pixel_counts(colour, 8) == (6144, 1536 + 3600 + 900 + 12)


def test_pixels_from_the_true_top_recover_a_grey_batch_of_eight(digits):
    images, labels = digits
    model = _lenet(1, 3).double()
    idx = _repeating(labels, 8, 200)
    x, y = images[idx].double(), labels[idx]
    grads = list(torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters())))
    h2, delta2 = _top_down(model, x, y)
    layers = parse_chain(copy.deepcopy(model), (1, 16, 16))
    solved, stats = solve_pixels(layers, grads, h2, delta2, torch.full_like(x, 0.5))
    assert stats["determined"] and stats["prior"] == 0.0
    assert min(psnr(solved[j], x[j]) for j in range(8)) > 40.0


def test_batch_of_eight_digits_with_a_repeated_label_above_50_db(digits, make_observation):
    images, labels = digits
    idx = _repeating(labels, 8, 0)
    x, y = images[idx], labels[idx]
    assert len(set(y.tolist())) == 7
    model = _lenet(1)
    # No budget, so the result does not depend on the machine's load: the solve ends
    # where its steps settle (a few seconds here).
    recon = Analytic(AttackConfig(time_budget_s=None)).reconstruct(model, make_observation(model, x, y))
    assert recon.stats["batch_method"] == "pixels"
    assert recon.labels.tolist() == y.sort().values.tolist()
    perm = match_batch(recon.images.numpy(), x.numpy())
    scores = [psnr(recon.images[int(perm[j])], x[j]) for j in range(8)]
    # Measured: 61-83 dB here; the previous default at B = 8 (batch_method "features",
    # also without a budget, run to convergence in ~13 s) gave 29-38 dB on this batch.
    assert min(scores) > 50.0, scores


def test_a_doubtful_separation_gets_a_short_share_and_no_polish(digits, make_observation):
    import time

    from attacker.analytic_batch import DOUBTFUL_RESIDUAL, DOUBTFUL_SHARE, reconstruct_batch
    from attacker.budget import time_budget

    images, labels = digits
    idx = _repeating(labels, 8, 0)
    x, y = images[idx], labels[idx]
    model = _lenet(1)
    obs = make_observation(model, x, y)
    layers = parse_chain(copy.deepcopy(model), (1, 16, 16))
    wrong = torch.zeros(8, dtype=torch.int64)  # 7 labels off: more than the search may change
    budget = 2.0
    start = time.perf_counter()
    with time_budget(budget):
        raw, _, stats = reconstruct_batch(model, layers, list(obs.gradients), wrong, (1, 16, 16),
                                          max_iters=100, inner=20, history=100,
                                          working=torch.float64, callback=None, method="pixels")
    seconds = time.perf_counter() - start
    assert stats["separation_residual"] > DOUBTFUL_RESIDUAL and stats["separation_doubtful"]
    assert not stats["gradient_polish"] and raw.shape == x.shape
    # The label search is what finds it doubtful; the image solve then stops at once (what is
    # left of DOUBTFUL_SHARE of the budget), and the rest of the budget is left unspent.
    assert stats["solve_seconds"] < max(0.0, DOUBTFUL_SHARE * budget - stats["separate_seconds"]) + 0.5
    assert seconds < budget
