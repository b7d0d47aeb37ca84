"""Scoring agrees with scikit-image and is independent of reconstruction order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from attacker.metrics import (
    PSNR_CAP_DB,
    label_accuracy,
    match_batch,
    mse,
    psnr,
    score_batch,
    ssim,
)


def _pair(seed: int, shape: tuple[int, ...], noise: float) -> tuple[np.ndarray, np.ndarray]:
    """A random image in [0, 1] and a noisy copy, clipped back to [0, 1]."""
    rng = np.random.default_rng(seed)
    truth = rng.random(shape)
    return truth, np.clip(truth + noise * rng.standard_normal(shape), 0.0, 1.0)


@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 16, 16), (1, 32, 32), (3, 32, 32)])
@pytest.mark.parametrize("noise", [0.02, 0.2, 1.0])
def test_psnr_and_ssim_match_skimage(shape, noise):
    for seed in range(3):
        truth, test = _pair(seed, shape, noise)
        expected_psnr = peak_signal_noise_ratio(truth, test, data_range=1.0)
        expected_ssim = structural_similarity(truth, test, channel_axis=0, data_range=1.0)
        assert psnr(test, truth) == pytest.approx(expected_psnr, abs=1e-3)
        assert ssim(test, truth) == pytest.approx(expected_ssim, abs=1e-3)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    channels=st.sampled_from([1, 3]),
    height=st.integers(7, 24),
    width=st.integers(7, 24),
)
def test_ssim_matches_skimage_on_any_shape(seed, channels, height, width):
    truth, test = _pair(seed, (channels, height, width), 0.3)
    expected = structural_similarity(truth, test, channel_axis=0, data_range=1.0)
    assert ssim(torch.tensor(test, dtype=torch.float32), truth) == pytest.approx(expected, abs=1e-3)


def test_ssim_of_2d_image_matches_skimage_grayscale():
    truth, test = _pair(7, (20, 20), 0.1)
    assert ssim(test, truth) == pytest.approx(
        structural_similarity(truth, test, data_range=1.0), abs=1e-3
    )


def test_identical_images_score_perfectly():
    truth, _ = _pair(1, (3, 16, 16), 0.0)
    assert psnr(truth, truth) == PSNR_CAP_DB
    assert ssim(truth, truth) == pytest.approx(1.0, abs=1e-12)
    assert mse(truth, truth) == 0.0


def test_psnr_is_capped_not_infinite():
    truth = np.full((1, 16, 16), 0.5)
    assert psnr(truth + 1e-9, truth) == PSNR_CAP_DB
    assert psnr(truth + 0.1, truth) == pytest.approx(20.0)


def test_ssim_rejects_images_under_window_and_shape_mismatch():
    with pytest.raises(ValueError, match=">= 7"):
        ssim(np.zeros((1, 6, 16)), np.zeros((1, 6, 16)))
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(np.zeros((1, 16, 16)), np.zeros((1, 16, 17)))


def test_match_batch_recovers_shuffled_permutation():
    rng = np.random.default_rng(0)
    truth = rng.random((6, 1, 16, 16))
    order = np.array([4, 0, 5, 2, 1, 3])
    recon = np.clip(truth[order] + 0.05 * rng.standard_normal(truth.shape), 0, 1)
    perm = match_batch(recon, truth)
    np.testing.assert_array_equal(order[perm], np.arange(6))


def test_score_batch_is_order_free():
    rng = np.random.default_rng(1)
    truth = rng.random((4, 3, 16, 16))
    labels = np.array([3, 1, 4, 1])
    noisy = np.clip(truth + 0.03 * rng.standard_normal(truth.shape), 0, 1)
    straight = score_batch(noisy, labels, truth, labels)
    order = np.array([2, 3, 0, 1])
    shuffled = score_batch(torch.tensor(noisy[order]), torch.tensor(labels[order]), truth, labels)
    assert shuffled["psnr"] == pytest.approx(straight["psnr"])
    assert shuffled["ssim"] == pytest.approx(straight["ssim"])
    assert shuffled["label_accuracy"] == 1.0
    assert shuffled["mean_psnr"] == pytest.approx(np.mean(straight["psnr"]))
    assert order[shuffled["permutation"]].tolist() == [0, 1, 2, 3]


def test_score_batch_counts_wrong_labels_and_rejects_nan():
    truth = np.random.default_rng(2).random((2, 1, 16, 16))
    score = score_batch(truth, np.array([0, 9]), truth, np.array([0, 1]))
    assert score["label_accuracy"] == 0.5
    assert score["mean_ssim"] == pytest.approx(1.0)
    broken = truth.copy()
    broken[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        score_batch(broken, np.array([0, 1]), truth, np.array([0, 1]))


def test_label_accuracy():
    assert label_accuracy(torch.tensor([1, 2, 3]), np.array([1, 0, 3])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        label_accuracy([], [])
