"""spear: exact batch recovery from a ReLU MLP's first linear layer, and its refusals."""

from __future__ import annotations

import pytest
import torch

import attacker  # noqa: F401  (registers every attack)
from attacker.api import AttackConfig, Observation, compute_gradients, create_attack
from attacker.metrics import match_batch
from gradleak.core.models import create_model


def _update(name: str, batch: int, seed: int, size: int = 8):
    torch.manual_seed(seed)
    model = create_model(name, in_channels=3, num_classes=10, image_size=size)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, 3, size, size), generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    obs = Observation(gradients=compute_gradients(model, x, y), batch_size=batch,
                      input_shape=(3, size, size), num_classes=10)
    return model, x, y, obs


@pytest.mark.parametrize("batch", [1, 4, 8])
def test_relu_batch_is_recovered_exactly(batch):
    model, x, y, obs = _update("relu-mlp", batch, seed=batch)
    rec = create_attack("spear", AttackConfig(seed=0)).reconstruct(model, obs)
    perm = match_batch(rec.images.numpy(), x.numpy())
    for j in range(batch):
        assert (rec.images[int(perm[j])] - x[j]).abs().max() < 1e-4
    assert sorted(rec.labels.tolist()) == sorted(y.tolist())
    assert rec.stats["stop_reason"] == "recovered" and rec.stats["rank"] == batch


def test_wrong_model_is_refused():
    model, _, _, obs = _update("lenet", 2, seed=0)
    attack = create_attack("spear")
    assert "fully connected first layer" in str(attack.supports(model, obs))
    with pytest.raises(ValueError, match="fully connected first layer"):
        attack.reconstruct(model, obs)


def test_sigmoid_mlp_is_refused():
    model, _, _, obs = _update("mlp", 2, seed=0)
    with pytest.raises(ValueError, match="ReLU after the first Linear"):
        create_attack("spear").reconstruct(model, obs)


def test_batch_larger_than_the_layer_allows_is_refused():
    model, _, _, obs = _update("relu-mlp", 4, seed=0)
    big = Observation(gradients=obs.gradients, batch_size=129, input_shape=obs.input_shape,
                      num_classes=10)
    with pytest.raises(ValueError, match="larger than spear can split"):
        create_attack("spear").reconstruct(model, big)
