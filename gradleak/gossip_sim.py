"""In-process simulation of the gossip protocol the attack of attacker.gossip_algebra targets.

The protocol exactly as the peers run it (see attacker/gossip_algebra.py): local SGD half-step
h = x_k(s) - lr * g_k(s), then R averaging rounds with W, each round's values sent to every
neighbour; in float32 (as on the wire). A lost message j -> k (probability `drop_rate` per
message, drawn from the seed) makes k use its own value in j's place; the attackers learn
only of the losses on messages sent to or by them. The simulation holds the truth (every gradient,
state and batch); it hands the attackers only their `AttackerView`.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attacker.gossip_algebra import X0, Drop, State
from attacker.gossip_async import MixEvent, Position, Reception

# (node, step, weights x_k(s) flat float32) -> lr * g_k(s) flat float32
LocalUpdate = Callable[[str, int, np.ndarray], np.ndarray]


@dataclass
class AttackerView:
    """What the colluding attackers saw and did: nothing else leaves the simulation."""

    observations: dict[State, np.ndarray] = field(default_factory=dict)  # received + own
    known: dict[tuple, np.ndarray] = field(default_factory=dict)  # x0, own lr * g
    drops: set[Drop] = field(default_factory=set)  # losses of messages to or from an attacker
    own_weights: dict[int, np.ndarray] = field(default_factory=dict)  # first attacker's x(s)
    received: set[Reception] = field(default_factory=set)  # async: messages that reached an attacker
    own_events: list[MixEvent] = field(default_factory=list)  # async: the attackers' own averagings


@dataclass
class Truth:
    """Everything the simulation knows, for scoring only."""

    updates: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # lr * g_k(s)
    states: dict[State, np.ndarray] = field(default_factory=dict)  # z_k(s, r), r = 0..R
    drops: set[Drop] = field(default_factory=set)
    events: list[MixEvent] = field(default_factory=list)  # async: every averaging, in time order


def simulate(
    graph: Mapping[str, Sequence[str]], order: Sequence[str], mixing: np.ndarray,
    attackers: Sequence[str], x0: np.ndarray, *, steps: int, rounds: int,
    local_update: LocalUpdate, drop_rate: float = 0.0, seed: int = 0,
    dtype: type = np.float32,
) -> tuple[AttackerView, Truth]:
    """Run S steps of R rounds; return the attackers' view and the truth."""
    order = list(order)
    index = {p: i for i, p in enumerate(order)}
    rng = np.random.default_rng(seed)
    x: np.ndarray = np.tile(np.asarray(x0, dtype=dtype), (len(order), 1))  # (n, d)
    view, truth = AttackerView(), Truth()
    view.known[X0] = np.asarray(x0, dtype=dtype).copy()
    w: np.ndarray = mixing.astype(dtype)
    for s in range(1, steps + 1):
        view.own_weights[s] = x[index[attackers[0]]].copy()
        z = x.copy()
        for k, node in enumerate(order):
            u: np.ndarray = np.asarray(local_update(node, s, x[k]), dtype=dtype)
            truth.updates[(node, s)] = u
            if node in attackers:
                view.known[(node, s)] = u
            z[k] = x[k] - u
        for r in range(rounds):
            lost = [(j, m, s, r) for m in order for j in graph[m] if rng.random() < drop_rate]
            for m in order:
                truth.states[(m, s, r)] = z[index[m]].copy()
            for a in attackers:
                view.observations[(a, s, r)] = z[index[a]].copy()
                for j in graph[a]:
                    if (j, a, s, r) not in lost:
                        view.observations[(j, s, r)] = z[index[j]].copy()
            truth.drops.update(lost)
            view.drops.update(d for d in lost if d[0] in attackers or d[1] in attackers)
            nxt = w @ z
            for j, m, _, _ in lost:
                nxt[index[m]] += w[index[m], index[j]] * (z[index[m]] - z[index[j]])
            z = nxt
        for m in order:
            truth.states[(m, s, rounds)] = z[index[m]].copy()
        x = z
    return view, truth


def simulate_async(
    graph: Mapping[str, Sequence[str]], order: Sequence[str], mixing: np.ndarray,
    attackers: Sequence[str], x0: np.ndarray, *, steps: int, rounds: int,
    local_update: LocalUpdate, drop_rate: float = 0.1, seed: int = 0,
    dtype: type = np.float32, jitter: float = 0.3, delay: float = 0.6,
) -> tuple[AttackerView, Truth]:
    """Async model gossip (p2p.model_gossip, lockstep=False) in an event order drawn from the seed.

    Every node ticks on its own clock (period 1 +- `jitter`, each tick +- 10%): a tick
    averages the round (but the first) with the newest message held from each neighbour
    (missing: its weight to self; held ones cleared), then sends the new z to every
    neighbour; each message is lost with probability `drop_rate`, else arrives after a
    uniform delay in [0, `delay`] periods. Sums in float64, rounded to `dtype` (as the peers).
    """
    if not 0.0 <= drop_rate < 1.0 or jitter < 0 or delay < 0:
        raise ValueError(f"bad drop_rate {drop_rate}, jitter {jitter} or delay {delay}")
    order = list(order)
    index = {p: i for i, p in enumerate(order)}
    rng = np.random.default_rng(seed)
    view, truth = AttackerView(), Truth()
    view.known[X0] = np.asarray(x0, dtype=dtype).copy()
    period = {k: 1.0 + jitter * (2 * rng.random() - 1) for k in order}
    z: dict[str, np.ndarray] = {}
    at: dict[str, Position] = {k: (1, 0) for k in order}
    held: dict[str, dict[str, dict[Position, np.ndarray]]] = {k: {j: {} for j in graph[k]} for k in order}
    queue: list[tuple[float, int, str, tuple]] = []
    tie = 0

    def push(t: float, kind: str, payload: tuple) -> None:
        nonlocal tie
        tie += 1
        heapq.heappush(queue, (t, tie, kind, payload))

    def half_step(k: str, s: int, x: np.ndarray) -> np.ndarray:
        u: np.ndarray = np.asarray(local_update(k, s, x), dtype=dtype)
        truth.updates[(k, s)] = u
        if k in attackers:
            view.known[(k, s)] = u
            if k == attackers[0]:
                view.own_weights[s] = x.copy()
        return (x.astype(np.float64) - u).astype(dtype)

    for k in order:
        z[k] = half_step(k, 1, np.asarray(x0, dtype=dtype))
        push(rng.random() * period[k], "tick", (k, True))
    while queue:
        t, _, kind, payload = heapq.heappop(queue)
        if kind == "arrive":
            sender, receiver, pos, value = payload
            held[receiver][sender][pos] = value
            if receiver in attackers:
                view.observations[(sender, *pos)] = value
                view.received.add((sender, receiver, *pos))
            continue
        k, first = payload
        if not first:  # average the round at[k] with the newest held messages
            s, r = at[k]
            i = index[k]
            used: list[tuple[str, Position | None]] = []
            own = mixing[i, i]
            acc = np.zeros(z[k].shape)
            for j in graph[k]:
                if not held[k][j]:
                    used.append((j, None))
                    own += mixing[i, index[j]]
                    continue
                newest = max(held[k][j])
                acc += mixing[i, index[j]] * held[k][j][newest].astype(np.float64)
                held[k][j].clear()
                used.append((j, newest))
            z[k] = (acc + own * z[k].astype(np.float64)).astype(dtype)
            event = MixEvent(k, s, r, tuple(used))
            truth.events.append(event)
            if k in attackers:
                view.own_events.append(event)
            if r + 1 < rounds:
                at[k] = (s, r + 1)
            else:
                truth.states[(k, s, rounds)] = z[k].copy()
                if s == steps:
                    continue  # done: x(S + 1) is not sent
                at[k] = (s + 1, 0)
                z[k] = half_step(k, s + 1, z[k])
        truth.states[(k, *at[k])] = z[k].copy()
        if k in attackers:
            view.observations[(k, *at[k])] = z[k].copy()
        for j in graph[k]:
            if rng.random() < drop_rate:
                truth.drops.add((k, j, *at[k]))
            else:
                push(t + delay * period[k] * rng.random(), "arrive", (k, j, at[k], z[k].copy()))
        push(t + period[k] * (1 + 0.1 * (2 * rng.random() - 1)), "tick", (k, False))
    return view, truth


def decattack_graph(members: Sequence[str], degree: float, seed: int,
                    max_draws: int = 1000) -> dict[str, tuple[str, ...]]:
    """decAttack's Erdős–Rényi draw (scripts/exp_erdos_renyi.py): G(n, p = D / n), redrawn until
    connected. (gradleak.core.graphs' er:D uses p = D / (n - 1): expected degree exactly D.)"""
    n = len(members)
    rng = np.random.default_rng(seed)
    p = min(1.0, degree / n)
    for _ in range(max_draws):
        upper = np.triu(rng.random((n, n)) < p, 1)
        adj = upper | upper.T
        seen, todo = {0}, [0]
        while todo:
            for j in np.flatnonzero(adj[todo.pop()]):
                if int(j) not in seen:
                    seen.add(int(j))
                    todo.append(int(j))
        if len(seen) == n:
            return {members[i]: tuple(members[int(j)] for j in np.flatnonzero(adj[i])) for i in range(n)}
    raise ValueError(f"no connected G({n}, {p:.3g}) in {max_draws} draws")


def decattack_iterations(n: int, degree: float, attackers: int, base_n: int = 20) -> int:
    """decAttack's gossip iterations T = int(min(n * p / |A|, n / 2)), where their p is the
    expected degree over their first n (20), not the edge probability: T grows with n."""
    return max(1, int(min(n * (degree / base_n) / attackers, n / 2)))  # their float floor, kept


def flat_parameters(model: nn.Module) -> np.ndarray:
    """The model's parameters as one float32 vector (parameters() order)."""
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().cpu().numpy().copy()


def sgd_update(
    model: nn.Module, batches: Callable[[str, int], tuple[torch.Tensor, torch.Tensor]], lr: float,
) -> LocalUpdate:
    """lr * (mean cross-entropy gradient) of node k's batch for step s at the given weights."""
    work = [model]

    def update(node: str, step: int, weights: np.ndarray) -> np.ndarray:
        net = work[0]
        torch.nn.utils.vector_to_parameters(torch.from_numpy(np.asarray(weights, np.float32)),
                                            net.parameters())
        images, labels = batches(node, step)
        loss = F.cross_entropy(net(images), labels)
        grads = torch.autograd.grad(loss, list(net.parameters()))
        return lr * torch.cat([g.reshape(-1) for g in grads]).detach().numpy()

    return update
