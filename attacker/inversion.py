"""Gradient matching: the DLG objective and the L-BFGS loop that minimises it.

Pure torch. The loop sees the model, the observed gradients and its own dummy
variables; it never sees ground truth. Callers (attacks.py) build the dummies and
turn the result into a Reconstruction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attacker.budget import TIME_BUDGET, expired
from gradleak.core.fedavg import local_sgd_delta

# (iteration, current best images clamped to [0, 1]) -> True to stop early.
_LBFGS_TOLERANCE_GRAD = 1e-7  # torch.optim.LBFGS's default, passed explicitly below
Callback = Callable[[int, torch.Tensor], bool | None]


def soft_cross_entropy(logits: torch.Tensor, label_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the soft target softmax(label_logits), mean over the batch.

    DLG's criterion: the label is a free variable, so it is kept as logits and
    squashed by softmax to stay a distribution while L-BFGS moves it.
    """
    target = F.softmax(label_logits, dim=-1)  # (B, K)
    return torch.mean(torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1))


def gradient_distance(
    dummy_grads: Sequence[torch.Tensor], target_grads: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Squared L2 distance summed over every parameter's gradient (DLG, eq. 4)."""
    total = torch.zeros((), device=target_grads[0].device, dtype=target_grads[0].dtype)
    for dummy, target in zip(dummy_grads, target_grads, strict=True):
        total = total + ((dummy - target) ** 2).sum()
    return total


@dataclass
class MatchResult:
    """Outcome of one gradient-matching run."""

    images: torch.Tensor  # (B, C, H, W) raw best iterate (not clamped)
    label_logits: torch.Tensor | None  # (B, K) best label variable; None when labels were fixed
    distance: float  # gradient distance at the best iterate; inf when none was finite
    iterations: int  # outer L-BFGS steps taken
    evaluations: int  # objective evaluations (forward + double backward)
    diverged: bool  # a non-finite distance was met
    stop_reason: str  # converged | stalled | plateau | callback | max_iters | diverged | time_budget


class _Matcher:
    """One run's state: the objective, the best-so-far iterate and the counters.

    The best iterate (by gradient distance) is kept so a divergence loses nothing.
    """

    def __init__(
        self,
        model: nn.Module,
        targets: Sequence[torch.Tensor],
        data: torch.Tensor,
        label_logits: torch.Tensor | None,
        hard_labels: torch.Tensor | None,
        simulate: tuple[int, float] | None = None,
    ) -> None:
        if label_logits is None and hard_labels is None:
            raise ValueError("need label_logits (joint) or hard_labels (fixed)")
        self.model, self.targets, self.data = model, targets, data
        self.label_logits, self.hard_labels = label_logits, hard_labels
        self.params: list[torch.Tensor] = list(model.parameters())
        self.simulate = simulate
        self.named = {n: p.detach() for n, p in model.named_parameters()}
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}
        self.variables = [data] if label_logits is None else [data, label_logits]
        self.best_distance = math.inf
        self.best_data = data.detach().clone()
        self.best_label = None if label_logits is None else label_logits.detach().clone()
        self.evaluations = 0
        self.nonfinite = 0
        self.steps_without_best = 0

    def _loss(self, logits: torch.Tensor) -> torch.Tensor:
        if self.label_logits is not None:
            return soft_cross_entropy(logits, self.label_logits)
        assert self.hard_labels is not None  # checked in __init__
        return F.cross_entropy(logits, self.hard_labels)

    def evaluate(self, *, backward: bool) -> torch.Tensor:
        """Gradient distance at the current point; with backward, fill the dummies' .grad."""
        if backward and expired():
            # Out of time: no gradient, so L-BFGS ends its step at once (see below).
            return torch.zeros((), device=self.data.device, dtype=self.data.dtype)
        distance = gradient_distance(self._dummy_gradients(backward), self.targets)
        self.evaluations += 1
        value = float(distance.detach())
        if not math.isfinite(value):
            # No backward: L-BFGS then sees a zero gradient and ends its step at once.
            self.nonfinite += 1
            return distance.detach()
        if backward:
            distance.backward(inputs=self.variables)  # the dummies only, not the weights
        if value < self.best_distance:
            self.best_distance = value
            self.best_data = self.data.detach().clone()
            if self.label_logits is not None:
                self.best_label = self.label_logits.detach().clone()
        return distance.detach()

    def _dummy_gradients(self, backward: bool) -> Sequence[torch.Tensor]:
        """The dummies' gradient, or their simulated FedAvg delta on the gradient's scale."""
        if self.simulate is None:
            logits = self.model(self.data)  # (B, K)
            # create_graph: the distance is differentiated again, w.r.t. the dummy inputs.
            return torch.autograd.grad(self._loss(logits), self.params, create_graph=backward)
        steps, lr = self.simulate
        delta = local_sgd_delta(self.model, self.named, self.buffers, self.data, self._loss,
                                steps=steps, lr=lr)
        return [delta[n] / (lr * steps) for n in self.named]

    def stop_reason(
        self, evaluations_before: int, best_before: float, grad_tol: float, patience: int
    ) -> str | None:
        """Why to stop after an outer step, or None to go on."""
        improved = self.best_distance < best_before
        self.steps_without_best = 0 if improved else self.steps_without_best + 1
        if expired():
            return TIME_BUDGET
        if self.nonfinite:
            return "diverged"
        if self.best_distance < grad_tol:
            return "converged"
        if self.evaluations - evaluations_before == 1 and self._flat():
            # L-BFGS returned without moving (gradient under its tolerance): every
            # further step would be the same no-op, e.g. with saturated sigmoids.
            return "stalled"
        if patience and self.steps_without_best >= patience:
            return "plateau"
        return None

    def _flat(self) -> bool:
        """Whether the last evaluation's gradient is under L-BFGS's tolerance.

        Read after a one-evaluation step, .grad still holds that evaluation's
        gradient; checking here spares a device sync in every closure call.
        """
        return all(
            v.grad is None or float(v.grad.abs().max()) <= _LBFGS_TOLERANCE_GRAD
            for v in self.variables
        )

    def result(self, iterations: int, reason: str) -> MatchResult:
        diverged = self.nonfinite > 0
        return MatchResult(
            images=self.best_data,
            label_logits=self.best_label,
            distance=self.best_distance,
            iterations=iterations,
            evaluations=self.evaluations,
            diverged=diverged,
            stop_reason="diverged" if diverged else reason,
        )


def match_gradients(
    model: nn.Module,
    targets: Sequence[torch.Tensor],
    data: torch.Tensor,
    *,
    label_logits: torch.Tensor | None = None,
    hard_labels: torch.Tensor | None = None,
    max_iters: int,
    inner: int,
    lr: float,
    history: int,
    line_search: str | None,
    grad_tol: float,
    patience: int = 0,
    callback: Callback | None = None,
    simulate: tuple[int, float] | None = None,
) -> MatchResult:
    """Optimise dummy inputs (and soft labels) so their gradient matches `targets`.

    Args:
        model: private model copy; every parameter must require grad.
        targets: observed gradients, in `model.parameters()` order, on the model's device.
        data: (B, C, H, W) leaf tensor with requires_grad, the dummy images.
        label_logits: (B, K) leaf with requires_grad to optimise labels jointly (DLG),
            or None to use `hard_labels` (iDLG).
        hard_labels: (B,) int64 labels used when `label_logits` is None.
        max_iters, inner, lr, history, line_search: L-BFGS outer steps, inner
            iterations per step, step size, memory, line search (None = fixed step).
        grad_tol: stop once the gradient distance falls below this.
        patience: stop after this many outer steps without a new best; 0 = never.
        callback: called after every outer step; returning True stops.
        simulate: (local_steps, local_lr) to match `targets` (a FedAvg delta over
            local_lr * local_steps) with the dummies' simulated delta of those steps
            (gradleak.core.fedavg); None matches their gradient.

    Returns:
        The best iterate seen and how the run went.
    """
    matcher = _Matcher(model, targets, data, label_logits, hard_labels, simulate)
    optimizer = torch.optim.LBFGS(
        matcher.variables,
        lr=lr,
        max_iter=inner,
        history_size=history,
        line_search_fn=line_search,
        tolerance_grad=_LBFGS_TOLERANCE_GRAD,
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        return matcher.evaluate(backward=True)

    iterations, reason = 0, None
    for iterations in range(1, max_iters + 1):
        before = (matcher.evaluations, matcher.best_distance)
        optimizer.step(closure)
        reason = matcher.stop_reason(*before, grad_tol, patience)
        if reason is None and callback is not None:
            reason = "callback" if callback(iterations, matcher.best_data.clamp(0.0, 1.0)) else None
        if reason is not None:
            break
    if reason is None:
        reason = "max_iters"
        matcher.evaluate(backward=False)  # L-BFGS never scores its last update itself
    return matcher.result(iterations, reason)
