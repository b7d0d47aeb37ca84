"""From the solved gossip system to images: invert every determined gradient.

For each determined unknown (node k, step s) the gradient is g = u / lr, taken at x_k(s):
x0 at s = 1, else solved from the system where its row is in K's row space, else (flagged
`weights_exact = False`) the first attacker's own x_a(s), the nearest public stand-in.
The gradient then goes to a registered image attack (attacker.api) as an Observation,
exactly as a directly received update would. Reconstructions come back keyed by
(node, step); scoring against the truth is the caller's business.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from attacker.api import AttackConfig, Observation, Reconstruction, create_attack
from attacker.gossip_algebra import Solution
from gradleak.core.graphs import hops


@dataclass(frozen=True)
class NodeStatus:
    """Per honest node: how far it is and what of it the attackers can solve for."""

    node: str
    hops: int  # to the nearest attacker
    determined: tuple[int, ...]  # first steps of its determined unknowns
    amplification: float  # the smallest error gain among them (inf if none)


@dataclass
class Leak:
    """One inverted gradient: the reconstruction and how it was obtained."""

    reconstruction: Reconstruction
    weights_exact: bool  # x_k(s) solved from the system (False: the attacker's stand-in)
    stats: dict[str, Any] = field(default_factory=dict)


def node_status(solution: Solution, graph: Mapping[str, Sequence[str]]) -> dict[str, NodeStatus]:
    """Hop distance and determined steps of every honest node."""
    dist = hops({p: tuple(q) for p, q in graph.items()}, list(solution.knowledge.attackers))
    out: dict[str, NodeStatus] = {}
    for node in solution.knowledge.order:
        if node in solution.knowledge.attackers:
            continue
        keys = [k for k in solution.knowledge.unknowns if k[0] == node]
        done = tuple(s for (_, s) in keys if solution.determined[(node, s)])
        amp = min((solution.amplification[(node, s)] for s in done), default=float("inf"))
        out[node] = NodeStatus(node, dist.get(node, -1), done, amp)
    return out


def load_flat(model: nn.Module, flat: np.ndarray) -> nn.Module:
    """A copy of `model` with its parameters (parameters() order) set from a flat vector."""
    out = copy.deepcopy(model)
    vec = torch.as_tensor(np.asarray(flat), dtype=torch.float32)
    torch.nn.utils.vector_to_parameters(vec.to(next(out.parameters()).device), out.parameters())
    return out


def unflatten(model: nn.Module, flat: np.ndarray) -> tuple[torch.Tensor, ...]:
    """A flat vector cut into one float32 tensor per parameter (parameters() order)."""
    vec = torch.as_tensor(np.asarray(flat, dtype=np.float32))
    out, at = [], 0
    for p in model.parameters():
        out.append(vec[at:at + p.numel()].view_as(p).clone())
        at += p.numel()
    if at != vec.numel():
        raise ValueError(f"flat vector has {vec.numel()} values, the model {at}")
    return tuple(out)


def invert_gradients(
    solution: Solution, model: nn.Module, *, lr: float, batch_size: int,
    input_shape: tuple[int, int, int], num_classes: int, own_weights: Mapping[int, np.ndarray],
    attack: str = "analytic", config: AttackConfig | None = None,
    targets: Sequence[tuple[str, int]] | None = None, max_expected_error: float | None = None,
) -> dict[tuple[str, int], Leak]:
    """Reconstruct the batch behind every determined gradient (or those of `targets`).

    Args:
        solution: the solved system.
        model: the architecture (its weights are replaced by x_k(s)); left untouched.
        lr: the public learning rate (u = lr * g).
        batch_size, input_shape, num_classes: public metadata of the honest peers' updates.
        own_weights: step -> the first attacker's own x_a(step), the stand-in for weights the
            system does not determine.
        attack: the registered image attack.
        targets: the (node, step) unknowns to attack (default: every determined one).
        max_expected_error: skip gradients whose Solution.expected_error is above this (an
            image attack on a gradient that is mostly rounding noise only burns time).
    """
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    chosen = create_attack(attack, config)
    keys = [k for k in (targets if targets is not None else solution.estimates)
            if solution.determined.get(k) and (max_expected_error is None
                                                or solution.expected_error[k] <= max_expected_error)]
    out: dict[tuple[str, int], Leak] = {}
    for node, step in keys:
        weights = solution.weights(node, step)
        exact = weights is not None
        if weights is None:
            if step not in own_weights:
                continue
            weights = own_weights[step]
        victim = load_flat(model, weights)
        grads = unflatten(victim, solution.estimates[(node, step)] / lr)
        obs = Observation(gradients=grads, batch_size=batch_size, input_shape=input_shape,
                          num_classes=num_classes)
        rec = chosen.reconstruct(victim, obs)
        out[(node, step)] = Leak(rec, exact, {
            "amplification": solution.amplification[(node, step)],
            "expected_error": solution.expected_error[(node, step)],
            "residual": solution.residual[(node, step)]})
    return out
