"""Label counts of a batch from the last layer's gradient plus the attacker's own data.

Why: the logit-moment counts (attacker/label_counts.py) guess the batch's predicted
class mass P from the gradient alone, which holds near initialisation but drifts once
the model has learnt (class-dependent logits). A member of the federation holds its
own training shard, drawn from the same distribution as everyone else's; run through
the current model it tells what a sample of class c adds to the gradient on average.
This is the idea of LLG+ (Wainakh et al. 2022, "impact" per class from auxiliary
data) and ZLG (Geng et al.), here applied to the last layer's full moments.

With logits z_n, softmax p_n and the mean cross-entropy over B samples, each sample
adds s_n = [p_n - y_n, vec((p_n - y_n) z_n^T)] to the observed
S = [B g, M] (M = B (dW W^T + g b^T), as in label_counts.py; without a bias, S = M
with z = W a). Grouped by class, S = sum_c sum_{n in c} s_n, so if the batch's
samples of class c are like the attacker's,

    S ~ sum_c n_c mu_c,   Cov(S) ~ sum_c n_c Sigma_c,   n >= 0 integers, sum n = B,

(mu_c, Sigma_c: the mean and covariance of s over the aux samples of class c; Sigma_c
shrunk towards its diagonal, since a class holds ~20 aux samples for D = K + K^2
entries).

The counts are the integers maximising that Gaussian likelihood times a multinomial
prior (the aux data's class shares; it settles the directions the gradient leaves
free), never below the exact bound c_i >= -B g_i (P_i >= 0): a non-negative least
squares start, rounded, then single moves of one sample from one class to another
while the likelihood improves, also started from the gradient-only counts; the best
start wins (benchmarks/batch_labels.py, docs/benchmarks.md: exact at B = 8-64 on every
untrained digits LeNet and up to 20 Adam steps; not past ~60% accuracy). Where it fails: a class the model predicts with near certainty adds
almost nothing (s ~ 0), so its count rests on the variance term alone; and the aux
shard must cover every class the batch can hold (a class with no aux sample is taken
as absent).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SHRINK = 0.3  # weight of the diagonal in each class covariance (0.1-0.3 measured alike)
FLOOR = 1e-8  # relative ridge on the summed covariance: keeps it invertible
FULL_COVARIANCE_CLASSES = 20  # D = K + K^2 entries: 420 at K = 20
MAX_MOVES = 500  # local-search steps; each moves one sample between two classes


@dataclass(frozen=True)
class LabelPrior:
    """The attacker's own labelled samples (never the attacked batch), for label counts.

    Build with `LabelPrior.from_data`, which checks the input; the statistics are
    taken per call from the model as it is then (`class_statistics`).
    """

    images: torch.Tensor  # (N, *input_shape) float
    labels: torch.Tensor  # (N,) int64 in [0, num_classes)
    num_classes: int

    @classmethod
    def from_data(cls, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> LabelPrior:
        """Check and wrap (images, labels).

        Raises:
            ValueError: empty or mismatched data, non-finite images, labels that are not
                integers in [0, num_classes), or num_classes < 2.
        """
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        images, labels = torch.as_tensor(images), torch.as_tensor(labels)
        if images.dim() < 2 or images.shape[0] == 0:
            raise ValueError(f"aux images must be a non-empty (N, ...) batch, got {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"aux labels {tuple(labels.shape)} do not match {images.shape[0]} images")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"aux labels must be integers, got {labels.dtype}")
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(f"aux labels must lie in [0, {num_classes}), got "
                             f"{int(labels.min())}..{int(labels.max())}")
        if not images.dtype.is_floating_point or not bool(torch.isfinite(images).all()):
            raise ValueError("aux images must be finite floats")
        return cls(images.detach(), labels.detach().to(torch.int64), num_classes)


def class_statistics(
    model: nn.Module, last: nn.Linear, prior: LabelPrior
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean (K, D), shrunk covariance (K, D, D), aux samples per class (K,)) of s.

    Raises:
        ValueError: when the model's output does not have prior.num_classes classes,
            or the aux images do not fit the model.
    """
    if last.out_features != prior.num_classes:
        raise ValueError(f"model has {last.out_features} classes, the aux data {prior.num_classes}")
    try:
        with torch.no_grad():
            logits = model(prior.images.to(last.weight.device)).to(torch.float64).cpu()
    except RuntimeError as exc:
        raise ValueError(f"aux images {tuple(prior.images.shape[1:])} do not fit the model: {exc}") from exc
    if logits.shape != (prior.labels.numel(), prior.num_classes):
        raise ValueError(f"model output {tuple(logits.shape)} for {prior.labels.numel()} aux samples")
    residual = torch.softmax(logits, 1)
    residual[torch.arange(residual.shape[0]), prior.labels] -= 1.0  # p - y (N, K)
    outer = (residual[:, :, None] * logits[:, None, :]).flatten(1)  # (N, K*K)
    samples = torch.cat([residual, outer], 1) if last.bias is not None else outer
    counts = torch.bincount(prior.labels, minlength=prior.num_classes)
    dim = samples.shape[1]
    mean = torch.zeros(prior.num_classes, dim, dtype=torch.float64)
    cov = torch.zeros(prior.num_classes, dim, dim, dtype=torch.float64)
    for c in range(prior.num_classes):
        rows = samples[prior.labels == c]
        if rows.shape[0]:
            mean[c] = rows.mean(0)
            centred = rows - mean[c]
            full = centred.T @ centred / rows.shape[0]
            cov[c] = (1 - SHRINK) * full + SHRINK * torch.diag(torch.diag(full))
    return mean, cov, counts


def observed_terms(
    weight: torch.Tensor, bias: torch.Tensor | None, weight_grad: torch.Tensor,
    bias_grad: torch.Tensor | None, batch_size: int,
) -> torch.Tensor:
    """(D,) the batch's [B g, vec M] (vec M alone without a bias), from the gradient.

    Raises:
        ValueError: misshaped or non-finite tensors, or a bias without its gradient.
    """
    if (bias is None) != (bias_grad is None):
        raise ValueError("the last layer's bias and its gradient must both be given or both absent")
    if weight.dim() != 2 or weight_grad.shape != weight.shape:
        raise ValueError(f"last layer {tuple(weight.shape)} does not match its gradient "
                         f"{tuple(weight_grad.shape)}")
    w, dw = (t.detach().to(torch.float64).cpu() for t in (weight, weight_grad))
    parts = [w, dw]
    moments = batch_size * dw @ w.T  # (K, K) sum (p - y) (W a)^T
    observed = moments.flatten()
    if bias is not None and bias_grad is not None:
        if bias.shape != (weight.shape[0],) or bias_grad.shape != bias.shape:
            raise ValueError(f"bias {tuple(bias.shape)} / gradient {tuple(bias_grad.shape)} misshaped")
        b, db = (t.detach().to(torch.float64).cpu() for t in (bias, bias_grad))
        parts += [b, db]
        moments = moments + batch_size * db[:, None] * b[None, :]  # sum (p - y) z^T
        observed = torch.cat([batch_size * db, moments.flatten()])
    if not all(bool(torch.isfinite(t).all()) for t in parts):
        raise ValueError("last-layer weights or gradient not finite")
    return observed


def prior_label_counts(
    model: nn.Module, last: nn.Linear, weight_grad: torch.Tensor, bias_grad: torch.Tensor | None,
    batch_size: int, prior: LabelPrior, starts: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """(K,) int64 counts summing to `batch_size`, most likely under the aux statistics.

    Args:
        model, last: the attacked model and its last nn.Linear (weights known).
        weight_grad, bias_grad: that layer's gradient in the update (bias_grad None
            when the layer has no bias).
        batch_size: B, from the update's public header.
        prior: the attacker's own labelled data.
        starts: other count vectors to start the search from (e.g. the gradient-only
            counts); the most likely result over all starts is returned.

    Raises:
        ValueError: bad batch size, misshaped or non-finite gradient, aux data that
            does not fit the model.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    observed = observed_terms(last.weight, last.bias, weight_grad, bias_grad, batch_size)
    mean, cov, seen = class_statistics(model, last, prior)
    # Diagonal first (cheap moves, most of the walk), then the full covariance.
    share = (seen.to(torch.float64) + 1) / (int(seen.sum()) + seen.numel())  # smoothed class shares
    likelihoods = [_Likelihood(observed, mean, cov, full, share) for full in (False, True)]
    lower = _lower_bounds(bias_grad, batch_size, seen.shape[0])
    allowed = (seen > 0) | (lower > 0)
    candidates = [_rounded_start(observed, mean, cov, allowed, batch_size)]
    candidates += [s.detach().to(torch.int64).cpu() for s in starts or []
                   if s.shape == seen.shape and int(s.sum()) == batch_size and bool((s >= 0).all())]
    best, best_score = candidates[0], float("inf")
    for start in candidates:
        counts = _raised(start.clone(), lower)
        for likelihood in likelihoods:
            counts, score = _local_search(counts, likelihood, allowed, lower)
        if score < best_score:
            best, best_score = counts, score
    return best.to(weight_grad.device)


def _lower_bounds(bias_grad: torch.Tensor | None, batch_size: int, num_classes: int) -> torch.Tensor:
    """(K,) counts the bias gradient certifies: c_i = P_i - B g_i with P_i >= 0, so
    c_i >= -B g_i. The aux statistics are only an average; this bound is exact (it is
    what keeps small batches of confident samples right). Zero without a bias, or
    where noise makes the bounds exceed the batch."""
    zero = torch.zeros(num_classes, dtype=torch.int64)
    if bias_grad is None:
        return zero
    lower = torch.ceil(-batch_size * bias_grad.detach().to(torch.float64).cpu() - 1e-3).clamp(min=0)
    lower = lower.to(torch.int64)
    return lower if int(lower.sum()) <= batch_size else zero


def _raised(counts: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """`counts` lifted to `lower`, the excess taken from the classes furthest above it."""
    total = int(counts.sum())
    counts = torch.maximum(counts, lower)
    while int(counts.sum()) > total:
        counts[torch.argmax(counts - lower)] -= 1
    return counts


class _Likelihood:
    """Negative Gaussian log-likelihood (up to constants) of counts n given S.

    Full class covariances while D is small (K <= FULL_COVARIANCE_CLASSES), their
    diagonals beyond (CIFAR-100's K = 100 would need 10^4 x 10^4 matrices)."""

    def __init__(self, observed: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, full: bool,
                 share: torch.Tensor) -> None:
        self.observed, self.mean, self.log_share = observed, mean, torch.log(share)
        self.full = full and mean.shape[0] <= FULL_COVARIANCE_CLASSES
        self.cov = cov if self.full else torch.diagonal(cov, dim1=1, dim2=2)
        diagonal = torch.diagonal(cov, dim1=1, dim2=2)
        self.ridge = FLOOR * float(diagonal.mean()) + 1e-30

    def __call__(self, counts: torch.Tensor) -> float:
        return float(self.moves(counts, torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))[0])

    def moves(self, counts: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        """(M,) scores of counts with one sample moved from src[m] to dst[m] (src == dst: none)."""
        weights = counts.to(torch.float64)
        spread = torch.tensordot(weights, self.cov, 1) + 0.0  # (D, D) or (D,)
        shift = (src != dst).to(torch.float64)
        spread = spread[None] + shift.view(-1, *[1] * spread.dim()) * (self.cov[dst] - self.cov[src])
        residual = (self.observed - weights @ self.mean)[None] \
            + shift[:, None] * (self.mean[src] - self.mean[dst])  # (M, D)
        moved = weights[None].repeat(src.numel(), 1)
        moved[torch.arange(src.numel()), src] -= shift
        moved[torch.arange(src.numel()), dst] += shift
        # -2 log of the multinomial prior on the counts (class shares from the aux data):
        # it decides the directions the gradient leaves free (classes the model is sure of).
        prior = 2 * (torch.lgamma(moved + 1) - moved * self.log_share).sum(1)
        if not self.full:
            spread = spread + self.ridge
            return (residual ** 2 / spread + torch.log(spread)).sum(1) + prior
        spread.diagonal(dim1=1, dim2=2).add_(self.ridge)
        chol, info = torch.linalg.cholesky_ex(spread)
        solved = torch.cholesky_solve(residual[:, :, None], chol)[:, :, 0]
        scores = (residual * solved).sum(1) + 2 * torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1)
        return torch.where(info == 0, scores + prior, torch.full_like(scores, float("inf")))


def _rounded_start(
    observed: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, allowed: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """Integer counts near the whitened non-negative least-squares fit of S onto the means."""
    scale = torch.diagonal(cov, dim1=1, dim2=2).mean(0).sqrt() + 1e-12  # (D,) entries differ in size
    design = (mean / scale).T[:, allowed]  # (D, K')
    target = observed / scale
    fit = torch.linalg.lstsq(design, target[:, None]).solution.flatten().clamp(min=0)
    step = 1.0 / (float(torch.linalg.matrix_norm(design, 2)) ** 2 + 1e-30)
    for _ in range(50):  # projected gradient steps: least squares kept non-negative
        fit = (fit - step * design.T @ (design @ fit - target)).clamp(min=0)
    full = torch.zeros(allowed.shape[0], dtype=torch.float64)
    full[allowed] = fit
    if float(full.sum()) > 0:
        full = full * (batch_size / float(full.sum()))
    else:
        full[allowed] = batch_size / int(allowed.sum())
    counts = torch.floor(full).to(torch.int64)
    while int(counts.sum()) < batch_size:
        gap = torch.where(allowed, full - counts, torch.full_like(full, -float("inf")))
        counts[torch.argmax(gap)] += 1
    return counts


def _local_search(
    counts: torch.Tensor, score: _Likelihood, allowed: torch.Tensor, lower: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Move one sample between classes while the likelihood improves (best move first),
    never below a class's certified count `lower`."""
    current = score(counts)
    targets = torch.nonzero(allowed).flatten()
    for _ in range(MAX_MOVES):
        sources = torch.nonzero(counts > lower).flatten()
        src = sources.repeat_interleave(targets.numel())
        dst = targets.repeat(sources.numel())
        keep = src != dst
        src, dst = src[keep], dst[keep]
        if src.numel() == 0:
            break
        trials = score.moves(counts, src, dst)
        best = int(torch.argmin(trials))
        if not float(trials[best]) < current - 1e-9:
            break
        counts[src[best]] -= 1
        counts[dst[best]] += 1
        current = float(trials[best])
    return counts, current
