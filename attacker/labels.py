"""Analytic label recovery from the last linear layer's gradient (iDLG and batches).

Why it works, for one sample (B = 1) with cross-entropy on logits z = W a + b and
softmax p = softmax(z): dL/dW = (p - y) a^T, so row i of the weight gradient sums to
(p_i - y_i) * sum(a). If the activations a feeding the layer are non-negative
(sigmoid, ReLU, softmax outputs) and not all zero, then sum(a) > 0, the true class's
row (p_c - 1 < 0) has the only negative sum, and every other row (p_i > 0) is
positive. The bias gradient p - y has the same sign pattern whatever a is.

It does not hold for batches (rows mix several samples), for losses other than
cross-entropy with a hard label, for two classes with activations summing negative,
or once a defence (noise, pruning, quantisation) flips the signs; the function then
still answers (the most negative row, iDLG's own rule) but the answer is a guess.

Batches (B > 1, `recover_label_counts`): with the mean cross-entropy over B samples,
the bias gradient is g_i = (P_i - c_i) / B, where P_i = sum_n p_ni is the batch's
total predicted probability of class i and c_i its count. Hence, whatever the
activations: an absent class (c_i = 0) has g_i > 0, so every negative entry is a
present class (no false positives); a present class is negative whenever P_i < c_i
(always for distinct labels while no class collects a whole sample's worth of
probability over the batch, e.g. an untrained or DLG-initialised model with B < K).
Counts follow from c_i = P_i - B g_i with P_i, unknown for present classes,
estimated by the mean P_j = B g_j of the non-negative (presumed absent) classes,
the bias analogue of LLG's "impact" (Wainakh et al. 2022). Distinct labels are exact
when exactly B entries are negative; repeats are right when the classes' predicted
masses differ by less than half a sample from that mean. Without a bias the
weight-row sums stand in for g (they carry the same sign pattern for non-negative
activations, scaled by the activations' sum, whose per-sample size is estimated too).

`recover_labels` now takes its counts from attacker/label_counts.py by default (P
estimated in logit space from the model's weights, iLRG-class), which needs no absent
class and stays exact at B = 8-64 near initialisation; the bias-sign counts above
remain as counts="bias" and as its fallback. With the attacker's own labelled data
(`prior`, attacker/label_prior.py) both answers seed a likelihood search under that
data's per-class gradient statistics, which stays exact further into training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from attacker.label_counts import logit_label_counts
from attacker.label_prior import LabelPrior, prior_label_counts

if TYPE_CHECKING:
    from attacker.api import AttackConfig, Observation

CORRECTION_GAIN = 10.0  # a corrected labelling must separate this much better than the counts
# How batch label counts are estimated: "logits" (attacker.label_counts, iLRG-class: the
# model's weights move the gradient to logit space; exact counts at B = 8-64 near init,
# benchmarks/batch_labels.py) or "bias" (`recover_label_counts`, from the bias signs alone).
COUNT_METHODS = ("logits", "bias")

def recover_label_batch1(
    last_weight_grad: torch.Tensor, bias_grad: torch.Tensor | None = None
) -> int:
    """Return the label of a batch-1 update from its last linear layer's gradient.

    Rules, first that applies: (1) the only negative weight-row sum (iDLG, holds
    for non-negative activations); (2) the only negative bias-gradient entry (holds
    for any activations); (3) the only positive row sum if it is also the largest in
    magnitude, with more than two classes (activations summing negative flip every
    sign); (4) the most negative row sum, iDLG's argmin rule, as the best guess
    once noise or compression blurred the signs.
    Weight rows come first because summing over in_features averages noise out.

    Args:
        last_weight_grad: (num_classes, in_features) gradient of the final nn.Linear.
        bias_grad: optional (num_classes,) gradient of its bias.

    Returns:
        The recovered class index.

    Raises:
        ValueError: on a wrongly shaped or non-finite gradient, or one without signal.
    """
    if last_weight_grad.dim() != 2 or last_weight_grad.shape[0] < 1:
        raise ValueError(
            f"expected a (num_classes, in_features) gradient, got {tuple(last_weight_grad.shape)}"
        )
    # float64 so the sums of many tiny entries keep their sign.
    row_sums = last_weight_grad.detach().to(torch.float64).sum(dim=1)  # (num_classes,)
    bias = _checked_bias(bias_grad, row_sums.shape[0])
    if not torch.isfinite(row_sums).all():
        raise ValueError("last-layer weight gradient is not finite")
    for hit in (_single(row_sums < 0), _single(bias < 0) if bias is not None else None):
        if hit is not None:
            return hit
    flipped = _flipped(row_sums)
    if flipped is not None:
        return flipped
    if torch.any(row_sums != 0):
        return int(torch.argmin(row_sums))
    if bias is not None and torch.any(bias != 0):
        return int(torch.argmin(bias))
    raise ValueError("last-layer gradient is all zero: no label signal")


def _checked_bias(bias_grad: torch.Tensor | None, num_classes: int) -> torch.Tensor | None:
    """The bias gradient as float64, or None when absent or not finite."""
    if bias_grad is None:
        return None
    bias = bias_grad.detach().to(torch.float64).flatten()  # (num_classes,)
    if bias.shape[0] != num_classes:
        raise ValueError(f"bias gradient has {bias.shape[0]} entries, need {num_classes}")
    return bias if torch.isfinite(bias).all() else None


def _flipped(row_sums: torch.Tensor) -> int | None:
    """The true row when activations summing negative flipped every sign, else None.

    Flipped, the true row is the only positive one and, since |s_c| equals the sum
    of the other rows' magnitudes, the largest; a lone positive row that is not the
    largest is noise. With two classes a flip cannot be told from no flip.
    """
    hit = _single(row_sums > 0)
    if row_sums.shape[0] <= 2 or hit is None:
        return None
    return hit if hit == int(torch.argmax(row_sums.abs())) else None


def _single(mask: torch.Tensor) -> int | None:
    """The index of the only True entry of a 1-D mask, else None."""
    hits = torch.nonzero(mask).flatten()
    return int(hits[0]) if hits.numel() == 1 else None


def recover_label_counts(
    last_weight_grad: torch.Tensor, bias_grad: torch.Tensor | None = None, *, batch_size: int
) -> torch.Tensor:
    """How many samples of each class a B-sample update holds (see the module docstring).

    Args:
        last_weight_grad: (num_classes, in_features) gradient of the final nn.Linear.
        bias_grad: optional (num_classes,) gradient of its bias; preferred when given,
            since its signs hold for any activations.
        batch_size: B, from the update's public header.

    Returns:
        (num_classes,) int64 counts summing to `batch_size`.

    Raises:
        ValueError: on a bad batch size, a misshaped or non-finite gradient, or one
            without signal (all zero).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    signal, unit = _count_signal(last_weight_grad, bias_grad, batch_size)
    present = signal < 0  # (K,) certainly present (absent classes are positive)
    if int(present.sum()) > batch_size:  # noise: keep the B most negative
        keep = torch.argsort(signal)[:batch_size]
        present = torch.zeros_like(present)
        present[keep] = True
    if not torch.any(present):  # no negative entry (noisy or odd): the smallest one
        present[torch.argmin(signal)] = True
    others = signal[~present]
    mean_absent = others.mean() if others.numel() else signal.new_zeros(())
    if unit is None:  # weight rows: the per-sample scale, assuming every present class shows
        unit = (int(present.sum()) * mean_absent - signal[present].sum()) / batch_size
        unit = unit if float(unit) > 0 else -signal[present].sum() / batch_size
    estimate = (mean_absent - signal) / unit  # (K,) real-valued counts
    counts = present.to(torch.int64)
    for _ in range(batch_size - int(counts.sum())):  # the rest go where most is missing
        counts[torch.argmax(estimate - counts)] += 1
    return counts


def _count_signal(
    last_weight_grad: torch.Tensor, bias_grad: torch.Tensor | None, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(signal (K,) float64, per-sample unit or None when it must be estimated)."""
    if last_weight_grad.dim() != 2 or last_weight_grad.shape[0] < 2:
        raise ValueError(
            f"expected a (num_classes, in_features) gradient, got {tuple(last_weight_grad.shape)}"
        )
    num_classes = last_weight_grad.shape[0]
    bias = _checked_bias(bias_grad, num_classes)
    if bias is not None and torch.any(bias != 0):
        return bias, bias.new_tensor(1.0 / batch_size)
    rows = last_weight_grad.detach().to(torch.float64).sum(dim=1)  # (K,)
    if not torch.isfinite(rows).all():
        raise ValueError("last-layer weight gradient is not finite")
    if not torch.any(rows != 0):
        raise ValueError("last-layer gradient is all zero: no label signal")
    return rows, None


def recover_labels(
    model: nn.Module,
    gradients: Sequence[torch.Tensor],
    batch_size: int,
    *,
    correct: bool = True,
    counts: str = "logits",
    prior: LabelPrior | None = None,
) -> torch.Tensor:
    """The labels behind an update, as a sorted (B,) int64 tensor on the gradients' device.

    B = 1 uses iDLG's rules (`recover_label_batch1`); B > 1 the counts of the method
    `counts` names (COUNT_METHODS: "logits", attacker.label_counts, where the last layer
    has a bias, else "bias", `recover_label_counts`), then (with `correct`, when B <= K and the last layer has
    a bias) the labelling that separates the last layer's gradient exactly into B
    samples' features, if a change of up to two labels finds one
    (attacker.analytic_batch.search_labels), or one that separates it
    CORRECTION_GAIN times better than the counts do: this repairs the counts where the model
    favours one class, e.g. the DLG-initialised LeNet. With `prior` (the attacker's own
    labelled data, attacker.label_prior) the counts are the ones most likely under it,
    searched from `counts`' answer too. A batch gradient does not say
    which sample had which label, so the order is arbitrary (sorted); scoring
    matches samples first.

    Raises:
        ValueError: see `find_last_linear_grads` and the two recovery functions.
    """
    weight_grad, bias_grad = find_last_linear_grads(model, gradients)
    device = weight_grad.device
    if batch_size == 1:
        label = recover_label_batch1(weight_grad, bias_grad)
        return torch.tensor([label], dtype=torch.int64, device=device)
    labels = _counted_labels(model, gradients, weight_grad, bias_grad, batch_size, counts, prior)
    if correct and bias_grad is not None and batch_size <= weight_grad.shape[0]:
        labels = _separable_labels(model, weight_grad, bias_grad, labels)[0]
    return labels


def certified_labels(
    model: nn.Module, gradients: Sequence[torch.Tensor], batch_size: int,
    prior: LabelPrior | None = None,
) -> torch.Tensor | None:
    """`recover_labels`' answer only where the gradient certifies it, else None.

    B = 1: iDLG's label. B > 1: the corrected labels only when the last layer's
    gradient separates exactly under them; a labelling that is merely better than
    the counts is not certified. Why: an attack that fixes wrong labels fails outright
    (iDLG on batches of 8 from a LeNet under training: 4.6 dB with uncertified labels
    vs 17-30 dB with DLG's jointly optimised ones), so it should fix only certain ones.
    """
    if batch_size == 1:
        return recover_labels(model, gradients, 1)
    weight_grad, bias_grad = find_last_linear_grads(model, gradients)
    if bias_grad is None or batch_size > weight_grad.shape[0]:
        return None
    labels = _counted_labels(model, gradients, weight_grad, bias_grad, batch_size, "logits", prior)
    corrected, exact = _separable_labels(model, weight_grad, bias_grad, labels)
    return corrected if exact else None


def _counted_labels(
    model: nn.Module,
    gradients: Sequence[torch.Tensor],
    weight_grad: torch.Tensor,
    bias_grad: torch.Tensor | None,
    batch_size: int,
    method: str,
    prior: LabelPrior | None = None,
) -> torch.Tensor:
    """The counts of `method` as sorted (B,) labels on the gradient's device.

    "logits" falls back to "bias" where it has no answer (no bias, or a gradient so
    distorted that its lower bounds exceed the batch). With `prior`, those counts
    are one start of attacker.label_prior's search."""
    if method not in COUNT_METHODS:
        raise ValueError(f"unknown count method '{method}' (known: {', '.join(COUNT_METHODS)})")
    counts = None
    if method == "logits" and bias_grad is not None:
        try:
            counts = logit_counts(model, gradients, batch_size)
        except ValueError:
            counts = None
    if counts is None:
        counts = recover_label_counts(weight_grad, bias_grad, batch_size=batch_size)
    if prior is not None:  # both gradient-only answers seed the search; the likelihood picks
        starts = [counts, recover_label_counts(weight_grad, bias_grad, batch_size=batch_size)]
        counts = prior_label_counts(model, _last_linear(model), weight_grad, bias_grad,
                                    batch_size, prior, starts=starts)
    classes = torch.arange(counts.shape[0], device=counts.device)
    return torch.repeat_interleave(classes, counts).to(weight_grad.device)


def logit_counts(
    model: nn.Module, gradients: Sequence[torch.Tensor], batch_size: int
) -> torch.Tensor:
    """(K,) int64 label counts from the model's last linear layer in logit space
    (attacker/label_counts.py), summing to `batch_size`.

    Raises:
        ValueError: no bias on the last linear layer, misaligned gradients, or see
            attacker.label_counts.logit_label_counts.
    """
    weight_grad, bias_grad = find_last_linear_grads(model, gradients)
    last = _last_linear(model)
    if bias_grad is None or last.bias is None:
        raise ValueError("logit-space label counts need the last linear layer's bias")
    return logit_label_counts(last.weight, last.bias, weight_grad, bias_grad, batch_size)


def _separable_labels(
    model: nn.Module, weight_grad: torch.Tensor, bias_grad: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, bool]:
    """(`labels` or a nearby labelling the gradient separates better under, exact?)."""
    from attacker.analytic_batch import search_labels  # it builds on this module's counts

    last = _last_linear(model)
    if last.bias is None or last.in_features < labels.numel():
        return labels, False
    weight, bias, w_grad, b_grad = (t.detach().to(torch.float64)
                                    for t in (last.weight, last.bias, weight_grad, bias_grad))
    if not all(bool(torch.isfinite(t).all()) for t in (weight, bias, w_grad, b_grad)):
        return labels, False
    sep, _, start = search_labels(weight, bias, w_grad, b_grad, labels, None)
    # Exact, or far better than the counts: repeated labels keep G ill-conditioned, so
    # the right labelling may stop short of exact (5.6e-6 measured) yet 100x below.
    trusted = sep.exact or sep.residual <= start / CORRECTION_GAIN
    return (sep.labels.to(labels.device) if trusted else labels), sep.exact


def find_last_linear_grads(
    model: nn.Module, grads: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pick the final nn.Linear's weight (and bias) gradient out of a full gradient list.

    "Final" means the nn.Linear whose weight comes last in `model.parameters()` order,
    the order in which peers send gradients; for a sequential classifier that is the
    output layer.

    Args:
        model: the model the gradients were taken of.
        grads: one tensor per parameter, in `model.parameters()` order.

    Returns:
        (weight_grad (num_classes, in_features), bias_grad (num_classes,) or None).

    Raises:
        ValueError: if the model has no nn.Linear, or the gradients do not line up
            with the parameters.
    """
    params = list(model.parameters())
    if len(grads) != len(params):
        raise ValueError(f"got {len(grads)} gradients for {len(params)} parameters")
    index = {id(p): i for i, p in enumerate(params)}
    last = _last_linear(model)
    weight_grad = grads[index[id(last.weight)]]
    if tuple(weight_grad.shape) != tuple(last.weight.shape):
        raise ValueError(
            f"last linear weight is {tuple(last.weight.shape)}, "
            f"its gradient {tuple(weight_grad.shape)}"
        )
    bias_grad = grads[index[id(last.bias)]] if last.bias is not None else None
    return weight_grad, bias_grad


def _last_linear(model: nn.Module) -> nn.Linear:
    """The nn.Linear whose weight comes last in model.parameters() order."""
    index = {id(p): i for i, p in enumerate(model.parameters())}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer")
    return max(linears, key=lambda m: index[id(m.weight)])


def analytic_labels(
    config: AttackConfig,
    model: nn.Module,
    targets: list[torch.Tensor],
    obs: Observation,
    *,
    certified_only: bool = False,
) -> torch.Tensor | None:
    """(B,) labels recovered from the gradient, or None where config or signal says no.

    Args:
        certified_only: under label_recovery "auto", B > 1 labels only where the
            gradient certifies them (labels.certified_labels), as idlg wants.
    """
    if config.label_recovery == "optimised":
        return None
    if obs.batch_size == 1:
        label = _analytic_label(model, targets)
        if label is None:
            return None
        return torch.tensor([label], dtype=torch.int64, device=targets[0].device)
    try:
        if certified_only and config.label_recovery == "auto":
            return certified_labels(model, targets, obs.batch_size, obs.label_prior)
        return recover_labels(model, targets, obs.batch_size, prior=obs.label_prior)
    except ValueError:
        return None


def _analytic_label(model: nn.Module, targets: list[torch.Tensor]) -> int | None:
    """iDLG's label from the last linear layer, or None when the gradient gives none."""
    weight_grad, bias_grad = find_last_linear_grads(model, targets)
    try:
        return recover_label_batch1(weight_grad, bias_grad)
    except ValueError:
        return None
