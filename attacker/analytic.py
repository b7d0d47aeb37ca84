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

Scope: batch size 1; chains of Conv2d / Linear layers with Sigmoid, Tanh,
LeakyReLU(slope > 0) or no activation and a final Linear with bias
(analytic_layers.parse_chain says precisely, and refuses others with a
ValueError): the DLG LeNet and the MLP of gradleak.models. Deterministic: the
seed is not used. Ground truth is never seen.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from attacker.analytic_layers import (
    ConvOps,
    Layer,
    linear_input,
    parse_chain,
    relative,
    solve_conv_input,
)
from attacker.attacks import (
    IDLG_LINE_SEARCH,
    Attack,
    AttackConfig,
    Observation,
    Reconstruction,
    _private_copy,
    _targets,
    compute_gradients,
    register_attack,
)
from attacker.inversion import Callback, gradient_distance, match_gradients
from attacker.labels import recover_label_batch1

CG_TOL = 1e-7  # relative residual of each convolution's normal equations
CG_MAX_ITERS = 3000  # CG iteration cap per convolution
# Polish only when the analytic image's gradient misses the observation by more than
# this relative squared distance. For scale, on the benchmark's LeNet white noise
# at 40 dB PSNR gives about 1e-4 and at 60 dB about 1e-6; the analytic images of
# the benchmark land far below (PSNR > 60 dB), so they are returned unpolished.
POLISH_ABOVE = 1e-5


@register_attack("analytic")
class Analytic(Attack):
    """R-GAP-style layer-by-layer inversion for batch 1, optionally polished by L-BFGS.

    AttackConfig: max_iters, lbfgs_inner, lr, lbfgs_history, line_search,
    grad_tol and patience govern the polish only ("auto" line search means
    iDLG's strong Wolfe); seed is unused (the attack is deterministic);
    label_recovery must be "auto" or "analytic".
    """

    def __init__(
        self,
        config: AttackConfig | None = None,
        *,
        cg_tol: float = CG_TOL,
        cg_max_iters: int = CG_MAX_ITERS,
        polish_above: float = POLISH_ABOVE,
    ) -> None:
        super().__init__(config)
        if not (cg_tol > 0 and cg_max_iters >= 1 and polish_above >= 0):
            raise ValueError("need cg_tol > 0, cg_max_iters >= 1 and polish_above >= 0")
        self.cg_tol, self.cg_max_iters, self.polish_above = cg_tol, cg_max_iters, polish_above

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

        Raises:
            ValueError: for a batch size other than 1, a model outside the
                supported chains, a non-finite gradient, or label_recovery
                "optimised".
        """
        start = time.perf_counter()
        if obs.batch_size != 1:
            raise ValueError(
                f"analytic attack needs batch size 1, got {obs.batch_size} "
                "(use idlg or ig for batches)"
            )
        if self.config.label_recovery == "optimised":
            raise ValueError("analytic attack recovers labels analytically; "
                             "label_recovery 'optimised' is not supported")
        victim = _private_copy(model)
        targets = _targets(victim, obs)
        if not all(bool(torch.isfinite(t).all()) for t in targets):
            raise ValueError("analytic attack needs a finite gradient")
        layers = parse_chain(victim, obs.input_shape)
        top = layers[-1]
        assert top.bias_index is not None  # parse_chain requires the final bias
        label = recover_label_batch1(targets[top.weight_index], targets[top.bias_index])
        labels = torch.tensor([label], dtype=torch.int64, device=targets[0].device)
        dtype = torch.float32 if targets[0].device.type == "mps" else torch.float64
        raw64, layer_stats = invert_batch1(
            layers, [t.to(dtype) for t in targets], obs.input_shape,
            tol=self.cg_tol, max_iters=self.cg_max_iters,
        )
        raw = raw64.to(targets[0].dtype)
        norm2 = float(sum(torch.sum(t * t) for t in targets))
        analytic_distance = _distance(victim, raw, labels, targets)
        analytic_seconds = time.perf_counter() - start
        stats: dict[str, Any] = {
            "attack": self.name,
            "iterations": 0,
            "evaluations": 1,
            "grad_distance": analytic_distance,
            "analytic_grad_distance": analytic_distance,
            "relative_grad_distance": analytic_distance / norm2 if norm2 > 0 else float("inf"),
            "analytic_seconds": analytic_seconds,
            "label_source": "analytic",
            "diverged": False,
            "stop_reason": "analytic",
            "device": str(raw.device),
            "polished_steps": 0,
            "cg_iterations": sum(int(s["iterations"]) for s in layer_stats),
            "layers": layer_stats,
        }
        if callback is not None and callback(0, raw.clamp(0.0, 1.0)):
            stats["stop_reason"] = "callback"
        elif not stats["relative_grad_distance"] <= self.polish_above:
            raw = self._polish(victim, targets, raw, labels, stats, norm2, callback)
        stats["seconds"] = time.perf_counter() - start
        images = torch.nan_to_num(raw.detach(), nan=0.0).clamp(0.0, 1.0)
        return Reconstruction(images=images, labels=labels, stats=stats, raw_images=raw.detach())

    def _polish(
        self, victim: nn.Module, targets: list[torch.Tensor], raw: torch.Tensor,
        labels: torch.Tensor, stats: dict[str, Any], norm2: float, callback: Callback | None,
    ) -> torch.Tensor:
        """iDLG's L-BFGS gradient matching from the analytic image; the better one wins."""
        config = self.config
        line_search = IDLG_LINE_SEARCH if config.line_search == "auto" else config.line_search
        result = match_gradients(
            victim, targets, raw.detach().clone().requires_grad_(True), hard_labels=labels,
            max_iters=config.max_iters, inner=config.lbfgs_inner, lr=config.lr,
            history=config.lbfgs_history, line_search=line_search, grad_tol=config.grad_tol,
            patience=config.patience, callback=callback,
        )
        stats.update(
            iterations=result.iterations, polished_steps=result.iterations,
            evaluations=1 + result.evaluations, stop_reason=result.stop_reason,
            diverged=result.diverged,
        )
        if result.distance < stats["analytic_grad_distance"]:
            stats["grad_distance"] = result.distance
            stats["relative_grad_distance"] = result.distance / norm2 if norm2 > 0 else float("inf")
            return result.images.detach()
        return raw


def _distance(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, targets: list[torch.Tensor]
) -> float:
    """DLG's squared gradient distance of `images` to the observation."""
    with torch.enable_grad():
        grads = compute_gradients(model, images, labels)
    return float(gradient_distance(grads, targets))


def invert_batch1(
    layers: list[Layer],
    grads: list[torch.Tensor],
    input_shape: tuple[int, int, int],
    *,
    tol: float = CG_TOL,
    max_iters: int = CG_MAX_ITERS,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The (1, C, H, W) input behind a batch-1 gradient, recovered layer by layer.

    Args:
        layers: analytic_layers.parse_chain's chain (shapes recorded).
        grads: the observed gradients in model.parameters() order, in the working
            dtype (float64) on the model's device.
        input_shape: (C, H, W).
        tol, max_iters: each convolution's CG tolerance and cap.

    Returns:
        (input, per-layer stats from the output side): name, type, unknowns,
        equations, determined (equations >= unknowns; R-GAP's condition for a
        unique answer, else the solve can only reach the least-squares answer
        nearest its start and the polish has to do the rest), iterations (CG;
        0 for closed forms), converged,
        forward_residual (relative, in output space), gradient_residual
        (relative, of the weight gradient) and delta_residual (how far the
        recursed output delta's per-channel sum is from the observed bias
        gradient, relative; nan without a bias).
    """
    dtype = grads[0].dtype
    top = layers[-1]
    assert top.bias_index is not None
    delta = grads[top.bias_index]  # (K,) = p - y exactly at B = 1
    top_weight = top.module.weight.detach().to(dtype)
    a = linear_input(grads[top.weight_index], delta)  # (n,) the final layer's input
    delta_in = top_weight.T @ delta  # dL/d(its input)
    stats = [{
        "name": top.name, "type": "Linear", "unknowns": a.numel(),
        "equations": grads[top.weight_index].numel(), "determined": True, "iterations": 0,
        "converged": True, "forward_residual": 0.0,
        "gradient_residual": relative(torch.outer(delta, a) - grads[top.weight_index],
                                  grads[top.weight_index]),
        "delta_residual": 0.0,
    }]
    for i in range(len(layers) - 2, -1, -1):
        layer = layers[i]
        act = layer.activation
        assert act is not None  # every layer but the last has one (IDENTITY at least)
        h = a.reshape(layer.out_shape)
        z, slope = act.inverse(h), act.slope(h)
        delta_z = delta_in.reshape(layer.out_shape) * slope
        weight = layer.module.weight.detach().to(dtype)
        bias = None if layer.module.bias is None else layer.module.bias.detach().to(dtype)
        weight_grad = grads[layer.weight_index]
        observed = None if layer.bias_index is None else grads[layer.bias_index]
        spatial = tuple(range(2, delta_z.dim()))
        recursed_bias = delta_z.sum(dim=spatial).flatten() if spatial else delta_z.flatten()
        delta_res = float("nan") if observed is None else relative(recursed_bias - observed, observed)
        if not layer.is_conv:
            if observed is not None:  # the observed bias gradient is delta_z itself at B = 1
                delta_z = observed.reshape(layer.out_shape)
            a = linear_input(weight_grad, delta_z.flatten())
            fwd = a @ weight.T + (0.0 if bias is None else bias)
            stats.append({
                "name": layer.name, "type": "Linear", "unknowns": a.numel(),
                "equations": weight_grad.numel(), "determined": True, "iterations": 0,
                "converged": True,
                "forward_residual": relative(slope.flatten() * (fwd - z.flatten()), slope * z),
                "gradient_residual": relative(torch.outer(delta_z.flatten(), a) - weight_grad,
                                          weight_grad),
                "delta_residual": delta_res,
            })
            delta_in = weight.T @ delta_z.flatten()
            continue
        assert isinstance(layer.module, nn.Conv2d)
        ops = ConvOps.of(layer.module, layer.in_shape, dtype)
        centre = layers[i - 1].activation.centre if i > 0 else 0.5  # type: ignore[union-attr]
        begin = torch.full(layer.in_shape, centre, dtype=dtype, device=z.device)
        x, info = solve_conv_input(ops, bias, z, slope, delta_z, weight_grad, begin,
                                   tol=tol, max_iters=max_iters)
        stats.append({
            "name": layer.name, "type": "Conv2d", "unknowns": x.numel(),
            "equations": z.numel() + weight_grad.numel(),
            "determined": z.numel() + weight_grad.numel() >= x.numel(),
            "iterations": info.iterations,
            "converged": info.converged, "forward_residual": info.forward_residual,
            "gradient_residual": info.gradient_residual, "delta_residual": delta_res,
        })
        a = x
        delta_in = ops.forward_adjoint(delta_z)
    return a.reshape(1, *input_shape), stats
