"""A batch's layers inverted in closed form, all samples of a layer in one linear solve.

Once the last layer's input A (B, n) and output deltas G (B, K) of every sample are
known (analytic_batch.separate_features), each earlier layer k, knowing its output h
for every sample (so z = f^-1(h), the slope f'(z) and dL/dz for each), has one
linear least-squares problem in the stacked inputs X (B samples at once):

    forward   s_j * (layer(x_j) + b) = s_j * z_j    for every sample j
    gradient  sum_j dW(x_j, delta_j) = dW_k          the observed weight gradient

The forward rows are per sample; the weight gradient couples the batch (R-GAP's
constraint summed over the samples). Counting: at B = 1 the LeNet's layers are
determined; at B > 1 a stride-2 convolution has B * 4x more unknowns than forward
rows and only one weight gradient to share, so where the count falls short the
solve returns the least-squares answer nearest its start and the polish that follows
(analytic_batch.invert_features, phase 2) has the whole gradient to finish with;
analytic.Analytic picks the feature inversion outright where the count falls short.

Each system is scaled as at B = 1 (every block's average row has unit norm), Jacobi-
preconditioned and solved by CG in float64 (analytic_layers.conjugate_gradients).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attacker.analytic_layers import Layer
from attacker.analytic_solvers import ConvOps, conjugate_gradients, relative

Operator = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class JointSystem:
    """One layer's scaled normal equations over the whole batch, ready for CG."""

    apply: Operator  # X -> w_f A_f^T S^2 A_f X + w_g A_g^T A_g X
    rhs: torch.Tensor  # shaped like X
    precond: torch.Tensor  # Jacobi diagonal, shaped like X
    forward: Operator  # X -> layer(X) without bias
    gradient: Operator  # X -> the weight gradient the batch gives


def _weights(rows_f: int, mass_f: float, rows_g: int, mass_g: float) -> tuple[float, float]:
    w_f = rows_f / mass_f if mass_f > 0 and math.isfinite(mass_f) else 0.0
    w_g = rows_g / mass_g if mass_g > 0 and math.isfinite(mass_g) else 0.0
    if w_f == 0.0 and w_g == 0.0:
        raise ValueError("analytic attack: a layer's constraints carry no signal")
    return w_f, w_g


def conv_system(
    conv: nn.Conv2d, in_shape: tuple[int, ...], target: torch.Tensor, s2: torch.Tensor,
    delta: torch.Tensor, weight_grad: torch.Tensor,
) -> JointSystem:
    """The batch system of one convolution; target = z - bias, all (B, ...) float64."""
    ops = ConvOps.of(conv, in_shape, target.dtype)
    diag_f = ops.forward_adjoint(s2, ops.weight * ops.weight)
    diag_g = ops.gradient_adjoint(torch.ones_like(weight_grad), delta * delta)
    w_f, w_g = _weights(target.numel(), float(diag_f.sum()), weight_grad.numel(), float(diag_g.sum()))
    rhs = w_f * ops.forward_adjoint(s2 * target) + w_g * ops.gradient_adjoint(weight_grad, delta)
    precond = (w_f * diag_f + w_g * diag_g).clamp_min(torch.finfo(rhs.dtype).tiny)
    apply = _conv_normal(ops, w_f * s2, w_g * delta, delta) if conv.groups == 1 else (
        lambda x: w_f * ops.forward_adjoint(s2 * ops.forward(x))
        + w_g * ops.gradient_adjoint(ops.gradient(x, delta), delta))
    return JointSystem(apply, rhs, precond, ops.forward, lambda x: ops.gradient(x, delta))


def _conv_normal(ops: ConvOps, s2_scaled: torch.Tensor, d_scaled: torch.Tensor,
                 delta: torch.Tensor) -> Operator:
    """The normal operator on the batch's patches: one unfold, one fold, four matmuls.

    The patches of all B samples sit side by side as one (C*kh*kw, B*L) matrix, so
    each product is one plain matmul rather than B small ones (about 2x faster here).
    """
    out_channels, batch = ops.weight.shape[0], delta.shape[0]
    geometry = {"kernel_size": (ops.weight.shape[2], ops.weight.shape[3]),
                "dilation": ops.dilation, "padding": ops.padding, "stride": ops.stride}
    w_flat = ops.weight.reshape(out_channels, -1)  # (O, CKK)
    w_flat_t = w_flat.T.contiguous()

    def side_by_side(t: torch.Tensor) -> torch.Tensor:  # (B, O, L) -> (O, B*L)
        return t.reshape(batch, out_channels, -1).transpose(0, 1).reshape(out_channels, -1)

    d_flat, d_scaled_flat, s2_flat = (side_by_side(t) for t in (delta, d_scaled, s2_scaled))
    size = ops.in_shape[2:]

    def apply(x: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(x, **geometry)  # (B, CKK, L)
        width = patches.shape[2]
        cols = patches.transpose(0, 1).reshape(patches.shape[1], -1)  # (CKK, B*L)
        grad_t = cols @ d_flat.T  # (CKK, O): the batch's weight gradient, transposed
        out = torch.addmm(grad_t @ d_scaled_flat, w_flat_t, s2_flat * (w_flat @ cols))
        out = out.reshape(-1, batch, width).transpose(0, 1)  # (B, CKK, L)
        return F.fold(out, size, **geometry)

    return apply


def linear_system(
    linear: nn.Linear, target: torch.Tensor, s2: torch.Tensor, delta: torch.Tensor,
    weight_grad: torch.Tensor,
) -> JointSystem:
    """The batch system of one nn.Linear; target (B, out) = z - bias, delta (B, out)."""
    weight = linear.weight.detach().to(target.dtype)  # (out, in)
    diag_f = s2 @ (weight * weight)  # (B, in)
    diag_g = (delta * delta).sum(1, keepdim=True).expand_as(diag_f)
    w_f, w_g = _weights(target.numel(), float(diag_f.sum()), weight_grad.numel(), float(diag_g.sum()))
    rhs = w_f * (s2 * target) @ weight + w_g * delta @ weight_grad
    precond = (w_f * diag_f + w_g * diag_g).clamp_min(torch.finfo(rhs.dtype).tiny).contiguous()

    def apply(x: torch.Tensor) -> torch.Tensor:
        return w_f * (s2 * (x @ weight.T)) @ weight + w_g * delta @ (delta.T @ x)

    return JointSystem(apply, rhs, precond, lambda x: x @ weight.T, lambda x: delta.T @ x)


def invert_layers(
    layers: list[Layer], grads: list[torch.Tensor], features: torch.Tensor,
    top_delta: torch.Tensor, input_shape: tuple[int, int, int], *, tol: float, max_iters: int,
    start: torch.Tensor | None = None, stop: Callable[[], bool] | None = None,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The (B, C, H, W) inputs behind a batch, from every sample's features down.

    Args:
        layers: analytic_layers.parse_chain's chain (shapes recorded at B = 1).
        grads: the observed gradients, model.parameters() order, float64.
        features: (B, n) the last layer's input of every sample.
        top_delta: (B, n) dL/d(features) of every sample, G W for the last layer.
        input_shape: (C, H, W).
        tol, max_iters: each layer's CG tolerance and cap.
        start: optional (B, C, H, W) images whose forward pass gives each CG its first
            iterate (a previous estimate); the activations' centres otherwise.
        stop: asked during each CG (a time budget); True ends that solve early.

    Returns:
        (inputs, per-layer stats from the output side: name, type, unknowns,
        equations, determined, iterations, converged, forward_residual,
        gradient_residual).
    """
    h, _, stats = descend(layers, grads, features, top_delta, tol=tol, max_iters=max_iters,
                          start=start, stop=stop)
    return h.reshape(features.shape[0], *input_shape), stats


def descend(
    layers: list[Layer], grads: list[torch.Tensor], features: torch.Tensor,
    top_delta: torch.Tensor, *, tol: float, max_iters: int, lowest: int = 0,
    start: torch.Tensor | None = None, stop: Callable[[], bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """`invert_layers` down to the input of layers[lowest] only.

    Returns (that input for every sample, dL/d(that input), per-layer stats); with
    lowest 0 the input is the images, flat per sample where the first layer is linear.
    """
    batch = features.shape[0]
    dtype = features.dtype
    starts = _layer_inputs(layers, start) if start is not None else None
    h, delta_in = features, top_delta
    stats: list[dict[str, Any]] = []
    for i in range(len(layers) - 2, lowest - 1, -1):
        layer = layers[i]
        act = layer.activation
        assert act is not None  # every layer but the last has one (IDENTITY at least)
        out_shape = (batch, *layer.out_shape[1:])
        in_shape = (batch, *layer.in_shape[1:])
        h = h.reshape(out_shape)
        z, slope = act.inverse(h), act.slope(h)
        delta = delta_in.reshape(out_shape) * slope
        bias = layer.module.bias
        target = z if bias is None else z - bias.detach().to(dtype).view(1, -1, *([1] * (z.dim() - 2)))
        weight_grad = grads[layer.weight_index]
        if layer.is_conv:
            assert isinstance(layer.module, nn.Conv2d)
            system = conv_system(layer.module, in_shape, target, slope * slope, delta, weight_grad)
        else:
            assert isinstance(layer.module, nn.Linear)
            system = linear_system(layer.module, target.flatten(1), (slope * slope).flatten(1),
                                   delta.flatten(1), weight_grad)
            in_shape = (batch, layer.in_shape[-1])
        if starts is not None:
            begin = starts[i].reshape(in_shape).to(dtype)
        else:
            centre = layers[i - 1].activation.centre if i > 0 else 0.5  # type: ignore[union-attr]
            begin = torch.full(in_shape, centre, dtype=dtype, device=features.device)
        x, iterations, converged = conjugate_gradients(system.apply, system.rhs, begin,
                                                       system.precond, tol, max_iters, stop)
        flat_target = target if layer.is_conv else target.flatten(1)
        flat_slope = slope if layer.is_conv else slope.flatten(1)
        stats.append({
            "name": layer.name, "type": type(layer.module).__name__, "unknowns": x.numel(),
            "equations": target.numel() + weight_grad.numel(),
            "determined": target.numel() + weight_grad.numel() >= x.numel(),
            "iterations": iterations, "converged": converged,
            "forward_residual": relative(flat_slope * (system.forward(x) - flat_target),
                                         flat_slope * (z if layer.is_conv else z.flatten(1))),
            "gradient_residual": relative(system.gradient(x) - weight_grad, weight_grad),
        })
        weight = layer.module.weight.detach().to(dtype)
        if layer.is_conv:
            delta_in = ConvOps.of(layer.module, in_shape, dtype).forward_adjoint(delta)  # type: ignore[arg-type]
        else:
            delta_in = delta.flatten(1) @ weight
        h = x
    return h, delta_in, stats


def _layer_inputs(layers: list[Layer], images: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's input for `images` (B, C, H, W), in chain order."""
    inputs = []
    x = images
    with torch.no_grad():
        for layer in layers:
            if layer.kind == "linear" and x.dim() > 2:
                x = x.flatten(1)
            inputs.append(x)
            out = layer.module(x.to(layer.module.weight.dtype))
            x = out if layer.activation is None else layer.activation.apply(out)
    return inputs

