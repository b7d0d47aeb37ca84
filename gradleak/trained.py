"""A LeNet trained on digits to held-out accuracy >= 90%, for attack benchmarks and tests.

Attacks are usually measured at initialisation, where gradients are large and
informative; a model that has learned gives small gradients on the samples it
classifies well. `trained_lenet` gives the latter quickly (seconds, Adam, full
16x16 digits), seeded and cached in-process, so every benchmark and test attacks
the same weights. The held-out split is returned too: attacked images come from it,
so the model has not memorised them (a new client's private data).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gradleak.core.models import create_model, init_model
from gradleak.data import load_dataset, split

TARGET_ACCURACY = 0.90


@dataclass(frozen=True)
class Trained:
    """A trained model and the data it was judged on."""

    model: nn.Module  # the LeNet with its trained weights (no dropout or BatchNorm)
    accuracy: float  # on the held-out images below
    steps: int  # Adam steps taken
    test_images: torch.Tensor  # (N, 1, 16, 16) held out, never trained on
    test_labels: torch.Tensor  # (N,)


@functools.lru_cache(maxsize=8)
def _train(init: str, seed: int, max_steps: int) -> Trained:
    data = load_dataset("digits", image_size=16)
    (train,), test = split(data, 1, test_fraction=0.2, seed=seed)
    x, y = torch.from_numpy(train.images), torch.from_numpy(train.labels)
    tx, ty = torch.from_numpy(test.images), torch.from_numpy(test.labels)
    model = create_model("lenet", in_channels=1, num_classes=data.num_classes, image_size=16)
    init_model(model, init, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    accuracy, step = 0.0, 0
    # Check every 25 steps and stop at the target: just trained enough, not converged,
    # which is the regime where a FedAvg client still sends informative updates.
    for step in range(1, max_steps + 1):
        pick = torch.randint(0, len(y), (64,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x[pick]), y[pick]).backward()
        optimizer.step()
        if step % 25 == 0:
            with torch.no_grad():
                accuracy = float((model(tx).argmax(dim=1) == ty).float().mean())
            if accuracy >= TARGET_ACCURACY + 0.02:
                break
    if accuracy < TARGET_ACCURACY:
        raise RuntimeError(f"LeNet ({init} init, seed {seed}) reached only {accuracy:.1%} "
                           f"held-out accuracy in {max_steps} steps")
    model.requires_grad_(True)
    return Trained(model, accuracy, step, tx, ty)


def trained_lenet(init: str = "dlg", seed: int = 0, max_steps: int = 3000) -> Trained:
    """The LeNet of `init` ("sigmoid", "dlg", "default") trained on digits to >= 90%.

    Cached per (init, seed, max_steps); the model is a fresh copy on every call, so a
    caller may change it. RuntimeError if the target is not reached in max_steps.
    """
    cached = _train(init, seed, max_steps)
    return Trained(copy.deepcopy(cached.model), cached.accuracy, cached.steps,
                   cached.test_images, cached.test_labels)


def adam_steps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, *,
               lr: float = 0.005, batch_size: int = 32, seed: int = 0) -> nn.Module:
    """`model` after `steps` Adam steps on random batches of (images, labels), the
    peers' optimiser setting by default: a model part-way through training."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(0, len(labels), (batch_size,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(images[pick]), labels[pick]).backward()
        optimizer.step()
    return model
