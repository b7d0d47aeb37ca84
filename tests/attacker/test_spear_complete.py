"""Completion (attacker/spear_complete.py): the last directions from the ReLU pattern."""

from __future__ import annotations

import torch

import attacker  # noqa: F401  (registers every attack)
from attacker.api import AttackConfig, Observation, compute_gradients, create_attack
from attacker.metrics import match_batch
from gradleak.core.models import create_model


def _batch(seed: int, batch: int = 6):
    torch.manual_seed(seed)
    model = create_model("relu-mlp", in_channels=3, num_classes=10, image_size=8)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, 3, 8, 8), generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    layer = model.net[1]
    return model, x, y, layer.weight.detach().double(), layer.bias.detach().double(), gen


def _recovered(model, x, y, budget: float = 20.0):
    obs = Observation(gradients=compute_gradients(model, x, y), batch_size=x.shape[0],
                      input_shape=tuple(x.shape[1:]), num_classes=10)
    rec = create_attack("spear", AttackConfig(seed=0, time_budget_s=budget)).reconstruct(model, obs)
    perm = match_batch(rec.raw_images.numpy(), x.numpy())
    error = max(float((rec.raw_images[int(perm[j])] - x[j]).abs().max()) for j in range(x.shape[0]))
    return rec, error


def test_a_sample_with_too_few_zeros_for_the_search_is_completed_exactly():
    # Sample 0 is planted with ~35 negative pre-activations of 256 (the others ~125):
    # under the 20% zero share a direction needs, so the search never confirms it
    # (before the completion: 5 of 6 found after 20 s). Its c is the one direction
    # left by the other five q's, and its ReLU pattern gives its q.
    model, x, y, w, b, gen = _batch(0)
    target = torch.where(torch.rand(w.shape[0], generator=gen) < 0.1, -1.0, 1.0).double()
    x[0] = (torch.linalg.pinv(w) @ (target - b)).reshape(3, 8, 8).float()
    negatives = (x.reshape(6, -1).double() @ w.T + b < 0).sum(dim=1)
    assert int(negatives[0]) < 0.2 * w.shape[0] < int(negatives[1:].min())
    rec, error = _recovered(model, x, y)
    assert rec.stats["stop_reason"] == "recovered" and rec.stats["found"] == 6
    assert error < 1e-4


def test_two_samples_whose_zeros_nest_are_told_apart_by_the_gradient():
    # Sample 1 is sample 0 moved just enough to turn one negative unit positive: its zero
    # rows are sample 0's less one, so every mix of the two is zero wherever sample 1
    # is and no zero test can find sample 1's q. The plane of both q's comes from
    # sample 1's ReLU pattern, and the point in it from the gradient distance.
    model, x, y, w, b, _ = _batch(0)
    xa = x[0].reshape(-1).double()
    za = w @ xa + b
    unit = int(torch.where(za < 0, za, torch.full_like(za, -1e9)).argmax())  # negative, nearest 0
    step = torch.linalg.pinv(w)[:, unit]
    xb = xa - 1.5 * float(za[unit]) / float(w[unit] @ step) * step
    zb = w @ xb + b
    assert float(zb[unit]) > 0 and int(((za > 0) != (zb > 0)).sum()) == 1
    x[1] = xb.reshape(3, 8, 8).float()
    rec, error = _recovered(model, x, y)
    assert rec.stats["stop_reason"] == "recovered"
    assert error < 1e-4  # exact: a mix of the two is within 5e-3 of either
