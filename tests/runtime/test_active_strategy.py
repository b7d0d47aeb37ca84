"""The crafted target of the live strategy: the imprint on a ReLU MLP, a fresh init elsewhere."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from attacker.api import compute_gradients
from attacker.imprint import read_imprint
from attacker.metrics import psnr
from gradleak.core.models import create_model
from gradleak.runtime.active_strategy import crafted_target


def _node(arch: str, shard: np.ndarray) -> SimpleNamespace:
    build = lambda: create_model(arch, in_channels=1, num_classes=10, image_size=16)
    return SimpleNamespace(build_model=build, spec=SimpleNamespace(model_seed=4, shard_images=shard))


def test_crafted_target_is_the_imprint_on_a_relu_mlp_and_reads_a_sample() -> None:
    rng = np.random.default_rng(0)
    shard = rng.random((300, 1, 16, 16)).astype(np.float32) * rng.random((300, 1, 1, 1)).astype(np.float32)
    target = crafted_target(_node("relu-mlp", shard))
    model = create_model("relu-mlp", in_channels=1, num_classes=10, image_size=16)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(target[n])
    x = torch.from_numpy(shard[:1])
    rec = read_imprint(model, compute_gradients(model, x, torch.tensor([3])), 1, (1, 16, 16))
    assert psnr(rec.images[0].numpy(), x[0].numpy()) >= 60
    lenet = crafted_target(_node("lenet", shard))
    assert all(float(t.abs().max()) <= 0.5 for t in lenet.values())  # DLG uniform(-0.5, 0.5)
