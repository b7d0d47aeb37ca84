"""The batch-1 recursion of the analytic attack: each layer's input from its output, backwards.

Split out of attacker/analytic.py (which re-exports `invert_batch1` and `invert_many`):
the attack class there handles labels, polish, stats and stacking; this module is
the layer-by-layer algebra of one update (`invert_batch1`) and of k updates stacked
(`invert_many`), as described in analytic.py's docstring.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attacker.analytic_layers import Layer
from attacker.analytic_solvers import (
    ConvOps,
    linear_input,
    relative,
    solve_conv_input,
    solve_conv_inputs,
)

CG_TOL = 1e-7  # relative residual of each convolution's normal equations
CG_MAX_ITERS = 3000  # CG iteration cap per convolution


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
    a, delta_in, top_stats = _invert_top(layers[-1], grads)
    stats = [top_stats]
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


def _invert_top(
    top: Layer, grads: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The final Linear at B = 1: (its input a, dL/da, its layer stats)."""
    assert top.bias_index is not None
    delta = grads[top.bias_index]  # (K,) = p - y exactly at B = 1
    weight_grad = grads[top.weight_index]
    a = linear_input(weight_grad, delta)  # (n,) the final layer's input
    delta_in = top.module.weight.detach().to(delta.dtype).T @ delta  # dL/d(its input)
    stats = {
        "name": top.name, "type": "Linear", "unknowns": a.numel(),
        "equations": weight_grad.numel(), "determined": True, "iterations": 0,
        "converged": True, "forward_residual": 0.0,
        "gradient_residual": relative(torch.outer(delta, a) - weight_grad, weight_grad),
        "delta_residual": 0.0,
    }
    return a, delta_in, stats


def invert_many(
    chains: list[list[Layer]],
    grads: list[list[torch.Tensor]],
    input_shape: tuple[int, int, int],
    *,
    tol: float = CG_TOL,
    max_iters: int = CG_MAX_ITERS,
) -> tuple[torch.Tensor, list[list[dict[str, Any]]]]:
    """`invert_batch1` for k batch-1 gradients at once, each with its own weights.

    Problem j is (chains[j], grads[j]); the chains come from models of one
    architecture (their layers have equal shapes), possibly the same chain object
    for updates taken at one model version. Closed-form layers run per problem;
    each convolution is one stacked CG solve over all k problems
    (analytic_layers.solve_conv_inputs), in which every problem keeps its own
    scalars and stops where it would alone.

    Returns:
        ((k, C, H, W) inputs, per-problem layer stats as `invert_batch1` gives them).
    """
    k = len(chains)
    dtype = grads[0][0].dtype
    tops = [chain[-1] for chain in chains]
    stats: list[list[dict[str, Any]]] = [[] for _ in range(k)]
    a_list, delta_in = [], []
    for j, (top, g) in enumerate(zip(tops, grads, strict=True)):
        a, d_in, top_stats = _invert_top(top, g)
        a_list.append(a)
        delta_in.append(d_in)
        stats[j].append(top_stats)
    a_all = torch.stack(a_list)  # (k, n)
    d_all = torch.stack(delta_in)
    for i in range(len(chains[0]) - 2, -1, -1):
        layer = chains[0][i]
        act = layer.activation
        assert act is not None
        out_shape = (k, *layer.out_shape[1:])
        h = a_all.reshape(out_shape)
        z, slope = act.inverse(h), act.slope(h)
        delta_z = d_all.reshape(out_shape) * slope
        mods = [chain[i].module for chain in chains]
        weights = [m.weight.detach().to(dtype) for m in mods]
        biases = [None if m.bias is None else m.bias.detach().to(dtype) for m in mods]
        weight_grads = [g[layer.weight_index] for g in grads]
        observed = [None if layer.bias_index is None else g[layer.bias_index] for g in grads]
        spatial = tuple(range(2, delta_z.dim()))
        recursed = delta_z.sum(dim=spatial) if spatial else delta_z
        delta_res = [float("nan") if o is None else relative(recursed[j].flatten() - o, o)
                     for j, o in enumerate(observed)]
        if not layer.is_conv:
            a_list, delta_in = [], []
            for j in range(k):
                dz = delta_z[j:j + 1]
                if observed[j] is not None:  # the observed bias gradient is delta_z at B = 1
                    dz = observed[j].reshape(layer.out_shape)  # type: ignore[union-attr]
                dz_flat = dz.flatten()
                a = linear_input(weight_grads[j], dz_flat)
                bias_j = biases[j]
                fwd = a @ weights[j].T + (0.0 if bias_j is None else bias_j)
                s_j = slope[j].flatten()
                stats[j].append({
                    "name": layer.name, "type": "Linear", "unknowns": a.numel(),
                    "equations": weight_grads[j].numel(), "determined": True, "iterations": 0,
                    "converged": True,
                    "forward_residual": relative(s_j * (fwd - z[j].flatten()), s_j * z[j].flatten()),
                    "gradient_residual": relative(torch.outer(dz_flat, a) - weight_grads[j],
                                              weight_grads[j]),
                    "delta_residual": delta_res[j],
                })
                a_list.append(a)
                delta_in.append(weights[j].T @ dz_flat)
            a_all, d_all = torch.stack(a_list), torch.stack(delta_in)
            continue
        distinct: dict[int, ConvOps] = {}
        ops = [distinct.setdefault(id(m), ConvOps.of(m, layer.in_shape, dtype))  # type: ignore[arg-type]
               for m in mods]
        centre = chains[0][i - 1].activation.centre if i > 0 else 0.5  # type: ignore[union-attr]
        begin = torch.full((k, *layer.in_shape[1:]), centre, dtype=dtype, device=z.device)
        x, infos = solve_conv_inputs(ops, biases, z, slope, delta_z, weight_grads, begin,
                                     tol=tol, max_iters=max_iters)
        for j, info in enumerate(infos):
            stats[j].append({
                "name": layer.name, "type": "Conv2d", "unknowns": x[j].numel(),
                "equations": z[j].numel() + weight_grads[j].numel(),
                "determined": z[j].numel() + weight_grads[j].numel() >= x[j].numel(),
                "iterations": info.iterations,
                "converged": info.converged, "forward_residual": info.forward_residual,
                "gradient_residual": info.gradient_residual, "delta_residual": delta_res[j],
            })
        a_all = x
        d_all = torch.cat([o.forward_adjoint(delta_z[j:j + 1]) for j, o in enumerate(ops)])
    return a_all.reshape(k, *input_shape), stats
