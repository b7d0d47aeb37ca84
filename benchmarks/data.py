"""Benchmark images that ship with scikit-learn: 32x32 colour crops of its two sample photos."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def colour_crops(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """(n, 3, size, size) float32 in [0, 1]: random 96-px crops of china.jpg / flower.jpg, downscaled."""
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(p, dtype=np.float32) / 255.0 for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        photo = photos[i % len(photos)]
        y = rng.integers(0, photo.shape[0] - 96)
        x = rng.integers(0, photo.shape[1] - 96)
        crops.append(photo[y:y + 96, x:x + 96].transpose(2, 0, 1))
    t = torch.from_numpy(np.stack(crops))
    return F.interpolate(t, size=(size, size), mode="area").clamp(0, 1).numpy()
