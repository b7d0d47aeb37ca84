"""k independent gradient-inversion problems in one vmapped graph, solved with signed Adam.

Each problem is (model weights, observed gradients, labels, dummy start). The
per-problem objective is Inverting Gradients' (Geiping et al. 2020): one minus the
cosine similarity between the dummy's and the observed gradient over all
parameters, plus a total-variation prior. `torch.func.vmap` evaluates all k
objectives and their input gradients in one pass, so k small problems cost about
as much as a few; Adam acts elementwise, so stacking the problems' variables keeps
the problems independent (unlike L-BFGS, whose line steps a summed objective couples).

Pure torch; the caller builds the problems and turns the result into Reconstructions.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap

from attacker.budget import TIME_BUDGET, expired
from gradleak.core.fedavg import local_sgd_delta

Tensors = dict[str, torch.Tensor]
# (iteration, best-so-far images (k, B, C, H, W) in [0, 1], their 1 - cos (k,) float64)
# -> True to stop every problem.
StackedCallback = Callable[[int, torch.Tensor, torch.Tensor], bool | None]
LAYER_WEIGHTS = ("equal", "linear")  # per-parameter weights of the cosine objective
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


@dataclass(frozen=True)
class Schedule:
    """How the signed-Adam loop runs; see AttackConfig for each setting's meaning."""

    max_iters: int  # outer iterations; the callback and patience count these
    inner: int  # Adam steps per outer iteration
    lr: float  # initial step, divided by 10 at 3/8, 5/8 and 7/8 of all steps
    tv_weight: float  # total-variation prior weight
    tol: float  # a problem converges once 1 - cos <= tol
    patience: int  # a problem stops after this many outer iterations with no new best
    layer_weights: str = "equal"  # one of LAYER_WEIGHTS


@dataclass
class StackedResult:
    """Per-problem outcome of one stacked run; index j is problem j."""

    images: torch.Tensor  # (k, B, C, H, W) best iterate of each problem, in [0, 1]
    label_logits: torch.Tensor | None  # (k, B, K) best label variable, None when labels fixed
    grad_loss: list[float]  # 1 - cos at each best iterate; inf when never finite
    loss: list[float]  # the full objective (with TV) at each best iterate
    stop_reasons: list[str]  # converged | plateau | diverged | callback | max_iters
    iterations: list[int]  # outer iterations each problem took part in
    evaluations: int  # objective evaluations of the whole stack (one per Adam step)


def attack_copy(model: nn.Module) -> nn.Module:
    """A private copy of `model` that vmap can run in the victim's train/eval mode.

    In train mode BatchNorm normalises with the batch's own statistics and only
    updates its running statistics as a side effect, which vmap cannot batch; the
    copy drops those statistics (`replace_all_batch_norm_modules_`), which changes
    nothing a train-mode forward returns. In eval mode the running statistics are
    read, so they stay (as buffers of each problem).
    """
    clone = copy.deepcopy(model)
    if clone.training:
        torch.func.replace_all_batch_norm_modules_(clone)
    return clone


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels of (B, C, H, W) images."""
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    return dx + dy


def layer_weights(kind: str, count: int) -> list[float]:
    """Per-parameter weights: equal, or linearly decaying from the first to the last."""
    if kind not in LAYER_WEIGHTS:
        raise ValueError(f"unknown layer weights '{kind}' (known: {', '.join(LAYER_WEIGHTS)})")
    if kind == "equal":
        return [1.0] * count
    return [(count - i) / count for i in range(count)]


class _Objective:
    """IG's objective of one problem as a pure function of (dummies, weights, targets)."""

    def __init__(self, model: nn.Module, names: Sequence[str], kind: str, tv_weight: float,
                 simulate: tuple[int, float] | None = None):
        self.model, self.names, self.tv_weight = model, list(names), tv_weight
        self.weights = layer_weights(kind, len(self.names))
        self.simulate = simulate

    def _ce(self, params: Tensors, buffers: Tensors, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = functional_call(self.model, (params, buffers), (x,))  # (B, K)
        # Mean cross-entropy against a target distribution: F.cross_entropy for one-hots.
        return -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()

    def __call__(
        self, x: torch.Tensor, labels: torch.Tensor, params: Tensors, buffers: Tensors,
        targets: Tensors, soft: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective, 1 - cos) of one problem; labels are logits when soft."""
        target = F.softmax(labels, dim=-1) if soft else labels  # (B, K)
        if self.simulate is None:
            dummy = grad(self._ce)(params, buffers, x, target)
        else:  # the client's local steps on the dummy; cosine is scale-free, the scale is kept
            steps, lr = self.simulate
            delta = local_sgd_delta(
                self.model, params, buffers, x,
                lambda logits: -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean(),
                steps=steps, lr=lr,
            )
            dummy = {n: d / (lr * steps) for n, d in delta.items()}
        dot = norm_d = norm_t = x.new_zeros(())
        for name, w in zip(self.names, self.weights, strict=True):
            d, t = dummy[name], targets[name]
            dot = dot + w * (d * t).sum()
            norm_d = norm_d + w * (d * d).sum()
            norm_t = norm_t + w * (t * t).sum()
        grad_loss = 1.0 - dot / (norm_d.sqrt() * norm_t.sqrt())
        total = grad_loss + self.tv_weight * total_variation(x) if self.tv_weight else grad_loss
        return total, grad_loss


def _lr_at(step: int, total: int, lr: float) -> float:
    """IG's schedule: lr / 10 after each of 3/8, 5/8 and 7/8 of the steps."""
    drops = sum(step >= int(total * f) for f in (3 / 8, 5 / 8, 7 / 8))
    return lr * 0.1**drops


class _State:
    """Variables, Adam moments and best-so-far of every problem (leading dim k)."""

    def __init__(self, images: torch.Tensor, label_logits: torch.Tensor | None) -> None:
        self.vars = [images.detach().clamp(0.0, 1.0)]
        if label_logits is not None:
            self.vars.append(label_logits.detach().clone())
        self.m = [torch.zeros_like(v) for v in self.vars]
        self.v = [torch.zeros_like(v) for v in self.vars]
        k = images.shape[0]
        self.best = [v.clone() for v in self.vars]
        self.best_loss = torch.full((k,), math.inf, dtype=torch.float64)
        self.best_grad_loss = torch.full((k,), math.inf, dtype=torch.float64)
        self.improved = torch.zeros(k, dtype=torch.bool)  # new best in this outer iteration
        self.stale = torch.zeros(k, dtype=torch.int64)  # outer iterations without a new best
        self.reason: list[str | None] = [None] * k
        self.iterations = [0] * k

    def active(self) -> list[int]:
        return [j for j, r in enumerate(self.reason) if r is None]

    def record(self, idx: list[int], total: torch.Tensor, grad_loss: torch.Tensor) -> None:
        """Keep each active problem's best iterate (by the full objective)."""
        total64 = total.detach().to("cpu", torch.float64)  # (len(idx),)
        where = torch.tensor(idx)
        for j in where[~torch.isfinite(total64)].tolist():
            self.reason[j] = "diverged"
        better = total64 < self.best_loss[where]  # NaN compares False
        if not bool(better.any()):
            return
        rows = where[better]
        self.best_loss[rows] = total64[better]
        self.best_grad_loss[rows] = grad_loss.detach().to("cpu", torch.float64)[better]
        self.improved[rows] = True
        on_device = rows.to(self.vars[0].device)
        for best, var in zip(self.best, self.vars, strict=True):
            best[on_device] = var[on_device]

    def adam(self, idx: list[int], grads: Sequence[torch.Tensor], step: int, lr: float) -> None:
        """One Adam step on the signs of the active problems' gradients, then the box."""
        every = len(idx) == self.vars[0].shape[0]
        index = torch.tensor(idx, device=self.vars[0].device)
        b1, b2 = _ADAM_BETAS
        for i, g in enumerate(grads):
            sign = torch.nan_to_num(g).sign()  # IG steps on the gradient's sign
            if every:
                m_old, v_old, x_old = self.m[i], self.v[i], self.vars[i]
            else:
                m_old, v_old, x_old = self.m[i][index], self.v[i][index], self.vars[i][index]
            m = m_old * b1 + (1 - b1) * sign
            v = v_old * b2 + (1 - b2) * sign * sign
            update = (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + _ADAM_EPS)
            x = x_old - lr * update
            if i == 0:
                x = x.clamp(0.0, 1.0)  # box constraint: pixels live in [0, 1]
            if every:
                self.m[i], self.v[i], self.vars[i] = m, v, x
            else:
                self.m[i][index], self.v[i][index], self.vars[i][index] = m, v, x


def invert_stacked(
    model: nn.Module,
    params: Tensors,
    buffers: Tensors,
    targets: Tensors,
    images: torch.Tensor,
    labels: torch.Tensor,
    schedule: Schedule,
    *,
    stacked_weights: bool,
    learn_labels: bool = False,
    callback: StackedCallback | None = None,
    groups: Sequence[int] | None = None,
    simulate: tuple[int, float] | None = None,
) -> StackedResult:
    """Minimise IG's objective for k problems at once.

    Args:
        model: an `attack_copy` of the victim; its own tensors are not used.
        params, buffers: the weights, (k, ...) each when `stacked_weights`, else shared.
        targets: observed gradients by parameter name, (k, ...) each.
        images: (k, B, C, H, W) dummy starts.
        labels: (k, B, K) label logits when `learn_labels` (DLG's soft labels), else
            fixed target distributions (`one_hot` of hard labels).
        schedule: the loop's settings.
        callback: after each outer iteration with every problem's best images and
            their gradient losses; returning True stops every problem.
        groups: (k,) group of each problem (the restarts of one update); once one
            converges, the rest of its group stop ("superseded"). None: no groups.
        simulate: (local_steps, local_lr): targets are FedAvg deltas over
            local_lr * local_steps, matched by each dummy's simulated delta
            (gradleak.core.fedavg); None matches gradients.

    Returns:
        Each problem's best iterate and how its run went.
    """
    names = list(targets)
    objective = _Objective(model, names, schedule.layer_weights, schedule.tv_weight, simulate)
    step_fn = grad_and_value(objective, argnums=(0, 1) if learn_labels else 0, has_aux=True)
    w_dim = 0 if stacked_weights else None
    batched = vmap(step_fn, in_dims=(0, 0, w_dim, w_dim, 0, None))
    state = _State(images, labels if learn_labels else None)
    fixed = labels.detach()
    k = images.shape[0]
    total_steps = schedule.max_iters * schedule.inner
    step = evaluations = 0
    for iteration in range(1, schedule.max_iters + 1):
        started = state.active()
        if not started:
            break
        for _ in range(schedule.inner):
            idx = state.active()
            if not idx:
                break
            if expired():
                for j in idx:
                    state.reason[j] = TIME_BUDGET
                break
            step += 1
            pick = None if len(idx) == k else torch.tensor(idx, device=images.device)
            p_, b_ = (params, buffers)
            if stacked_weights and pick is not None:
                p_, b_ = _take(params, pick), _take(buffers, pick)
            x = state.vars[0] if pick is None else state.vars[0][pick]
            source = state.vars[1] if learn_labels else fixed
            lab = source if pick is None else source[pick]
            tgt = targets if pick is None else _take(targets, pick)
            grads, (total, grad_loss) = batched(x, lab, p_, b_, tgt, learn_labels)
            evaluations += 1
            state.record(idx, total, grad_loss)
            grads = list(grads) if learn_labels else [grads]
            state.adam(idx, grads, step, _lr_at(step - 1, total_steps, schedule.lr))
        _end_of_iteration(state, started, iteration, schedule, groups)
        if _callback_stops(callback, state, iteration):
            for j in state.active():
                state.reason[j] = "callback"
    return StackedResult(
        images=state.best[0].clamp(0.0, 1.0),
        label_logits=state.best[1] if learn_labels else None,
        grad_loss=[float(v) for v in state.best_grad_loss],
        loss=[float(v) for v in state.best_loss],
        stop_reasons=[r or "max_iters" for r in state.reason],
        iterations=state.iterations,
        evaluations=evaluations,
    )


def _callback_stops(callback: StackedCallback | None, state: _State, iteration: int) -> bool:
    if callback is None or not state.active():
        return False
    return bool(callback(iteration, state.best[0].clamp(0.0, 1.0), state.best_grad_loss.clone()))


def _end_of_iteration(
    state: _State, idx: list[int], iteration: int, schedule: Schedule,
    groups: Sequence[int] | None,
) -> None:
    """Count the iteration for the problems that ran it, then apply tol and patience."""
    for j in idx:
        state.iterations[j] = iteration
        state.stale[j] = 0 if state.improved[j] else state.stale[j] + 1
        state.improved[j] = False
        if state.reason[j] is not None:
            continue
        if state.best_grad_loss[j] <= schedule.tol:
            state.reason[j] = "converged"
            for i in idx:
                if groups is not None and groups[i] == groups[j] and state.reason[i] is None:
                    state.reason[i] = "superseded"  # a sibling restart got there
        elif schedule.patience and state.stale[j] >= schedule.patience:
            state.reason[j] = "plateau"


def _take(tensors: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: t.index_select(0, index) for name, t in tensors.items()}


def stack_weights(models: Sequence[nn.Module]) -> tuple[Tensors, Tensors]:
    """(params, buffers) of several same-architecture models, stacked on a new dim 0."""
    params = [dict(m.named_parameters()) for m in models]
    buffers = [dict(m.named_buffers()) for m in models]
    stacked_p = {n: torch.stack([p[n].detach() for p in params]) for n in params[0]}
    stacked_b = {n: torch.stack([b[n].detach() for b in buffers]) for n in buffers[0]}
    return stacked_p, stacked_b


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(..., B) int64 labels as fixed (..., B, K) float targets for `invert_stacked`."""
    return F.one_hot(labels, num_classes).to(torch.float32)
