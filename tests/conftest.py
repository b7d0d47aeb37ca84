"""Shared fixtures: offline digits, a small LeNet, and (for integration tests) one Ray session."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from gradleak.data import Dataset, load_dataset
from gradleak.models import create_model, init_dlg_uniform


@pytest.fixture(scope="session")
def digits_data() -> Dataset:
    return load_dataset("digits", image_size=16)


@pytest.fixture
def lenet() -> torch.nn.Module:
    model = create_model("lenet", in_channels=1, num_classes=10, image_size=16)
    return init_dlg_uniform(model, torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the whole test session (worker start-up costs seconds on 2 cores)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available() or os.environ.get("GRADLEAK_GPU_TESTS"):
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
