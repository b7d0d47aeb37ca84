"""The knowledge system of asynchronous, lossy model gossip (p2p.model_gossip's async mode).

In async mode each peer runs its S x R averaging rounds on its own clock: at round (s, r) it
sends z_k(s, r) to its neighbours (some messages are lost), then averages with the newest
message that has arrived from each neighbour since its previous round, whatever that
message's position (s', r'); a neighbour with none gives its weight to the peer's own z:

    z_k(s, r + 1) = (W_kk + sum_{j missing} W_kj) z_k(s, r) + sum_{j used} W_kj z_j(s'_j, r'_j)

and after round R - 1, x_k(s + 1) = z_k(s, R), z_k(s + 1, 0) = x_k(s + 1) - u_k(s + 1). So
every state is still a known linear combination of the unknowns, *given the record of which
position each averaging used* (a `MixEvent`). The builder propagates the coefficient rows
through the events in a causal order (each event after the sends it uses), then stacks one
row per message that reached an attacker (all of them are observed, used or superseded) and
the attackers' own states. The result is an `attacker.gossip_algebra.Knowledge`, so `solve`
and `determined_unknowns` apply unchanged.

Who knows the events: a peer knows its own (it did them) and the position of each message it
receives (the header's step and mix_round); the positions a non-neighbour used are in no
header. So passing every node's events is the informed attacker (an upper bound: peers that
publish their mixing records); an attacker that must assume lock-step for the others solves
a wrong system (benchmarks/gossip_attack.py measures how wrong).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from attacker.gossip_algebra import X0, Knowledge, State, check_inputs

Position = tuple[int, int]  # (local step s >= 1, mix round r in 0..R-1)
Reception = tuple[str, str, int, int]  # (sender, receiver, step, round) of a message that arrived


@dataclass(frozen=True)
class MixEvent:
    """One averaging round of one node: z_node(step, mix_round + 1) from what it used."""

    node: str
    step: int
    mix_round: int
    used: tuple[tuple[str, Position | None], ...]  # (neighbour, position used or None: missing)


def build_async_knowledge(
    graph: Mapping[str, Sequence[str]], order: Sequence[str], mixing: np.ndarray,
    attackers: Sequence[str], *, steps: int, rounds: int, events: Sequence[MixEvent],
    received: Collection[Reception],
) -> Knowledge:
    """The attackers' knowledge system of an async run (exact model: one unknown per (node, step)).

    Args:
        graph, order, mixing: the public adjacency, W's index and W.
        attackers: the colluding members.
        steps, rounds: S and R; every node runs all S x R rounds.
        events: every node's S x R averaging rounds, each after the sends it uses.
        received: the messages that arrived at an attacker (any receiver not an attacker is ignored).

    Raises:
        ValueError: on a bad size, an event out of causal order, a used message from a
            non-neighbour, or a node whose rounds are missing.
    """
    order = tuple(order)
    n = len(order)
    index = {p: i for i, p in enumerate(order)}
    check_inputs(graph, order, mixing, attackers, steps, rounds)
    honest = [p for p in order if p not in set(attackers)]
    unknowns = tuple((p, s) for p in honest for s in range(1, steps + 1))
    knowns: tuple[tuple, ...] = (X0, *((a, s) for a in attackers for s in range(1, steps + 1)))
    p, q = len(unknowns), len(knowns)
    col: dict[tuple, int] = {u: i for i, u in enumerate(unknowns)}
    col.update({k: p + i for i, k in enumerate(knowns)})

    states = np.full((steps, rounds + 1, n, p + q), np.nan)
    x0 = np.zeros(p + q)
    x0[col[X0]] = 1.0
    for k, node in enumerate(order):
        states[0, 0, k] = x0
        states[0, 0, k, col[(node, 1)]] -= 1.0
    for ev in events:
        k = index[ev.node]
        if not (1 <= ev.step <= steps and 0 <= ev.mix_round < rounds):
            raise ValueError(f"event {ev.node} ({ev.step}, {ev.mix_round}) is outside S = {steps}, R = {rounds}")
        own = states[ev.step - 1, ev.mix_round, k]
        if np.isnan(own[0]):
            raise ValueError(f"event {ev.node} ({ev.step}, {ev.mix_round}) comes before its own previous round")
        self_weight = mixing[k, k]
        acc = np.zeros(p + q)
        for sender, pos in ev.used:
            if sender not in graph[ev.node]:
                raise ValueError(f"{ev.node} used a message of {sender}, not a neighbour")
            w = mixing[k, index[sender]]
            if pos is None:
                self_weight += w
                continue
            row = states[pos[0] - 1, pos[1], index[sender]]
            if pos[1] >= rounds or np.isnan(row[0]):
                raise ValueError(f"{ev.node} ({ev.step}, {ev.mix_round}) used {sender} at {pos} "
                                 "before it was computed")
            acc += w * row
        new = acc + self_weight * own
        states[ev.step - 1, ev.mix_round + 1, k] = new
        if ev.mix_round + 1 == rounds and ev.step < steps:  # the next step's half-step
            states[ev.step, 0, k] = new
            states[ev.step, 0, k, col[(ev.node, ev.step + 1)]] -= 1.0
    if np.isnan(states[..., 0]).any():
        raise ValueError("events do not cover every node's S x R rounds")

    rows: dict[State, np.ndarray] = {}
    for a in attackers:  # the attackers' own states, every round they sent
        for s in range(1, steps + 1):
            for r in range(rounds):
                rows[(a, s, r)] = states[s - 1, r, index[a]]
    for sender, receiver, s, r in sorted(received):
        if receiver in attackers and (sender, s, r) not in rows:
            rows[(sender, s, r)] = states[s - 1, r, index[sender]]
    observed = tuple(rows)
    stacked = np.array([rows[o] for o in observed])
    return Knowledge(order, tuple(attackers), steps, rounds, "exact", unknowns, knowns, observed,
                     stacked[:, :p], stacked[:, p:], states)


def lockstep_events(graph: Mapping[str, Sequence[str]], order: Sequence[str], *, steps: int,
                    rounds: int) -> list[MixEvent]:
    """The events of a lock-step run without losses: every round uses its neighbours' same round."""
    return [MixEvent(node, s, r, tuple((j, (s, r)) for j in graph[node]))
            for s in range(1, steps + 1) for r in range(rounds) for node in order]
