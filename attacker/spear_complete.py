"""Completion: the last one or two sample directions from the first layer's ReLU pattern.

In spear's notation (attacker/spear.py), sample i's input is fixed by its row c_i of
Q^-1 alone: x_i = c_i S V^T / (c_i . h) with h = U^T db, whatever its scale. With all
but d of the q's known, the unknown samples' c's lie in the d-dim complement of the
known q's (c_j . q_i = 0 for i != j). Any c there gives an input whose pre-activations
z = W x + bias have the sign of (M c) (c . h), M = W V S + bias h^T: linear in c, so
the d = 1 or 2 dimensional complement splits into at most m + 1 cells of one sign
pattern. In sample i's cell the negative rows are zeros of g_i = U q_i, so U on those
rows has q_i as its null vector: no zero-share threshold, and no random rows.

One case is beyond any zero test: when one sample's zero rows are a subset of
another's (near-duplicate images: measured in 3 of 10 colour batches of 16), every
mix of the two is zero wherever the smaller set is, and U on those rows has a plane
of null vectors. The plane holds both q's; the one with the extra zeros is found as
above, and the other is fitted in the plane by the gradient distance of the recovered
batch (a mix of the two images does not re-create the update).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar


@dataclass(frozen=True)
class Completion:
    """What the completion needs beyond the gradient: the layer and a consistency check."""

    weight: torch.Tensor  # (m, d) the first Linear's weight
    bias: torch.Tensor  # (m,)
    # Squared gradient distance of a recovered batch (b, d) float64, as a share of |g|^2.
    distance: Callable[[torch.Tensor], float]
    consistent: float = 1e-6  # largest distance share of a recovered batch

    def __post_init__(self) -> None:
        if self.weight.dim() != 2 or self.bias.shape != (self.weight.shape[0],):
            raise ValueError(f"weight (m, d) and bias (m,) needed, got {tuple(self.weight.shape)}, "
                             f"{tuple(self.bias.shape)}")


MAX_LEFT = 2  # complements of at most this dimension are completed (cells grow like m^(d-1))
_GRID = 64  # angles tried in a plane before the local fit
# A fitted sample must re-create the update far more closely than a found one: a mix
# of two near-duplicates is close to both (5e-7 of |g|^2 measured, against 1e-14 exact).
_FIT_SHARE = 1e-4


def inputs(q: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """(b, d) inputs of a full set of directions q (b, b): X = diag(1/s) Q^-1 S V^T."""
    scales = torch.linalg.solve(q, h)  # db = U Q s
    return torch.linalg.solve(q, s[:, None] * vh) / scales[:, None]


def complete(
    u: torch.Tensor, known: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, h: torch.Tensor,
    alive: torch.Tensor, tol: float, spec: Completion,
) -> torch.Tensor | None:
    """Q (b, b) with the known columns and the missing ones, or None.

    Args:
        u: (m', b) live rows of U.
        known: (b, k) unit directions found, k >= b - MAX_LEFT.
        s, vh: (b,), (b, d) the top singular values and right vectors of dW.
        h: (b,) U^T db.
        alive: (m,) bool, the live rows among the layer's m units.
        tol: the search's zero tolerance.
        spec: layer and consistency check.
    """
    b, k = known.shape
    left = b - k
    if left == 0 or left > MAX_LEFT:
        return None
    basis = torch.linalg.qr(known, mode="complete").Q[:, k:]  # (b, left): the c's live here
    m_full = (spec.weight.to(u) @ vh.T) * s + spec.bias.to(u)[:, None] * h  # (m, b)
    m_rows = m_full[alive] @ basis  # (m', left)
    h_left = h @ basis  # (left,)
    betas = _cells(m_rows, h_left)  # (n, left)
    neg = (m_rows @ betas.T) * (betas @ h_left)[None, :] < 0  # (m', n)
    lines, planes = _nulls(u, neg.T, tol)

    def batch(q: torch.Tensor) -> float:
        if torch.linalg.svdvals(q)[-1] <= 1e-9:
            return math.inf
        x = inputs(q, s, vh, h)
        return spec.distance(x) if bool(torch.isfinite(x).all()) else math.inf

    lines = [q for q in lines if known.shape[1] == 0 or float((known.T @ q).abs().max()) < 1 - 1e-9]
    for extra in _choices(lines, left):
        q = torch.cat([known, *(e[:, None] for e in extra)], dim=1)
        if batch(q) <= spec.consistent:
            return q
    # A plane of null vectors holds both its samples' q's: one is known or a line, the
    # other is fitted in the plane by the gradient distance.
    anchors = [(a, True) for a in known.T] + [(a, False) for a in lines]
    for plane in planes:
        for a, is_known in anchors:
            p = plane.T @ a  # (2,)
            if float(p.norm()) < 1 - 1e-9 or (left == 2 and is_known):
                continue
            base = known if is_known else torch.cat([known, a[:, None]], dim=1)
            if base.shape[1] != b - 1:
                continue
            e1 = F.normalize(plane @ p, dim=0)
            e2 = F.normalize(plane @ torch.stack([-p[1], p[0]]), dim=0)

            def column(theta: float, e1: torch.Tensor = e1, e2: torch.Tensor = e2) -> torch.Tensor:
                return (math.cos(theta) * e1 + math.sin(theta) * e2)[:, None]

            def at(theta: float, base: torch.Tensor = base,
                   column: Callable[[float], torch.Tensor] = column) -> float:
                return batch(torch.cat([base, column(theta)], dim=1))

            theta = _fit(at)
            if theta is not None:
                full = torch.cat([base, column(theta)], dim=1)
                if batch(full) <= spec.consistent * _FIT_SHARE:
                    return full
    return None


def _cells(m_rows: torch.Tensor, h_left: torch.Tensor) -> torch.Tensor:
    """(n, d) one direction inside each cell of constant sign pattern (d = 1 or 2)."""
    if m_rows.shape[1] == 1:
        return m_rows.new_ones((1, 1))
    lines = torch.cat([m_rows, h_left[None]])  # (m' + 1, 2): c . line = 0 bounds a cell
    keep = lines.norm(dim=1) > 0
    # The angle (mod pi) of the direction orthogonal to each line.
    angles = torch.remainder(torch.atan2(lines[keep, 0], -lines[keep, 1]), math.pi).sort().values
    mids = (angles + torch.roll(angles, -1)) / 2
    mids[-1] = (angles[-1] + angles[0] + math.pi) / 2
    return torch.stack([mids.cos(), mids.sin()], dim=1)


def _nulls(u: torch.Tensor, neg: torch.Tensor, tol: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(null vectors (b,), null planes (b, 2)) of U on each cell's negative rows (n, m')."""
    b = u.shape[1]
    neg = neg[neg.sum(dim=1) > b]  # fewer rows than b always leave a null vector
    if neg.shape[0] == 0:
        return [], []
    neg = torch.unique(neg, dim=0)
    sub = u[None] * neg[:, :, None]  # (n, m', b): other rows zeroed
    _, sv, vh = torch.linalg.svd(sub, full_matrices=False)
    small = sv <= tol * sv[:, :1]
    lines: list[torch.Tensor] = []
    planes: list[torch.Tensor] = []
    for i in range(neg.shape[0]):
        null = int(small[i].sum())
        if null == 1:
            _add(lines, vh[i, -1])
        elif null == 2 and not any(_same(p, vh[i, -2:].T) for p in planes):
            planes.append(vh[i, -2:].T)
    return lines, planes


def _add(found: list[torch.Tensor], q: torch.Tensor) -> None:
    if all(abs(float(old @ q)) < 1 - 1e-9 for old in found):
        found.append(q)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.linalg.svdvals(a.T @ b).min() > 1 - 1e-9)


def _choices(lines: list[torch.Tensor], left: int) -> list[tuple[torch.Tensor, ...]]:
    if left == 1:
        return [(q,) for q in lines]
    return [(a, c) for i, a in enumerate(lines) for c in lines[i + 1:]]


def _fit(at: Callable[[float], float]) -> float | None:
    """The angle in (0, pi) where at() is smallest: a grid, then a bounded local fit."""
    grid = [math.pi * (i + 0.5) / _GRID for i in range(_GRID)]
    values = [at(t) for t in grid]
    best = min(range(_GRID), key=lambda i: values[i])
    if not math.isfinite(values[best]):
        return None
    step = math.pi / _GRID
    res = minimize_scalar(at, bounds=(grid[best] - step, grid[best] + step), method="bounded",
                          options={"xatol": 1e-12})
    return float(res.x) if res.fun <= values[best] else grid[best]
