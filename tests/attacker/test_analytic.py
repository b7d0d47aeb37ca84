"""The analytic (R-GAP style) attack: exact-to-the-pixel batch-1 recovery, and its refusals."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacker.analytic import Analytic
from attacker.analytic_layers import ConvOps
from attacker.api import ATTACKS, AttackConfig, Observation, compute_gradients, create_attack
from attacker.batched import reconstruct_many
from attacker.metrics import psnr
from gradleak.core.models import create_model, init_dlg_uniform

CONFIG = AttackConfig(max_iters=5, seed=3)
TARGET_DB = 30.0


def _colour_crops(count: int, size: int = 32) -> torch.Tensor:
    """(count, 3, size, size) in [0, 1]: 96-px crops of scikit-learn's sample photos, downscaled."""
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(p, dtype=np.float32) / 255.0 for p in load_sample_images().images]
    rng = np.random.default_rng(0)
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - 96), rng.integers(0, photo.shape[1] - 96)
        crops.append(photo[y:y + 96, x:x + 96].transpose(2, 0, 1))
    return F.interpolate(torch.from_numpy(np.stack(crops)), size=(size, size), mode="area").clamp(0, 1)


def _observe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: int = 10) -> Observation:
    return Observation(gradients=compute_gradients(model, x, y), batch_size=x.shape[0],
                       input_shape=tuple(x.shape[1:]), num_classes=classes)


def _assert_recovered(recon, x: torch.Tensor, y: torch.Tensor) -> None:
    assert psnr(recon.images[0], x[0]) >= TARGET_DB
    assert recon.labels.tolist() == y.tolist()
    assert recon.images.shape == x.shape and recon.labels.dtype == torch.int64


def test_registered_and_created_with_a_config():
    assert "analytic" in ATTACKS
    attack = create_attack("analytic", CONFIG)
    assert isinstance(attack, Analytic) and attack.config is CONFIG


@pytest.mark.parametrize("index", [0, 7, 42])
def test_recovers_batch1_digit(digits, dlg_lenet, make_observation, index):
    images, labels = digits
    x, y = images[index:index + 1], labels[index:index + 1]
    recon = create_attack("analytic", CONFIG).reconstruct(dlg_lenet, make_observation(dlg_lenet, x, y))
    _assert_recovered(recon, x, y)
    stats = recon.stats
    assert stats["attack"] == "analytic" and stats["label_source"] == "analytic"
    assert stats["stop_reason"] == "analytic" and stats["polished_steps"] == 0  # no polish needed
    assert stats["diverged"] is False and stats["device"] == "cpu"
    assert [layer["name"] for layer in stats["layers"]] == [
        "classifier", "features.4", "features.2", "features.0"]
    assert all(layer["converged"] for layer in stats["layers"])
    assert stats["relative_grad_distance"] <= 1e-5
    assert stats["seconds"] >= stats["analytic_seconds"] > 0


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_recovers_32px_colour_crop_on_dlg_lenet(index):
    x = _colour_crops(4)[index:index + 1]
    y = torch.tensor([index % 10])
    model = init_dlg_uniform(create_model("lenet", in_channels=3, num_classes=10, image_size=32),
                             torch.Generator().manual_seed(index))
    recon = create_attack("analytic", AttackConfig(seed=index)).reconstruct(model, _observe(model, x, y))
    _assert_recovered(recon, x, y)
    assert recon.stats["cg_iterations"] > 0


def test_recovers_mlp_input_in_closed_form(digits, make_observation):
    images, labels = digits
    x, y = images[3:4], labels[3:4]
    model = create_model("mlp", in_channels=1, num_classes=10, image_size=16)
    recon = create_attack("analytic", CONFIG).reconstruct(model, make_observation(model, x, y))
    _assert_recovered(recon, x, y)
    assert recon.stats["cg_iterations"] == 0  # two linear layers: no solve at all
    assert psnr(recon.images[0], x[0]) >= 60.0


def test_tanh_and_identity_chain_with_dilation_and_groups():
    """Activations other than sigmoid, a conv with no activation, dilation, groups, no bias."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(12, 12, 3, padding=2, dilation=2, groups=3, bias=False),
        nn.Sigmoid(),
        nn.Conv2d(12, 12, 3, padding=1),  # no activation: identity before the classifier
        nn.Flatten(),
        nn.Linear(12 * 16 * 16, 10),
    )
    x = _colour_crops(1, size=16)
    y = torch.tensor([4])
    recon = create_attack("analytic", CONFIG).reconstruct(model, _observe(model, x, y))
    _assert_recovered(recon, x, y)


def test_polish_runs_when_asked_and_never_worsens(digits, dlg_lenet, make_observation):
    images, labels = digits
    x, y = images[5:6], labels[5:6]
    obs = make_observation(dlg_lenet, x, y)
    short = AttackConfig(max_iters=1, lbfgs_inner=3)
    recon = Analytic(short, polish_above=0.0).reconstruct(dlg_lenet, obs)
    _assert_recovered(recon, x, y)
    stats = recon.stats
    assert stats["polished_steps"] == 1 and stats["evaluations"] > 1
    assert stats["grad_distance"] <= stats["analytic_grad_distance"]


def test_polish_finishes_an_underdetermined_layer():
    """A convolution with fewer equations than unknowns is flagged; L-BFGS completes it."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1), nn.Tanh(),
        nn.Conv2d(12, 12, 3, padding=2, dilation=2, groups=3, bias=False), nn.Sigmoid(),
        nn.Conv2d(12, 4, 3, padding=1),  # 4*16*16 + 4*12*9 equations, 12*16*16 unknowns
        nn.Flatten(), nn.Linear(4 * 16 * 16, 10),
    )
    x, y = _colour_crops(1, size=16), torch.tensor([4])
    recon = create_attack("analytic", AttackConfig(max_iters=10)).reconstruct(
        model, _observe(model, x, y))
    _assert_recovered(recon, x, y)
    stats = recon.stats
    assert [layer["determined"] for layer in stats["layers"]] == [True, False, True, True]
    assert stats["analytic_grad_distance"] > stats["grad_distance"]
    assert stats["polished_steps"] >= 1 and stats["stop_reason"] == "converged"


def test_callback_sees_the_analytic_image_and_can_stop(digits, dlg_lenet, make_observation):
    images, labels = digits
    x, y = images[:1], labels[:1]
    seen: list[tuple[int, tuple[int, ...], float]] = []

    def stop(iteration: int, current: torch.Tensor) -> bool:
        assert 0.0 <= current.min() and current.max() <= 1.0
        seen.append((iteration, tuple(current.shape), psnr(current[0], x[0])))
        return True

    recon = Analytic(CONFIG, polish_above=0.0).reconstruct(
        dlg_lenet, make_observation(dlg_lenet, x, y), callback=stop)
    assert [(i, s) for i, s, _ in seen] == [(0, (1, 1, 16, 16))] and seen[0][2] >= TARGET_DB
    assert recon.stats["stop_reason"] == "callback" and recon.stats["polished_steps"] == 0


def test_leaves_the_model_untouched(digits, dlg_lenet, make_observation):
    images, labels = digits
    obs = make_observation(dlg_lenet, images[:1], labels[:1])
    dlg_lenet.eval()
    before = {k: v.clone() for k, v in dlg_lenet.state_dict().items()}
    Analytic(CONFIG, polish_above=0.0).reconstruct(dlg_lenet, obs)  # polish included
    after = dlg_lenet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in dlg_lenet.parameters()) and not dlg_lenet.training


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                       nn.Linear(4 * 16 * 16, 10)), "cannot invert ReLU"),
        (nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Sigmoid(), nn.Flatten(),
                       nn.Linear(4 * 14 * 14, 10)), "cannot invert BatchNorm2d"),
        (nn.Sequential(nn.Flatten(), nn.Linear(256, 10, bias=False)), "bias on the final"),
        (nn.Sequential(nn.Flatten(), nn.Linear(256, 10), nn.Sigmoid()), "final nn.Linear"),
    ],
)
def test_refuses_unsupported_models(digits, make_observation, model, message):
    images, labels = digits
    with pytest.raises(ValueError, match=message):
        create_attack("analytic").reconstruct(model, make_observation(model, images[:1], labels[:1]))


class _Residual(nn.Module):
    """Conv + linear modules, but a forward with a skip connection the chain does not have."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.act = nn.Sigmoid()
        self.fc = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((x + self.act(self.conv(x))).flatten(1))


def test_refuses_a_forward_that_is_not_the_chain(digits, make_observation):
    images, labels = digits
    model = _Residual()
    with pytest.raises(ValueError, match="not the plain chain"):
        create_attack("analytic").reconstruct(model, make_observation(model, images[:1], labels[:1]))


def test_refuses_non_finite_gradients_and_optimised_labels(digits, dlg_lenet, make_observation):
    images, labels = digits
    obs = make_observation(dlg_lenet, images[:1], labels[:1])
    poisoned = [g.clone() for g in obs.gradients]
    poisoned[2][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        create_attack("analytic").reconstruct(
            dlg_lenet, dataclasses.replace(obs, gradients=tuple(poisoned)))
    with pytest.raises(ValueError, match="optimised"):
        create_attack("analytic", AttackConfig(label_recovery="optimised")).reconstruct(dlg_lenet, obs)


def test_reconstruct_many_matches_one_by_one(digits, make_observation):
    images, labels = digits
    models = [init_dlg_uniform(create_model("lenet", in_channels=1, num_classes=10, image_size=16),
                               torch.Generator().manual_seed(s)) for s in (1, 2, 3)]
    obs = [make_observation(m, images[i:i + 1], labels[i:i + 1]) for i, m in enumerate(models)]
    many = reconstruct_many("analytic", models, obs, CONFIG)
    for i, (model, recon) in enumerate(zip(models, many, strict=True)):
        single = create_attack("analytic", CONFIG).reconstruct(model, obs[i])
        # Same algorithm and stopping per problem; only matmul summation order may differ.
        assert torch.allclose(recon.images, single.images, rtol=0.0, atol=1e-5)
        assert recon.stats["cg_iterations"] == single.stats["cg_iterations"]
        assert recon.stats["stacked"] == 3
        _assert_recovered(recon, images[i:i + 1], labels[i:i + 1])


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_operators_are_adjoint_and_the_patch_form_matches(stride):
    """<A x, y> = <x, A^T y> for both constraints; the unfold form equals the conv form."""
    g = torch.Generator().manual_seed(stride)
    conv = nn.Conv2d(3, 5, 5, stride=stride, padding=2).double()
    x = torch.rand((1, 3, 11, 11), generator=g, dtype=torch.float64)
    ops = ConvOps.of(conv, tuple(x.shape), torch.float64)
    out = ops.forward(x)
    y, delta = (torch.randn(out.shape, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.randn(conv.weight.shape, generator=g, dtype=torch.float64)
    s2 = torch.rand(out.shape, generator=g, dtype=torch.float64)
    assert torch.allclose((out * y).sum(), (x * ops.forward_adjoint(y)).sum())
    assert torch.allclose((ops.gradient(x, delta) * w).sum(), (x * ops.gradient_adjoint(w, delta)).sum())
    by_convs = 0.3 * ops.forward_adjoint(s2 * out) + 2.0 * ops.gradient_adjoint(
        ops.gradient(x, delta), delta)
    assert torch.allclose(ops.normal_operator(0.3, s2, 2.0, delta)(x), by_convs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_analytic_runs_on_cuda():
    x = _colour_crops(1).cuda()
    y = torch.tensor([3], device="cuda")
    model = init_dlg_uniform(create_model("lenet", in_channels=3, num_classes=10, image_size=32),
                             torch.Generator().manual_seed(0)).cuda()
    recon = create_attack("analytic", CONFIG).reconstruct(model, _observe(model, x, y))
    assert recon.images.is_cuda and recon.stats["device"].startswith("cuda")
    _assert_recovered(recon, x, y)
