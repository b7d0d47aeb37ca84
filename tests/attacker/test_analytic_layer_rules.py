"""The analytic attack's per-layer-type rules: a registered type is inverted, an unregistered
one is refused with its name through supports()."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attacker.analytic_layers import (
    LAYER_RULES,
    SHAPE_ONLY,
    Activation,
    Refused,
    register_layer,
    role_of,
    sigmoid,
)
from attacker.api import AttackConfig, create_attack
from attacker.metrics import psnr


class Logistic(nn.Module):
    """A sigmoid of our own: the same function, a type the attack has no rule for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)


class Softsign(nn.Module):
    """x / (1 + |x|): invertible elementwise on (-1, 1), registered by the test below."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / (1 + x.abs())


def _softsign() -> Activation:
    def inverse(h: torch.Tensor) -> torch.Tensor:
        h = h.clamp(-1 + 1e-10, 1 - 1e-10)
        return h / (1 - h.abs())

    def slope(h: torch.Tensor) -> torch.Tensor:
        return (1 - h.clamp(-1 + 1e-10, 1 - 1e-10).abs()) ** 2  # 1 / (1 + |z|)^2 from h

    return Activation("softsign", lambda z: z / (1 + z.abs()), inverse, slope, 0.0)


def _mlp(act: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 64), act(), nn.Linear(64, 10))


def test_the_built_in_types_have_rules():
    for kind in (nn.Linear, nn.Conv2d, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.Flatten, nn.ReLU):
        assert kind in LAYER_RULES
    assert role_of(nn.Flatten(), "f") == SHAPE_ONLY
    assert isinstance(role_of(nn.LeakyReLU(0.0), "a"), Refused)  # slope 0 loses the negatives
    assert role_of(nn.Dropout(0.5).train(), "d") == Refused("drops random units in train mode")


def test_an_unregistered_layer_type_is_refused_by_name(digits, make_observation):
    images, labels = digits
    model = _mlp(Logistic)
    reason = create_attack("analytic").supports(model, make_observation(model, images[:1], labels[:1]))
    assert reason is not None and "cannot invert Logistic at '2'" in reason
    assert "not a layer type the attack has an inverter for" in reason


def test_registering_a_layer_type_makes_supports_accept_it_and_inverts_it(digits, make_observation):
    images, labels = digits
    model = _mlp(Softsign)
    obs = make_observation(model, images[3:4], labels[3:4])
    attack = create_attack("analytic", AttackConfig(max_iters=5, time_budget_s=None))
    assert "cannot invert Softsign" in (attack.supports(model, obs) or "")
    register_layer(Softsign)(lambda module, name: _softsign())
    assert attack.supports(model, obs) is None
    recon = attack.reconstruct(model, obs)
    assert psnr(recon.images[0], images[3]) > 30 and recon.labels.tolist() == [int(labels[3])]
    with pytest.raises(ValueError, match="Softsign is already registered"):
        register_layer(Softsign)(lambda module, name: _softsign())


def test_a_subclass_uses_its_base_types_rule():
    class MySigmoid(nn.Sigmoid):
        pass

    role = role_of(MySigmoid(), "s")
    assert isinstance(role, Activation) and role.name == sigmoid().name
