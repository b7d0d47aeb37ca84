"""How much a late update counts: staleness rules by name, applied at aggregation.

An update's lag is how many local steps the receiver's model is ahead of the
weights the sender took its gradient at (receiver version - header.model_version,
never below 0). In lock-step rounds every lag is 0 and every rule gives weight 1.

- `constant`: every update counts fully, however late.
- `poly:A`: weight (1 + lag)^-A, FedAsync's polynomial rule (Xie et al. 2019).
- `cutoff:K`: full weight up to lag K, dropped (weight 0, counted) beyond it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Staleness:
    """A parsed rule: canonical name and the weight factor of a lag."""

    name: str
    factor: Callable[[int], float]

    def __call__(self, lag: int) -> float:
        return self.factor(max(0, lag))


def _constant() -> Callable[[int], float]:
    return lambda _lag: 1.0


def _poly(a: float) -> Callable[[int], float]:
    if not (a >= 0 and math.isfinite(a)):
        raise ValueError(f"poly exponent must be a finite number >= 0, got {a}")
    return lambda lag: float((1.0 + lag) ** -a)


def _cutoff(k: float) -> Callable[[int], float]:
    if k < 0 or k != int(k):
        raise ValueError(f"cutoff must be a whole number of steps >= 0, got {k:g}")
    return lambda lag: 1.0 if lag <= k else 0.0


RULES: dict[str, tuple[int, Callable[..., Callable[[int], float]]]] = {
    "constant": (0, _constant),
    "poly": (1, _poly),
    "cutoff": (1, _cutoff),
}


def parse_staleness(spec: str) -> Staleness:
    """Parse `constant`, `poly:A` or `cutoff:K`; ValueError naming the problem."""
    name, *raw = str(spec).strip().split(":")
    if name not in RULES:
        raise ValueError(f"unknown staleness rule '{spec}' (known: constant, poly:A, cutoff:K)")
    arity, make = RULES[name]
    if len(raw) != arity:
        raise ValueError(f"staleness rule '{name}' takes {arity} parameter(s), got '{spec}'")
    try:
        values = [float(r) for r in raw]
    except ValueError:
        raise ValueError(f"staleness rule '{spec}' has a non-numeric parameter") from None
    canonical = ":".join([name, *(f"{v:g}" for v in values)])
    return Staleness(canonical, make(*values))
