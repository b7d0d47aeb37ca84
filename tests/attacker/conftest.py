"""Offline test data for the attack tests: scikit-learn's 8x8 digits upscaled to 16x16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from attacker.api import Observation, compute_gradients
from gradleak.core.models import create_model, init_dlg_uniform

IMAGE_SIZE = 16
NUM_CLASSES = 10


def _load_digits16() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 1, 16, 16) float32 in [0, 1] and (N,) int64 labels."""
    bunch = load_digits()
    images = torch.tensor(bunch.images / 16.0, dtype=torch.float32)[:, None]  # (N, 1, 8, 8)
    images = F.interpolate(
        images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
    ).clamp(0.0, 1.0)  # (N, 1, 16, 16)
    return images, torch.tensor(bunch.target, dtype=torch.int64)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One intra-op thread: these models are tiny, and a second thread only spins
    against whatever else shares the CPU, making timings erratic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, 16, 16) in [0, 1], labels (N,)) from the digits scikit-learn ships."""
    return _load_digits16()


@pytest.fixture
def dlg_lenet() -> nn.Module:
    """The DLG paper's LeNet for 16x16 grayscale digits, uniform(-0.5, 0.5) init, seed 1234."""
    model = create_model("lenet", in_channels=1, num_classes=NUM_CLASSES, image_size=IMAGE_SIZE)
    return init_dlg_uniform(model, torch.Generator().manual_seed(1234))


def observe(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Observation:
    """What a malicious peer receives from an honest one training on (images, labels)."""
    return Observation(
        gradients=compute_gradients(model, images, labels),
        batch_size=images.shape[0],
        input_shape=tuple(images.shape[1:]),
        num_classes=NUM_CLASSES,
    )


@pytest.fixture
def make_observation():
    """The `observe` helper as a fixture, so test modules need not import conftest."""
    return observe
