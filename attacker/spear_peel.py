"""Peeling: sample directions from rows of U that are active for few samples, no search.

In spear's notation (attacker/spear.py) row r of U is u_r = sum over the samples j
active at unit r of G[j, r] c_j, where c_j is row j of Q^-1 (so c_j . q_i = 1 if i = j,
else 0). A unit active for one sample only gives a row parallel to that sample's c_j;
a few such units make a cluster of parallel rows. Once the span V of some samples'
c's is known, rows active for those samples and one more are parallel in the
quotient (their projection on V's orthogonal complement), so V grows a sample at a
time: a cascade. In colour batches of B = 16-32 at init a fifth of the live units is
active for at most two samples, and the cascade (on ground-truth activity) reached
every sample of every batch tried.

V's orthogonal complement is always the span of the q's of the samples not yet in V,
so a cascade that stops with one dimension left gives that last sample's q exactly,
and one that stalls leaves a smaller instance of the search problem (dimension d
instead of B). Each sample's q comes from a cascade that avoids that sample (`peel`
with `avoid`).

Parallelism is judged against each row's own noise: rows are taken in coordinates
where the gradient's rounding (or added noise) is isotropic (U S, rows of dW projected
on its top singular vectors), and the noise of a row is read from the part of its dW
row outside those vectors.
"""

from __future__ import annotations

import torch

KAPPA = 8.0  # a row's deviation from parallel may reach this many of its noise units
# Rows that make a cluster: two, while the complement has 4 or more dimensions (two
# random rows there fall parallel within noise with a vanishing chance); three below
# that, where two of a hundred rows can fall at one angle of a plane by chance. Three
# everywhere left B = 16 batches stalled in complements of dimension 10-13.
_MIN_CLUSTER = 3
_MIN_PAIR_DIM = 4
# The avoided direction comes from a cluster's fit, and its projection on a smaller
# complement loses digits: a cluster this close to it counts as its sample.
_BAN_SIN = 1e-4


def complement(v: torch.Tensor, b: int) -> torch.Tensor:
    """(b, b - k) orthonormal basis of the orthogonal complement of v's rows (k, b)."""
    if v.shape[0] == 0:
        return torch.eye(b, dtype=torch.float64, device=v.device)
    q, _ = torch.linalg.qr(v.T, mode="complete")
    return q[:, v.shape[0]:]


def peel(
    w: torch.Tensor, noise: torch.Tensor, start: torch.Tensor, avoid: torch.Tensor | None = None,
    stop_at: int = 1,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Grow the span of c's from start (k, b) by parallel clusters of projected rows.

    Args:
        w: (m, b) rows in noise-isotropic coordinates.
        noise: (m,) each row's noise norm in those coordinates.
        start: (k, b) orthonormal rows spanning the c's known so far.
        avoid: (b,) a direction whose sample must not be added (a cluster parallel to
            its projection is skipped), or None.
        stop_at: stop when the complement has this dimension.

    Returns:
        (V (k', b) orthonormal rows, the cluster directions added, in order).
    """
    b = w.shape[1]
    v = start
    added: list[torch.Tensor] = []
    while b - v.shape[0] > stop_at:
        k = complement(v, b)  # (b, d)
        p = w @ k  # (m, d)
        size = p.norm(dim=1)
        live = size > KAPPA * noise  # rows not (yet) inside V
        if int(live.sum()) < 2:
            break
        idx = live.nonzero().flatten()
        unit = p[idx] / size[idx, None]
        slack = KAPPA * noise[idx] / size[idx]  # each row's angular noise, in radians
        cos = (unit @ unit.T).clamp(-1.0, 1.0)
        sin = (1.0 - cos * cos).clamp_min(0.0).sqrt()
        parallel = sin <= slack[:, None] + slack[None, :]
        if avoid is not None:
            banned = avoid @ k
            if float(banned.norm()) > 0:
                banned = banned / banned.norm()
                bsin = (1.0 - (unit @ banned).clamp(-1.0, 1.0) ** 2).clamp_min(0.0).sqrt()
                parallel &= ~(bsin <= slack + _BAN_SIN)[:, None]
        count = parallel.sum(dim=1)  # the row itself included
        best = int(count.argmax())
        if int(count[best]) < (2 if k.shape[1] >= _MIN_PAIR_DIM else _MIN_CLUSTER):
            break
        members = unit[parallel[best]] * size[idx][parallel[best], None]  # (c, d)
        # The cluster's direction: the members' principal axis (big rows weigh more,
        # as their angle is the better known).
        axis = torch.linalg.svd(members, full_matrices=False).Vh[0]  # (d,)
        direction = k @ axis  # (b,)
        added.append(direction)
        v = torch.cat([v, direction[None]])
        v = torch.linalg.qr(v.T).Q.T  # keep the rows orthonormal
    return v, added


def directions(w: torch.Tensor, noise: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(q's found, in w's coordinates; bases (b, d >= 2) of complements a cascade stalled in).

    One cascade from nothing leaves its last sample's q; then, for each sample it added,
    a cascade from the span before it that avoids it leaves that sample (alone, or with
    the others it could not peel: a stalled complement, for the search)."""
    b = w.shape[1]
    found: list[torch.Tensor] = []
    stalled: list[torch.Tensor] = []

    def settle(v: torch.Tensor) -> None:
        k = complement(v, b)
        if k.shape[1] == 1:
            found.append(k[:, 0])
        elif k.shape[1] > 1 and not any(_same_span(k, old) for old in stalled):
            stalled.append(k)

    v, flag = peel(w, noise, w.new_zeros((0, b)))
    settle(v)
    prefix = w.new_zeros((0, b))
    for direction in flag:
        settle(peel(w, noise, prefix, avoid=direction)[0])
        prefix = torch.linalg.qr(torch.cat([prefix, direction[None]]).T).Q.T
    return found, stalled


def _same_span(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two orthonormal bases (columns) span one subspace."""
    return a.shape == b.shape and bool(torch.linalg.svdvals(a.T @ b).min() > 1 - 1e-9)
