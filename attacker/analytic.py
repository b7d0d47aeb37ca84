"""Analytic gradient inversion of one sample, layer by layer (R-GAP style): attack "analytic".

Follows the idea of R-GAP (Zhu & Blaschko, ICLR 2021, "R-GAP: Recursive Gradient
Attack on Privacy"): with one sample, every layer's weight gradient is a linear
function of that layer's input once the gradient at its output is known, and the
forward pass is another linear constraint on the same input. Going backwards
from the logits, each layer's input is solved for and becomes the next solve's
known output:

1. Final nn.Linear (logits z = W a + b, mean cross-entropy, B = 1): the bias
   gradient is the output delta p - y, so the label is iDLG's (labels.py) and the
   feature vector is a = dW^T db / |db|^2 (dW = db a^T exactly; the classic
   dW[c] / db[c] for the class with the largest |db| is the same answer from one
   row).
2. Each earlier layer k with activation f, knowing its output h_k and dL/dh_k:
   z_k = f^-1(h_k), delta_k = dL/dh_k * f'(z_k), then
   - nn.Linear: its input is dW_k^T delta_k / |delta_k|^2 (delta_k = db_k, the
     observed bias gradient, when there is a bias);
   - nn.Conv2d: its input x solves, in float64 least squares, both
     conv_k(x) + b_k = z_k (forward, rows weighted by f') and
     conv2d_weight(x, delta_k) = dW_k (gradient), by Jacobi-preconditioned
     conjugate gradients on the normal equations with conv / conv-transpose
     operators (analytic_layers.solve_conv_input);
   and dL/dh_{k-1} = W_k^T delta_k.
3. The input of the first layer is the image. Its gradient is checked against
   the observation; only when it explains the gradient poorly (relative squared
   distance above `polish_above`) is it polished by iDLG's L-BFGS gradient
   matching started from it (attacker.inversion.match_gradients).

Many updates at once (`Analytic.reconstruct_many`, used by
attacker.batched.reconstruct_many): `invert_many` runs the same recursion for k
updates, each at its own model version, with every convolution solved as one
stacked CG (analytic_layers.solve_conv_inputs) in which each problem keeps its
own scalars and stops where it would alone.

Batches (B > 1, up to the number of classes): attacker.analytic_batch separates
every sample's features from the last layer's gradient (labels recovered and
corrected on the way), then solves every earlier layer for the whole batch at once
(attacker.analytic_joint), polishing by gradient matching only where that misses
the gradient. `Analytic.expected_seconds` is the cost model a scheduler can plan
with; the time budget (AttackConfig.time_budget_s) is checked inside every solve.

Scope: chains of Conv2d / Linear layers with Sigmoid, Tanh,
LeakyReLU(slope > 0) or no activation and a final Linear with bias
(analytic_layers.parse_chain says precisely, and refuses others with a
ValueError): the DLG LeNet and the MLP of gradleak.core.models. Deterministic: the
seed is not used. Ground truth is never seen.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from attacker.analytic_batch import reconstruct_batch
from attacker.analytic_layers import Layer, parse_chain
from attacker.analytic_params import POLISH_ABOVE, AnalyticParams
from attacker.analytic_pixels import pixel_counts, supports_pixels
from attacker.analytic_problem import Problem, determined, gradient_misfit, reconstruction
from attacker.analytic_single import CG_MAX_ITERS, CG_TOL, invert_batch1, invert_many
from attacker.api import (
    IDLG_LINE_SEARCH,
    Attack,
    AttackConfig,
    Observation,
    Reconstruction,
    checked_targets,
    private_copy,
    register_attack,
    simulated_steps,
    update_model,
)
from attacker.inversion import Callback, match_gradients
from attacker.labels import recover_labels
from attacker.params import from_config

# The cost model of `Analytic.expected_seconds`: seconds per element of the layers'
# inputs (times B), on one thread of this 2-core CPU. Batch 1: 0.11-0.21 s for the
# 32x32 colour LeNet's 6912 elements; batches: benchmarks/batch_analytic.py.
BATCH1_SECONDS_PER_ELEMENT = 2.5e-5
BATCH_SECONDS_PER_ELEMENT = 1.5e-4
# Where a layer's batch solve is underdetermined and no pixel solve applies, the
# feature inversion runs instead: 6.4 s (p50) to ~31 dB against 2.3 s estimated.
UNDERDETERMINED_FACTOR = 3.0
# The pixel solve (B = 8 on the 16x16 LeNet, analytic_pixels): seconds per pixel of the
# batch until its steps settle, without a budget: grey digits 4-12 s for 2048 pixels,
# colour 14-36 s for 6144 (docs/benchmarks.md), so under the live 3 s budget it runs
# to the budget.
PIXEL_SECONDS_PER_UNKNOWN = 2.5e-3


@register_attack("analytic")
class Analytic(Attack):
    """R-GAP-style layer-by-layer inversion for batch 1, optionally polished by L-BFGS;
    feature separation then per-sample inversion for batches (analytic_batch).

    AttackConfig: max_iters, lbfgs_inner, lr, lbfgs_history, line_search,
    grad_tol and patience govern the batch-1 polish ("auto" line search means
    iDLG's strong Wolfe); for batches max_iters caps the outer L-BFGS steps of the
    inversion, with lbfgs_inner and lbfgs_history; seed is unused (the attack is
    deterministic); label_recovery must be "auto" or "analytic".
    """

    params_type = AnalyticParams

    def __init__(
        self,
        config: AttackConfig | None = None,
        params: AnalyticParams | None = None,
        **settings: Any,
    ) -> None:
        """`settings` (cg_tol=..., batch_method=...) set single fields of AnalyticParams."""
        if settings:
            base = params if params is not None else from_config(AnalyticParams, config or AttackConfig())
            params = dataclasses.replace(base, **settings)
        super().__init__(config, params)
        p = self.params
        self.cg_tol, self.cg_max_iters, self.polish_above = p.cg_tol, p.cg_max_iters, p.polish_above
        self.batch_method = p.batch_method

    def supports(self, model: nn.Module, obs: Observation) -> str | None:
        """A chain of Conv2d/Linear with invertible activations (sigmoid, tanh, leaky ReLU),
        no BatchNorm, label_recovery not "optimised", and a batch that fits the last layer."""
        if self.config.label_recovery == "optimised":
            return "label_recovery 'optimised' is not supported"
        try:
            layers = parse_chain(model, obs.input_shape)
        except ValueError as exc:
            return str(exc)
        if obs.batch_size > 1:
            width = layers[-1].module.weight.shape[1]
            if obs.batch_size > min(obs.num_classes, width):
                return (f"batch size {obs.batch_size} exceeds what the last layer separates "
                        f"(min(num_classes, width) = {min(obs.num_classes, width)})")
        return None

    def expected_seconds(self, model: nn.Module, obs: Observation) -> float:
        """The wall seconds a scheduler can plan for `obs` (1 CPU thread), budget included.

        A cost model, not a promise: seconds per element of every layer's input times
        the batch size (the layers' CG solves dominate, and their work per iteration
        grows with that count); where some layer's batch solve has fewer equations than
        unknowns, PIXEL_SECONDS_PER_UNKNOWN per pixel of the batch (the pixel solve) or
        UNDERDETERMINED_FACTOR times the estimate (the feature inversion), with the
        constants of benchmarks/batch_analytic.py and the batch-1 table of
        docs/benchmarks.md; capped by config.time_budget_s, which the attack honours
        (stop_reason "time_budget"). inf for an unsupported update.
        """
        if self.supports(model, obs) is not None:
            return float("inf")
        layers = parse_chain(private_copy(model), obs.input_shape)
        batch = obs.batch_size
        elements = batch * sum(math.prod(layer.in_shape[1:]) for layer in layers)
        rate = BATCH1_SECONDS_PER_ELEMENT if batch == 1 else BATCH_SECONDS_PER_ELEMENT
        estimate = rate * elements
        method = self._batch_method(layers, batch) if batch > 1 else "single"
        if method == "pixels":
            estimate = PIXEL_SECONDS_PER_UNKNOWN * pixel_counts(layers, batch)[0]
        elif method == "features":
            estimate *= UNDERDETERMINED_FACTOR  # the polish has to finish what the solve cannot
        budget = self.config.time_budget_s
        return estimate if budget is None else min(estimate, budget)

    def reconstruct(
        self, model: nn.Module, obs: Observation, *, callback: Callback | None = None
    ) -> Reconstruction:
        """See Attack.reconstruct. Iteration 0 of the callback is the analytic image,
        1, 2, ... the polish steps (when it runs).

        Stats add: analytic_seconds, analytic_grad_distance, relative_grad_distance
        (of the returned image, over ||observed gradient||^2), polished_steps,
        cg_iterations and layers (one dict per layer, output side first: name,
        type, unknowns, equations, determined, iterations, converged,
        forward_residual, gradient_residual, delta_residual; see `invert_batch1`).
        stop_reason: "analytic" (no polish needed), "callback", or the polish's.
        For B > 1 the stats are analytic_batch.reconstruct_batch's (separation
        residual, ratio, per-sample reliability, label changes, inversion steps)
        and the callback sees each outer step of the inversion.

        Raises:
            ValueError: for a batch larger than the number of classes, a model
                outside the supported chains, a non-finite gradient, or
                label_recovery "optimised".
        """
        start = time.perf_counter()
        self._check_config()
        victim = private_copy(model)
        layers = parse_chain(victim, obs.input_shape)
        if obs.batch_size > 1:
            return self._reconstruct_batch(victim, layers, obs, start, callback)
        problem = Problem.of(victim, layers, obs)
        raw64, layer_stats = invert_batch1(
            layers, problem.work, obs.input_shape, tol=self.cg_tol, max_iters=self.cg_max_iters,
        )
        stats = problem.analytic_stats(self.name, raw64, layer_stats, 0.0)
        stats["analytic_seconds"] = time.perf_counter() - start
        raw = raw64.to(problem.targets[0].dtype)
        # A delta of several local steps is solved as if it were one gradient (first order);
        # under multi_step "exact" the polish then matches the simulated local steps from that
        # image, which the first-order residual cannot judge, so it always runs.
        simulate = simulated_steps(self.config, obs)
        if callback is not None and callback(0, raw.clamp(0.0, 1.0)):
            stats["stop_reason"] = "callback"
        elif simulate is not None or not stats["relative_grad_distance"] <= self.polish_above:
            raw = self._polish(victim, problem.targets, raw, problem.labels, stats,
                               problem.norm2, callback, simulate)
        stats["update_model"] = update_model(obs, simulate is not None)
        stats["seconds"] = time.perf_counter() - start
        return reconstruction(raw, problem.labels, stats)

    def _reconstruct_batch(
        self, victim: nn.Module, layers: list[Layer], obs: Observation, start: float,
        callback: Callback | None,
    ) -> Reconstruction:
        """B > 1: features separated from the last layer, then inverted (analytic_batch)."""
        if obs.batch_size > obs.num_classes:
            raise ValueError(
                f"analytic attack separates at most num_classes = {obs.num_classes} samples "
                f"per update, got batch size {obs.batch_size} (use ig for larger batches)"
            )
        width = layers[-1].module.weight.shape[1]
        if obs.batch_size > width:
            raise ValueError(f"analytic attack separates at most the last layer's {width} input "
                             f"features' worth of samples, got batch size {obs.batch_size}")
        targets = checked_targets(victim, obs)
        if not all(bool(torch.isfinite(t).all()) for t in targets):
            raise ValueError("analytic attack needs a finite gradient")
        labels = recover_labels(victim, targets, obs.batch_size, correct=False,  # searched below
                                prior=obs.label_prior)
        dtype = torch.float32 if targets[0].device.type == "mps" else torch.float64
        config = self.config
        raw, labels, stats = reconstruct_batch(
            victim, layers, targets, labels, obs.input_shape, max_iters=config.max_iters,
            inner=config.lbfgs_inner, history=config.lbfgs_history, working=dtype,
            callback=callback, method=self._batch_method(layers, obs.batch_size),
        )
        distance = gradient_misfit(victim, raw, labels, targets)
        norm2 = float(sum(torch.sum(t * t) for t in targets))
        stats.update(
            attack=self.name, grad_distance=distance,
            relative_grad_distance=distance / norm2 if norm2 > 0 else float("inf"),
            label_source="analytic", diverged=not bool(torch.isfinite(raw).all()),
            device=str(raw.device), seconds=time.perf_counter() - start,
        )
        return reconstruction(raw, labels, stats)

    def _batch_method(self, layers: list[Layer], batch: int) -> str:
        """"auto": the closed-form layers where every layer's batch solve is determined,
        else the joint pixel solve of the two lowest convolutions where the chain has
        them (analytic_pixels), else the feature inversion (docs/benchmarks.md)."""
        if self.batch_method != "auto":
            return self.batch_method
        if all(determined(layer, batch) for layer in layers[:-1]):
            return "layers"
        return "pixels" if supports_pixels(layers) else "features"

    def reconstruct_many(
        self,
        models: list[nn.Module],
        observations: list[Observation],
        *,
        callback: Callable[[int, list[torch.Tensor]], bool | None] | None = None,
    ) -> list[Reconstruction]:
        """Reconstruct k updates together; each equals its `reconstruct` result.

        Updates whose models have one layer chain (architecture and input shape)
        are inverted as one stack (`invert_many`): one CG solve per convolution
        for all of them, each problem with its own weights, scalars and stopping.
        The label and the closed-form layers are per update; the few updates
        whose analytic image misses the gradient by more than `polish_above` are
        polished one by one, as `reconstruct` would.

        Args:
            models: the model of each update (the same object for updates taken at
                one version shares its copy and chain); left untouched.
            observations: the updates; those of batch size 1 are stacked, larger
                batches are separated one by one (`reconstruct`).
            callback: once per stack, with iteration 0 and each of its updates'
                analytic images; True returns them unpolished (stop_reason
                "callback"). The polish runs without a callback.

        Returns:
            One Reconstruction per update, in order, with `reconstruct`'s stats;
            "seconds" and "analytic_seconds" share the stack's time equally (plus
            the update's own polish), and "stacked" / "stack_seconds" say how many
            updates were solved together and in how long.

        Raises:
            ValueError: naming the first offending update's index, for a model
                outside the supported chains or a non-finite gradient (batch-1
                updates are checked before any work), or a batch the attack cannot
                separate; or for label_recovery "optimised".
        """
        if len(models) != len(observations):
            raise ValueError(f"got {len(models)} models for {len(observations)} observations")
        self._check_config()
        batches = [j for j, obs in enumerate(observations) if obs.batch_size > 1]
        victims: dict[int, tuple[nn.Module, dict[tuple[int, int, int], list[Layer]]]] = {}
        problems: dict[int, Problem] = {}
        chains: dict[int, list[Layer]] = {}
        groups: dict[tuple[Any, ...], list[int]] = {}
        for j, (model, obs) in enumerate(zip(models, observations, strict=True)):
            if j in batches:
                continue
            victim, by_shape = victims.setdefault(id(model), (private_copy(model), {}))
            try:
                if obs.input_shape not in by_shape:
                    by_shape[obs.input_shape] = parse_chain(victim, obs.input_shape)
                layers = by_shape[obs.input_shape]
                problems[j] = Problem.of(victim, layers, obs)
            except ValueError as exc:
                raise ValueError(f"update {j}: {exc}") from exc
            chains[j] = layers
            key = (obs.input_shape, str(problems[j].work[0].device),
                   tuple((l.name, repr(l.module), l.in_shape, l.out_shape) for l in layers))
            groups.setdefault(key, []).append(j)
        out: dict[int, Reconstruction] = {}
        for j in batches:  # separated one by one: nothing to stack
            try:
                out[j] = self.reconstruct(models[j], observations[j])
            except ValueError as exc:
                raise ValueError(f"update {j}: {exc}") from exc
        for members in groups.values():
            solved = self._solve_stack([problems[j] for j in members], [chains[j] for j in members],
                                       callback, [simulated_steps(self.config, observations[j]) for j in members],
                                       [observations[j] for j in members])
            out.update(zip(members, solved, strict=True))
        return [out[j] for j in range(len(observations))]

    def _solve_stack(
        self, problems: list[Problem], chains: list[list[Layer]],
        callback: Callable[[int, list[torch.Tensor]], bool | None] | None,
        simulates: list[tuple[int, float] | None], observations: list[Observation],
    ) -> list[Reconstruction]:
        start = time.perf_counter()
        k = len(problems)
        raw64, layer_stats = invert_many(
            chains, [p.work for p in problems], problems[0].input_shape,
            tol=self.cg_tol, max_iters=self.cg_max_iters,
        )
        stats = [p.analytic_stats(self.name, raw64[j:j + 1], layer_stats[j], 0.0)
                 for j, p in enumerate(problems)]
        raws = [raw64[j:j + 1].to(p.targets[0].dtype) for j, p in enumerate(problems)]
        stack_seconds = time.perf_counter() - start
        stopped = callback is not None and bool(callback(0, [r.clamp(0.0, 1.0) for r in raws]))
        recons = []
        for p, raw, st, simulate, obs in zip(problems, raws, stats, simulates, observations, strict=True):
            st.update(analytic_seconds=stack_seconds / k, stacked=k, stack_seconds=stack_seconds)
            polish_start = time.perf_counter()
            if stopped:
                st["stop_reason"] = "callback"
            elif simulate is not None or not st["relative_grad_distance"] <= self.polish_above:
                raw = self._polish(p.victim, p.targets, raw, p.labels, st, p.norm2, None, simulate)
            st["update_model"] = update_model(obs, simulate is not None)
            st["seconds"] = stack_seconds / k + time.perf_counter() - polish_start
            recons.append(reconstruction(raw, p.labels, st))
        return recons

    def _check_config(self) -> None:
        if self.config.label_recovery == "optimised":
            raise ValueError("analytic attack recovers labels analytically; "
                             "label_recovery 'optimised' is not supported")

    def _polish(
        self, victim: nn.Module, targets: list[torch.Tensor], raw: torch.Tensor,
        labels: torch.Tensor, stats: dict[str, Any], norm2: float, callback: Callback | None,
        simulate: tuple[int, float] | None = None,
    ) -> torch.Tensor:
        """iDLG's L-BFGS gradient matching from the analytic image; the better one wins.

        With `simulate` (local_steps, local_lr) the matching is of the simulated FedAvg
        delta; its best iterate is never worse than the start, so it is kept."""
        config = self.config
        line_search = IDLG_LINE_SEARCH if config.line_search == "auto" else config.line_search
        result = match_gradients(
            victim, targets, raw.detach().clone().requires_grad_(True), hard_labels=labels,
            max_iters=config.max_iters, inner=config.lbfgs_inner, lr=config.lr,
            history=config.lbfgs_history, line_search=line_search, grad_tol=config.grad_tol,
            patience=config.patience, callback=callback, simulate=simulate,
        )
        stats.update(
            iterations=result.iterations, polished_steps=result.iterations,
            evaluations=1 + result.evaluations, stop_reason=result.stop_reason,
            diverged=result.diverged,
        )
        if simulate is not None and bool(torch.isfinite(result.images).all()):
            stats["simulated_distance"] = result.distance
            return result.images.detach()
        if result.distance < stats["analytic_grad_distance"]:
            stats["grad_distance"] = result.distance
            stats["relative_grad_distance"] = result.distance / norm2 if norm2 > 0 else float("inf")
            return result.images.detach()
        return raw


__all__ = ["CG_MAX_ITERS", "CG_TOL", "POLISH_ABOVE", "Analytic", "AnalyticParams", "invert_batch1", "invert_many"]
