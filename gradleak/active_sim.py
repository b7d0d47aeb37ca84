"""In-process model gossip with an active attacker: the state override of attacker/active.py.

The protocol of gradleak/gossip_sim.py (float32 messages, float64 sums rounded to float32 as
the peers do, no drops), except that at every step's last round each attacker that is the
designated neighbour of a victim sends it the override message instead of its own z. The
attackers rush: they compute the override from the round's messages they hold (their own
neighbours' and their colluders', pooled). Their own averaging continues from their true z.
`target=None` runs the honest protocol (the passive baseline on the same batches). The
attackers' part (ActiveView) is returned apart from the truth (ActiveTruth).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from attacker.active import Detection, Override, designated, detection_scores, override_message
from gradleak.gossip_sim import LocalUpdate


@dataclass
class ActiveView:
    """What the attackers hold: the victims' half-steps as received and what they sent."""

    half_steps: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # victim's h(s)
    sent: dict[tuple[str, int], Override] = field(default_factory=dict)  # (victim, step) -> override


@dataclass
class ActiveTruth:
    """Everything else, for scoring only: updates, weights, and what the victims computed."""

    updates: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # lr * g_k(s)
    weights: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # x_k(s)
    detection: dict[tuple[str, int], dict[str, Detection]] = field(default_factory=dict)  # victim's scores


def simulate_override(
    graph: Mapping[str, Sequence[str]], order: Sequence[str], mixing: np.ndarray,
    attackers: Sequence[str], victims: Sequence[str], x0: np.ndarray, *, steps: int, rounds: int,
    local_update: LocalUpdate, target: np.ndarray | None,
) -> tuple[ActiveView, ActiveTruth]:
    """Run S steps of R rounds with the attackers overriding `victims` toward `target`."""
    order = list(order)
    index = {p: i for i, p in enumerate(order)}
    attackers = tuple(attackers)
    lead = {v: designated({p: tuple(q) for p, q in graph.items()}, attackers, v) for v in victims}
    missing = [v for v, a in lead.items() if a is None or v in attackers]
    if missing:
        raise ValueError(f"victims {missing} are attackers or have no attacker neighbour")
    seen = {j for a in attackers for j in graph[a]} | set(attackers)  # whose messages the attackers hold
    view, truth = ActiveView(), ActiveTruth()
    x = np.tile(np.asarray(x0, dtype=np.float32), (len(order), 1))  # (n, d)
    for s in range(1, steps + 1):
        z = x.copy()
        for k, node in enumerate(order):
            truth.weights[(node, s)] = x[k].copy()
            u = np.asarray(local_update(node, s, x[k]), dtype=np.float32)
            truth.updates[(node, s)] = u
            z[k] = x[k] - u
        for v in victims:
            view.half_steps[(v, s)] = z[index[v]].copy()
        for r in range(rounds):
            sent: dict[tuple[str, str], np.ndarray] = {}  # (sender, receiver) -> message, if not z
            if target is not None and r == rounds - 1:
                held = {j: z[index[j]] for j in seen}
                for v in victims:
                    row = {p: float(mixing[index[v], index[p]]) for p in (v, *graph[v])}
                    ov = override_message(row=row, victim=v, attacker=str(lead[v]), target=target,
                                          held={j: held[j] for j in row if j in held})
                    view.sent[(v, s)] = ov
                    sent[(ov.attacker, v)] = ov.message.astype(np.float32)
            z = _average(z, mixing, graph, order, index, sent, truth, victims, s, r == rounds - 1)
        x = z
    return view, truth


def _average(z: np.ndarray, w: np.ndarray, graph: Mapping[str, Sequence[str]], order: list[str],
             index: dict[str, int], sent: Mapping[tuple[str, str], np.ndarray], truth: ActiveTruth,
             victims: Sequence[str], step: int, last: bool) -> np.ndarray:
    """One round as each peer computes it: float64 sum over sorted neighbours, rounded to float32."""
    nxt = np.empty_like(z)
    for k, node in enumerate(order):
        acc = w[k, k] * z[k].astype(np.float64)
        got = {}
        for j in sorted(graph[node]):
            m = sent.get((j, node), z[index[j]])
            got[j] = m
            acc += w[k, index[j]] * m.astype(np.float64)
        nxt[k] = acc.astype(np.float32)
        if last and node in victims:
            truth.detection[(node, step)] = detection_scores(z[k], got)
    return nxt
