"""The DLG paper's defence claims, checked against a sweep's done cells (pure functions).

Rows are the store's cell.json dicts. Cells of the same (attack, batch size, defence)
are pooled over seeds into a `Group`; each claim looks at the groups of one attack and
returns what it measured and a verdict. Defences the paper counts as sufficient but a
stronger attack (anything but the paper's DLG) still breaks become `Finding`s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

PSNR_THRESHOLD_DB = 30.0  # a reconstruction at or above it counts as leaked
SHARE_NEAR_ZERO = 0.05  # at most this share of reconstructions >= 30 dB: "near zero"
NOISE_SCALE_MIN = 1e-2  # the paper: Gaussian/Laplacian noise of this scale or more defends
PRUNE_RATIO_MIN = 0.2  # the paper: pruning more than this share defends
PSNR_CLOSE_DB = 3.0  # fp16 "does not defend": its mean PSNR within this of 'none'
ACCURACY_COST_MIN = 0.01  # a defence "costs accuracy" when it loses more than this
PAPER_ATTACK = "dlg"  # the attack the paper's claims are about

HOLDS = "holds"
FAILS = "does not hold"
NOT_MEASURED = "not measured"

Key = tuple[str, int, str]  # (attack, batch_size, defence)


@dataclass(frozen=True)
class Group:
    """The cells of one (attack, batch size, defence), pooled over seeds."""

    attack: str
    batch_size: int
    defence: str
    cells: int
    reconstructions: int
    mean_psnr: float | None  # weighted by reconstructions: the mean over all of them
    share_psnr_30: float | None
    honest_accuracy: float | None  # mean over cells

    @property
    def defended(self) -> bool:
        """No leakage: mean PSNR below the threshold and almost no reconstruction above it."""
        if self.mean_psnr is None:
            return True  # nothing reconstructed at all leaks nothing
        return self.mean_psnr < PSNR_THRESHOLD_DB and (self.share_psnr_30 or 0.0) <= SHARE_NEAR_ZERO

    def leakage(self) -> str:
        """`b8 none: 31.2 dB, 40% >= 30 dB` for the measured column."""
        if self.mean_psnr is None:
            return f"b{self.batch_size} {self.defence}: no reconstructions"
        share = 100 * (self.share_psnr_30 or 0.0)
        return f"b{self.batch_size} {self.defence}: {self.mean_psnr:.1f} dB, {share:.0f}% >= 30 dB"


@dataclass(frozen=True)
class Outcome:
    """What one claim measured under one attack."""

    measured: str
    verdict: str
    broken: tuple[Group, ...] = ()  # groups the paper counts as defended that leak


@dataclass(frozen=True)
class ClaimResult:
    number: int
    claim: str
    attack: str
    measured: str
    verdict: str


@dataclass(frozen=True)
class Finding:
    """A stronger attack breaks a defence the paper thought sufficient."""

    claim: int
    paper_says: str
    group: Group

    def text(self) -> str:
        g = self.group
        share = 100 * (g.share_psnr_30 or 0.0)
        psnr = "-" if g.mean_psnr is None else f"{g.mean_psnr:.1f} dB"
        return (f"FINDING: {g.attack} breaks `{g.defence}` at batch size {g.batch_size} "
                f"(mean PSNR {psnr}, {share:.0f}% of reconstructions >= "
                f"{PSNR_THRESHOLD_DB:g} dB), although the paper says {self.paper_says} "
                f"(claim {self.claim}).")


# ------------------------------------------------------------------ defence specs


def defence_steps(spec: str) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """`prune:0.3+fp16` -> (("prune", (0.3,)), ("fp16", ())); `none` -> ()."""
    steps = []
    for part in spec.strip().split("+"):
        name, *raws = part.strip().split(":")
        if name == "none":
            continue
        try:
            values = tuple(float(r) for r in raws)
        except ValueError:
            values = ()
        steps.append((name, values))
    return tuple(steps)


def defence_family(spec: str) -> str:
    """The chain's step names without parameters: `prune:0.3+fp16` -> `prune+fp16`."""
    return "+".join(name for name, _ in defence_steps(spec)) or "none"


def defence_strength(spec: str) -> float | None:
    """The first parameter of the first step (ratio, scale, group size), if any."""
    steps = defence_steps(spec)
    return steps[0][1][0] if steps and steps[0][1] else None


def defence_order(spec: str) -> tuple[int, str, float, str]:
    """Sort key: `none` first, then by family and strength."""
    strength = defence_strength(spec)
    return (spec != "none", defence_family(spec), -1.0 if strength is None else strength, spec)


def _single(spec: str, names: Iterable[str]) -> tuple[str, float] | None:
    steps = defence_steps(spec)
    if len(steps) == 1 and steps[0][0] in set(names) and steps[0][1]:
        return steps[0][0], steps[0][1][0]
    return None


# ------------------------------------------------------------------ pooling


def _mean(values: Sequence[float], weights: Sequence[float] | None = None) -> float | None:
    if not values:
        return None
    w = list(weights) if weights is not None else [1.0] * len(values)
    total = sum(w)
    return sum(v * x for v, x in zip(values, w)) / total if total > 0 else None


def group_cells(rows: Iterable[Mapping[str, Any]]) -> dict[Key, Group]:
    """Pool the cells of each (attack, batch size, defence) over seeds."""
    buckets: dict[Key, list[Mapping[str, Any]]] = {}
    for row in rows:
        key = (str(row["attack"]), int(row["batch_size"]), str(row["defence"]))
        buckets.setdefault(key, []).append(row)
    groups = {}
    for key, cells in sorted(buckets.items()):
        scored = [c for c in cells
                  if c.get("mean_psnr") is not None and (c.get("reconstructions") or 0) > 0]
        weights = [float(c["reconstructions"]) for c in scored]
        shares = [float(c.get("share_psnr_30") or 0.0) for c in scored]
        accs = [float(c["honest_accuracy"]) for c in cells if c.get("honest_accuracy") is not None]
        groups[key] = Group(
            attack=key[0], batch_size=key[1], defence=key[2], cells=len(cells),
            reconstructions=sum(int(c.get("reconstructions") or 0) for c in cells),
            mean_psnr=_mean([float(c["mean_psnr"]) for c in scored], weights),
            share_psnr_30=_mean(shares, weights),
            honest_accuracy=_mean(accs),
        )
    return groups


def honest_accuracy(groups: Mapping[Key, Group]) -> dict[tuple[int, str], float]:
    """Honest accuracy per (batch size, defence) over every attack's cells (no attacker in it)."""
    acc: dict[tuple[int, str], list[float]] = {}
    for g in groups.values():
        if g.honest_accuracy is not None:
            acc.setdefault((g.batch_size, g.defence), []).append(g.honest_accuracy)
    return {k: sum(v) / len(v) for k, v in acc.items()}


# ------------------------------------------------------------------ claims


def _of(groups: Mapping[Key, Group], attack: str, pick: Callable[[str], bool]) -> list[Group]:
    found = [g for (a, _, d), g in groups.items() if a == attack and pick(d)]
    return sorted(found, key=lambda g: (defence_order(g.defence), g.batch_size))


def _defends(selected: list[Group], missing: str) -> Outcome:
    if not selected:
        return Outcome(missing, NOT_MEASURED)
    broken = tuple(g for g in selected if not g.defended)
    measured = "; ".join(g.leakage() for g in selected)
    return Outcome(measured, FAILS if broken else HOLDS, broken)


def claim_noise(groups: Mapping[Key, Group], attack: str) -> Outcome:
    """(1) Gaussian/Laplacian noise >= 1e-2 defends and costs honest accuracy."""
    noisy = _of(groups, attack, lambda d: (s := _single(d, ("gauss", "laplace"))) is not None
                and s[1] >= NOISE_SCALE_MIN)
    leak = _defends(noisy, f"no gauss/laplace cells with scale >= {NOISE_SCALE_MIN:g}")
    if leak.verdict == NOT_MEASURED:
        return leak
    acc = honest_accuracy(groups)
    costs, parts = [], []
    for g in noisy:
        mine, base = acc.get((g.batch_size, g.defence)), acc.get((g.batch_size, "none"))
        if mine is None or base is None:
            parts.append(f"b{g.batch_size} {g.defence}: accuracy vs none not measured")
            continue
        costs.append(base - mine > ACCURACY_COST_MIN)
        parts.append(f"b{g.batch_size} {g.defence}: accuracy {mine:.3f} vs none {base:.3f}")
    measured = leak.measured + "; accuracy: " + "; ".join(parts)
    if leak.verdict == FAILS or (costs and not all(costs)):
        return Outcome(measured, FAILS, leak.broken)
    return Outcome(measured, HOLDS if costs and len(costs) == len(noisy) else NOT_MEASURED)


def claim_fp16(groups: Mapping[Key, Group], attack: str) -> Outcome:
    """(2) Half precision does not defend: fp16's leakage stays close to 'none'."""
    pairs = []
    for g in _of(groups, attack, lambda d: d == "fp16"):
        base = groups.get((attack, g.batch_size, "none"))
        if base is not None and base.mean_psnr is not None:
            pairs.append((g, base))
    if not pairs:
        return Outcome("no fp16 cells with a 'none' cell at the same batch size", NOT_MEASURED)
    close = [g.mean_psnr is not None and n.mean_psnr is not None
             and g.mean_psnr >= n.mean_psnr - PSNR_CLOSE_DB for g, n in pairs]
    measured = "; ".join(f"{g.leakage()} vs {n.leakage()}" for g, n in pairs)
    return Outcome(measured, HOLDS if all(close) else FAILS)


def claim_prune(groups: Mapping[Key, Group], attack: str) -> Outcome:
    """(3) Pruning more than 20% of the gradient defends."""
    pruned = _of(groups, attack, lambda d: (s := _single(d, ("prune",))) is not None
                 and s[1] > PRUNE_RATIO_MIN)
    return _defends(pruned, f"no prune cells with ratio > {PRUNE_RATIO_MIN:g}")


def claim_batch(groups: Mapping[Key, Group], attack: str) -> Outcome:
    """(4) Large batches defend: under 'none' leakage falls with batch size."""
    plain = [g for g in _of(groups, attack, lambda d: d == "none") if g.mean_psnr is not None]
    if len({g.batch_size for g in plain}) < 2:
        return Outcome("fewer than two batch sizes under 'none'", NOT_MEASURED)
    small, large = plain[0], plain[-1]
    falls = (small.mean_psnr or 0.0) > (large.mean_psnr or 0.0)
    measured = "; ".join(g.leakage() for g in plain)
    broken = () if large.defended else (large,)
    return Outcome(measured, HOLDS if falls and not broken else FAILS, broken)


def claim_secagg(groups: Mapping[Key, Group], attack: str) -> Outcome:
    """(5) Secure aggregation (encrypted gradients) defends."""
    masked = _of(groups, attack, lambda d: any(n == "secagg" for n, _ in defence_steps(d)))
    return _defends(masked, "no secagg cells")


@dataclass(frozen=True)
class Claim:
    number: int
    text: str
    paper_says: str  # for findings: why the paper thought the defence sufficient
    check: Callable[[Mapping[Key, Group], str], Outcome] = field(repr=False)


CLAIMS: tuple[Claim, ...] = (
    Claim(1, f"Gaussian/Laplacian noise >= {NOISE_SCALE_MIN:g} defends and costs accuracy",
          f"noise of scale >= {NOISE_SCALE_MIN:g} defends", claim_noise),
    Claim(2, "fp16 does not defend (leakage close to 'none')", "", claim_fp16),
    Claim(3, f"pruning > {PRUNE_RATIO_MIN:.0%} defends", f"pruning > {PRUNE_RATIO_MIN:.0%} defends",
          claim_prune),
    Claim(4, "large batches defend (leakage falls with batch size under 'none')",
          "large batches defend", claim_batch),
    Claim(5, "secure aggregation defends", "secure aggregation defends", claim_secagg),
)


def claim_attacks(groups: Mapping[Key, Group]) -> list[str]:
    """The paper's attack first (always, measured or not), then the others in the store."""
    return [PAPER_ATTACK, *sorted({g.attack for g in groups.values()} - {PAPER_ATTACK})]


def check_claims(rows: Iterable[Mapping[str, Any]]) -> tuple[list[ClaimResult], list[Finding]]:
    """Every claim under every attack, and the findings where a stronger attack breaks one."""
    groups = group_cells(rows)
    results, findings = [], []
    for claim in CLAIMS:
        for attack in claim_attacks(groups):
            out = claim.check(groups, attack)
            results.append(ClaimResult(claim.number, claim.text, attack, out.measured, out.verdict))
            if attack != PAPER_ATTACK and claim.paper_says:
                findings += [Finding(claim.number, claim.paper_says, g) for g in out.broken]
    return results, findings
