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


def test_too_few_live_units_give_no_direction_rather_than_an_error():
    # A trained network leaves most first-layer units dead for a whole batch: fewer live
    # rows than a direction needs zeros. The search used to fail inside topk ("selected
    # index k out of range"); now it reports nothing found.
    from attacker.spear import SpearConfig, _sparse_directions

    u = torch.randn((3, 6), dtype=torch.float64)  # 3 live units, batch 6
    q, trials = _sparse_directions(u, 1e-8, SpearConfig(), torch.Generator().manual_seed(0))
    assert q.shape == (6, 0) and trials == 0


def test_non_finite_gradient_is_refused_with_a_reason():
    model, _x, _y, obs = _update("relu-mlp", 2, seed=3)
    grads = list(obs.gradients)
    grads[0] = grads[0].clone()
    grads[0][0, 0] = float("nan")
    bad = Observation(gradients=tuple(grads), batch_size=2, input_shape=obs.input_shape, num_classes=10)
    with pytest.raises(ValueError, match="finite"):
        create_attack("spear", AttackConfig(seed=0)).reconstruct(model, bad)


def test_a_trained_relu_mlp_still_gives_batch1_images_exactly():
    torch.manual_seed(0)
    model = create_model("relu-mlp", in_channels=3, num_classes=10, image_size=8)
    gen = torch.Generator().manual_seed(1)
    xs, ys = torch.rand((256, 3, 8, 8), generator=gen), torch.randint(0, 10, (256,), generator=gen)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(150):  # fit random labels: many units die, logits grow confident
        loss = torch.nn.functional.cross_entropy(model(xs), ys)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for batch in (1, 4):
        x, y = xs[:batch], ys[:batch]
        obs = Observation(gradients=compute_gradients(model, x, y), batch_size=batch,
                          input_shape=(3, 8, 8), num_classes=10)
        rec = create_attack("spear", AttackConfig(seed=0, time_budget_s=3)).reconstruct(model, obs)
        assert rec.images.shape == x.shape  # runs and scores, whatever it found
        if batch == 1:
            assert (rec.images - x).abs().max() < 1e-4


def test_header_batch_below_the_rank_is_incomplete_not_a_crash():
    # Regression: B = 3 of a rank-6 gradient gives no singular-value gap at s[3], the
    # zero tolerance grew past 1, every unit was dropped as dead and topk raised
    # "selected index k out of range" (seen on a trained relu-mlp).
    from attacker.spear import SpearConfig, recover_inputs

    gen = torch.Generator().manual_seed(0)
    dz = torch.randn(6, 64, generator=gen).clamp(min=0)
    x = torch.rand(6, 48, generator=gen)
    res = recover_inputs(dz.T @ x, dz.sum(0), batch_size=3, params=SpearConfig(),
                         generator=gen)
    assert res.found == 0 and res.rank == 6
    assert res.inputs.shape == (3, 48)
