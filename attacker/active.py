"""The active attack on model gossip: a malicious member overrides its neighbours' state.

After Pasquini, Raynal & Troncoso, "On the (In)security of Peer-to-Peer Decentralized
Machine Learning" (S&P 2023). Protocol as in attacker/gossip_algebra.py: victim v ends
step s with x_v(s+1) = W_vv z_v + W_va m + sum_{u in N(v) \\ a} W_vu z_u, all at round R-1,
m being what attacker a sends v. A rushing attacker waits for the round's messages, then
sends m = (theta* - W_vv z_v - sum_u W_vu z_u) / W_va, so that x_v(s+1) = theta*, a model
the attacker chose. At step s+1 v half-steps from theta* and sends h = theta* - lr g_v(s+1)
back: the attacker reads v's gradient at weights it picked, g = (theta* - h) / lr.

Exact when the attackers hold every z_u of v's neighbourhood (u a common neighbour or a
colluder). A neighbour u it does not observe is estimated by z_v; the error e = z_u - z_v
lands in x_v(s+1) as W_vu e and in the recovered gradient as W_vu e / lr, of the order of
the gradient itself (neighbours' models differ by O(lr g)). Detection: what an honest peer
can compute from its own round, see `detection_scores`. Pure numpy; no truth.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

# What a malicious member sends in model gossip (gradleak/runtime/active_strategy.py).
STRATEGIES = ("honest", "state-override", "crafted")


@dataclass(frozen=True)
class Override:
    """The message one attacker sends one victim at the victim's last averaging round."""

    victim: str
    attacker: str
    message: np.ndarray  # (d,) float64; rounded to the wire dtype by the sender
    exact: bool  # every other term of the victim's average was observed
    estimated: tuple[str, ...]  # neighbours whose z was stood in for by z_victim


@dataclass(frozen=True)
class Detection:
    """What one honest peer sees of one neighbour's model in one averaging round."""

    sender: str
    l2: float  # |m_sender - z_own|
    l2_ratio: float  # l2 / mean l2 of the other neighbours (nan without others)
    cosine: float  # cos(m_sender - z_own, mean of the others' differences) (nan without others)


def override_message(
    *, row: Mapping[str, float], victim: str, attacker: str, target: np.ndarray,
    held: Mapping[str, np.ndarray],
) -> Override:
    """The message that sets the victim's next model to `target`.

    Args:
        row: row `victim` of W: every neighbour's weight and the victim's own.
        victim, attacker: the victim and the neighbour that sends the override.
        target: theta* (d,).
        held: round R-1 values the attackers hold for members of `row` (the victim's own
            message is required; colluders' messages to the victim and the values of
            common neighbours where observed). The attacker's own entry is ignored.

    Raises:
        ValueError: when the attacker is not the victim's neighbour, or z_victim is missing.
    """
    w_a = float(row.get(attacker, 0.0))
    if not w_a > 0:
        raise ValueError(f"{attacker} is not a neighbour of {victim} (weight {w_a})")
    if victim not in held:
        raise ValueError(f"the victim's own round message z_{victim} is needed")
    z_v = np.asarray(held[victim], dtype=np.float64)
    rest = np.zeros_like(z_v)
    estimated = []
    for j, w in row.items():
        if j == attacker or w == 0:
            continue
        if j in held:
            rest += w * np.asarray(held[j], dtype=np.float64)
        else:
            rest += w * z_v
            estimated.append(j)
    message = (np.asarray(target, dtype=np.float64) - rest) / w_a
    return Override(victim, attacker, message, not estimated, tuple(sorted(estimated)))


def recover_gradient(target: np.ndarray, half_step: np.ndarray, lr: float) -> np.ndarray:
    """The victim's gradient at theta* from its next half-step h = theta* - lr g (float64)."""
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    return (np.asarray(target, dtype=np.float64) - np.asarray(half_step, dtype=np.float64)) / lr


def detection_scores(own: np.ndarray, received: Mapping[str, np.ndarray]) -> dict[str, Detection]:
    """Per sender: the L2 distance of its model from the peer's own, relative to the others',
    and the cosine with the mean difference of the other neighbours.

    An override to a far target stands out by its norm (it is divided by W_va) and, where
    the honest neighbours drift together, by pointing elsewhere (cosine well below 1).
    """
    z = np.asarray(own, dtype=np.float64)
    diffs = {p: np.asarray(m, dtype=np.float64) - z for p, m in received.items()}
    norms = {p: float(np.linalg.norm(d)) for p, d in diffs.items()}
    out = {}
    for p, d in diffs.items():
        others = [q for q in diffs if q != p]
        if not others:
            out[p] = Detection(p, norms[p], float("nan"), float("nan"))
            continue
        mean = np.mean([diffs[q] for q in others], axis=0)
        base = float(np.mean([norms[q] for q in others]))
        denom = norms[p] * float(np.linalg.norm(mean))
        cos = float(d @ mean / denom) if denom > 0 else float("nan")
        out[p] = Detection(p, norms[p], norms[p] / base if base > 0 else float("inf"), cos)
    return out


def designated(graph: Mapping[str, tuple[str, ...] | list[str]], attackers: tuple[str, ...] | list[str],
               victim: str) -> str | None:
    """The colluder that overrides `victim` (the first attacker among its neighbours), or None."""
    for a in attackers:
        if a in graph[victim]:
            return a
    return None
