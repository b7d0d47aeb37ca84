"""The crafted imprint model: a ReLU MLP whose gradient reads out a batch, directly and through gossip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacker.active import recover_gradient
from attacker.api import compute_gradients
from attacker.gossip_attack import load_flat, unflatten
from attacker.imprint import brightness_thresholds, imprint_weights, is_relu_mlp, read_imprint
from attacker.metrics import score_batch
from gradleak.active_sim import simulate_override
from gradleak.core.graphs import mixing_matrix
from gradleak.core.models import create_model
from gradleak.gossip_sim import flat_parameters, sgd_update

SHAPE = (1, 16, 16)


def _crafted(public: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("relu-mlp", in_channels=1, num_classes=10, image_size=16)
    state = imprint_weights(model, brightness_thresholds(public, 256))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state[n])
    return model


def _psnrs(rec, images, labels) -> list[float]:
    return score_batch(rec.images.numpy(), rec.labels.numpy(), images.numpy(), labels.numpy())["psnr"]


def test_a_batch_of_8_is_read_from_the_imprint_gradient(digits) -> None:
    images, labels = digits
    model = _crafted(images[1000:])  # thresholds from other (public) digits
    got = []
    for j in range(5):
        x, y = images[8 * j:8 * j + 8], labels[8 * j:8 * j + 8]
        got += _psnrs(read_imprint(model, compute_gradients(model, x, y), 8, SHAPE), x, y)
    assert np.mean(np.array(got) >= 30) >= 0.85  # a sample sharing a brightness bin comes out mixed


def test_the_override_to_the_imprint_leaks_a_victims_batch_through_gossip(digits) -> None:
    images, labels = digits
    crafted = _crafted(images[1000:])
    torch.manual_seed(1)
    net = create_model("relu-mlp", in_channels=1, num_classes=10, image_size=16)  # the network's model
    members = ["a", "v1", "v2"]
    graph = {"a": ("v1", "v2"), "v1": ("a",), "v2": ("a",)}
    w = mixing_matrix(graph, members)

    def batch(node: str, step: int):
        i = 8 * (3 * members.index(node) + step)
        return images[i:i + 8], labels[i:i + 8]

    lr = 0.05
    target = flat_parameters(crafted)
    view, _truth = simulate_override(graph, members, w, ["a"], ["v1", "v2"], flat_parameters(net), steps=2, rounds=1,
                            local_update=sgd_update(net, batch, lr), target=target)
    got = []
    for v in ("v1", "v2"):
        victim = load_flat(net, target)
        grad = unflatten(victim, recover_gradient(target, view.half_steps[(v, 2)], lr))
        got += _psnrs(read_imprint(victim, grad, 8, SHAPE), *batch(v, 2))
    assert np.mean(np.array(got) >= 30) >= 0.8


def test_the_imprint_needs_a_relu_mlp_and_ascending_thresholds() -> None:
    lenet = create_model("lenet", in_channels=1, num_classes=10, image_size=16)
    assert not is_relu_mlp(lenet)
    with pytest.raises(ValueError, match="ReLU MLP"):
        imprint_weights(lenet, [0.1])
    mlp = create_model("relu-mlp", in_channels=1, num_classes=10, image_size=16)
    with pytest.raises(ValueError, match="ascending"):
        imprint_weights(mlp, [0.5] * 256)
