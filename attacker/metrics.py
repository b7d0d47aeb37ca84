"""Scoring a reconstruction against the truth: MSE, PSNR, SSIM, label accuracy.

Pure numpy/scipy (float64). Only the evaluator calls these; attacks never see truth.
SSIM reproduces scikit-image's `structural_similarity(a, b, channel_axis=0,
data_range=1.0)` defaults without importing scikit-image at runtime.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from scipy.optimize import linear_sum_assignment

ArrayLike = np.ndarray | torch.Tensor

# PSNR of identical images is +inf; capping keeps means and Prometheus values finite.
# 100 dB is an MSE of 1e-10 * data_range^2, beyond float32 rounding of [0, 1] pixels.
PSNR_CAP_DB = 100.0
SSIM_WIN = 7  # skimage's default window: 7x7 uniform (gaussian_weights=False)
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _array(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _pair(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x, y = _array(a), _array(b)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {y.shape}")
    return x, y


def mse(a: ArrayLike, b: ArrayLike) -> float:
    """Mean squared error over all elements of two same-shaped arrays."""
    x, y = _pair(a, b)
    return float(np.mean((x - y) ** 2))


def psnr(a: ArrayLike, b: ArrayLike, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of one image pair, capped at PSNR_CAP_DB.

    Equals skimage's `peak_signal_noise_ratio(a, b, data_range=data_range)` below the
    cap; identical images give PSNR_CAP_DB instead of +inf.
    """
    error = mse(a, b)
    if error == 0.0:
        return PSNR_CAP_DB
    return float(min(PSNR_CAP_DB, 10.0 * math.log10(data_range**2 / error)))


def _window_mean(x: np.ndarray) -> np.ndarray:
    """Mean over every full 7x7 window of (C, H, W): (C, H - 6, W - 6).

    skimage filters with reflected borders and then crops (win - 1) / 2 pixels on
    each side; the surviving pixels are exactly the full windows, so no padding.
    """
    return sliding_window_view(x, (SSIM_WIN, SSIM_WIN), axis=(1, 2)).mean(axis=(-2, -1))


def ssim(a: ArrayLike, b: ArrayLike, data_range: float = 1.0) -> float:
    """Mean structural similarity of one (C, H, W) (or (H, W)) image pair.

    Matches skimage's `structural_similarity(a, b, channel_axis=0, data_range=...)`:
    7x7 uniform window, K1=0.01, K2=0.03, sample covariance (N / (N - 1)), mean over
    the border-cropped SSIM map of each channel, then over channels.

    Raises:
        ValueError: if H or W is under 7 pixels (skimage raises too) or shapes differ.
    """
    x, y = _pair(a, b)
    if x.ndim == 2:
        x, y = x[None], y[None]
    if x.ndim != 3:
        raise ValueError(f"expected a (C, H, W) or (H, W) image, got shape {x.shape}")
    if min(x.shape[1:]) < SSIM_WIN:
        raise ValueError(f"SSIM needs H and W >= {SSIM_WIN}, got {x.shape[1:]}")
    n = SSIM_WIN * SSIM_WIN
    cov_norm = n / (n - 1.0)  # unbiased (sample) covariance, skimage's default
    ux, uy = _window_mean(x), _window_mean(y)
    vx = cov_norm * (_window_mean(x * x) - ux * ux)
    vy = cov_norm * (_window_mean(y * y) - uy * uy)
    vxy = cov_norm * (_window_mean(x * y) - ux * uy)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return float(ssim_map.mean(axis=(1, 2)).mean())


def label_accuracy(pred: ArrayLike, true: ArrayLike) -> float:
    """Fraction of positions where the predicted label equals the true one."""
    p, t = _array(pred).ravel(), _array(true).ravel()
    if p.shape != t.shape or p.size == 0:
        raise ValueError(f"need equally many labels, at least one: {p.size} vs {t.size}")
    return float(np.mean(p == t))


def match_batch(recon: ArrayLike, truth: ArrayLike) -> np.ndarray:
    """Pair reconstructions with truths by minimum total MSE (optimal assignment).

    A batch gradient is a sum over samples, so reconstructions come in no
    particular order; scoring after matching makes the score order-free.

    Args:
        recon: (B, ...) reconstructed images.
        truth: (B, ...) true images.

    Returns:
        perm (B,) int64 such that recon[perm[j]] is matched with truth[j].
    """
    r, t = _pair(recon, truth)
    if r.ndim < 2 or r.shape[0] == 0:
        raise ValueError(f"expected a non-empty (B, ...) batch, got shape {r.shape}")
    r, t = r.reshape(r.shape[0], -1), t.reshape(t.shape[0], -1)
    cost = ((t[:, None, :] - r[None, :, :]) ** 2).mean(axis=-1)  # (B_truth, B_recon)
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(t.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm


def score_batch(
    recon_images: ArrayLike,
    recon_labels: ArrayLike,
    true_images: ArrayLike,
    true_labels: ArrayLike,
    data_range: float = 1.0,
) -> dict[str, Any]:
    """Score a reconstructed batch against the truth after optimal matching.

    Args:
        recon_images, true_images: (B, C, H, W).
        recon_labels, true_labels: (B,).

    Returns:
        psnr / ssim / mse: per-image lists in truth order; mean_psnr, mean_ssim,
        mean_mse; label_accuracy of the matched labels; permutation (list of int).

    Raises:
        ValueError: on mismatched shapes or non-finite reconstructed pixels.
    """
    r_img, t_img = _pair(recon_images, true_images)
    if r_img.ndim != 4:
        raise ValueError(f"expected (B, C, H, W) images, got shape {r_img.shape}")
    if not np.isfinite(r_img).all():
        raise ValueError("reconstructed images contain non-finite values")
    perm = match_batch(r_img, t_img)
    r_img = r_img[perm]
    psnrs = [psnr(r, t, data_range) for r, t in zip(r_img, t_img, strict=True)]
    ssims = [ssim(r, t, data_range) for r, t in zip(r_img, t_img, strict=True)]
    mses = [mse(r, t) for r, t in zip(r_img, t_img, strict=True)]
    return {
        "psnr": psnrs,
        "ssim": ssims,
        "mse": mses,
        "mean_psnr": float(np.mean(psnrs)),
        "mean_ssim": float(np.mean(ssims)),
        "mean_mse": float(np.mean(mses)),
        "label_accuracy": label_accuracy(_array(recon_labels).ravel()[perm], true_labels),
        "permutation": perm.tolist(),
    }
