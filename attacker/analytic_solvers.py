"""The linear algebra of the analytic attack's convolutions: normal equations and CG.

Everything here is linear algebra on one sample's (or a stack of problems') convolution
input, through the operators of attacker/analytic_conv.py (ConvOps and numeric_padding
are re-exported here). Split out of analytic_layers.py, which keeps the chain (parsing,
activations) and re-exports these names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attacker.analytic_conv import ConvOps, numeric_padding

__all__ = [
    "STACK_CHUNK", "STOP_EVERY", "ConvOps", "NormalSystem", "SolveInfo", "StackedNormal",
    "conjugate_gradients", "conjugate_gradients_many", "linear_input", "numeric_padding",
    "relative", "solve_conv_input", "solve_conv_inputs",
]

# Problems per batched product on the CPU: a few at a time keep the patches in cache.
STACK_CHUNK = 4
STOP_EVERY = 25  # CG iterations between checks of its `stop` callable (a time budget)


@dataclass
class SolveInfo:
    """How one layer's least-squares solve went."""

    iterations: int
    converged: bool
    forward_residual: float  # ||s (conv(x) + b - z)|| / ||s z||, s the activation slope
    gradient_residual: float  # ||dW(x) - dW|| / ||dW||


def solve_conv_input(
    ops: ConvOps,
    bias: torch.Tensor | None,
    z: torch.Tensor,
    slope: torch.Tensor,
    delta: torch.Tensor,
    weight_grad: torch.Tensor,
    start: torch.Tensor,
    *,
    tol: float,
    max_iters: int,
) -> tuple[torch.Tensor, SolveInfo]:
    """The convolution's input x from its pre-activation z and its weight gradient.

    Least squares over both constraints, stacked:
      forward  s * (conv(x) + b) = s * z   (rows weighted by the activation slope s,
               so units whose output sits in saturation, where z is ill-determined,
               count less: the residual is measured in output space);
      gradient conv2d_weight(x, delta) = dW  (R-GAP's weight constraint).
    Each block is scaled so its average equation has unit norm, then the normal
    equations are solved by conjugate gradients with a Jacobi preconditioner, in
    the dtype of the inputs (float64 by the caller).

    Args:
        z, slope, delta: (1, O, H', W') pre-activation, activation slope, and dL/dz.
        weight_grad: (O, C/groups, kh, kw) observed weight gradient.
        start: (1, C, H, W) first iterate.
        tol: stop once ||normal-equation residual|| <= tol * ||right-hand side||.
        max_iters: CG iteration cap.
    """
    system = NormalSystem.of(ops, bias, z, slope, delta, weight_grad)
    normal = ops.normal_operator(system.w_f, system.s2, system.w_g, delta)
    x, iterations, converged = conjugate_gradients(
        normal, system.rhs, start, system.precond, tol, max_iters)
    return x, system.info(ops, x, iterations, converged)


@dataclass(frozen=True)
class NormalSystem:
    """One convolution's scaled normal equations (see `solve_conv_input`), ready for CG."""

    z: torch.Tensor  # (1, O, H', W') pre-activation
    target: torch.Tensor  # z - bias
    slope: torch.Tensor  # activation slope s
    s2: torch.Tensor  # s * s
    delta: torch.Tensor  # dL/dz
    weight_grad: torch.Tensor  # observed dW
    w_f: float  # forward block weight
    w_g: float  # gradient block weight
    rhs: torch.Tensor  # (1, C, H, W)
    precond: torch.Tensor  # Jacobi diagonal, (1, C, H, W)

    @classmethod
    def of(
        cls, ops: ConvOps, bias: torch.Tensor | None, z: torch.Tensor, slope: torch.Tensor,
        delta: torch.Tensor, weight_grad: torch.Tensor,
    ) -> NormalSystem:
        target = z if bias is None else z - bias.view(1, -1, 1, 1)
        s2 = slope * slope
        diag_f = ops.forward_adjoint(s2, ops.weight * ops.weight)  # diag of A_f^T S^2 A_f
        diag_g = ops.gradient_adjoint(torch.ones_like(weight_grad), delta * delta)  # A_g^T A_g
        mass_f, mass_g = float(diag_f.sum()), float(diag_g.sum())  # squared Frobenius norms
        w_f = z.numel() / mass_f if mass_f > 0 and math.isfinite(mass_f) else 0.0
        w_g = weight_grad.numel() / mass_g if mass_g > 0 and math.isfinite(mass_g) else 0.0
        if w_f == 0.0 and w_g == 0.0:
            raise ValueError("analytic attack: a convolution's constraints carry no signal")
        rhs = (w_f * ops.forward_adjoint(s2 * target)
               + w_g * ops.gradient_adjoint(weight_grad, delta))
        precond = (w_f * diag_f + w_g * diag_g).clamp_min(torch.finfo(rhs.dtype).tiny)
        return cls(z, target, slope, s2, delta, weight_grad, w_f, w_g, rhs, precond)

    def info(self, ops: ConvOps, x: torch.Tensor, iterations: int, converged: bool) -> SolveInfo:
        """How well x (1, C, H, W) meets both constraints."""
        forward_res = relative(self.slope * (ops.forward(x) - self.target), self.slope * self.z)
        gradient_res = relative(ops.gradient(x, self.delta) - self.weight_grad, self.weight_grad)
        return SolveInfo(iterations, converged, forward_res, gradient_res)


class StackedNormal:
    """The normal operators of P convolution problems of one geometry, applied at once.

    Problem p has its own weights (or all share one tensor), slopes and delta; the
    product for all P is one unfold, one fold and four batched matmuls (the patch
    form of `ConvOps.normal_operator`), so P small problems cost about one larger
    one. Grouped convolutions fall back to each problem's own operator.
    `keep(mask)` drops the problems whose CG has stopped.
    """

    def __init__(self, ops: list[ConvOps], systems: list[NormalSystem]) -> None:
        first = ops[0]
        self.size = first.in_shape[2:]
        self.geometry = {"kernel_size": (first.weight.shape[2], first.weight.shape[3]),
                         "dilation": first.dilation, "padding": first.padding,
                         "stride": first.stride}
        self.grouped = first.groups != 1
        if self.grouped:
            self.each = [o.normal_operator(s.w_f, s.s2, s.w_g, s.delta)
                         for o, s in zip(ops, systems, strict=True)]
            return
        out_channels = first.weight.shape[0]
        if all(o.weight is first.weight for o in ops):
            w_flat = first.weight.reshape(1, out_channels, -1)  # (1, O, CKK), broadcast
        else:
            w_flat = torch.stack([o.weight.reshape(out_channels, -1) for o in ops])
        self.w_flat, self.w_flat_t = w_flat, w_flat.transpose(1, 2).contiguous()
        self.d_flat = torch.cat([s.delta.reshape(1, out_channels, -1) for s in systems])
        w_g = torch.tensor([s.w_g for s in systems], dtype=self.d_flat.dtype,
                           device=self.d_flat.device).view(-1, 1, 1)
        self.d_scaled = w_g * self.d_flat
        self.s2_scaled = torch.cat([(s.w_f * s.s2).reshape(1, out_channels, -1)
                                    for s in systems])  # (P, O, L)

    def keep(self, mask: torch.Tensor, kept: list[int]) -> None:
        """Keep only the problems where `mask` (P,) is True (their positions: `kept`)."""
        if self.grouped:
            self.each = [self.each[i] for i in kept]
            return
        if self.w_flat.shape[0] > 1:
            self.w_flat, self.w_flat_t = self.w_flat[mask], self.w_flat_t[mask]
        self.d_flat, self.d_scaled, self.s2_scaled = (
            self.d_flat[mask], self.d_scaled[mask], self.s2_scaled[mask])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.grouped:
            return torch.cat([f(x[i:i + 1]) for i, f in enumerate(self.each)])
        count = x.shape[0]
        chunk = STACK_CHUNK if x.device.type == "cpu" else count
        if count <= chunk:
            return self._apply(x, slice(None))
        return torch.cat([self._apply(x[i:i + chunk], slice(i, i + chunk))
                          for i in range(0, count, chunk)])

    def _apply(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        patches = F.unfold(x, **self.geometry)  # (P, CKK, L)
        w_flat = self.w_flat if self.w_flat.shape[0] == 1 else self.w_flat[rows]
        w_flat_t = self.w_flat_t if self.w_flat_t.shape[0] == 1 else self.w_flat_t[rows]
        d_flat, d_scaled = self.d_flat[rows], self.d_scaled[rows]
        grad = torch.bmm(d_flat, patches.transpose(1, 2))  # (P, O, CKK) weight gradients
        forward = self.s2_scaled[rows] * torch.matmul(w_flat, patches)  # (P, O, L)
        cols = torch.baddbmm(torch.bmm(grad.transpose(1, 2), d_scaled),
                             w_flat_t.expand(x.shape[0], -1, -1), forward)
        return F.fold(cols, self.size, **self.geometry)


def solve_conv_inputs(
    ops: list[ConvOps],
    biases: list[torch.Tensor | None],
    z: torch.Tensor,
    slope: torch.Tensor,
    delta: torch.Tensor,
    weight_grads: list[torch.Tensor],
    start: torch.Tensor,
    *,
    tol: float,
    max_iters: int,
) -> tuple[torch.Tensor, list[SolveInfo]]:
    """`solve_conv_input` for P problems of one convolution geometry, solved together.

    Problem p is (ops[p], biases[p], z[p], slope[p], delta[p], weight_grads[p],
    start[p]); z, slope, delta are (P, O, H', W'), start (P, C, H, W). Each problem
    gets the same scaling, preconditioner, tolerance and cap as alone, and its own
    CG scalars, so its answer is the one-problem answer up to summation order.
    """
    systems = [
        NormalSystem.of(o, b, z[p:p + 1], slope[p:p + 1], delta[p:p + 1], g)
        for p, (o, b, g) in enumerate(zip(ops, biases, weight_grads, strict=True))
    ]
    normal = StackedNormal(ops, systems)
    rhs = torch.cat([s.rhs for s in systems])
    precond = torch.cat([s.precond for s in systems])
    x, iterations, converged = conjugate_gradients_many(
        normal, rhs, start, precond, tol, max_iters)
    infos = [s.info(o, x[p:p + 1], iterations[p], converged[p])
             for p, (o, s) in enumerate(zip(ops, systems, strict=True))]
    return x, infos


def conjugate_gradients_many(
    apply: StackedNormal,
    rhs: torch.Tensor,
    start: torch.Tensor,
    precond: torch.Tensor,
    tol: float,
    max_iters: int,
) -> tuple[torch.Tensor, list[int], list[bool]]:
    """`conjugate_gradients` for P independent systems stacked on dim 0.

    Every scalar of CG (step, beta, residual norm, bound) is per problem; a problem
    leaves the stack (and `apply`, through keep) as soon as it converges, breaks
    down or hits the cap, exactly where it would stop alone.

    Returns:
        (x (P, ...), iterations per problem, converged per problem).
    """
    count = rhs.shape[0]
    shape = (-1,) + (1,) * (rhs.dim() - 1)

    def norms(t: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(t.flatten(1), dim=1)

    def dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.sum((a * b).flatten(1), dim=1)

    out = start.clone()
    iterations, converged = [0] * count, [False] * count
    ids = list(range(count))  # problem behind each row of the active stack
    x = start.clone()
    r = rhs - apply(x)
    bound = tol * norms(rhs)
    precond = precond.clone()

    def settle(done: torch.Tensor, step: int, ok: torch.Tensor | None) -> torch.Tensor:
        """Write the finished rows out; returns the mask of rows that go on."""
        nonlocal ids
        rows = done.nonzero().flatten().tolist()
        oks = [True] * len(rows) if ok is None else ok[done].tolist()
        for row, good in zip(rows, oks, strict=True):
            j = ids[row]
            out[j], iterations[j], converged[j] = x[row], step, bool(good)
        go = ~done
        kept = go.nonzero().flatten().tolist()
        ids = [ids[i] for i in kept]
        if kept and rows:
            apply.keep(go, kept)
        return go

    done = norms(r) <= bound
    if bool(done.any()):
        go = settle(done, 0, None)
        x, r, bound, precond = x[go], r[go], bound[go], precond[go]
    if not ids:
        return out, iterations, converged
    zr = r / precond
    p = zr.clone()
    rz = dots(r, zr)
    for k in range(1, max_iters + 1):
        ap = apply(p)
        curvature = dots(p, ap)
        broken = ~(curvature > 0)  # exact solution in a null direction, or breakdown
        step = torch.where(broken, torch.zeros_like(rz), rz / curvature)
        # A broken-down problem keeps x as it was: step 0 for it.
        x = x + step.view(shape) * p
        r = r - step.view(shape) * ap
        hit = norms(r) <= bound
        done = broken | hit
        if k == max_iters:
            done = torch.ones_like(done)
        if bool(done.any()):
            go = settle(done, k, hit & ~broken)
            if not ids:
                break
            x, r, p, rz, bound, precond = x[go], r[go], p[go], rz[go], bound[go], precond[go]
        zr = r / precond
        rz_next = dots(r, zr)
        p = zr + (rz_next / rz).view(shape) * p
        rz = rz_next
    return out, iterations, converged


def conjugate_gradients(
    apply: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    start: torch.Tensor,
    precond: torch.Tensor,
    tol: float,
    max_iters: int,
    stop: Callable[[], bool] | None = None,
) -> tuple[torch.Tensor, int, bool]:
    """Jacobi-preconditioned CG for apply(x) = rhs (apply symmetric positive semi-definite).

    `stop`, when given, is asked every STOP_EVERY iterations; True ends the solve
    with the current iterate (not converged), which is how a time budget cuts it short.

    Returns (x, iterations, converged).
    """
    x = start.clone()
    r = rhs - apply(x)
    bound = tol * float(torch.linalg.vector_norm(rhs))
    if float(torch.linalg.vector_norm(r)) <= bound:
        return x, 0, True
    zr = r / precond
    p = zr.clone()
    rz = torch.sum(r * zr)
    for k in range(1, max_iters + 1):
        ap = apply(p)
        curvature = torch.sum(p * ap)
        if not float(curvature) > 0:  # exact solution in a null direction, or breakdown
            return x, k, False
        step = rz / curvature
        x = x + step * p
        r = r - step * ap
        if float(torch.linalg.vector_norm(r)) <= bound:
            return x, k, True
        if stop is not None and k % STOP_EVERY == 0 and stop():
            return x, k, False
        zr = r / precond
        rz_next = torch.sum(r * zr)
        p = zr + (rz_next / rz) * p
        rz = rz_next
    return x, max_iters, False


def relative(residual: torch.Tensor, reference: torch.Tensor) -> float:
    """||residual|| / ||reference||, inf when the reference is zero."""
    ref = float(torch.linalg.vector_norm(reference))
    return float(torch.linalg.vector_norm(residual)) / ref if ref > 0 else float("inf")


def linear_input(weight_grad: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """A Linear layer's batch-1 input from dW = delta a^T: a = dW^T delta / |delta|^2.

    Least squares over every output row (the row with the largest |delta| alone,
    dW[c] / delta[c], is the classic form; all rows weighted by delta^2 is the
    same answer with less rounding noise).
    """
    norm2 = float(torch.sum(delta * delta))
    if not norm2 > 0:
        raise ValueError("analytic attack: a linear layer's output gradient is all zero")
    return weight_grad.T @ delta / norm2
