"""Every registered image attack honours AttackConfig.time_budget_s; the default chain
picks the fastest attack that supports the model."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from attacker.api import ATTACKS, AttackConfig, choose_attack, create_attack
from attacker.budget import exhausted, expired, time_budget
from gradleak.core.models import create_model

BUDGET = 0.5
SLACK = 1.5


@pytest.fixture(scope="module", autouse=True)
def _warm_optimisers() -> None:
    """torch imports torch._dynamo on the first optimiser built (seconds, once per
    process): pay it before the clock starts, it is no part of an attack's loop."""
    torch.optim.LBFGS([torch.zeros(1, requires_grad=True)])


@pytest.mark.parametrize("name", sorted(n for n in ATTACKS if n in ("dlg", "idlg", "ig", "analytic")))
def test_each_attack_stops_at_its_time_budget(name, digits, dlg_lenet, make_observation) -> None:
    images, labels = digits
    # Hard cases: a batch of 8 (the live demo's slow analytic update), many iterations.
    batch = 8
    obs = make_observation(dlg_lenet, images[:batch], labels[:batch])
    config = AttackConfig(max_iters=10_000, time_budget_s=BUDGET, grad_tol=0.0, restarts=2)
    attack = create_attack(name, config)
    start = time.perf_counter()
    rec = attack.reconstruct(dlg_lenet, obs)
    took = time.perf_counter() - start
    assert took < BUDGET + SLACK, f"{name} took {took:.2f} s on a {BUDGET} s budget"
    assert rec.stats["stop_reason"] == "time_budget", rec.stats["stop_reason"]
    assert rec.images.shape == images[:batch].shape and torch.isfinite(rec.images).all()


def test_no_budget_means_no_limit() -> None:
    assert not expired() and not exhausted()
    with time_budget(None):
        assert not expired()
    with time_budget(0.01):
        time.sleep(0.02)
        with time_budget(10.0):  # the outer one ends first and stays in force
            assert expired()
        assert exhausted()
    with pytest.raises(ValueError, match="time_budget_s"):
        AttackConfig(time_budget_s=0)


class _ReluNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_choose_attack_takes_analytic_for_the_sigmoid_lenet_and_falls_back(
    digits, dlg_lenet, make_observation,
) -> None:
    images, labels = digits
    chain = ("analytic", "idlg", "dlg")
    obs = make_observation(dlg_lenet, images[:1], labels[:1])
    attack, reasons = choose_attack(chain, dlg_lenet, obs)
    assert attack is not None and attack.name == "analytic" and not reasons
    relu = _ReluNet()
    obs = make_observation(relu, images[:1], labels[:1])
    attack, reasons = choose_attack(chain, relu, obs)
    assert attack is not None and attack.name == "idlg"
    assert "ReLU" in reasons["analytic"]
    # A batch wider than the classes: analytic refuses it, idlg takes it.
    mlp = create_model("mlp", in_channels=1, num_classes=10, image_size=16)
    big = make_observation(mlp, images[:12], labels[:12])
    attack, reasons = choose_attack(chain, mlp, big)
    assert attack is not None and attack.name == "idlg" and "batch size 12" in reasons["analytic"]
    none, why = choose_attack(("analytic",), relu, make_observation(relu, images[:1], labels[:1]))
    assert none is None and set(why) == {"analytic"}
