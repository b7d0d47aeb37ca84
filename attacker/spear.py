"""SPEAR-class exact batch recovery from a ReLU network's first linear layer.

Why it works (the idea of Dimitrov et al., NeurIPS 2024; this is our own code). For
the first layer y = W x + b of a batch X (B, d), the weight gradient is
dW = G^T X (m, d) with G = dL/dy (B, m), and db = G^T 1. So dW has rank <= B:
dW = U S V^T with U (m, B), and G^T = U Q for an unknown invertible Q (B, B), whose
column q_i gives sample i's column g_i = U q_i. A ReLU after the layer zeroes g_i
wherever sample i's pre-activation is negative, about half of the m entries. Any
B - 1 of those zero rows of U determine q_i (up to scale) as the null vector of the
(B - 1, B) submatrix; a random choice of B - 1 rows hits one sample's zeros with
probability ~B 2^-(B-1), and a direction found that way is recognised by its many
further zeros (a direction of mixed samples has only the B - 1 zeros it was built
on). With B directions, the scales follow from the bias gradient,
db = U Q s, and the inputs from dW = U Q diag(s) X:
X = diag(1/s) Q^-1 S V^T. All of it in float64, exact up to the gradient's rounding.

The cost grows like 2^B (the chance of a hit halves per extra sample), so it is
exact and fast up to B ~ 20 on the CPU and stops working beyond that.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from attacker import spear_complete, spear_peel
from attacker.api import (
    Attack,
    AttackConfig,
    Observation,
    Reconstruction,
    checked_targets,
    register_attack,
)
from attacker.budget import expired
from attacker.inversion import Callback


@dataclass(frozen=True)
class SpearConfig:
    """Settings of the direction search (all have measured defaults)."""

    chunk: int = 16_384  # random row subsets tried per vectorised step
    max_trials: int = 20_000_000  # give up after this many subsets
    # An entry of U q counts as zero below this share of the column's largest entry;
    # float32 gradients leave ~1e-8 on a true zero; 1e-5 let near-null mixes of samples
    # through (their smallest singular value ~5e-6 of the largest, measured).
    zero_tol: float = 1e-6
    # Extra tolerance per unit of noise: the first discarded singular value over the
    # smallest kept one measures noise added to the gradient (DP-style defences).
    noise_factor: float = 3.0
    # A direction is a sample's when it has this share of the live rows zero beyond
    # the B - 1 it was built on: samples of relu-mlp at init had 30-43%, a mix of
    # samples that slipped through the other tests 13% (0.1 let it in).
    min_zero_share: float = 0.2
    rank_tol: float = 1e-5  # singular values below this share of the largest are rank noise
    # Peel directions off rows active for few samples (attacker/spear_peel.py) before
    # the random search; False is the search alone.
    peel: bool = True

    def __post_init__(self) -> None:
        if self.chunk < 1 or self.max_trials < 1:
            raise ValueError("chunk and max_trials must be >= 1")
        for name in ("zero_tol", "noise_factor", "min_zero_share", "rank_tol"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")


@dataclass
class SpearResult:
    """What the search found: the inputs and how."""

    inputs: torch.Tensor  # (B, d) float64; rows of samples not found are zero
    found: int  # sample directions found (B when complete)
    rank: int  # numerical rank of dW: the batch size the gradient shows
    trials: int  # row subsets tried


def first_linear(model: nn.Module, input_shape: tuple[int, int, int]) -> nn.Linear:
    """The model's first layer when it is a Linear on the flattened image followed by ReLU.

    Raises:
        ValueError: when the first parameterised layer is not an nn.Linear taking
            C*H*W inputs, or the next layer is not an nn.ReLU.
    """
    leaves = [m for m in model.modules() if not list(m.children())]
    layers = [m for m in leaves if not isinstance(m, (nn.Flatten, nn.Identity, nn.Dropout))]
    first = next((i for i, m in enumerate(layers) if any(True for _ in m.parameters())), None)
    if first is None or not isinstance(layers[first], nn.Linear):
        kind = "no parameters" if first is None else type(layers[first]).__name__
        raise ValueError(
            f"spear needs a fully connected first layer, {type(model).__name__} starts with {kind}"
        )
    linear = layers[first]
    assert isinstance(linear, nn.Linear)
    pixels = math.prod(input_shape)
    if linear.in_features != pixels or linear.bias is None:
        raise ValueError(
            f"spear needs a first Linear with bias on the {pixels} flattened pixels, "
            f"got in_features={linear.in_features}, bias={linear.bias is not None}"
        )
    if first + 1 >= len(layers) or not isinstance(layers[first + 1], nn.ReLU):
        raise ValueError(f"spear needs a ReLU after the first Linear of {type(model).__name__}")
    return linear


def max_batch(linear: nn.Linear) -> int:
    """The largest batch spear takes for this first layer.

    A sample is found from B - 1 of its zero rows and confirmed by more; ReLU zeroes
    about half of the m rows, so B stays below half the width, and below d (rank).
    """
    return max(1, min(linear.in_features, linear.out_features // 2))


def recover_inputs(
    weight_grad: torch.Tensor,
    bias_grad: torch.Tensor,
    *,
    batch_size: int,
    params: SpearConfig,
    generator: torch.Generator,
    completion: spear_complete.Completion | None = None,
) -> SpearResult:
    """The B inputs of a linear layer followed by ReLU, from its weight and bias gradients.

    Args:
        weight_grad: (m, d) dL/dW.
        bias_grad: (m,) dL/db.
        batch_size: B from the update's header; the rank decides when it is smaller.
        params: search settings.
        generator: seeds the random row subsets.
        completion: the layer's weight and bias and a consistency check of a batch;
            with it, the last directions come from the ReLU pattern (spear_complete.py).
    """
    dw = weight_grad.detach().to(torch.float64)
    db = bias_grad.detach().to(torch.float64).flatten()
    if not (bool(torch.isfinite(dw).all()) and bool(torch.isfinite(db).all())):
        raise ValueError("spear needs finite gradients: the first layer's has inf or nan entries")
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)  # (m, r), (r,), (r, d)
    rank = int((s > params.rank_tol * s[0]).sum()) if s[0] > 0 else 0
    b = min(rank, batch_size)
    inputs = dw.new_zeros((batch_size, dw.shape[1]))
    if b == 0:
        return SpearResult(inputs, 0, rank, 0)
    noise = float(s[b] / s[b - 1]) if b < s.numel() else 0.0
    tol = max(params.zero_tol, params.noise_factor * noise)
    if tol >= _MAX_TOL:
        # The weakest sample's singular value is near the noise floor (a trained model's
        # well-classified sample, or DP noise): no entry can be told zero, so no sample
        # can be split off; this tolerance also left too few live rows for the search.
        return SpearResult(inputs, 0, rank, 0)
    ub = u[:, :b]  # (m, b)
    # Units dead for the whole batch are zero in every sample: no information, and
    # they would count as zeros of any mix of samples.
    norms = ub.norm(dim=1)
    alive = norms > tol * norms.max()
    live = ub[alive]  # (m', b)
    # The same rows in coordinates where the gradient's noise is isotropic (rows of dW
    # on its top b singular vectors), and each row's noise there: the part of its dW
    # row beyond rank b, scaled to b of the d - b dimensions it spreads over.
    w = live * s[:b]
    outside = (dw[alive].pow(2).sum(dim=1) - w.pow(2).sum(dim=1)).clamp_min(0.0).sqrt()
    noise = outside * math.sqrt(b / max(1, dw.shape[1] - b))
    h = ub.T @ db
    finish = None
    if completion is not None and b == batch_size:
        def finish(known: torch.Tensor) -> torch.Tensor | None:
            return _completed(live, known, s[:b], vh[:b], h, alive, tol, completion)
    peeled = _peeled(live, w, noise, s[:b], tol, params, generator) if params.peel else []
    q, trials = _sparse_directions(live, tol, params, generator, peeled, finish)  # (b, k)
    found = q.shape[1]
    if found < b:
        return SpearResult(inputs, found, rank, trials)
    x = spear_complete.inputs(q, s[:b], vh[:b], h)  # (b, d)
    # A sample whose bias gradient is (near) zero has no recoverable scale: its row
    # is inf or nan, which would poison the labels' pseudo-inverse; report it missing.
    bad = ~torch.isfinite(x).all(dim=1)
    x[bad] = 0.0
    inputs[:b] = x
    return SpearResult(inputs, found - int(bad.sum()), rank, trials)


def _peeled(
    u: torch.Tensor, w: torch.Tensor, noise: torch.Tensor, s: torch.Tensor, tol: float,
    params: SpearConfig, generator: torch.Generator,
) -> list[tuple[int, torch.Tensor]]:
    """Directions (zeros, q) from peeling (attacker/spear_peel.py), each checked by _refine;
    small complements a cascade stalled in are searched as smaller problems."""
    b = u.shape[1]
    need = _need(u.shape[0], b, params)
    found: list[tuple[int, torch.Tensor]] = []

    def take(q_w: torch.Tensor) -> None:
        q = F.normalize(q_w * s, dim=0)  # w . q_w = u . (s * q_w)
        entry = _refine(u, q, tol)
        if entry is not None and entry[0] >= need:
            _keep(found, entry, u, tol)

    direct, stalled = spear_peel.directions(w, noise)
    for q_w in direct:
        take(q_w)
    # Larger stalled complements cost nearly what the whole search does: left to it.
    for basis in sorted(stalled, key=lambda k: k.shape[1]):
        if basis.shape[1] > max(_STALL_DIM, b // 2):
            break
        # Not stopped when the found set has b directions: mixes of near-duplicate samples
        # pass _refine (measured: B = 16, seed 1602, every complement held the same three
        # such samples and one other) and would fill it before the later complements'
        # samples are reached; _independent then prefers the sharpest zeros.
        if expired():
            break
        # Every sample of this complement is found already when the directions inside it
        # span it; by rank, as mixes repeat, and with a rank tolerance above what a mix
        # just off the complement adds (residual 1e-4, singular value 1e-3 measured).
        inside = [q for _, q in found if float((basis.T @ F.normalize(q / s, dim=0)).norm()) > 1 - 1e-9]
        if inside and _rank(torch.stack(inside, dim=1), _INSIDE_RANK) >= basis.shape[1]:
            continue
        rows = w @ basis
        # Rows inside the peeled span project to noise: they would count as zeros of any
        # direction. The complement's own rows hold only the zeros its samples do not
        # share with the peeled ones (a sample had 37-54 of ~170 where the full problem
        # asks 20% of its rows), so its zero share is relaxed here; _refine then asks
        # the full share of every direction on all the rows.
        rows = rows[rows.norm(dim=1) > _SUB_SNR * noise]
        # Every direction the sub-search passes, not just b independent ones: mixes of
        # the complement's near-duplicate samples would fill those before its other
        # sample is hit (measured: seed 1602's sample 3); _refine and the sharpness
        # order of _independent sort them out.
        sub: list[tuple[int, torch.Tensor]] = []
        _sparse_directions(rows, tol, replace(params, min_zero_share=_SUB_ZERO_SHARE, max_trials=_SUB_TRIALS),
                           generator, sub, stop=False)
        for _, q_sub in sub:
            take(basis @ q_sub)
    return found


_STALL_DIM = 4  # stalled complements of at most this dimension (or B / 2) are searched
_SUB_SNR = 1e3  # rows kept in a complement's search: projected norm over the row's noise
_SUB_ZERO_SHARE = 0.05
_INSIDE_RANK = 1e-2
# Subsets tried per complement, all of them now that the sub-search does not stop at a
# full set: its samples are found within a few thousand (0.3-0.9 s each at B = 16),
# and a sample whose zeros nest in another's is never found (50,000 took the budget).
_SUB_TRIALS = 8_192


def _completed(
    u: torch.Tensor, known: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, h: torch.Tensor,
    alive: torch.Tensor, tol: float, spec: spear_complete.Completion,
) -> torch.Tensor | None:
    """spear_complete.complete of the directions found, or of them less one or two.

    A mix of samples whose zeros nest passes every zero test (measured: B = 16 with near-duplicate images), so a set that
    cannot be completed consistently is tried again without the directions whose zeros
    are near another's: the suspects."""
    b, k = known.shape
    if (q := spear_complete.complete(u, known, s, vh, h, alive, tol, spec)) is not None:
        return q
    col = (u @ known).abs()  # (m', k)
    pat = (col <= tol * col.amax(dim=0)).to(u.dtype).T  # (k, m')
    apart = pat.sum(1, keepdim=True) + pat.sum(1) - 2 * pat @ pat.T + 1e9 * torch.eye(k, dtype=u.dtype)
    suspects = (apart.amin(dim=1) < _SUSPECT).nonzero().flatten().tolist()
    for size in range(1, spear_complete.MAX_LEFT + 1):
        if b - (k - size) > spear_complete.MAX_LEFT:
            break
        # known's columns come sharpest zeros first (_independent): its last few are the
        # likeliest mixes (seed 1602: the two mixes among the last four, behind a
        # sample's q whose zeros sat at 3e-7), tried before the suspects.
        tail = list(itertools.combinations(range(max(0, k - _TAIL), k), size))
        for drop in [*tail, *(d for d in itertools.combinations(suspects, size) if d not in tail)]:
            if expired():
                return None
            keep = [i for i in range(k) if i not in drop]
            if (q := spear_complete.complete(u, known[:, keep], s, vh, h, alive, tol, spec)) is not None:
                return q
    return None


_TAIL = 4  # last (least sharp) columns of a full set whose drops are tried first
_SUSPECT = 16  # zero rows apart from another direction's below which a direction is suspect


def _need(m: int, b: int, params: SpearConfig) -> int:
    """Zeros a sample's direction must have: the b - 1 that define it and a share more."""
    return b - 1 + max(2, math.ceil(params.min_zero_share * (m - b + 1)))


def _sparse_directions(
    u: torch.Tensor, tol: float, params: SpearConfig, generator: torch.Generator,
    found: list[tuple[int, torch.Tensor]] | None = None,
    finish: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    stop: bool = True,
) -> tuple[torch.Tensor, int]:
    """(Q (b, k) unit columns of samples' directions, k <= b; row subsets tried),
    starting from the directions found already (extended in place); finish(Q (b, k))
    may complete a nearly full set (None when it cannot)."""
    m, b = u.shape
    if b == 1:
        return u.new_ones((1, 1)), 0
    need = _need(m, b, params)
    found = [] if found is None else found  # (zeros, q)
    trials = 0
    chosen = _independent(found, b, u, tol)
    tried = -1  # len(found) when the completion was last tried

    def completed() -> torch.Tensor | None:
        nonlocal tried
        if finish is None or len(found) == tried or chosen.shape[1] < b - spear_complete.MAX_LEFT:
            return None
        tried = len(found)
        return finish(chosen)

    def done() -> torch.Tensor | None:
        """The full set: consistent if it can be made so, else as found (the caller checks)."""
        full = completed()
        if full is None and chosen.shape[1] == b and stop:
            return chosen
        return full

    if (full := done()) is not None:
        return full, 0
    if m < need:  # fewer live rows than a sample's zeros need: none can be confirmed
        return chosen, 0
    # The chance of a hit is ~b 2^-(b-1): small batches need far fewer subsets per step.
    chunk = min(params.chunk, max(256, 2 ** (b + 1)))
    while trials < params.max_trials and not expired():
        rows = torch.rand((chunk, m), generator=generator).topk(b - 1, dim=1).indices
        sub = u[rows]  # (n, b-1, b)
        sol, info = torch.linalg.solve_ex(sub[:, :, : b - 1], -sub[:, :, b - 1])  # (n, b-1)
        trials += chunk
        cand = torch.cat([sol, sol.new_ones((sol.shape[0], 1))], dim=1)  # (n, b)
        ok = (info == 0) & torch.isfinite(cand).all(dim=1)
        cand = F.normalize(cand[ok], dim=1)
        col = (cand @ u.T).abs()  # (n, m)
        zeros = (col <= tol * col.amax(dim=1, keepdim=True)).sum(dim=1)
        hits = cand[zeros >= need]
        if found and hits.numel():  # drop the ones already found before refining
            known = torch.stack([q for _, q in found])  # (k, b)
            hits = hits[(hits @ known.T).abs().amax(dim=1) < 1 - 1e-4]
        for q in hits[:_REFINE_PER_STEP]:
            entry = _refine(u, q, tol)
            if entry is not None and entry[0] >= need:
                _keep(found, entry, u, tol)
        chosen = _independent(found, b, u, tol)
        if (full := done()) is not None:
            return full, trials
    return _independent(found, b, u, tol), trials


# Zero tolerances at or above this share of a column's largest entry call a third of
# any column zero: the zero pattern is lost in noise (measured: 1.7-3 on a trained
# relu-mlp's B = 8 digits gradient with noise of 1e-4 to 1e-2 of its rms).
_MAX_TOL = 0.1
_REFINE_PER_STEP = 32  # hits refined per step; the rest are mostly repeats of them


def _refine(u: torch.Tensor, q: torch.Tensor, tol: float) -> tuple[int, torch.Tensor] | None:
    """(zeros, q) re-solved on all the rows q zeroes, or None for a mix of samples.

    A mix of k samples is zero on their joint zeros (a k-dim null space, a quarter of
    the rows for two under ReLU) plus k - 1 rows it happens to fit, so leaving out one
    of those rows opens a second null direction. One sample's zeros keep a 1-dim null
    space whichever row is left out: that is the test.
    """
    col = (u @ q).abs()
    sub = u[col <= tol * col.max()]  # (z, b)
    z, b = sub.shape
    if z <= b:
        return None
    _, sv, vh = torch.linalg.svd(sub, full_matrices=True)
    if sv[-1] > tol * sv[0]:  # no exact null direction: the zeros were only small entries
        return None
    q = vh[-1]
    keep = ~torch.eye(z, dtype=torch.bool, device=sub.device)  # (z, z): all but row i
    loo = sub.unsqueeze(0).expand(z, z, b)[keep].reshape(z, z - 1, b)
    sv = torch.linalg.svdvals(loo)  # (z, b)
    if bool((sv[:, -2] <= 10 * tol * sv[:, 0]).any()):
        return None
    # Polish: a row only near zero (within tol, far above the other zeros) tilts q, by
    # ~3e-4 rad measured (seed 1602), enough to spoil the completion: re-solved
    # without it (it still counts as a zero).
    col = (u @ q).abs()
    share = col / col.max()
    zeros = share <= tol
    sharp = zeros & (share <= _POLISH * share[zeros].median())
    if b < int(sharp.sum()) < int(zeros.sum()):
        q = torch.linalg.svd(u[sharp], full_matrices=True).Vh[-1]
    col = (u @ q).abs()
    zeros = col <= tol * col.max()
    return int(zeros.sum()), q


_POLISH = 100.0  # zero rows above this many times the median zero are left out by the polish


def _keep(found: list[tuple[int, torch.Tensor]], entry: tuple[int, torch.Tensor],
          u: torch.Tensor, tol: float) -> None:
    """Add a direction unless it is one already found (|cos| near 1); of two, keep the
    sharper: one re-solved on a row that is only near zero is off by ~3e-4 rad and has
    more zeros (measured: seed 1602, zeros at 3e-7 against 1e-8), and it spoilt the
    completion of an otherwise exact set."""
    _, q = entry
    for i, (_, old) in enumerate(found):
        if abs(float(old @ q)) > 1 - 1e-6:
            if _depth(u, q, tol) < _depth(u, old, tol):
                found[i] = entry
            return
    found.append(entry)


def _rank(q: torch.Tensor, tol: float) -> int:
    """Numerical rank of unit columns q (b, k)."""
    return int((torch.linalg.svdvals(q) > tol).sum())


def _depth(u: torch.Tensor, q: torch.Tensor, tol: float) -> float:
    """The largest of q's zero entries (U q) as a share of its largest entry.

    A sample's zeros sit at the gradient's rounding (<= 1e-7 measured), a mix that
    passed _refine has its zeros up to the tolerance (1e-6 to 1e-5 of 1.5e-5)."""
    col = (u @ q).abs()
    col = col / col.max()
    zeros = col[col <= tol]
    return float(zeros.max()) if zeros.numel() else tol


def _independent(found: list[tuple[int, torch.Tensor]], b: int,
                 u: torch.Tensor | None = None, tol: float = 0.0) -> torch.Tensor:
    """Up to b linearly independent directions as columns (b, k): sparsest first, or,
    given the rows u, sharpest zeros first (samples before mixes of samples)."""
    chosen: list[torch.Tensor] = []
    if u is None:
        order = sorted(found, key=lambda e: -e[0])
    else:
        order = sorted(found, key=lambda e: (_depth(u, e[1], tol), -e[0]))
    for _, q in order:
        trial = torch.stack([*chosen, q], dim=1)
        if torch.linalg.svdvals(trial)[-1] > 1e-6:
            chosen.append(q)
        if len(chosen) == b:
            break
    if not chosen:
        return torch.empty((b, 0), dtype=torch.float64)
    return torch.stack(chosen, dim=1)


def _labels(model: nn.Module, images: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
    """Each recovered sample's label: its softmax minus its share of the last layer's gradient.

    dW_last = (P - Y)^T H / B, so with the features H of the recovered inputs,
    Y = P - B (dW_last H^+)^T; the largest entry of each row is the label.
    """
    params = list(model.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    last = max((m for m in model.modules() if isinstance(m, nn.Linear)),
               key=lambda m: index[id(m.weight)])
    seen: list[torch.Tensor] = []
    hook = last.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].detach()))
    try:
        with torch.no_grad():
            logits = model(images)  # (B, K)
    finally:
        hook.remove()
    feats = seen[-1].to(torch.float64)  # (B, n)
    probs = torch.softmax(logits.to(torch.float64), dim=1)
    dw_last = targets[index[id(last.weight)]].to(torch.float64)  # (K, n)
    share = images.shape[0] * (dw_last @ torch.linalg.pinv(feats)).T  # (B, K) = P - Y
    return (probs - share).argmax(dim=1)


@register_attack("spear")
class Spear(Attack):
    """Exact batch recovery from a ReLU network's first fully connected layer (SPEAR-class).

    Works on a model whose first layer is nn.Linear (with bias) on the flattened image
    followed by nn.ReLU (the `relu-mlp` model); any B up to `max_batch` of that layer,
    in practice B <= ~20 within a minute on the CPU. The batch size is the gradient's
    numerical rank (the header's B bounds it). Labels follow from the recovered inputs.
    """

    params_type = SpearConfig  # attack.params.spear

    def __init__(self, config: AttackConfig | None = None, params: SpearConfig | None = None) -> None:
        super().__init__(config)
        self.params = params if params is not None else SpearConfig()

    def supports(self, model: nn.Module, obs: Observation) -> str | None:
        """None when the model and batch fit spear, else why not."""
        try:
            linear = first_linear(model, obs.input_shape)
        except ValueError as err:
            return str(err)
        if obs.batch_size > max_batch(linear):
            return (f"batch of {obs.batch_size} is larger than spear can split with a first "
                    f"layer of {linear.out_features} units on {linear.in_features} inputs "
                    f"(at most {max_batch(linear)})")
        return None

    def reconstruct(
        self, model: nn.Module, obs: Observation, *, callback: Callback | None = None
    ) -> Reconstruction:
        """See Attack.reconstruct; stats add rank, found, trials.

        Raises:
            ValueError: on a model spear cannot attack or a batch too large for it.
        """
        start = time.perf_counter()
        why = self.supports(model, obs)
        if why is not None:
            raise ValueError(why)
        targets = checked_targets(model, obs)
        linear = first_linear(model, obs.input_shape)
        index = {id(p): i for i, p in enumerate(model.parameters())}
        assert linear.bias is not None  # first_linear checked it
        like = targets[0]
        scale = float(sum((t.double() ** 2).sum() for t in targets))
        params = self.params

        def share(x: torch.Tensor) -> float:
            batch = x.reshape(obs.batch_size, *obs.input_shape).to(like)
            return _distance(model, batch, _labels(model, batch, targets), targets) / scale

        completion = spear_complete.Completion(
            linear.weight.detach().to(torch.float64), linear.bias.detach().to(torch.float64),
            share, _CONSISTENT)
        while True:
            result = recover_inputs(
                targets[index[id(linear.weight)]], targets[index[id(linear.bias)]],
                batch_size=obs.batch_size, params=params,
                generator=torch.Generator().manual_seed(self.config.seed), completion=completion,
            )
            raw = result.inputs.reshape(obs.batch_size, *obs.input_shape).to(like)
            labels = _labels(model, raw, targets).to(device=like.device)
            complete = result.found == min(result.rank, obs.batch_size) == obs.batch_size
            distance = _distance(model, raw, labels, targets)
            # A wrong direction can pass every test of the search (measured: B = 12, two
            # images at input cosine 0.95-0.99, relative distance 3.7 against 1e-14 when
            # exact), so a complete batch is called recovered only if it re-creates the
            # update; a peeled one that does not is searched again without peeling.
            if complete and distance > _CONSISTENT * scale:
                reason = "inconsistent"
                if params.peel and not expired():
                    params = replace(params, peel=False)
                    continue
            else:
                reason = "recovered" if complete else "incomplete"
            break
        images = raw.clamp(0.0, 1.0)
        if callback is not None:
            callback(1, images)
        stats = {
            "attack": self.name,
            "iterations": 1,
            "evaluations": result.trials,
            "grad_distance": distance,
            "seconds": time.perf_counter() - start,
            "label_source": "analytic",
            "diverged": False,
            "stop_reason": reason,
            "device": str(like.device),
            "rank": result.rank,
            "found": result.found,
            "trials": result.trials,
        }
        return Reconstruction(images=images, labels=labels, stats=stats, raw_images=raw)


_CONSISTENT = 1e-6  # largest squared gradient distance, as a share of |g|^2, of a recovery


def _distance(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
              targets: list[torch.Tensor]) -> float:
    """Squared gradient distance of the reconstruction (0 for an exact one, up to rounding)."""
    params = list(model.parameters())
    loss = F.cross_entropy(model(images), labels)
    grads = torch.autograd.grad(loss, params)
    return float(sum(((g - t) ** 2).sum() for g, t in zip(grads, targets, strict=True)))
