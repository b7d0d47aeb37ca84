"""Defences an honest peer applies to its gradient before the update leaves it.

A defence chain is written `name[:param]` joined by `+`, e.g. `prune:0.3+fp16`,
and applied left to right. The canonical spec string is what appears in metrics,
records and plots, so equal chains always print the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Grads = dict[str, torch.Tensor]
Step = Callable[[Grads, torch.Generator], Grads]
Factory = Callable[[float | None], Step]


@dataclass(frozen=True)
class _Entry:
    factory: Factory
    needs_param: bool
    doc: str


DEFENCES: dict[str, _Entry] = {}


def register_defence(name: str, *, needs_param: bool, doc: str) -> Callable[[Factory], Factory]:
    """Register a defence factory under `name`; `needs_param` says if `name:x` is required."""

    def wrap(factory: Factory) -> Factory:
        DEFENCES[name] = _Entry(factory, needs_param, doc)
        return factory

    return wrap


@dataclass(frozen=True)
class Defence:
    """A parsed, applicable defence chain."""

    name: str  # canonical spec, e.g. "prune:0.3+fp16"
    steps: tuple[Step, ...]

    def apply(self, grads: Grads, generator: torch.Generator) -> Grads:
        """Return defended copies of `grads`; the input is left untouched."""
        out = {k: v.detach().clone() for k, v in grads.items()}
        for step in self.steps:
            out = step(out, generator)
        return out


def parse_defence(spec: str) -> Defence:
    """Parse a chain like `prune:0.3+gauss:1e-3`; raise ValueError naming the bad part."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty defence spec")
    if spec.strip() == "none":
        return Defence("none", ())
    names, steps = [], []
    for part in spec.strip().split("+"):
        name, _, raw = part.strip().partition(":")
        entry = DEFENCES.get(name)
        if entry is None:
            known = ", ".join(sorted(DEFENCES))
            raise ValueError(f"unknown defence '{name}' in '{spec}' (known: none, {known})")
        param = _param(name, raw, entry.needs_param, spec)
        steps.append(entry.factory(param))
        names.append(f"{name}:{param:g}" if param is not None else name)
    return Defence("+".join(names), tuple(steps))


def _param(name: str, raw: str, needs: bool, spec: str) -> float | None:
    if not needs:
        if raw:
            raise ValueError(f"defence '{name}' takes no parameter (in '{spec}')")
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"defence '{name}' needs a number, as in '{name}:0.1' (in '{spec}')") from None
    if not math.isfinite(value):
        raise ValueError(f"defence '{name}' parameter must be finite (in '{spec}')")
    return value


def prune_smallest(t: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero exactly floor(ratio * numel) entries of smallest magnitude (ties broken by index)."""
    k = int(ratio * t.numel())
    if k == 0:
        return t
    flat = t.reshape(-1).clone()
    # A stable sort makes the choice among equal magnitudes deterministic.
    order = torch.sort(flat.abs(), stable=True).indices
    flat[order[:k]] = 0
    return flat.reshape(t.shape)


@register_defence("prune", needs_param=True, doc="zero the given share of smallest-magnitude entries, per tensor")
def _prune(ratio: float | None) -> Step:
    assert ratio is not None
    if not 0.0 <= ratio <= 0.99:
        raise ValueError(f"prune ratio must be in [0, 0.99], got {ratio}")
    return lambda g, _gen: {k: prune_smallest(v, ratio) for k, v in g.items()}


def _noise_step(scale: float | None, sample: Callable[[torch.Tensor, torch.Generator], torch.Tensor]) -> Step:
    assert scale is not None
    if not 0.0 <= scale <= 10.0:
        raise ValueError(f"noise scale must be in [0, 10], got {scale}")

    def step(g: Grads, gen: torch.Generator) -> Grads:
        return {k: v + scale * sample(v, gen).to(v.dtype) for k, v in g.items()}

    return step


def _std_normal(v: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(v.shape, generator=gen, dtype=torch.float64).to(v.device)


def _std_laplace(v: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # Inverse-CDF sampling keeps it on the seeded generator (torch's Laplace has none).
    u = torch.rand(v.shape, generator=gen, dtype=torch.float64) - 0.5
    u = u.clamp(-0.5 + 1e-12, 0.5 - 1e-12)
    return (-torch.sign(u) * torch.log1p(-2 * u.abs())).to(v.device)


@register_defence("gauss", needs_param=True, doc="add N(0, scale^2) noise to every entry")
def _gauss(scale: float | None) -> Step:
    return _noise_step(scale, _std_normal)


@register_defence("laplace", needs_param=True, doc="add Laplace(0, scale) noise to every entry")
def _laplace(scale: float | None) -> Step:
    return _noise_step(scale, _std_laplace)


@register_defence("fp16", needs_param=False, doc="send in half precision")
def _fp16(_p: float | None) -> Step:
    return lambda g, _gen: {k: v.to(torch.float16) for k, v in g.items()}
