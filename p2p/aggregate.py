"""How a peer combines one apply's updates into one gradient: mean, median, trimmed, clip.

Rules by name (`--aggregate`):

- `mean`: the weighted mean, sum(w_i t_i) / sum(w_i) (the default).
- `median`: the coordinate-wise median of the updates, weighted by their votes.
- `trimmed:F`: the coordinate-wise trimmed mean: per coordinate the values are sorted
  and F of the total vote is cut at each end (an update straddling a cut counts in
  part), the rest averaged by vote. 0 < F < 0.5.
- `clip:C`: each update's L2 norm (over all its tensors) clipped to C, then the
  weighted mean: one update moves the mean by at most w_i C / sum(w).

Weights and votes. An update's weight is its samples x mixing weight x the staleness
factor of its lag (p2p.peer); `mean` and `clip` use it. `median` and `trimmed` use its
vote, the staleness factor alone (in [0, 1], computed by the receiver): the sample
count and mixing weight are the sender's claims, and under a weighted median whoever
claims the most weight picks the value. So late updates still count less, and in
lock-step rounds (every factor 1) these are the plain coordinate-wise median and
trimmed mean of the round's updates. A secure-aggregation group sum enters as one
contribution: the group's weighted mean (its sum over its members' total weight) with
that total as its weight and one vote, since its members' single updates are never seen.

Everything is accumulated in float64 in the order given, so a fixed input order gives
bit-identical results (lock-step runs stay reproducible).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

RULES = ("mean", "median", "trimmed:F", "clip:C")


@dataclass(frozen=True)
class Contribution:
    """One update (or one group sum) as it enters an aggregate."""

    tensors: Mapping[str, torch.Tensor]
    weight: float  # samples x mixing weight x staleness factor: mean and clip
    vote: float = 1.0  # the staleness factor alone: median and trimmed


@dataclass(frozen=True)
class Aggregator:
    """A parsed rule: its canonical name, kind and parameter."""

    name: str  # canonical spec, e.g. "trimmed:0.2"
    kind: str  # mean | median | trimmed | clip
    param: float = 0.0  # F of trimmed, C of clip

    def __call__(self, contributions: Sequence[Contribution]) -> dict[str, torch.Tensor] | None:
        """The aggregate (float64, on the tensors' device), or None when nothing counts."""
        live = [c for c in contributions if c.weight > 0 and c.vote > 0]
        if not live:
            return None
        if self.kind == "mean":
            return _weighted_mean(live)
        if self.kind == "clip":
            return _weighted_mean([_clipped(c, self.param) for c in live])
        return _by_coordinate(live, self.param if self.kind == "trimmed" else None)


def l2_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all tensors together, in float64 (inf when it overflows)."""
    total = 0.0
    for t in tensors.values():
        total += float(torch.linalg.vector_norm(t.to(torch.float64)) ** 2)
    return math.sqrt(total)


def _weighted_mean(items: Sequence[Contribution]) -> dict[str, torch.Tensor]:
    total = math.fsum(c.weight for c in items)
    out: dict[str, torch.Tensor] = {}
    for name in items[0].tensors:
        acc = torch.zeros_like(items[0].tensors[name], dtype=torch.float64)
        for c in items:  # in the given order: the float sum is reproducible
            acc += c.tensors[name].to(torch.float64) * c.weight
        out[name] = acc / total
    return out


def _clipped(c: Contribution, bound: float) -> Contribution:
    norm = l2_norm(c.tensors)
    if norm <= bound:
        return c
    scale = bound / norm  # norm > bound > 0, so finite and < 1
    return Contribution({n: t.to(torch.float64) * scale for n, t in c.tensors.items()}, c.weight, c.vote)


def _by_coordinate(items: Sequence[Contribution], trim: float | None) -> dict[str, torch.Tensor]:
    """Vote-weighted coordinate-wise median (trim None) or trimmed mean (trim = F)."""
    votes = torch.tensor([c.vote for c in items], dtype=torch.float64)
    out: dict[str, torch.Tensor] = {}
    for name in items[0].tensors:
        stack = torch.stack([c.tensors[name].to(torch.float64) for c in items])
        votes = votes.to(stack.device)
        values, order = torch.sort(stack, dim=0, stable=True)
        w = votes.view(-1, *[1] * (stack.dim() - 1)).expand_as(stack).gather(0, order)
        upper = w.cumsum(0)  # each sorted value covers the vote interval [lower, upper]
        lower = torch.cat([torch.zeros_like(upper[:1]), upper[:-1]])
        total = upper[-1]
        if trim is None:
            # The value(s) whose interval holds half the vote: two at an exact tie
            # (an even count of equal votes), averaged as the usual median is.
            half = total / 2
            hit = ((lower <= half) & (upper >= half)).to(torch.float64)
            out[name] = (values * hit).sum(0) / hit.sum(0)
        else:
            lo, hi = total * trim, total * (1 - trim)
            kept = (torch.minimum(upper, hi) - torch.maximum(lower, lo)).clamp(min=0)
            out[name] = (values * kept).sum(0) / (hi - lo)
    return out


def parse_aggregate(spec: str) -> Aggregator:
    """Parse `mean`, `median`, `trimmed:F` (0 < F < 0.5) or `clip:C` (C > 0); ValueError naming the problem."""
    text = str(spec).strip()
    name, *raw = text.split(":")
    arity = {"mean": 0, "median": 0, "trimmed": 1, "clip": 1}
    if name not in arity:
        raise ValueError(f"unknown aggregation rule '{text}' (known: {', '.join(RULES)})")
    if len(raw) != arity[name]:
        want = "no parameter" if arity[name] == 0 else "one parameter"
        raise ValueError(f"aggregation rule '{name}' takes {want}, got '{text}' (known: {', '.join(RULES)})")
    if not raw:
        return Aggregator(name, name)
    try:
        value = float(raw[0])
    except ValueError:
        raise ValueError(f"aggregation rule '{text}' has a non-numeric parameter") from None
    if name == "trimmed" and not 0.0 < value < 0.5:
        raise ValueError(f"trimmed:F cuts F of the votes at each end, so 0 < F < 0.5; got '{text}'")
    if name == "clip" and not (value > 0 and math.isfinite(value)):
        raise ValueError(f"clip:C needs a finite norm bound C > 0, got '{text}'")
    return Aggregator(f"{name}:{value:g}", name, value)
