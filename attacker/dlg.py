"""DLG (Zhu et al. 2019) exactly as published, and iDLG (Zhao et al. 2020)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from attacker.api import (
    IDLG_LINE_SEARCH,
    Attack,
    AttackConfig,
    LoopParams,
    Observation,
    Reconstruction,
    checked_targets,
    initial_images,
    private_copy,
    register_attack,
    shared,
    simulated_steps,
    update_model,
)
from attacker.inversion import Callback, MatchResult, match_gradients
from attacker.labels import analytic_labels


@dataclass(frozen=True)
class DLGParams(LoopParams):
    """dlg's own parameters (attack.params.dlg); each stands for the AttackConfig field
    of its name, whose comments there say what it does."""

    lr: float = shared("lr")
    line_search: str | None = shared("line_search")
    lbfgs_inner: int = shared("lbfgs_inner")
    lbfgs_history: int = shared("lbfgs_history")
    grad_tol: float = shared("grad_tol")


@dataclass(frozen=True)
class IDLGParams(DLGParams):
    """idlg's (attack.params.idlg): dlg's and where its labels come from."""

    label_recovery: str = shared("label_recovery")


def _run(
    config: AttackConfig,
    model: nn.Module,
    targets: list[torch.Tensor],
    data: torch.Tensor,
    callback: Callback | None,
    line_search: str | None,
    simulate: tuple[int, float] | None,
    **labels: torch.Tensor,
) -> MatchResult:
    return match_gradients(
        model,
        targets,
        data,
        max_iters=config.max_iters,
        inner=config.lbfgs_inner,
        lr=config.lr,
        history=config.lbfgs_history,
        line_search=line_search,
        grad_tol=config.grad_tol,
        patience=config.patience,
        callback=callback,
        simulate=simulate,
        **labels,
    )


def _reconstruction(
    name: str, result: MatchResult, labels: torch.Tensor, source: str, start: float,
    model_of_update: str,
) -> Reconstruction:
    stats = {
        "attack": name,
        "iterations": result.iterations,
        "evaluations": result.evaluations,
        "grad_distance": result.distance,
        "seconds": time.perf_counter() - start,
        "label_source": source,
        "diverged": result.diverged,
        "stop_reason": result.stop_reason,
        "device": str(result.images.device),
        "update_model": model_of_update,
    }
    images = torch.nan_to_num(result.images.detach(), nan=0.0).clamp(0.0, 1.0)
    return Reconstruction(
        images=images,
        labels=labels.detach().to(torch.int64),
        stats=stats,
        raw_images=result.images.detach(),
    )


@register_attack("dlg")
class DLG(Attack):
    """Deep Leakage from Gradients (Zhu et al. 2019): images and soft labels jointly."""

    params_type = DLGParams

    def reconstruct(
        self, model: nn.Module, obs: Observation, *, callback: Callback | None = None
    ) -> Reconstruction:
        """See Attack.reconstruct; labels are the argmax of the optimised soft labels."""
        start = time.perf_counter()
        victim = private_copy(model)
        targets = checked_targets(victim, obs)
        generator = torch.Generator().manual_seed(self.config.seed)
        # DLG draws the dummy images first, then the dummy labels.
        data = initial_images(self.config, obs, generator, targets[0])
        label_logits = torch.randn((obs.batch_size, obs.num_classes), generator=generator)
        label_logits = label_logits.to(targets[0]).requires_grad_(True)
        line_search = None if self.config.line_search == "auto" else self.config.line_search
        simulate = simulated_steps(self.config, obs)
        result = _run(
            self.config, victim, targets, data, callback, line_search, simulate,
            label_logits=label_logits,
        )
        assert result.label_logits is not None  # joint optimisation always returns them
        labels = result.label_logits.argmax(dim=-1)
        return _reconstruction(self.name, result, labels, "optimised", start,
                               update_model(obs, simulate is not None))


@register_attack("idlg")
class IDLG(Attack):
    """iDLG (Zhao et al. 2020): analytic labels, then the images alone by L-BFGS.

    iDLG is defined for one sample. Under label_recovery "auto" a B > 1 update takes
    analytic labels only where the gradient certifies them (it separates exactly
    under them: labels.certified_labels) and otherwise runs DLG's joint optimisation,
    as does an update whose last-layer gradient gives no label or label_recovery
    "optimised" (label_source "optimised"); "analytic" always takes the batch
    recovery's labels (labels.recover_labels).
    line_search "auto" means "strong_wolfe" here (see AttackConfig.line_search).
    """

    params_type = IDLGParams

    def reconstruct(
        self, model: nn.Module, obs: Observation, *, callback: Callback | None = None
    ) -> Reconstruction:
        """See Attack.reconstruct."""
        start = time.perf_counter()
        victim = private_copy(model)
        targets = checked_targets(victim, obs)
        labels = analytic_labels(self.config, victim, targets, obs, certified_only=True)
        if labels is None:
            # No analytic labels (B > 1 under "auto", "optimised", or no usable signs).
            recon = DLG(self.config).reconstruct(model, obs, callback=callback)
            recon.stats["attack"] = self.name
            return recon
        generator = torch.Generator().manual_seed(self.config.seed)
        data = initial_images(self.config, obs, generator, targets[0])
        line_search = IDLG_LINE_SEARCH if self.config.line_search == "auto" else self.config.line_search
        simulate = simulated_steps(self.config, obs)
        result = _run(self.config, victim, targets, data, callback, line_search, simulate,
                      hard_labels=labels)
        return _reconstruction(self.name, result, labels, "analytic", start,
                               update_model(obs, simulate is not None))


