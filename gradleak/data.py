"""Datasets by name and the seeded split into private shards plus a held-out test set.

`digits` (scikit-learn's bundled handwritten digits) works offline and is the
default. MNIST and CIFAR-10/100 use the real torchvision loaders on files the user
already has under `data_root`; nothing is ever downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Dataset:
    """Images in [0, 1] as float32 (N, C, H, W) and int64 labels (N,)."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)


@dataclass(frozen=True)
class Shard:
    """One peer's private training data."""

    images: np.ndarray
    labels: np.ndarray


Loader = Callable[[str | None], tuple[np.ndarray, np.ndarray, int, int]]
DATASETS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Register a loader returning (images NCHW in [0,1], labels, classes, default size)."""

    def wrap(fn: Loader) -> Loader:
        DATASETS[name] = fn
        return fn

    return wrap


def load_dataset(
    name: str, *, data_root: str | None = None, image_size: int | None = None,
    limit: int | None = None, seed: int = 0,
) -> Dataset:
    """Load a dataset by name, resized to `image_size` and subsampled to `limit` (seeded)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}' (known: {', '.join(sorted(DATASETS))})")
    images, labels, classes, default_size = DATASETS[name](data_root)
    if limit is not None and len(labels) > limit:
        keep = np.sort(np.random.default_rng(seed).permutation(len(labels))[:limit])
        images, labels = images[keep], labels[keep]
    size = image_size or default_size
    if images.shape[-1] != size or images.shape[-2] != size:
        images = _resize(images, size)
    return Dataset(name, images.astype(np.float32), labels.astype(np.int64), classes)


def split(
    data: Dataset, num_shards: int, *, test_fraction: float, seed: int
) -> tuple[list[Shard], Shard]:
    """Shuffle with `seed`, hold out a test set, deal the rest into equal shards."""
    order = np.random.default_rng(seed).permutation(len(data.labels))
    n_test = max(1, round(len(order) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    per = len(train) // num_shards
    if per < 1:
        raise ValueError(f"{len(train)} training samples cannot fill {num_shards} shards")
    shards = [
        Shard(data.images[train[i * per:(i + 1) * per]], data.labels[train[i * per:(i + 1) * per]])
        for i in range(num_shards)
    ]
    return shards, Shard(data.images[test], data.labels[test])


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return out.clamp_(0.0, 1.0).numpy()


@register_dataset("digits")
def _digits(_root: str | None) -> tuple[np.ndarray, np.ndarray, int, int]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8)
    return images, d.target.astype(np.int64), 10, 16


def _torchvision(cls_name: str, classes: int, size: int) -> Loader:
    def load(root: str | None) -> tuple[np.ndarray, np.ndarray, int, int]:
        import torchvision

        if root is None:
            raise FileNotFoundError(f"dataset '{cls_name}' needs --data-root (nothing is downloaded)")
        if not Path(root).is_dir():
            raise FileNotFoundError(f"data root not found: {root}")
        cls = getattr(torchvision.datasets, cls_name)
        try:
            ds = cls(root=root, train=True, download=False)
        except RuntimeError as exc:  # torchvision's "Dataset not found" message
            raise FileNotFoundError(f"{cls_name} files not found under {root}: {exc}") from None
        data = np.asarray(ds.data)
        images = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
        return images.astype(np.float32) / 255.0, np.asarray(ds.targets), classes, size

    return load


DATASETS["mnist"] = _torchvision("MNIST", 10, 28)
DATASETS["cifar10"] = _torchvision("CIFAR10", 10, 32)
DATASETS["cifar100"] = _torchvision("CIFAR100", 100, 32)
