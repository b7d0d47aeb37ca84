"""spear on a trained ReLU MLP: weak samples and noise end the search, they do not crash it.

A trained model gives its well-classified samples tiny gradients, so the weakest
sample's singular value of dW sits near the noise floor; spear used to derive a zero
tolerance above 1 from that and then ask topk for more rows than were left
("selected index k out of range"), or pass inf rows to the labels' pseudo-inverse.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import attacker  # noqa: F401  (registers every attack)
from attacker import spear
from attacker.api import AttackConfig, Observation, compute_gradients, create_attack
from gradleak.core.models import create_model
from gradleak.data import load_dataset

SHAPE = (1, 16, 16)


@functools.lru_cache(maxsize=1)
def _trained() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    data = load_dataset("digits", image_size=16)
    x, y = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    torch.manual_seed(7)
    model = create_model("relu-mlp", in_channels=1, num_classes=10, image_size=16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, 1000, (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        assert float((model(x[1400:]).argmax(1) == y[1400:]).float().mean()) > 0.8
    return model, x[1400:1408], y[1400:1408]


@pytest.mark.parametrize("sigma", [0.0, 1e-4, 1e-2])
def test_trained_batch_with_noise_is_reported_not_raised(sigma):
    model, x, y = _trained()
    gen = torch.Generator().manual_seed(1)
    grads = tuple(g + sigma * g.pow(2).mean().sqrt() * torch.randn(g.shape, generator=gen)
                  for g in compute_gradients(model, x, y))
    obs = Observation(gradients=grads, batch_size=8, input_shape=SHAPE, num_classes=10)
    rec = create_attack("spear", AttackConfig(seed=0, time_budget_s=10)).reconstruct(model, obs)
    assert bool(torch.isfinite(rec.images).all()) and rec.images.shape == (8, *SHAPE)
    if sigma > 0:  # the weakest sample is below the noise: nothing can be split off
        assert rec.stats["found"] == 0 and rec.stats["stop_reason"] == "incomplete"


def test_non_finite_gradient_is_refused():
    model, x, y = _trained()
    grads = list(compute_gradients(model, x, y))
    grads[0] = grads[0].clone()
    grads[0][0, 0] = float("nan")
    obs = Observation(gradients=tuple(grads), batch_size=8, input_shape=SHAPE, num_classes=10)
    with pytest.raises(ValueError, match="finite"):
        create_attack("spear").reconstruct(model, obs)


def test_wrong_direction_is_reported_inconsistent(monkeypatch):
    torch.manual_seed(4)  # at init, where spear recovers B = 4 exactly (test_spear.py)
    model = create_model("relu-mlp", in_channels=3, num_classes=10, image_size=8)
    gen = torch.Generator().manual_seed(4)
    x, y = torch.rand((4, 3, 8, 8), generator=gen), torch.randint(0, 10, (4,), generator=gen)
    obs = Observation(gradients=compute_gradients(model, x, y), batch_size=4,
                      input_shape=(3, 8, 8), num_classes=10)
    found = spear._independent

    def mixed(entries, b, *rest):  # one sample's direction replaced by a mix of two
        q = found(entries, b, *rest).clone()
        if q.shape[1] == b:
            q[:, 0] = torch.nn.functional.normalize(q[:, 0] + 0.5 * q[:, 1], dim=0)
        return q

    monkeypatch.setattr(spear, "_independent", mixed)
    # The completion would drop the mix and complete the set (it tries the last
    # columns' drops): off, so the inconsistent set is what comes out.
    monkeypatch.setattr(spear, "_completed", lambda *args: None)
    rec = create_attack("spear", AttackConfig(seed=0, time_budget_s=10)).reconstruct(model, obs)
    assert rec.stats["found"] == 4 and rec.stats["stop_reason"] == "inconsistent"
