"""The multi-hop passive attack on gossip learning: what the colluding attackers can solve for.

After El Mrini, Cyffers & Bellet, "Privacy Attacks in Decentralized Learning" (ICML 2024).
The protocol (the same as p2p's gossip peers): all nodes start from x0; at local step
s = 1..S node k half-steps h = x_k(s) - u_k(s), u_k(s) = lr * g_k(s) (plain SGD), then runs
R >= 1 averaging rounds z_k(s, 0) = h, z_k(s, r+1) = sum_j W_kj z_j(s, r), sending z_k(s, r)
to every neighbour at each round; x_k(s+1) = z_k(s, R). W and the graph are public.

Every state z_k(s, r) is a known linear combination of the honest nodes' scaled gradients
(the unknowns) plus a known part: x0 and the attackers' own scaled gradients. The builder
propagates these coefficient rows through the protocol symbolically (so a dropped message
the attacker knows of is modelled: the receiver uses its own value in the sender's place).
An attacker observes z_j(s, r) for each neighbour j and its own states; colluders pool them.
Each observation is one row of the knowledge matrix K; the same K acts on every coordinate
of the parameter vector, so one factorisation of K serves all of them.

Unknown models: "exact" (one unknown per (node, step)) and "constant" (one per node over a
window of `window` steps, or the whole run: decAttack's D-GD assumption, right only in the
limit of small lr on a fixed sample; the residual says how wrong it is). Plain gossip
averaging of private values v_k is the case S = 1, x0 = 0, u_k = -v_k.

Determined (numerically): K's numerical rank counts singular values above RCOND * s_max;
an unknown i (or a state's row c) is determined when its component outside the row space of
K, |P_null c| / |c|, is at most NULL_TOL. Both are relative, so they do not depend on the
scale of W. `amplification` (the norm of the row of pinv(K) that recovers the unknown) is
how much an observation error is multiplied on the way: float32 messages (relative error
~6e-8 of |x|, dominated by x0) then give a recovered-gradient error of about
6e-8 * |x| * amplification. Ground truth never enters: inputs are public W, the graph and
what the attackers saw or did.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

MODELS = ("exact", "constant")
RCOND = 1e-10  # singular values below this share of the largest count as zero
# The same for float64 observations (gossip.model_dtype float64): K is exact to float64
# rounding, and the observations no longer hide what its small singular values carry.
RCOND_FLOAT64 = 1e-13
NULL_TOL = 1e-6  # |component outside row space(K)| / |row| at most this: determined
X0 = ("x0",)  # the key of the known initial model

State = tuple[str, int, int]  # (node, step s >= 1, round r in 0..R): z_node(s, r)
Drop = tuple[str, str, int, int]  # (sender, receiver, step, round) of a message that was lost


@dataclass(frozen=True)
class Knowledge:
    """The linear system the attackers hold, before any value is plugged in."""

    order: tuple[str, ...]  # the members, W's index
    attackers: tuple[str, ...]
    steps: int  # S
    rounds: int  # R
    model: str  # one of MODELS
    unknowns: tuple[tuple[str, int], ...]  # (honest node, first step its unknown covers)
    knowns: tuple[tuple, ...]  # X0, then (attacker, step): the attacker's own lr * g
    observed: tuple[State, ...]  # the state each row of `rows` observes
    rows: np.ndarray  # (m, p) observation coefficients on the unknowns
    known_rows: np.ndarray  # (m, q) their coefficients on the knowns
    states: np.ndarray  # (S, R + 1, n, p + q) every node's state z_k(s, r) in coefficients

    def state_row(self, node: str, step: int, rnd: int) -> np.ndarray:
        """Coefficients (p + q,) of z_node(step, rnd); (step, 0) is the half-step of x_node(step)."""
        return self.states[step - 1, rnd, self.order.index(node)]

    def weights_row(self, node: str, step: int) -> np.ndarray:
        """Coefficients (p + q,) of x_node(step), the weights node's gradient at `step` is taken at."""
        if step == 1:
            row = np.zeros(self.states.shape[-1])
            row[len(self.unknowns) + self.knowns.index(X0)] = 1.0
            return row
        return self.states[step - 2, self.rounds, self.order.index(node)]


def build_knowledge(
    graph: Mapping[str, Sequence[str]], order: Sequence[str], mixing: np.ndarray,
    attackers: Sequence[str], *, steps: int, rounds: int, model: str = "exact",
    window: int | None = None, drops: Collection[Drop] = (),
) -> Knowledge:
    """The attackers' knowledge system: one row per observed message, propagated symbolically.

    Args:
        graph: the public adjacency (gradleak.core.graphs.build_graph).
        order: the members in W's index.
        mixing: W (n, n), row k the weights node k averages with.
        attackers: the colluding members (their observations are pooled).
        steps, rounds: S >= 1 local steps, R >= 1 averaging rounds each.
        model: "exact" or "constant" (see the module docstring).
        window: constant model only: steps per unknown (None: the whole run).
        drops: lost messages the attackers know of (the receiver averages its own value
            in the sender's place); a lost message to an attacker is never observed.

    Raises:
        ValueError: on an unknown model, a bad size or an attacker not in `order`.
    """
    order = tuple(order)
    n = len(order)
    index = {p: i for i, p in enumerate(order)}
    if model not in MODELS:
        raise ValueError(f"unknown gradient model '{model}' (known: {', '.join(MODELS)})")
    check_inputs(graph, order, mixing, attackers, steps, rounds)
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    span = steps if (model == "exact" or window is None) else window
    span = 1 if model == "exact" else span
    honest = [p for p in order if p not in set(attackers)]
    unknowns = tuple((p, s) for p in honest for s in range(1, steps + 1, span))
    knowns: tuple[tuple, ...] = (X0, *((a, s) for a in attackers for s in range(1, steps + 1)))
    p, q = len(unknowns), len(knowns)
    col: dict[tuple, int] = {u: i for i, u in enumerate(unknowns)}
    col.update({k: p + i for i, k in enumerate(knowns)})
    lost = set(drops)

    states = np.zeros((steps, rounds + 1, n, p + q))
    x = np.zeros((n, p + q))
    x[:, col[X0]] = 1.0
    rows: dict[State, np.ndarray] = {}
    for s in range(1, steps + 1):
        z = x.copy()
        for k, node in enumerate(order):  # h = x - u: the node's own gradient column
            key = (node, s) if node in attackers else (node, 1 + (s - 1) // span * span)
            z[k, col[key]] -= 1.0
        for r in range(rounds):
            states[s - 1, r] = z
            for a in attackers:
                rows[(a, s, r)] = z[index[a]]
                for j in graph[a]:
                    if (j, a, s, r) not in lost:
                        rows[(j, s, r)] = z[index[j]]
            z = _mix(z, mixing, graph, order, index, lost, s, r)
        states[s - 1, rounds] = z
        x = z
    observed = tuple(rows)
    stacked = np.array([rows[o] for o in observed])
    return Knowledge(order, tuple(attackers), steps, rounds, model, unknowns, knowns, observed,
                     stacked[:, :p], stacked[:, p:], states)


def check_inputs(graph: Mapping[str, Sequence[str]], order: Sequence[str], mixing: np.ndarray,
                 attackers: Sequence[str], steps: int, rounds: int) -> None:
    """The checks every knowledge builder makes; ValueError naming the bad input."""
    if steps < 1 or rounds < 1:
        raise ValueError(f"steps and rounds must be >= 1, got {steps}, {rounds}")
    if mixing.shape != (len(order), len(order)) or set(graph) != set(order):
        raise ValueError("mixing must be (n, n) in `order`, and order the graph's members")
    if not attackers or any(a not in set(order) for a in attackers):
        raise ValueError(f"attackers {list(attackers)} must be members of the graph")


def _mix(z: np.ndarray, mixing: np.ndarray, graph: Mapping[str, Sequence[str]],
         order: tuple[str, ...], index: dict[str, int], lost: set[Drop], s: int, r: int) -> np.ndarray:
    """One averaging round; a lost message j -> k makes k use its own value in j's place."""
    out = mixing @ z
    for sender, receiver, ds, dr in lost:
        if ds == s and dr == r and sender in graph.get(receiver, ()):
            k, j = index[receiver], index[sender]
            out[k] += mixing[k, j] * (z[k] - z[j])
    return out


@dataclass(frozen=True)
class Solution:
    """What the observations give: the determined unknowns and the values behind them."""

    knowledge: Knowledge
    determined: dict[tuple[str, int], bool]  # unknown -> in the row space of K
    amplification: dict[tuple[str, int], float]  # |row of pinv(K)|: error gain on the way
    residual: dict[tuple[str, int], float]  # relative residual of the rows that involve it
    # amplification * (error per observation: rounding, or the residual's rms if larger) /
    # |estimate|: the relative error to expect, from public quantities (an order of magnitude)
    expected_error: dict[tuple[str, int], float]
    estimates: dict[tuple[str, int], np.ndarray]  # determined unknown -> lr * g (d,) float64
    rank: int
    _basis: np.ndarray  # (p, rank) orthonormal basis of the row space of K
    _solved: np.ndarray  # (p, d) least-squares unknowns (meaningful where determined)
    _known: np.ndarray  # (q, d) the known values

    def value_of(self, row: np.ndarray) -> np.ndarray | None:
        """The value (d,) of a state with coefficient row (p + q,), or None if not determined."""
        p = len(self.knowledge.unknowns)
        c = row[:p]
        norm = float(np.linalg.norm(c))
        if norm > 0 and np.linalg.norm(c - self._basis @ (self._basis.T @ c)) > NULL_TOL * norm:
            return None
        return c @ self._solved + row[p:] @ self._known

    def state(self, node: str, step: int, rnd: int) -> np.ndarray | None:
        """z_node(step, rnd) if determined, else None."""
        return self.value_of(self.knowledge.state_row(node, step, rnd))

    def recovered_states(self) -> dict[State, np.ndarray]:
        """Every determined state z_k(s, r) the attackers did not observe themselves."""
        seen = set(self.knowledge.observed)
        out = {}
        for s in range(1, self.knowledge.steps + 1):
            for r in range(self.knowledge.rounds + 1):
                for node in self.knowledge.order:
                    if (node, s, r) not in seen and (value := self.state(node, s, r)) is not None:
                        out[(node, s, r)] = value
        return out

    def weights(self, node: str, step: int) -> np.ndarray | None:
        """x_node(step) if determined, else None."""
        return self.value_of(self.knowledge.weights_row(node, step))


def determined_unknowns(knowledge: Knowledge) -> dict[tuple[str, int], bool]:
    """Which unknowns the observations determine, from K alone (no values needed).

    The same test as `solve` (relative rank cut RCOND, then |P_null e_i| <= NULL_TOL), for
    counting shares over many graphs without simulating any values.
    """
    k = knowledge.rows
    if k.shape[1] == 0:
        return {}
    _, sig, vt = np.linalg.svd(k, full_matrices=False)
    rank = int(np.sum(sig > RCOND * sig[0])) if sig.size and sig[0] > 0 else 0
    inside = np.sum(vt[:rank] ** 2, axis=0)  # |P_row e_i|^2 for every unknown i
    return {key: bool(np.sqrt(max(1.0 - float(inside[i]), 0.0)) <= NULL_TOL)
            for i, key in enumerate(knowledge.unknowns)}


def solve(
    knowledge: Knowledge, observations: Mapping[State, np.ndarray],
    known: Mapping[tuple, np.ndarray], *, input_eps: float | None = None,
) -> Solution:
    """Solve the knowledge system in float64 with rank tracking.

    Args:
        knowledge: from build_knowledge.
        observations: every state in `knowledge.observed` -> its value (d,) as received
            (any float dtype; float32 on the wire).
        known: every key of `knowledge.knowns` -> its value (d,): x0 and the attackers'
            own scaled gradients lr * g_a(s).
        input_eps: relative rounding error of the observations (default: half an ulp of
            the coarsest observation dtype, 6e-8 for float32).

    Raises:
        ValueError: when an observation or known value is missing or of the wrong size.
    """
    missing = [o for o in knowledge.observed if o not in observations]
    missing += [k for k in knowledge.knowns if k not in known]
    if missing:
        raise ValueError(f"missing values for {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    raw = [np.asarray(observations[o]) for o in knowledge.observed]
    if input_eps is None:
        floats = [a.dtype for a in raw if np.issubdtype(a.dtype, np.floating)] or [np.dtype(np.float64)]
        input_eps = max(float(np.finfo(dt).eps) / 2 for dt in floats)
    y = np.stack([a.astype(np.float64).ravel() for a in raw])
    v = np.stack([np.asarray(known[k], dtype=np.float64).ravel() for k in knowledge.knowns])
    if y.shape[1] != v.shape[1]:
        raise ValueError(f"observations have {y.shape[1]} values, knowns {v.shape[1]}")
    k = knowledge.rows
    b = y - knowledge.known_rows @ v  # (m, d) what the unknowns must explain
    p = k.shape[1]
    if p == 0:
        return Solution(knowledge, {}, {}, {}, {}, {}, 0, np.zeros((0, 0)), np.zeros((0, y.shape[1])), v)
    u, sig, vt = np.linalg.svd(k, full_matrices=False)
    rcond = RCOND_FLOAT64 if input_eps < 1e-12 else RCOND
    rank = int(np.sum(sig > rcond * sig[0])) if sig.size and sig[0] > 0 else 0
    basis = vt[:rank].T  # (p, rank)
    pinv = basis / sig[:rank] @ u[:, :rank].T  # (p, m)
    solved = pinv @ b  # (p, d)
    res = b - k @ solved
    # Error per observation: the rounding of the wire, or what the residual shows is there
    # beyond it (a wrong model: constant gradients that drift, losses the attacker missed).
    spare = max(k.shape[0] - rank, 1)
    noise = max(input_eps * float(np.median(np.linalg.norm(y, axis=1))),
                float(np.linalg.norm(res)) / np.sqrt(spare))
    det, amp, resid, est, expect = {}, {}, {}, {}, {}
    for i, key in enumerate(knowledge.unknowns):
        outside = 1.0 - float(np.sum(basis[i] ** 2))  # |P_null e_i|^2
        det[key] = bool(np.sqrt(max(outside, 0.0)) <= NULL_TOL)
        amp[key] = float(np.linalg.norm(pinv[i]))
        involved = k[:, i] != 0
        scale = float(np.linalg.norm(b[involved]))
        resid[key] = float(np.linalg.norm(res[involved]) / scale) if scale > 0 else 0.0
        size = float(np.linalg.norm(solved[i]))
        expect[key] = amp[key] * noise / size if size > 0 else float("inf")
        if det[key]:
            est[key] = solved[i]
    return Solution(knowledge, det, amp, resid, expect, est, rank, basis, solved, v)
