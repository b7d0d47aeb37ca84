"""Dataset loading: the offline default and the real torchvision loader on files the user has."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from gradleak.data import DATASETS, load_dataset


def _write_idx(path: Path, array: np.ndarray) -> None:
    # The MNIST idx format: magic (0, 0, dtype 0x08 = ubyte, ndim), big-endian dims, raw bytes.
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_through_torchvision_from_local_files(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 28, 28))
    labels = rng.integers(0, 10, size=30)
    _write_idx(raw / "train-images-idx3-ubyte", images)
    _write_idx(raw / "train-labels-idx1-ubyte", labels)
    _write_idx(raw / "t10k-images-idx3-ubyte", images[:5])
    _write_idx(raw / "t10k-labels-idx1-ubyte", labels[:5])
    d = load_dataset("mnist", data_root=str(tmp_path))
    assert d.images.shape == (30, 1, 28, 28) and d.num_classes == 10
    assert np.allclose(d.images[3, 0], images[3] / 255.0) and np.array_equal(d.labels, labels)
    assert load_dataset("mnist", data_root=str(tmp_path), image_size=16).images.shape == (30, 1, 16, 16)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100"])
def test_torchvision_sets_never_download(name: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_dataset(name, data_root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="needs --data-root"):
        load_dataset(name)
    assert not any(tmp_path.iterdir())  # nothing was fetched or created


def test_digits_default_and_registry() -> None:
    d = load_dataset("digits")
    assert d.images.shape[1:] == (1, 16, 16) and d.images.dtype == np.float32
    assert 0.0 <= d.images.min() and d.images.max() <= 1.0 and set(np.unique(d.labels)) == set(range(10))
    assert {"digits", "mnist", "cifar10", "cifar100"} <= set(DATASETS)
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        load_dataset("svhn")
