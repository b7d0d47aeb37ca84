"""Label counts of a batch from the last linear layer's gradient and the model's own weights.

Our implementation of the idea of iLRG (Ma et al., ICLR 2023): move the last layer's
gradient into logit space with the known weights, estimate the batch's predicted
class mass there, and read the counts off the bias gradient.

With logits z_n = W a_n + b, softmax p_n and the mean cross-entropy over B samples,
the bias gradient is g = (1/B) sum_n (p_n - y_n) and the weight gradient
dW = (1/B) sum_n (p_n - y_n) a_n^T. Hence, exactly,

    c = P - B g,   P = sum_n p_n  (the batch's predicted mass per class),
    M = B (dW W^T + g b^T) = sum_n (p_n - y_n) z_n^T   (K x K, known).

Only P is unknown. If every sample had the mean logit zbar, M would be B g zbar^T, so
zbar is the least-squares fit of M's rows onto B g, and P ~ B softmax(zbar). The
class offsets (row i of M also holds sum over class i of z_n - zbar) bias that fit;
they grow with a class's count, so the fit is reweighted by 1 / c_i^2 with the
counts of the previous pass (a few passes). Counts are then the integers nearest
P - B g, summing to B and at least -B g_i (P_i >= 0).

Where it holds: while the samples' logits stay close to their mean, i.e. on models
at or near initialisation (benchmarks/batch_labels.py, 20 random digit batches per
row: all counts exact at B = 8, 32 and 64 on the DLG- and PyTorch-initialised LeNet,
14/20 at B = 64 on the sigmoid-initialised one). Where it does not: the last layer's
gradient fixes P only up to K free directions (the mean logit; the class offsets
above are what the fit must guess), so once a model has learnt (class-dependent
logits, confident predictions) the estimate drifts: a confidently classified sample
adds almost nothing to any gradient, and no method reading this layer alone can count
it. Needs the last layer's bias; B is public.
"""

from __future__ import annotations

import torch

REWEIGHT_PASSES = 5  # measured: 20 passes gained 1 batch of 20 over 5 (colour DLG LeNet, B = 32)


def logit_moments(
    weight: torch.Tensor,
    bias: torch.Tensor,
    weight_grad: torch.Tensor,
    bias_grad: torch.Tensor,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(M (K, K), B g (K,)) in float64: sum_n (p_n - y_n) z_n^T and sum_n (p_n - y_n).

    Args:
        weight, bias: the last linear layer's (K, F) weight and (K,) bias.
        weight_grad, bias_grad: their gradients in the update.
        batch_size: B.

    Raises:
        ValueError: a bad batch size, misshaped or non-finite tensors.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if weight.dim() != 2 or weight_grad.shape != weight.shape or bias.shape != (weight.shape[0],) \
            or bias_grad.shape != bias.shape:
        raise ValueError(f"last layer {tuple(weight.shape)}/{tuple(bias.shape)} does not match its "
                         f"gradient {tuple(weight_grad.shape)}/{tuple(bias_grad.shape)}")
    weight, bias, w_grad, b_grad = (t.detach().to(torch.float64).cpu()
                                    for t in (weight, bias, weight_grad, bias_grad))
    if not all(bool(torch.isfinite(t).all()) for t in (weight, bias, w_grad, b_grad)):
        raise ValueError("last-layer weights or gradient not finite")
    moments = batch_size * (w_grad @ weight.T + b_grad[:, None] * bias[None, :])  # (K, K)
    return moments, batch_size * b_grad


def estimate_class_mass(
    moments: torch.Tensor, scaled_bias: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """P (K,), the batch's summed predicted probability per class (module docstring).

    Args:
        moments: M from `logit_moments`.
        scaled_bias: B g from `logit_moments`.
        batch_size: B.

    Raises:
        ValueError: on a bias gradient without signal (all zero).
    """
    if not bool(torch.any(scaled_bias != 0)):
        raise ValueError("last-layer bias gradient is all zero: no label signal")
    weights = torch.ones_like(scaled_bias)
    for _ in range(REWEIGHT_PASSES + 1):  # the first pass is the plain least squares
        mean_logit = _fit(moments, scaled_bias, weights)
        counts = batch_size * torch.softmax(mean_logit, 0) - scaled_bias
        weights = counts.clamp(min=0.5) ** 2  # a class's offset term grows with its count
    return batch_size * torch.softmax(mean_logit, 0)


def _fit(moments: torch.Tensor, scaled_bias: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """zbar minimising sum_i |M_i - B g_i zbar|^2 / w_i (K,)."""
    coeff = scaled_bias / weights
    return (moments * coeff[:, None]).sum(0) / (scaled_bias * coeff).sum()


def round_counts(estimate: torch.Tensor, lower: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The int64 counts nearest `estimate` that sum to `batch_size` and are >= `lower`.

    Raises:
        ValueError: when the lower bounds alone exceed the batch.
    """
    floor = lower.to(torch.int64)
    if int(floor.sum()) > batch_size:
        raise ValueError(f"lower bounds sum to {int(floor.sum())} > batch size {batch_size}")
    target = torch.maximum(estimate, floor.to(estimate.dtype))
    counts = torch.maximum(torch.round(target).to(torch.int64), floor)
    while int(counts.sum()) < batch_size:  # one more where the estimate exceeds the count most
        counts[torch.argmax(target - counts)] += 1
    while int(counts.sum()) > batch_size:  # one fewer where it falls shortest, above its floor
        slack = torch.where(counts > floor, target - counts, torch.full_like(target, float("inf")))
        counts[torch.argmin(slack)] -= 1
    return counts


def logit_label_counts(
    weight: torch.Tensor,
    bias: torch.Tensor,
    weight_grad: torch.Tensor,
    bias_grad: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """(K,) int64 label counts of a B-sample update, summing to B (module docstring).

    Args:
        weight, bias: the last linear layer's weight and bias (known to the attacker).
        weight_grad, bias_grad: their gradients in the update.
        batch_size: B, from the update's public header.

    Raises:
        ValueError: see `logit_moments`, `estimate_class_mass` and `round_counts`.
    """
    moments, scaled_bias = logit_moments(weight, bias, weight_grad, bias_grad, batch_size)
    mass = estimate_class_mass(moments, scaled_bias, batch_size)
    # c_i = P_i - B g_i with P_i > 0: a class is present at least -B g_i times.
    lower = torch.ceil(-scaled_bias - 1e-3).clamp(min=0)
    return round_counts(mass - scaled_bias, lower, batch_size).to(weight_grad.device)
