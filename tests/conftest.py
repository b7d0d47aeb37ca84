"""Shared fixtures: offline digits, a small LeNet, and (for integration tests) one Ray session."""

from __future__ import annotations

import os

# Ray swaps 127.0.0.1 for the machine's outward IP when a driver connects to a cluster;
# our test servers bind loopback only, so keep Ray on loopback (set before ray is imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from gradleak.core.models import create_model, init_dlg_uniform
from gradleak.data import Dataset, load_dataset


@pytest.fixture(scope="session")
def digits_data() -> Dataset:
    return load_dataset("digits", image_size=16)


@pytest.fixture
def lenet() -> torch.nn.Module:
    model = create_model("lenet", in_channels=1, num_classes=10, image_size=16)
    return init_dlg_uniform(model, torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """One three-node Ray cluster on 127.0.0.1 for the whole session (start-up costs seconds).

    The second node is a plain CPU node, so honest peers spread over two nodes and gossip
    crosses them; the third declares a GPU and the custom resource `attacker`, as a
    cluster's GPU node would, so placement is tested without a GPU (Ray's resources are
    logical).
    """
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.add_node(num_cpus=1, num_gpus=1, resources={"attacker": 1}, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


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
