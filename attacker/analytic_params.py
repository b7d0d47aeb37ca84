"""The analytic attack's own parameters (attack.params.analytic), apart from the attack."""

from __future__ import annotations

from dataclasses import dataclass

from attacker.analytic_batch import BATCH_METHODS
from attacker.analytic_single import CG_MAX_ITERS, CG_TOL
from attacker.api import shared

# Polish only when the analytic image's gradient misses the observation by more than
# this relative squared distance. For scale, on the benchmark's LeNet white noise
# at 40 dB PSNR gives about 1e-4 and at 60 dB about 1e-6; the analytic images of
# the benchmark land far below (PSNR > 60 dB), so they are returned unpolished.
POLISH_ABOVE = 1e-5


@dataclass(frozen=True)
class AnalyticParams:
    """analytic's own parameters (attack.params.analytic)."""

    cg_tol: float = CG_TOL  # relative residual each convolution's CG solve stops at
    cg_max_iters: int = CG_MAX_ITERS  # CG iterations per convolution, at most
    polish_above: float = POLISH_ABOVE  # polish a batch-1 image by L-BFGS above this misfit
    batch_method: str = "auto"  # B > 1: one of BATCH_METHODS, or "auto" (chosen per layer)
    # AttackConfig fields of those names, for the polish and the batch inversion (analytic.Analytic).
    max_iters: int = shared("max_iters")
    line_search: str | None = shared("line_search")
    label_recovery: str = shared("label_recovery")

    def __post_init__(self) -> None:
        if not (self.cg_tol > 0 and self.cg_max_iters >= 1 and self.polish_above >= 0):
            raise ValueError("need cg_tol > 0, cg_max_iters >= 1 and polish_above >= 0")
        if self.batch_method != "auto" and self.batch_method not in BATCH_METHODS:
            raise ValueError(f"unknown batch_method '{self.batch_method}' (known: {', '.join(BATCH_METHODS)})")
