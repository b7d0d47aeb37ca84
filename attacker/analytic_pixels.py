"""A batch's two lowest layers solved together, in the images' own pixels.

Why. Layer by layer (analytic_joint.invert_layers), the second convolution's input
h1 = f(conv1(x)) is an unknown of its own: on gradleak's 16x16 LeNet at B = 8 that is
8 x 768 unknowns for 8 x 192 forward rows plus 3600 weight-gradient entries, so the
solve is underdetermined and the image it leads to is poor (7-9 dB). With the pixels
as the unknowns instead, h1 is a function of x and the same equations plus the first
convolution's weight and bias gradients count against far fewer unknowns:

    grey 16x16, B = 8:   2048 pixels;  1536 + 3600 + 300 + 12 = 5448 equations
    colour 16x16, B = 8: 6144 pixels;  1536 + 3600 + 900 + 12 = 6048 equations

Grey digits are determined several times over; colour at B = 8 falls 96 short, so
there (and only where the count falls short) a small smoothness prior (squared
differences of neighbouring pixels, weight PRIOR_WEIGHT) picks the answer.

The equations, with h2 the second layer's known output, z2 = f^-1(h2), s2 = f'(z2)
and delta2 = dL/dz2 known from the layers above, e = conv2^T delta2:

    forward   s2 * (conv2(h1(x)) + b2 - z2) = 0
    dW2       conv2_weight(h1(x), delta2) = dW2
    dW1, db1  conv1_weight(x, e * f'(z1(x))) = dW1,  sum e * f'(z1(x)) = db1

Nonlinear in x through f, so Levenberg-Marquardt: each step solves the damped
Gauss-Newton equations (J^T J + mu I) d = -J^T r by CG, preconditioned by a
random-probe estimate of J^T J's diagonal, with J and J^T written out by hand on the
batch's patches laid side by side (`_Pixels.jvp`, `_Pixels.vjp`: two unfolds, two
folds and a few matmuls each, about 0.5 ms at B = 8 on one core, twice as fast as the
same maps through torch's convolution calls). Each block is divided by the norm of
its target, so every block's relative residual counts alike. Pixels are kept in
[0, 1]. Where the prior is on, its weight shrinks by PRIOR_DECAY each accepted step
down to PRIOR_FLOOR of its start: it steers the early steps, then leaves the
gradient to decide. The solve ends when an accepted step moves the pixels by less
than STEP_TOL (RMS), after LM_STEPS, or when `stop` (the time budget) says so.

Measured (benchmarks/batch_analytic.py, docs/benchmarks.md): grey digits at B = 8
come out at 40-80 dB; colour at B = 8, 96 equations short, at 25-36 dB, the prior's
smoothness limiting it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attacker.analytic_conv import numeric_padding
from attacker.analytic_layers import Activation, Layer

PRIOR_WEIGHT = 1e-2  # smoothness weight where the pixel count falls short (tuned on colour B = 8)
LM_STEPS = 60  # Levenberg-Marquardt steps at most
CG_STEPS = 100  # CG iterations per step at most
CG_RTOL = 1e-3  # each step's CG stops at this relative residual (inexact Gauss-Newton)
PRIOR_DECAY = 0.7  # the prior's weight shrinks by this each accepted step...
PRIOR_FLOOR = 0.03  # ... down to this share of its start
PROBES = 4  # random probes of the diagonal estimate (the preconditioner)
STEP_TOL = 1e-4  # an accepted step moving the pixels by less (RMS) ends the solve
CONVERGED = 1e-14  # squared relative residual at which the images explain the gradient


def pixel_counts(layers: list[Layer], batch: int) -> tuple[int, int]:
    """(unknowns, equations) of the joint pixel solve of layers[0] and layers[1]."""
    first, second = layers[0].module, layers[1].module
    unknowns = batch * math.prod(layers[0].in_shape[1:])
    equations = (batch * math.prod(layers[1].out_shape[1:]) + second.weight.numel()
                 + first.weight.numel() + (0 if first.bias is None else first.bias.numel()))
    return unknowns, equations


def supports_pixels(layers: list[Layer]) -> bool:
    """Whether the joint pixel solve applies: two plain convolutions at the bottom."""
    if len(layers) < 3 or not (layers[0].is_conv and layers[1].is_conv):
        return False
    return all(layer.module.groups == 1 for layer in layers[:2])  # type: ignore[union-attr]


@dataclass
class _Conv:
    """One convolution on the batch's patches laid side by side: (C*kh*kw, B*L) columns,
    so each product is one matmul; outputs stay in the (O, B*L) layout."""

    weight: torch.Tensor  # (O, C*kh*kw)
    shape: tuple[int, ...]  # the weight's own shape
    geometry: dict[str, Any]
    in_size: tuple[int, int]
    batch: int

    @classmethod
    def of(cls, conv: nn.Conv2d, in_shape: tuple[int, ...], batch: int, dtype: torch.dtype) -> _Conv:
        weight = conv.weight.detach().to(dtype)
        geometry = {"kernel_size": (weight.shape[2], weight.shape[3]), "stride": conv.stride,
                    "padding": numeric_padding(conv), "dilation": conv.dilation}
        return cls(weight.reshape(weight.shape[0], -1), tuple(weight.shape), geometry,
                   (in_shape[-2], in_shape[-1]), batch)

    def columns(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (C*kh*kw, B*L)."""
        patches = F.unfold(image, **self.geometry)
        return patches.transpose(0, 1).reshape(patches.shape[1], -1)

    def fold(self, cols: torch.Tensor) -> torch.Tensor:
        """The adjoint of `columns`: (C*kh*kw, B*L) -> (B, C, H, W)."""
        out = cols.reshape(cols.shape[0], self.batch, -1).transpose(0, 1)
        return F.fold(out, self.in_size, **self.geometry)


def _side(t: torch.Tensor) -> torch.Tensor:
    """(B, O, H, W) -> (O, B*H*W)."""
    return t.reshape(t.shape[0], t.shape[1], -1).transpose(0, 1).reshape(t.shape[1], -1)


def _image(t: torch.Tensor, batch: int, size: tuple[int, ...]) -> torch.Tensor:
    """(O, B*H*W) -> (B, O, H, W)."""
    return t.reshape(t.shape[0], batch, -1).transpose(0, 1).reshape(batch, t.shape[0], *size)


class _Pixels:
    """The residual of the joint system and its Jacobian products at a point x.

    Every per-unit quantity is kept in the side-by-side layout (O, B*L) of `_Conv`;
    the residual's blocks are forward (O2, B*L2), dW2, dW1 (flattened) and db1.
    """

    def __init__(self, layers: list[Layer], grads: list[torch.Tensor], h2: torch.Tensor,
                 delta2: torch.Tensor, prior: float) -> None:
        first, second = layers[0], layers[1]
        c1, c2 = first.module, second.module
        assert isinstance(c1, nn.Conv2d) and isinstance(c2, nn.Conv2d)
        act1, act2 = first.activation, second.activation
        assert act1 is not None and act2 is not None
        dtype, batch = h2.dtype, h2.shape[0]
        self.act1: Activation = act1
        self.batch = batch
        self.c1 = _Conv.of(c1, first.in_shape, batch, dtype)
        self.c2 = _Conv.of(c2, second.in_shape, batch, dtype)
        self.h1_size = tuple(first.out_shape[2:])
        self.b1 = None if c1.bias is None else c1.bias.detach().to(dtype).view(-1, 1)
        b2 = torch.zeros(c2.out_channels, dtype=dtype) if c2.bias is None else c2.bias.detach().to(dtype)
        s2 = act2.slope(h2)
        self.s2 = _side(s2)
        self.target = _side((act2.inverse(h2) - b2.view(1, -1, 1, 1)) * s2)  # s2 * (z2 - b2)
        self.delta2 = _side(delta2)
        self.dw1 = grads[first.weight_index].reshape(self.c1.weight.shape)
        self.dw2 = grads[second.weight_index].reshape(self.c2.weight.shape)
        self.db1 = None if first.bias_index is None else grads[first.bias_index]
        self.e = _side(self.c2.fold(self.c2.weight.T @ self.delta2))  # dL/dh1
        self.scales = [1.0 / max(float(t.norm()), 1e-300) for t in
                       (self.target, self.dw2, self.dw1, self.db1 if self.db1 is not None else self.dw1)]
        self.prior = prior
        self.x = torch.empty(0)

    def _h1_columns(self, h1: torch.Tensor) -> torch.Tensor:
        return self.c2.columns(_image(h1, self.batch, self.h1_size))

    def at(self, x: torch.Tensor) -> torch.Tensor:
        """Move to x; returns the residual there (flat)."""
        self.x = x
        self.cols = self.c1.columns(x)
        z1 = self.c1.weight @ self.cols
        if self.b1 is not None:
            z1 = z1 + self.b1
        h1 = self.act1.apply(z1)
        self.s1 = self.act1.slope(h1)
        self.ds1 = _slope_derivative(self.act1, h1, self.s1)
        self.d1 = self.e * self.s1
        self.e_ds1 = self.e * self.ds1
        h1_cols = self._h1_columns(h1)
        forward = self.s2 * (self.c2.weight @ h1_cols) - self.target
        dw2 = self.delta2 @ h1_cols.T - self.dw2
        dw1 = self.d1 @ self.cols.T - self.dw1
        db1 = None if self.db1 is None else self.d1.sum(1) - self.db1
        return self._stack(forward, dw2, dw1, db1, x)

    def _stack(self, forward: torch.Tensor, dw2: torch.Tensor, dw1: torch.Tensor,
               db1: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        s = self.scales
        parts = [forward.flatten() * s[0], dw2.flatten() * s[1], dw1.flatten() * s[2]]
        if db1 is not None:
            parts.append(db1 * s[3])
        if self.prior:
            parts += [self.prior * (x[..., 1:, :] - x[..., :-1, :]).flatten(),
                      self.prior * (x[..., :, 1:] - x[..., :, :-1]).flatten()]
        return torch.cat(parts)

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        v_cols = self.c1.columns(v)
        u = self.c1.weight @ v_cols  # dz1
        a = self.s1 * u  # dh1
        q = self.e_ds1 * u  # d(delta1)
        a_cols = self._h1_columns(a)
        forward = self.s2 * (self.c2.weight @ a_cols)
        dw2 = self.delta2 @ a_cols.T
        dw1 = torch.addmm(self.d1 @ v_cols.T, q, self.cols.T)
        return self._stack(forward, dw2, dw1, q.sum(1) if self.db1 is not None else None, v)

    def vjp(self, r: torch.Tensor) -> torch.Tensor:
        s = self.scales
        x = self.x
        n_f, n_2, n_1 = self.target.numel(), self.dw2.numel(), self.dw1.numel()
        rf = r[:n_f].view_as(self.target) * s[0]
        r2 = r[n_f:n_f + n_2].view_as(self.dw2) * s[1]
        r1 = r[n_f + n_2:n_f + n_2 + n_1].view_as(self.dw1) * s[2]
        offset = n_f + n_2 + n_1
        a_cols = torch.addmm(r2.T @ self.delta2, self.c2.weight.T, self.s2 * rf)
        a_bar = _side(self.c2.fold(a_cols))
        q_bar = r1 @ self.cols
        if self.db1 is not None:
            q_bar = q_bar + (r[offset:offset + self.db1.numel()] * s[3]).view(-1, 1)
            offset += self.db1.numel()
        u_bar = self.s1 * a_bar + self.e_ds1 * q_bar
        out = self.c1.fold(torch.addmm(r1.T @ self.d1, self.c1.weight.T, u_bar))
        if self.prior:
            dy = r[offset:offset + _count(x, 2)].view(*x.shape[:2], x.shape[2] - 1, x.shape[3])
            offset += dy.numel()
            dx = r[offset:].view(*x.shape[:3], x.shape[3] - 1)
            out = out + self.prior * (_diff_adjoint(dy, 2) + _diff_adjoint(dx, 3))
        return out


def _count(x: torch.Tensor, dim: int) -> int:
    shape = list(x.shape)
    shape[dim] -= 1
    return math.prod(shape)


def _diff_adjoint(d: torch.Tensor, dim: int) -> torch.Tensor:
    """Adjoint of x -> x[1:] - x[:-1] along dim."""
    pad = [0, 0] * (d.dim() - 1 - dim) + [1, 1]
    padded = F.pad(d, pad)
    return padded.narrow(dim, 0, d.shape[dim] + 1) - padded.narrow(dim, 1, d.shape[dim] + 1)


def _slope_derivative(act: Activation, h: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """d f'(z) / dz from the output h: sigmoid s(1 - 2h), tanh -2h s, piecewise-linear 0."""
    if act.name == "sigmoid":
        return slope * (1.0 - 2.0 * h)
    if act.name == "tanh":
        return -2.0 * h * slope
    return torch.zeros_like(h)


def solve_pixels(
    layers: list[Layer], grads: list[torch.Tensor], h2: torch.Tensor, delta2: torch.Tensor,
    start: torch.Tensor, *, prior: float = 0.0, steps: int = LM_STEPS,
    stop: Callable[[], bool] | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The (B, C, H, W) images whose two lowest layers explain h2 and the gradients.

    Args:
        layers: the chain (analytic_layers.parse_chain); layers[0], layers[1] convolutions.
        grads: observed gradients, model.parameters() order, in h2's dtype (float64).
        h2: (B, ...) the second layer's output (its activation applied), every sample.
        delta2: dL/dz2, the gradient at the second layer's pre-activation, same shape.
        start: first iterate (B, C, H, W).
        prior: the smoothness weight (0 where the count is determined).
        stop: asked between CG iterations (a time budget).

    Returns:
        (images, stats: unknowns, equations, prior, steps, cg_iterations, residual).
    """
    system = _Pixels(layers, grads, h2, delta2, prior)
    x = start.clamp(0.0, 1.0).clone()
    r = system.at(x)
    current = float(r @ r)
    mu, cg_total, taken = 1e-4, 0, 0
    generator = torch.Generator(device=x.device).manual_seed(0)
    for _ in range(steps):
        if current <= CONVERGED or (stop is not None and stop()):
            break
        g = system.vjp(r)
        diag = _diagonal(system, r, PROBES, generator) + mu
        d, iters = _cg(_damped(system, mu), -g, diag, CG_STEPS, CG_RTOL, stop)
        cg_total += iters
        trial = (x + d).clamp(0.0, 1.0)
        r_trial = system.at(trial)
        value = float(r_trial @ r_trial)
        if value < current:
            moved = float(torch.linalg.vector_norm(trial - x)) / math.sqrt(x.numel())
            x, r, current, mu = trial, r_trial, value, max(mu / 4.0, 1e-12)
            taken += 1
            if moved <= STEP_TOL and system.prior <= prior * PRIOR_FLOOR:
                break  # the pixels have settled (below the 8-bit scale by far)
            if system.prior > prior * PRIOR_FLOOR:  # the prior steers, then steps back
                system.prior = max(system.prior * PRIOR_DECAY, prior * PRIOR_FLOOR)
                r = system.at(x)
                current = float(r @ r)
        else:
            system.at(x)  # back to the accepted point
            mu *= 8.0
    unknowns, equations = pixel_counts(layers, h2.shape[0])
    return x, {"name": f"{layers[1].name}+{layers[0].name}", "type": "pixels", "unknowns": unknowns,
               "equations": equations, "determined": equations >= unknowns, "prior": prior,
               "steps": taken, "iterations": cg_total, "residual": math.sqrt(current)}


def _damped(system: _Pixels, mu: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """v -> (J^T J + mu I) v at the system's current point."""
    return lambda v: system.vjp(system.jvp(v)) + mu * v


def _diagonal(system: _Pixels, r: torch.Tensor, probes: int,
              generator: torch.Generator) -> torch.Tensor:
    """An estimate of diag(J^T J): the mean of (J^T w)^2 over random signs w."""
    total = torch.zeros_like(system.x)
    for _ in range(probes):
        w = torch.randint(0, 2, r.shape, generator=generator, device=r.device).to(r.dtype) * 2 - 1
        total += system.vjp(w) ** 2
    return total / probes


def _cg(apply: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, precond: torch.Tensor,
        iters: int, rtol: float, stop: Callable[[], bool] | None) -> tuple[torch.Tensor, int]:
    """Jacobi-preconditioned CG from zero for apply(d) = rhs; stops at rtol (of the
    preconditioned residual), the cap or `stop`."""
    d = torch.zeros_like(rhs)
    r = rhs.clone()
    z = r / precond
    p = z.clone()
    rs = float(torch.sum(r * z))
    bound = (rtol ** 2) * rs
    for i in range(1, iters + 1):
        ap = apply(p)
        curvature = float(torch.sum(p * ap))
        if curvature <= 0:
            return d, i
        alpha = rs / curvature
        d = d + alpha * p
        r = r - alpha * ap
        z = r / precond
        new = float(torch.sum(r * z))
        if new <= bound or (stop is not None and i % 10 == 0 and stop()):
            return d, i
        p = z + (new / rs) * p
        rs = new
    return d, iters
