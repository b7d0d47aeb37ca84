"""Defences an honest peer applies to its gradient before the update leaves it.

A defence chain is written `name[:param[:param]]` joined by `+`, e.g. `prune:0.3+fp16`
or `dp:1:0.5`, and applied left to right. The canonical spec string is what appears in
metrics, records and plots, so equal chains always print the same way; `Defence.params`
gives each step's named parameters (and derived privacy figures) for the run record.

Secure aggregation is not a step here: it needs the peer's identity, group and round,
so it lives in `p2p.secagg` and the Peer applies it after the chain.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Grads = dict[str, torch.Tensor]
Step = Callable[[Grads, torch.Generator], Grads]
Factory = Callable[..., Step]  # called with the parsed parameters, positionally
Describe = Callable[..., dict[str, float]]  # derived figures from the same parameters

_EXAMPLE_VALUES = ("1", "0.5")  # for error messages: "prune:1", "dp:1:0.5"
DP_DELTA = 1e-5  # delta at which the per-step epsilon of `dp` is reported


@dataclass(frozen=True)
class _Entry:
    factory: Factory
    params: tuple[str, ...]  # parameter names, in spec order
    doc: str
    describe: Describe | None = None


DEFENCES: dict[str, _Entry] = {}


def register_defence(
    name: str, *, params: tuple[str, ...] = (), doc: str, describe: Describe | None = None,
) -> Callable[[Factory], Factory]:
    """Register a defence factory under `name` taking the named numeric `params`.

    `describe`, given the same parameters, returns derived figures (e.g. epsilon)
    that `Defence.params` reports next to the parameters themselves.
    """

    def wrap(factory: Factory) -> Factory:
        DEFENCES[name] = _Entry(factory, params, doc, describe)
        return factory

    return wrap


@dataclass(frozen=True)
class DefenceStep:
    """One parsed step of a chain."""

    spec: str  # canonical, e.g. "dp:1:0.5"
    fn: Step
    params: tuple[tuple[str, float], ...] = ()  # named parameters and derived figures


@dataclass(frozen=True)
class Defence:
    """A parsed, applicable defence chain."""

    name: str  # canonical spec, e.g. "prune:0.3+fp16"
    steps: tuple[DefenceStep, ...] = field(default=())

    @property
    def params(self) -> dict[str, dict[str, float]]:
        """Each step's parameters by its canonical spec, e.g.
        `{"dp:1:0.5": {"clip": 1.0, "noise_multiplier": 0.5, "epsilon": ..., "delta": 1e-05}}`."""
        return {s.spec: dict(s.params) for s in self.steps}

    def apply(self, grads: Grads, generator: torch.Generator) -> Grads:
        """Return defended copies of `grads`; the input is left untouched."""
        out = {k: v.detach().clone() for k, v in grads.items()}
        for step in self.steps:
            out = step.fn(out, generator)
        return out


def parse_defence(spec: str) -> Defence:
    """Parse a chain like `prune:0.3+gauss:1e-3`; raise ValueError naming the bad part."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty defence spec")
    if spec.strip() == "none":
        return Defence("none", ())
    steps = []
    for part in spec.strip().split("+"):
        name, *raws = part.strip().split(":")
        if name == "secagg":
            raise ValueError(
                f"'secagg' is not a defence step (in '{spec}'): secure aggregation is set up "
                "per peer group with p2p.secagg.create_group and Peer(secagg=...)"
            )
        entry = DEFENCES.get(name)
        if entry is None:
            known = ", ".join(sorted(DEFENCES))
            raise ValueError(f"unknown defence '{name}' in '{spec}' (known: none, {known})")
        values = _params(name, raws, entry.params, spec)
        fn = entry.factory(*values)
        named = list(zip(entry.params, values))
        if entry.describe is not None:
            named += list(entry.describe(*values).items())
        canonical = ":".join([name, *(f"{v:g}" for v in values)])
        steps.append(DefenceStep(canonical, fn, tuple(named)))
    return Defence("+".join(s.spec for s in steps), tuple(steps))


def _params(name: str, raws: list[str], names: tuple[str, ...], spec: str) -> tuple[float, ...]:
    if not names:
        if raws:
            raise ValueError(f"defence '{name}' takes no parameter (in '{spec}')")
        return ()
    example = ":".join([name, *_EXAMPLE_VALUES[: len(names)]])
    if len(raws) != len(names):
        what = "a number" if len(names) == 1 else f"{len(names)} numbers ({', '.join(names)})"
        raise ValueError(f"defence '{name}' needs {what}, as in '{example}' (in '{spec}')")
    values = []
    for raw in raws:
        try:
            value = float(raw)
        except ValueError:
            what = "a number" if len(names) == 1 else "numbers"
            raise ValueError(
                f"defence '{name}' needs {what}, as in '{example}' (in '{spec}')"
            ) from None
        if not math.isfinite(value):
            raise ValueError(f"defence '{name}' parameter must be finite (in '{spec}')")
        values.append(value)
    return tuple(values)


# ------------------------------------------------------------------ sparsification


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


@register_defence("prune", params=("ratio",), doc="zero the given share of smallest-magnitude entries, per tensor")
def _prune(ratio: float) -> Step:
    if not 0.0 <= ratio <= 0.99:
        raise ValueError(f"prune ratio must be in [0, 0.99], got {ratio}")
    return lambda g, _gen: {k: prune_smallest(v, ratio) for k, v in g.items()}


# ------------------------------------------------------------------ noise


def _noise_step(scale: float, sample: Callable[[torch.Tensor, torch.Generator], torch.Tensor]) -> Step:
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


@register_defence("gauss", params=("scale",), doc="add N(0, scale^2) noise to every entry")
def _gauss(scale: float) -> Step:
    return _noise_step(scale, _std_normal)


@register_defence("laplace", params=("scale",), doc="add Laplace(0, scale) noise to every entry")
def _laplace(scale: float) -> Step:
    return _noise_step(scale, _std_laplace)


# ------------------------------------------------------------------ differential privacy


def update_norm(grads: Grads) -> float:
    """L2 norm of the whole update, all tensors flattened together (computed in float64)."""
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in grads.values()))


def clip_update(grads: Grads, *, max_norm: float) -> Grads:
    """Scale the whole update down so its L2 norm is at most `max_norm` (never up)."""
    norm = update_norm(grads)
    if norm <= max_norm:
        return dict(grads)
    factor = max_norm / norm
    # Scaling in float64 and rounding once keeps the clipped norm at the bound to ~1 ulp.
    return {k: (v.double() * factor).to(v.dtype) for k, v in grads.items()}


def _log_ndtr(x: float) -> float:
    """log of the standard normal CDF, accurate far into the lower tail."""
    if x > -30.0:
        return math.log(0.5 * math.erfc(-x / math.sqrt(2.0)))
    # Asymptotic series of Mills' ratio; erfc underflows below here.
    return -0.5 * x * x - math.log(-x) - 0.5 * math.log(2 * math.pi) + math.log1p(-1 / x**2 + 3 / x**4)


def gaussian_delta(*, noise_multiplier: float, epsilon: float) -> float:
    """Exact delta(epsilon) of one Gaussian mechanism with std = noise_multiplier * sensitivity.

    The analytic Gaussian mechanism (Balle & Wang, ICML 2018, Theorem 8):
    delta = Phi(1/(2s) - eps*s) - exp(eps) * Phi(-1/(2s) - eps*s), s = noise_multiplier.
    """
    s = noise_multiplier
    a = 0.5 / s
    first = math.exp(_log_ndtr(a - epsilon * s))
    second = math.exp(epsilon + _log_ndtr(-a - epsilon * s))
    return max(0.0, first - second)


def gaussian_epsilon(*, noise_multiplier: float, delta: float) -> float:
    """Smallest epsilon such that one Gaussian release is (epsilon, delta)-DP (bisection).

    Per step: one release of one clipped update, add/remove adjacency (sensitivity =
    the clip bound). Not composed over rounds; T rounds need an accountant (RDP/PRV).
    """
    if not (noise_multiplier > 0 and 0 < delta < 1):
        raise ValueError("noise_multiplier must be > 0 and delta in (0, 1)")
    if gaussian_delta(noise_multiplier=noise_multiplier, epsilon=0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gaussian_delta(noise_multiplier=noise_multiplier, epsilon=hi) > delta:
        lo, hi = hi, hi * 2
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if gaussian_delta(noise_multiplier=noise_multiplier, epsilon=mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def _check_dp(clip: float, noise_multiplier: float) -> None:
    if not 0.0 < clip <= 1e6:
        raise ValueError(f"dp clip bound must be in (0, 1e6], got {clip}")
    if not 0.0 < noise_multiplier <= 100.0:
        raise ValueError(f"dp noise multiplier must be in (0, 100], got {noise_multiplier}")


def _describe_dp(clip: float, noise_multiplier: float) -> dict[str, float]:
    _check_dp(clip, noise_multiplier)
    eps = gaussian_epsilon(noise_multiplier=noise_multiplier, delta=DP_DELTA)
    return {"noise_std": noise_multiplier * clip, "epsilon": eps, "delta": DP_DELTA}


@register_defence(
    "dp", params=("clip", "noise_multiplier"), describe=_describe_dp,
    doc="clip the whole update's L2 norm to CLIP, add N(0, (SIGMA*CLIP)^2) to every entry",
)
def _dp(clip: float, noise_multiplier: float) -> Step:
    """DP-SGD's clip-and-noise (Abadi et al. 2016; Opacus) applied to the peer's update.

    Clipping is per update (the whole batch's gradient), not per example as in DP-SGD:
    the guarantee `Defence.params` reports is for adding or removing one peer's update
    in one round (sensitivity CLIP), per step, not composed over rounds.
    """
    _check_dp(clip, noise_multiplier)
    std = noise_multiplier * clip

    def step(g: Grads, gen: torch.Generator) -> Grads:
        clipped = clip_update(g, max_norm=clip)
        return {k: v + std * _std_normal(v, gen).to(v.dtype) for k, v in clipped.items()}

    return step


# ------------------------------------------------------------------ precision


@register_defence("fp16", doc="send in half precision")
def _fp16() -> Step:
    return lambda g, _gen: {k: v.to(torch.float16) for k, v in g.items()}


@register_defence("bf16", doc="send in bfloat16 (float32's range, 8 significant bits)")
def _bf16() -> Step:
    return lambda g, _gen: {k: v.to(torch.bfloat16) for k, v in g.items()}


_INT8_MAX = 127
_SCALE_BITS = 17  # significant bits kept in an int8 scale: 7 (q) + 17 = 24 = float32's


def int8_scale(max_abs: float) -> float:
    """The per-tensor scale s of symmetric int8 quantisation of values up to `max_abs`.

    s >= max_abs / 127 (so |q| <= 127) with a 17-bit significand and s >= 2**-149, so
    every q * s with |q| <= 127 is an exact float32 (at most 24 significant bits).
    """
    if not math.isfinite(max_abs):
        raise ValueError(f"int8 quantisation needs finite values, got max |x| = {max_abs}")
    if max_abs == 0.0:
        return 1.0
    s = max_abs / _INT8_MAX
    quantum = max(2.0 ** (math.frexp(s)[1] - _SCALE_BITS), 2.0**-149)
    return math.ceil(s / quantum) * quantum


def quantise_int8(t: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Symmetric per-tensor int8 quantisation: return (q int8, scale) with t ~= q * scale."""
    x = t.detach().double()
    scale = int8_scale(float(x.abs().max()) if x.numel() else 0.0)
    q = torch.round(x / scale).clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return q, scale


@register_defence("int8", doc="symmetric per-tensor int8 quantisation, sent dequantised")
def _int8() -> Step:
    """Quantise each tensor to q * s (q int8 in [-127, 127], one scale s per tensor).

    The codec has no per-tensor scale field and the receiver checks parameter names,
    so the wire carries the dequantised float32 tensor q * s, each value exact (see
    `int8_scale`): the receiver can recover s = max|x| / 127 and q = x / s exactly.
    The wire size is float32's; the leakage measured is int8's.
    """

    def step(g: Grads, _gen: torch.Generator) -> Grads:
        out = {}
        for k, v in g.items():
            q, scale = quantise_int8(v)
            out[k] = (q.double() * scale).to(torch.float32)
        return out

    return step
