"""Which unknowns the attackers' observations determine, in exact arithmetic.

`gossip_algebra.solve` decides "determined" numerically (a relative rank cut on K in
float64), which is right while K is well conditioned; after many rounds the rows W^t[j]
approach the consensus row and a cut at 1e-10 may call undetermined what the algebra
determines. This module decides it exactly: W's entries are rationals (Metropolis-Hastings
1 / (1 + max(d_i, d_j)), or uniform), so K is propagated and row-reduced over the prime
field GF(P) with W's entries mapped there. A rank over GF(P) is the rational rank unless P
divides one of the few minors involved (odds of order size / P ~ 1e-6); an unknown is
determined when e_i is in K's row space: its reduced row is exactly e_i, decAttack's test
on the reduced row echelon form (src/consensus.py), without their 1e-6 float thresholds.
It tells which values the algebra allows, not how precisely float32 messages give them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from fractions import Fraction

import numpy as np

from attacker.gossip_algebra import State
from attacker.gossip_async import MixEvent, lockstep_events

P = 67108859  # the largest prime below 2^26: products and short sums stay inside int64


def _mod(f: Fraction) -> int:
    return f.numerator % P * pow(f.denominator % P, P - 2, P) % P


def exact_determined(
    graph: Mapping[str, Sequence[str]], order: Sequence[str], mixing: Sequence[Sequence[Fraction]],
    attackers: Sequence[str], *, steps: int, rounds: int, observed: Collection[State] | None = None,
    events: Sequence[MixEvent] | None = None,
) -> dict[tuple[str, int], bool]:
    """(honest node, step) -> determined, exactly, for the exact model (one unknown per step).

    Args:
        mixing: W in rationals (gradleak.core.graphs.mixing_fractions).
        observed: the states the attackers saw; default: lock-step, every round of every
            attacker and of each attacker's neighbour (what build_knowledge observes).
        events: the averaging record (attacker.gossip_async); default: lock-step, no loss.
    """
    order = tuple(order)
    index = {p: i for i, p in enumerate(order)}
    if not attackers or any(a not in index for a in attackers):
        raise ValueError(f"attackers {list(attackers)} must be members of the graph")
    honest = [p for p in order if p not in set(attackers)]
    unknowns = [(p, s) for p in honest for s in range(1, steps + 1)]
    col = {u: i for i, u in enumerate(unknowns)}
    w = [[_mod(x) for x in row] for row in mixing]
    width = len(unknowns)
    states: dict[State, np.ndarray] = {}
    for node in order:
        states[(node, 1, 0)] = _half_step(np.zeros(width, np.int64), col.get((node, 1)))
    for ev in events if events is not None else lockstep_events(graph, order, steps=steps, rounds=rounds):
        k = index[ev.node]
        own = w[k][k]
        acc = np.zeros(width, np.int64)
        for sender, pos in ev.used:
            if pos is None:
                own = (own + w[k][index[sender]]) % P
            else:
                acc = (acc + w[k][index[sender]] * states[(sender, *pos)]) % P
        new = (acc + own * states[(ev.node, ev.step, ev.mix_round)]) % P
        states[(ev.node, ev.step, ev.mix_round + 1)] = new
        if ev.mix_round + 1 == rounds and ev.step < steps:
            states[(ev.node, ev.step + 1, 0)] = _half_step(new, col.get((ev.node, ev.step + 1)))
    if observed is None:
        seen = set(attackers) | {j for a in attackers for j in graph[a]}
        observed = [(p, s, r) for p in seen for s in range(1, steps + 1) for r in range(rounds)]
    if not unknowns:
        return {}
    reduced = _rref(np.array([states[o] for o in sorted(observed)], dtype=np.int64))
    unit_rows = {int(np.flatnonzero(row)[0]) for row in reduced if np.count_nonzero(row) == 1}
    return {u: col[u] in unit_rows for u in unknowns}


def _half_step(x: np.ndarray, column: int | None) -> np.ndarray:
    """z(s, 0) = x(s) - u(s): the node's own unknown enters with coefficient -1 (None: known)."""
    z = x.copy()
    if column is not None:
        z[column] = (z[column] - 1) % P
    return z


def _rref(a: np.ndarray) -> np.ndarray:
    """The reduced row echelon form of `a` over GF(P)."""
    a = a % P
    row = 0
    for c in range(a.shape[1]):
        nz = np.flatnonzero(a[row:, c])
        if nz.size == 0:
            continue
        piv = row + int(nz[0])
        a[[row, piv]] = a[[piv, row]]
        a[row] = a[row] * pow(int(a[row, c]), P - 2, P) % P
        others = np.flatnonzero(a[:, c])
        others = others[others != row]
        if others.size:
            a[others] = (a[others] - a[others, c:c + 1] * a[row]) % P
        row += 1
        if row == a.shape[0]:
            break
    return a
