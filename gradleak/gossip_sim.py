"""In-process simulation of the gossip protocol the attack of attacker.gossip_algebra targets.

The protocol exactly as the peers run it (see attacker/gossip_algebra.py): local SGD half-step
h = x_k(s) - lr * g_k(s), then R averaging rounds with W, each round's values sent to every
neighbour; in float32 (as on the wire). A lost message j -> k (probability `drop_rate` per
message, drawn from the seed) makes k use its own value in j's place; the attackers learn
only of the losses on messages sent to or by them. The simulation holds the truth (every gradient,
state and batch); it hands the attackers only their `AttackerView`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attacker.gossip_algebra import X0, Drop, State

# (node, step, weights x_k(s) flat float32) -> lr * g_k(s) flat float32
LocalUpdate = Callable[[str, int, np.ndarray], np.ndarray]


@dataclass
class AttackerView:
    """What the colluding attackers saw and did: nothing else leaves the simulation."""

    observations: dict[State, np.ndarray] = field(default_factory=dict)  # received + own
    known: dict[tuple, np.ndarray] = field(default_factory=dict)  # x0, own lr * g
    drops: set[Drop] = field(default_factory=set)  # losses of messages to or from an attacker
    own_weights: dict[int, np.ndarray] = field(default_factory=dict)  # first attacker's x(s)


@dataclass
class Truth:
    """Everything the simulation knows, for scoring only."""

    updates: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # lr * g_k(s)
    states: dict[State, np.ndarray] = field(default_factory=dict)  # z_k(s, r), r = 0..R
    drops: set[Drop] = field(default_factory=set)


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
