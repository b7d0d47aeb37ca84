"""The analytic attack on colour batches whose labels repeat: the closed-form layer path."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attacker.analytic import Analytic
from attacker.analytic_joint import invert_layers
from attacker.analytic_layers import parse_chain
from attacker.api import AttackConfig, Observation, compute_gradients
from attacker.metrics import match_batch, psnr
from gradleak.core.models import create_model, init_model

SIZE = 16


@pytest.fixture(scope="module")
def colour() -> torch.Tensor:
    """Eight 16x16 colour crops of scikit-learn's two bundled photos (not the digits)."""
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(p, dtype=np.float32) / 255.0 for p in load_sample_images().images]
    rng = np.random.default_rng(5)
    out = []
    for i in range(8):
        pic = photos[i % 2]
        y, x = int(rng.integers(0, pic.shape[0] - 96)), int(rng.integers(0, pic.shape[1] - 96))
        patch = torch.from_numpy(pic[y:y + 96, x:x + 96].transpose(2, 0, 1).copy())[None]
        out.append(F.interpolate(patch, size=(SIZE, SIZE), mode="area")[0])
    return torch.stack(out).clamp(0.0, 1.0)


def _lenet(seed: int = 0) -> torch.nn.Module:
    model = create_model("lenet", in_channels=3, num_classes=10, image_size=SIZE)
    return init_model(model, "sigmoid", seed)


def _observe(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Observation:
    return Observation(gradients=compute_gradients(model, x, y), batch_size=x.shape[0],
                       input_shape=tuple(x.shape[1:]), num_classes=10)


def _scores(images: torch.Tensor, truth: torch.Tensor) -> list[float]:
    perm = match_batch(images.numpy(), truth.numpy())
    return [psnr(images[int(perm[j])], truth[j]) for j in range(truth.shape[0])]


def test_batch_of_four_with_a_repeated_label_above_30_db(colour):
    model = _lenet()
    x, y = colour[:4], torch.tensor([2, 2, 5, 7])
    recon = Analytic(AttackConfig(time_budget_s=10.0)).reconstruct(model, _observe(model, x, y))
    assert recon.labels.tolist() == [2, 2, 5, 7]
    scores = _scores(recon.images, x)
    assert min(scores) > 30.0, scores  # the previous feature-inversion path: ~30 dB mean
    assert recon.stats["batch_method"] == "layers" and recon.stats["stop_reason"] == "analytic"
    assert recon.stats["solved_relative_distance"] < 1e-6
    again = Analytic(AttackConfig(time_budget_s=10.0)).reconstruct(model, _observe(model, x, y))
    assert torch.equal(again.images, recon.images)  # deterministic


def test_layers_invert_exactly_from_the_true_features(colour):
    model = _lenet(1).double()
    x, y = colour[4:8].double(), torch.tensor([1, 1, 1, 6])
    grads = [g.double() for g in compute_gradients(model, x, y)]
    layers = parse_chain(copy.deepcopy(model), (3, SIZE, SIZE))
    with torch.no_grad():
        features = model.features(x).flatten(1)
        probs = torch.softmax(model.classifier(features), dim=1)
    deltas = (probs - F.one_hot(y, 10).double()) / 4
    images, stats = invert_layers(layers, grads, features, deltas @ model.classifier.weight.detach(),
                                  (3, SIZE, SIZE), tol=1e-9, max_iters=5000)
    assert [s["type"] for s in stats] == ["Conv2d"] * 3 and all(s["determined"] for s in stats)
    assert float((images - x).abs().max()) < 1e-3


def test_time_budget_stops_a_batch_and_says_so(colour):
    model = _lenet(2)
    x, y = colour[:8], torch.tensor([0, 0, 0, 3, 3, 5, 8, 9])
    obs = _observe(model, x, y)
    attack = Analytic(AttackConfig(time_budget_s=0.3))
    start = __import__("time").perf_counter()
    recon = attack.reconstruct(model, obs)
    assert __import__("time").perf_counter() - start < 1.5  # budget plus one check's slack
    assert recon.stats["stop_reason"] == "time_budget"
    assert recon.images.shape == x.shape and bool(torch.isfinite(recon.images).all())


def test_expected_seconds_grows_with_the_batch_and_stops_at_the_budget(colour):
    model = _lenet()
    attack = Analytic(AttackConfig(time_budget_s=None))
    costs = [attack.expected_seconds(model, _observe(model, colour[:b], torch.arange(b)))
             for b in (1, 2, 4, 8)]
    assert costs == sorted(costs) and costs[0] < 0.1 < costs[-1]
    capped = Analytic(AttackConfig(time_budget_s=0.5))
    assert capped.expected_seconds(model, _observe(model, colour[:8], torch.arange(8))) == 0.5
    too_big = _observe(model, torch.rand(11, 3, SIZE, SIZE), torch.arange(11) % 10)
    assert attack.expected_seconds(model, too_big) == float("inf")
