"""Batches (B > 1) for the analytic attack: each sample's features, then its image.

First the last layer's gradient is split into every sample's features, with the labels
checked and corrected on the way (attacker/analytic_separation.py says why and how);
then the images come from the features, by one of BATCH_METHODS (`reconstruct_batch`).

Images, default (`reconstruct_batch` method "layers"): with the features and deltas
of every sample, each earlier layer is one linear least-squares problem for the whole
batch (analytic_joint.invert_layers: per-sample forward rows plus the shared weight
gradient), solved by CG in float64. Where the counts make it determined (16x16
colour up to B = 4: 192 features + the convolutions' 4500 weight-gradient entries
shared by 768 pixels a sample) the images come out at 40-80 dB in about a second;
where not (B = 8, or 32x32 colour beyond B = 1) method "pixels" solves the layers
above the second the same way and then the two lowest together in the pixels
(attacker/analytic_pixels.py: grey digits at B = 8 come out at 40-80 dB). A
separation left far from exact (residual > DOUBTFUL_RESIDUAL: wrong labels) gets
only DOUBTFUL_SHARE of the budget for its images and no polish.

Method "features" (attacker/analytic_features.py): B feature inversions by L-BFGS, then
the whole gradient where every sample is reliable.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attacker.analytic_features import invert_features
from attacker.analytic_joint import descend, invert_layers
from attacker.analytic_layers import Layer
from attacker.analytic_pixels import PRIOR_WEIGHT, pixel_counts, solve_pixels, supports_pixels
from attacker.analytic_separation import (
    EXACT_RESIDUAL,
    feature_bounds,
    search_labels,
    separate_features,
)
from attacker.api import private_copy
from attacker.budget import expired
from attacker.inversion import Callback

# Where the separation used to live: its names are still importable from here.
__all__ = ["BATCH_METHODS", "DOUBTFUL_RESIDUAL", "DOUBTFUL_SHARE", "EXACT_RESIDUAL", "reconstruct_batch",
           "search_labels", "separate_features"]

BATCH_METHODS = ("layers", "pixels", "features")  # see reconstruct_batch
CG_TOL = 1e-7  # each layer's CG tolerance (looser costs PSNR: 1e-6 gave 36 dB where 1e-7 gave 53)
CG_MAX_ITERS = 3000
POLISH_ABOVE = 1e-6  # polish a solved batch whose relative gradient distance is above this
# A separation residual above this is doubtful: wrong labels left 1.5e-2 to 5e-2 on
# trained digit models at B = 8, right ones 6e-8 to 1e-5 (benchmarks/batch_analytic.py).
DOUBTFUL_RESIDUAL = 1e-3
# Of the budget, where a doubtful batch's image solve stops. Doubtful separations never
# reached 30 dB (trained sigmoid LeNet, 24 batches of 2 and 4: 3-24 dB, 0.2-0.9 s of image
# solve each; the exact ones 60-100 dB), so they get only what is left of a tenth of the
# budget after the label search, and the time goes to the next update (docs/live.md).
DOUBTFUL_SHARE = 0.1


def reconstruct_batch(
    victim: nn.Module, layers: list[Layer], targets: list[torch.Tensor], labels: torch.Tensor,
    input_shape: tuple[int, int, int], *, max_iters: int, inner: int, history: int,
    working: torch.dtype, callback: Callback | None, method: str = "layers",
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Separate, then invert: (raw images in the victim's dtype, labels, stats).

    method "layers" (default): every layer solved for the whole batch in closed form
    (analytic_joint.invert_layers), then, only when those images miss the gradient
    by more than POLISH_ABOVE (relative), the gradient polish of `invert_features`
    started from them; the one nearer the gradient is returned. "features": the
    earlier path, images by L-BFGS against the features from a flat start, then the
    gradient (kept for comparison: benchmarks/batch_analytic.py). "pixels": the layers
    above the second in closed form, then the two lowest solved together in the pixels
    (analytic_pixels.solve_pixels), with its smoothness prior only where the pixel
    count falls short; then the polish as for "layers".
    """
    if method not in BATCH_METHODS:
        raise ValueError(f"unknown batch method '{method}' (known: {', '.join(BATCH_METHODS)})")
    start = time.perf_counter()
    top = layers[-1]
    assert top.bias_index is not None  # parse_chain requires the final bias
    model = private_copy(victim).to(working)  # the float64 twin; the victim stays as it is
    work = [t.to(working) for t in targets]
    chain = [_rebind(layer, model) for layer in layers]
    last = chain[-1].module
    assert last.bias is not None
    bounds = feature_bounds(layers)
    sep, changes, _ = search_labels(last.weight.detach(), last.bias.detach(), work[top.weight_index],
                                 work[top.bias_index], labels.to(work[0].device), bounds)
    separate_seconds = time.perf_counter() - start
    stats: dict[str, Any] = {
        "batch_method": method, "separate_seconds": separate_seconds,
        "separation_residual": sep.residual, "separation_ratio": sep.ratio,
        "reliability": [round(float(r), 4) for r in sep.reliability], "label_changes": changes,
    }
    if method == "features":
        inv = invert_features(model, chain, sep, work, input_shape, max_iters=max_iters,
                              inner=inner, history=history, callback=callback)
        stats.update(iterations=inv.iterations, evaluations=inv.evaluations,
                     feature_iterations=inv.phase1_iterations, gradient_polish=inv.polished,
                     stop_reason=inv.stop_reason)
        return inv.images.to(targets[0].dtype), sep.labels.to(targets[0].device), stats
    weight, bias = last.weight.detach(), last.bias.detach()
    onehot = F.one_hot(sep.labels, weight.shape[0]).to(weight.dtype)
    deltas = (torch.softmax(sep.features @ weight.T + bias, dim=1) - onehot) / sep.labels.numel()
    # A separation far from exact means wrong labels (or a local minimum the restarts
    # did not leave): the images cannot come out right, so they get a short share of
    # the budget and no polish, and the rest goes to the next update.
    doubtful = not sep.residual <= DOUBTFUL_RESIDUAL
    stop = (lambda: expired(DOUBTFUL_SHARE)) if doubtful else expired
    stats["separation_doubtful"] = doubtful
    if method == "pixels":
        solved, layer_stats = _solve_pixels(chain, work, sep.features, deltas @ weight,
                                            input_shape, stop)
    else:
        solved, layer_stats = invert_layers(chain, work, sep.features, deltas @ weight,
                                            input_shape, tol=CG_TOL, max_iters=CG_MAX_ITERS,
                                            stop=stop)
    norm2 = float(sum(torch.sum(t * t) for t in work)) or 1.0
    solved_distance = _distance(model, solved, sep.labels, work) / norm2
    stats.update(solve_seconds=time.perf_counter() - start - separate_seconds,
                 solved_relative_distance=solved_distance, layers=layer_stats,
                 cg_iterations=sum(int(st["iterations"]) for st in layer_stats),
                 iterations=0, evaluations=1, gradient_polish=False, stop_reason="analytic")
    raw = solved
    if callback is not None and callback(0, solved.detach().clamp(0.0, 1.0)):
        stats["stop_reason"] = "callback"
    elif not solved_distance <= POLISH_ABOVE and not doubtful and not expired():
        inv = invert_features(model, chain, sep, work, input_shape, max_iters=max_iters,
                              inner=inner, history=history, callback=callback,
                              start=solved.clamp(0.0, 1.0), first_phase=2)
        polished = _distance(model, inv.images, sep.labels, work) / norm2
        stats.update(iterations=inv.iterations, evaluations=1 + inv.evaluations,
                     gradient_polish=True, stop_reason=inv.stop_reason,
                     polished_relative_distance=polished)
        if polished < solved_distance:
            raw = inv.images
    return raw.detach().to(targets[0].dtype), sep.labels.to(targets[0].device), stats


def _solve_pixels(chain: list[Layer], work: list[torch.Tensor], features: torch.Tensor,
                  top_delta: torch.Tensor, input_shape: tuple[int, int, int],
                  stop: Callable[[], bool]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Layers above the second in closed form, then the two lowest in the pixels."""
    if not supports_pixels(chain):
        raise ValueError("batch method 'pixels' needs two plain convolutions at the bottom")
    h2, dh2, layer_stats = descend(chain, work, features, top_delta, tol=CG_TOL,
                                   max_iters=CG_MAX_ITERS, lowest=2, stop=stop)
    batch = features.shape[0]
    second = chain[1]
    assert second.activation is not None
    h2 = h2.reshape(batch, *second.out_shape[1:])
    delta2 = dh2.reshape(h2.shape) * second.activation.slope(h2)
    unknowns, equations = pixel_counts(chain, batch)
    start = torch.full((batch, *input_shape), 0.5, dtype=h2.dtype, device=h2.device)
    images, stats = solve_pixels(chain, work, h2, delta2, start,
                                 prior=PRIOR_WEIGHT if equations < unknowns else 0.0, stop=stop)
    return images, [*layer_stats, stats]


def _distance(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
              targets: list[torch.Tensor]) -> float:
    """The squared gradient distance of `images` under `labels` to `targets`."""
    params = list(model.parameters())
    with torch.enable_grad():
        grads = torch.autograd.grad(F.cross_entropy(model(images.detach()), labels), params)
    return float(sum(torch.sum((g - t) ** 2) for g, t in zip(grads, targets, strict=True)))


def _rebind(layer: Layer, model: nn.Module) -> Layer:
    """The same layer description pointing at `model`'s module of that name."""
    return dataclasses.replace(layer, module=model.get_submodule(layer.name))  # type: ignore[arg-type]

