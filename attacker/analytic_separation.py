"""Batches (B > 1) for the analytic attack, first step: every sample's features and the
labels, separated out of the last layer's gradient (used by attacker/analytic_batch.py).

Why it works. With the mean cross-entropy over B samples and logits z_j = W a_j + b,
the final nn.Linear's gradients are dW = G^T A and db = G^T 1, where row j of G is
(p_j - y_j) / B and p_j = softmax(W a_j + b). Given the labels, G is a function of A
alone, so the (B, n) feature matrix A (every sample's input to the last layer)
solves dW = G(A)^T A: K x n equations in B x n unknowns, determined while G has rank
B (B <= K). `separate_features` starts with a fixed point: A <- the least-squares
answer of G^T A = dW for the current G, projected onto the activation's range (a
sigmoid's features lie in (0, 1)), then G <- G(A); Levenberg-Marquardt then finishes
it in the features' row space (A = N R with R the top-B right singular vectors of dW:
B x B unknowns, an exact Jacobian), down to float32's rounding when the labels are
right.

Where it is weak: when the model predicts nearly the same distribution q for every
sample and the batch's labels cover most of q's mass, sum_j q[y_j] (q - e_{y_j}) is
nearly 0, G is nearly rank-deficient, and the sample whose label the model favours
is poorly determined (the fixed point alone gets it wrong; the refinement usually
recovers it). A sample the model already predicts with p ~ 1 adds almost nothing to
the gradient and cannot be separated at all. Repeated labels are the common weak
case: two samples of one class give rows p_j - e_y that differ only by their
predictions (benchmarks/batch_labels.py: 5-23 dB on batches of 8 with repeats from a
training LeNet, against 28-35 dB with distinct labels). When the separation is not exact, G's
smallest singular vector says which samples are doubtful (`Separated.reliability`,
1 for a trusted sample, 0 for the worst).

Labels come from `labels.recover_labels` (counts from the bias gradient), then
`search_labels` changes up to two labels while a change at least halves the
separation's residual, stopping at an exact one: the counts go wrong when the
favoured class collects more than a sample's worth of probability over the batch,
and only the right labelling separates exactly.

Separation cost: the Levenberg-Marquardt Jacobian is in closed form
(`_RowSpace.jacobian`, 13 ms per labelling at B = 4 against 250 ms by autodiff), so
the label search is cheap; where the labels are right but the separation is not
exact (repeated labels leave local minima beside the fixed point), up to
SEPARATE_RESTARTS seeded perturbed starts are tried. Two distinct exact separations
can exist for one repeated pair (measured: both at a residual of 2e-8, features 11%
apart); nothing here tells them apart yet, and the wrong one costs that pair's images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attacker.analytic_layers import Layer
from attacker.budget import expired

SEPARATE_ITERS = 300  # fixed-point steps (each a B x B solve); converges in 20-60 here
LM_ITERS = 100  # Levenberg-Marquardt steps refining the separation
SEPARATE_RESTARTS = 8  # perturbed LM starts tried while the separation is not exact
RESTART_SCALE = 0.3  # their perturbation, relative to the mean |coordinate| of the start
SEARCH_LM_ITERS = 20  # the same per candidate labelling, enough to rank candidates
SEARCH_START_ITERS = 50  # fixed-point steps per candidate
SEARCH_ROUNDS = 2  # labels the search may change
RECOUNT_ROUNDS = 2  # count-identity corrections tried before the search (`_recount`)
SEARCH_KEEP = 3  # best-scanned candidates refined fully each round
SEARCH_CANDIDATES = 40  # single changes scanned per round at most (most likely first)
SEARCH_GAIN = 0.5  # a change is kept when it at least halves the residual
SEPARATE_SHARE = 0.5  # of a time budget, what separation and label search may spend
# A separation is exact when its relative residual is below this: the right labels
# reach ~1e-8 from float32 gradients, wrong ones stayed above 5e-6 in our tests.
EXACT_RESIDUAL = 1e-6
SEARCH_NEAR_EXACT = 1e-4  # the right labels' residual after SEARCH_LM_ITERS steps is below this
FEATURE_EPS = 1e-6  # projection margin inside a bounded activation's range
RELIABLE_RATIO = 0.2  # G's smallest/largest singular value above which all samples are trusted

BOUNDS = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}


@dataclass
class Separated:
    """The last layer's gradient split into per-sample features."""

    features: torch.Tensor  # (B, n)
    labels: torch.Tensor  # (B,) int64, the labelling the features belong to
    residual: float  # relative residual of dW = G^T A and db = G^T 1 together
    ratio: float  # G's smallest / largest singular value
    reliability: torch.Tensor  # (B,) in [0, 1]
    exact: bool  # residual <= EXACT_RESIDUAL: features as exact as the gradient allows

    @property
    def all_reliable(self) -> bool:
        return self.exact or self.ratio >= RELIABLE_RATIO


def separate_features(
    weight: torch.Tensor, bias: torch.Tensor, weight_grad: torch.Tensor, bias_grad: torch.Tensor,
    labels: torch.Tensor, bounds: tuple[float, float] | None, *, refine_iters: int = LM_ITERS,
    start_iters: int = SEPARATE_ITERS, restarts: int = SEPARATE_RESTARTS,
) -> Separated:
    """Solve dW = G(A)^T A, db = G(A)^T 1 for the features A given the labels.

    A fixed point gives the start (see the module docstring), then Levenberg-Marquardt
    refines it in the features' row space: A = N R with R the top-B right singular
    vectors of dW, so the unknowns are the B x B matrix N and the equations
    G^T N = dW R^T and G^T 1 = db, small enough for an exact Jacobian. With the right
    labels the refined residual is at float32's rounding (about 1e-8 relative); a
    wrong labelling leaves it orders of magnitude higher, which `search_labels` uses.
    All tensors in one float dtype (float64 recommended); weight (K, n), bias (K,),
    weight_grad (K, n), bias_grad (K,), labels (B,).
    """
    batch = labels.numel()
    onehot = F.one_hot(labels, weight.shape[0]).to(weight.dtype)
    probs = torch.full_like(onehot, 1.0 / weight.shape[0])
    features = torch.zeros(batch, weight.shape[1], dtype=weight.dtype, device=weight.device)
    for _ in range(start_iters):
        g = (probs - onehot) / batch  # (B, K)
        gram = g @ g.T
        gram = gram + torch.eye(batch, dtype=g.dtype, device=g.device) * 1e-14 * gram.trace()
        features = torch.linalg.solve(gram, g @ weight_grad)  # least squares of G^T A = dW
        if bounds is not None:
            features = features.clamp(bounds[0] + FEATURE_EPS, bounds[1] - FEATURE_EPS)
        new = torch.softmax(features @ weight.T + bias, dim=1)
        settled = float((new - probs).abs().max()) < 1e-12
        probs = new
        if settled:
            break
    rows = torch.linalg.svd(weight_grad, full_matrices=False)[2][:batch]  # (B, n)
    system = _RowSpace(weight, bias, weight_grad @ rows.T, bias_grad, onehot, rows)
    begin = features @ rows.T
    coords = _levenberg_marquardt(system.residual, begin, refine_iters, system.jacobian)
    residual = float(torch.linalg.vector_norm(system.residual(coords)))
    generator = torch.Generator().manual_seed(0)  # restarts are deterministic
    for _ in range(restarts):  # repeated labels leave local minima next to the fixed point
        if residual <= EXACT_RESIDUAL or expired(SEPARATE_SHARE):
            break
        noise = torch.randn(begin.shape, generator=generator, dtype=begin.dtype).to(begin.device)
        trial = _levenberg_marquardt(system.residual, begin + RESTART_SCALE * begin.abs().mean() * noise,
                                     refine_iters, system.jacobian)
        value = float(torch.linalg.vector_norm(system.residual(trial)))
        if value < residual:
            coords, residual = trial, value
    features = coords @ rows
    g = system.deltas(coords)
    u, s, _ = torch.linalg.svd(g, full_matrices=False)
    ratio = float(s[-1] / s[0]) if float(s[0]) > 0 else 0.0
    exact = residual <= EXACT_RESIDUAL
    weakest = u[:, -1].abs()
    reliability = (torch.ones_like(weakest) if exact or ratio >= RELIABLE_RATIO
                   else (1.0 - weakest / weakest.max()).clamp_min(0.0))
    return Separated(features, labels, residual, ratio, reliability, exact)


@dataclass
class _RowSpace:
    """The separation's equations in row-space coordinates (see `separate_features`)."""

    weight: torch.Tensor
    bias: torch.Tensor
    projected: torch.Tensor  # (K, B) dW R^T
    bias_grad: torch.Tensor
    onehot: torch.Tensor  # (B, K)
    rows: torch.Tensor  # (B, n)

    def deltas(self, coords: torch.Tensor) -> torch.Tensor:
        logits = (coords @ self.rows) @ self.weight.T + self.bias
        return (torch.softmax(logits, dim=1) - self.onehot) / coords.shape[0]

    def residual(self, coords: torch.Tensor) -> torch.Tensor:
        g = self.deltas(coords)
        scale = torch.sqrt(torch.sum(self.projected ** 2) + torch.sum(self.bias_grad ** 2))
        return torch.cat([(g.T @ coords - self.projected).flatten(),
                          g.sum(0) - self.bias_grad]) / scale

    def jacobian(self, coords: torch.Tensor) -> torch.Tensor:
        """d residual / d coords, (K*B + K, B*B), in closed form.

        Row j of G depends on row j of the coordinates only: dG_j/dC_j =
        (diag(p_j) - p_j p_j^T) V^T / B with V = R W^T, so dr[k, n]/dC[j, m] =
        D[j, k, m] C[j, n] + G[j, k] [m = n] for the weight rows and D[j, k, m] for the
        bias row; about 30x faster here than forward-mode autodiff of `residual`.
        """
        batch = coords.shape[0]
        v = self.rows @ self.weight.T  # (B, K)
        p = torch.softmax(coords @ v + self.bias, dim=1)  # (B, K)
        g = (p - self.onehot) / batch
        jp = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # (B, K, K)
        d = torch.matmul(jp, v.T) / batch  # (B, K, B): [j, k, m]
        eye = torch.eye(batch, dtype=coords.dtype, device=coords.device)
        weight_rows = (torch.einsum("jkm,jn->knjm", d, coords)
                       + torch.einsum("jk,mn->knjm", g, eye))
        bias_rows = d.permute(1, 0, 2)  # (K, B, B): [k, j, m]
        scale = torch.sqrt(torch.sum(self.projected ** 2) + torch.sum(self.bias_grad ** 2))
        return torch.cat([weight_rows.reshape(-1, batch * batch),
                          bias_rows.reshape(-1, batch * batch)]) / scale


def _levenberg_marquardt(
    residual: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, iters: int,
    jacobian: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Minimise ||residual(x)||^2 from start by damped Gauss-Newton (exact Jacobian:
    `jacobian(x)` when given, else forward-mode autodiff)."""
    x, damping = start.clone(), 1e-3
    shape = x.shape

    def flat(v: torch.Tensor) -> torch.Tensor:
        return residual(v.reshape(shape))

    current = float(torch.linalg.vector_norm(flat(x.flatten())))
    for _ in range(iters):
        if current <= EXACT_RESIDUAL * 1e-2 or expired(SEPARATE_SHARE):
            break
        jac = (jacobian(x) if jacobian is not None
               else torch.func.jacfwd(flat)(x.flatten()))  # (M, B*B)
        r = flat(x.flatten())
        hess, grad = jac.T @ jac, jac.T @ r
        diag = torch.diag(hess.diagonal() + 1e-15)
        for _ in range(30):
            step = torch.linalg.solve(hess + damping * diag, grad)
            trial = x - step.reshape(shape)
            value = float(torch.linalg.vector_norm(flat(trial.flatten())))
            if value < current:
                x, current, damping = trial, value, max(damping / 5.0, 1e-15)
                break
            damping *= 10.0
        else:
            break  # no step helps: a (local) minimum
    return x


def search_labels(
    weight: torch.Tensor, bias: torch.Tensor, weight_grad: torch.Tensor, bias_grad: torch.Tensor,
    labels: torch.Tensor, bounds: tuple[float, float] | None,
) -> tuple[Separated, int, float]:
    """The recovered labelling, corrected one label at a time while that separates better.

    Each round scans single changes (one sample of label a relabelled b) with a short
    refinement, repeated labels and absent classes first (the count estimate errs by
    splitting the model's favourite class's samples over other classes), keeps the
    change that cuts the residual most if it cuts it by SEARCH_GAIN, and stops at an
    exact separation or after SEARCH_ROUNDS changes. Returns the best separation, how
    many labels were changed, and the residual of the labelling it started from.
    """
    current = labels.sort().values
    best = separate_features(weight, bias, weight_grad, bias_grad, current, bounds, restarts=0)
    start_residual, changes = best.residual, 0
    num_classes = weight.shape[0]
    for _ in range(RECOUNT_ROUNDS):
        if best.exact or expired(SEPARATE_SHARE):
            break
        recounted = _recount(weight, bias, bias_grad, best.features)
        if torch.equal(recounted, current):
            break
        fit = separate_features(weight, bias, weight_grad, bias_grad, recounted, bounds)
        if not fit.residual < best.residual:
            break
        changes += int((torch.bincount(recounted, minlength=num_classes)
                        - torch.bincount(current, minlength=num_classes)).clamp_min(0).sum())
        best, current = fit, recounted
    for _ in range(SEARCH_ROUNDS):
        if best.exact or expired(SEPARATE_SHARE):
            break
        short = separate_features(weight, bias, weight_grad, bias_grad, current, bounds,
                                  refine_iters=SEARCH_LM_ITERS, start_iters=SEARCH_START_ITERS,
                                  restarts=0).residual  # same budget as theirs
        values = current.tolist()
        present = sorted(set(values))
        repeated = [a for a in present if values.count(a) > 1]
        absent = [c for c in range(num_classes) if c not in present]
        order = ([(a, c) for a in repeated for c in absent]
                 + [(a, c) for a in present if a not in repeated for c in absent]
                 + [(a, c) for a in present for c in present if c != a])
        scanned: list[tuple[float, torch.Tensor]] = []
        order = order[:SEARCH_CANDIDATES]
        for group_end in (len(repeated) * len(absent), len(order)):
            for a, c in order[len(scanned):group_end]:
                if expired(SEPARATE_SHARE):
                    break
                candidate = current.clone()
                candidate[values.index(a)] = c
                candidate = candidate.sort().values
                fit = separate_features(weight, bias, weight_grad, bias_grad, candidate,
                                        bounds, refine_iters=SEARCH_LM_ITERS,
                                        start_iters=SEARCH_START_ITERS, restarts=0)
                scanned.append((fit.residual, candidate))
                if fit.residual <= SEARCH_NEAR_EXACT:  # on its way to exact: look no further
                    break
            best_scan = min(scanned, key=lambda t: t[0])[0] if scanned else float("inf")
            if best_scan < SEARCH_GAIN * short or best_scan <= SEARCH_NEAR_EXACT:
                break
        if not scanned:
            break
        scanned.sort(key=lambda t: t[0])
        if not scanned[0][0] < SEARCH_GAIN * short:
            break
        fits = [separate_features(weight, bias, weight_grad, bias_grad, candidate, bounds, restarts=0)
                for _, candidate in scanned[:SEARCH_KEEP]]  # short scans can misrank: refine a few
        fit = min(fits, key=lambda f: f.residual)
        candidate = fit.labels
        if not fit.residual < best.residual:
            break
        best, current, changes = fit, candidate, changes + 1
    if not best.exact and not expired(SEPARATE_SHARE):  # the labels chosen: now the restarts
        fit = separate_features(weight, bias, weight_grad, bias_grad, current, bounds)
        best = fit if fit.residual < best.residual else best
    return best, changes, start_residual


def _recount(weight: torch.Tensor, bias: torch.Tensor, bias_grad: torch.Tensor,
             features: torch.Tensor) -> torch.Tensor:
    """Sorted labels from the count identity c = P - B db, P predicted from `features`.

    The bias gradient is db = (P - c) / B with P the batch's summed softmax; the
    counts' estimate (labels.recover_label_counts) has to guess P, while a
    separation, even under slightly wrong labels, gives every sample's features and
    so P itself: rounding P - B db then gives the counts, one cheap check before the
    label search scans single changes.
    """
    batch = features.shape[0]
    predicted = torch.softmax(features @ weight.T + bias, dim=1).sum(0)
    estimate = predicted - batch * bias_grad
    counts = estimate.round().clamp_min(0).to(torch.int64)
    while int(counts.sum()) > batch:  # drop where the estimate is furthest below its count
        counts[torch.argmax(torch.where(counts > 0, counts - estimate, -torch.inf))] -= 1
    while int(counts.sum()) < batch:
        counts[torch.argmax(estimate - counts)] += 1
    classes = torch.arange(weight.shape[0], device=features.device)
    return torch.repeat_interleave(classes, counts)


def feature_bounds(layers: list[Layer]) -> tuple[float, float] | None:
    """The range of the last layer's input: its preceding activation's, or the images' [0, 1]."""
    if len(layers) == 1:
        return (0.0, 1.0)
    activation = layers[-2].activation
    return BOUNDS.get(activation.name) if activation is not None else None
