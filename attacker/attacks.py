"""The attack interface, its registry, and the DLG / iDLG gradient-inversion attacks.

An attack gets only what a malicious peer really sees (the model at the sender's
version and an Observation: gradients plus public metadata) and returns a
Reconstruction with stats. Ground truth reaches only the scoring step (metrics.py).
"""

from __future__ import annotations

import copy
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attacker.inversion import Callback, MatchResult, match_gradients
from attacker.labels import (
    certified_labels,
    find_last_linear_grads,
    recover_label_batch1,
    recover_labels,
)
from gradleak.registry import Registry

INITS = ("randn", "rand")  # dummy-image starts: N(0, 1) as DLG, or uniform [0, 1)
# "auto": each attack's own default (dlg: None, DLG's fixed step; idlg: "strong_wolfe").
LINE_SEARCHES = ("auto", None, "strong_wolfe")
# Where labels come from. "auto": each attack's default (dlg: optimised, always, as
# published; ig: analytic at any B; idlg: analytic at B = 1 and where the gradient
# certifies a batch's labels, optimised otherwise).
# "analytic": recovered from the last layer's gradient (labels.recover_labels) at any B.
# "optimised": DLG's soft labels, learned jointly with the images.
LABEL_RECOVERIES = ("auto", "analytic", "optimised")
LAYER_WEIGHTS = ("equal", "linear")  # IG's per-parameter weights of the cosine


@dataclass(frozen=True)
class Observation:
    """What a peer receives: gradients and public metadata, nothing about ground truth."""

    gradients: tuple[torch.Tensor, ...]  # one per parameter, model.parameters() order, float32
    batch_size: int  # number of samples behind the gradient (public header field)
    input_shape: tuple[int, int, int]  # (C, H, W) of one sample
    num_classes: int  # logits of the model

    def __post_init__(self) -> None:
        object.__setattr__(self, "gradients", tuple(self.gradients))
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        if not self.gradients or not all(isinstance(g, torch.Tensor) for g in self.gradients):
            raise ValueError("an observation needs at least one gradient tensor")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise ValueError(f"input_shape must be positive (C, H, W), got {self.input_shape}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")


@dataclass(frozen=True)
class AttackConfig:
    """Settings shared by the optimisation-based attacks."""

    max_iters: int = 300  # outer L-BFGS steps (DLG's 300 "iterations")
    lbfgs_inner: int = 20  # L-BFGS iterations per outer step (torch's max_iter default)
    lr: float = 1.0  # L-BFGS step size; DLG uses 1 with no line search
    seed: int = 0  # seeds the dummy images and labels: same seed, same start
    # Stop once sum over parameters of ||g_dummy - g_obs||^2 is below this. Absolute, in
    # squared gradient units: ||g_obs||^2 is ~160 for DLG-init LeNet on one 16x16 digit
    # (rms entry ~0.13), so 1e-7 is agreement to ~2.5e-5 of the gradient's norm.
    grad_tol: float = 1e-7
    init: str = "randn"  # dummy-image start, one of INITS
    lbfgs_history: int = 100  # L-BFGS memory (torch default)
    # None = DLG's published fixed step. "strong_wolfe" ended every DLG failure in our
    # 220-run digits study (0 vs 17 below 30 dB), at about the same median time.
    # "auto" keeps dlg as published (None) and gives idlg "strong_wolfe" (see IDLG).
    line_search: str | None = "auto"
    patience: int = 0  # stop after this many outer steps with no new best; 0 = never (DLG)
    label_recovery: str = "auto"  # one of LABEL_RECOVERIES; dlg always optimises
    # Inverting Gradients (ig). One outer iteration is ig_inner Adam steps, so max_iters
    # means the same callback/patience cadence as L-BFGS's outer steps.
    ig_inner: int = 4  # Adam steps per outer iteration
    ig_lr: float = 0.1  # Adam step on the signed gradient; /10 at 3/8, 5/8, 7/8 of the steps
    tv_weight: float = 1e-4  # total-variation prior weight (IG's CIFAR value)
    restarts: int = 2  # independent starts, solved together; the lowest 1 - cos wins
    ig_tol: float = 0.0  # a start converges once 1 - cos <= this (0: float32's floor)
    layer_weights: str = "equal"  # IG's cosine over parameters, one of LAYER_WEIGHTS

    def __post_init__(self) -> None:
        counts = (self.max_iters, self.lbfgs_inner, self.lbfgs_history, self.ig_inner, self.restarts)
        if min(counts) < 1:
            raise ValueError(
                "max_iters, lbfgs_inner, lbfgs_history, ig_inner and restarts must be >= 1"
            )
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}")
        for name in ("lr", "ig_lr"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number, got {value}")
        if not (self.tv_weight >= 0 and math.isfinite(self.tv_weight)):
            raise ValueError(f"tv_weight must be a finite number >= 0, got {self.tv_weight}")
        if not self.ig_tol >= 0:
            raise ValueError(f"ig_tol must be >= 0, got {self.ig_tol}")
        if not self.grad_tol >= 0:
            raise ValueError(f"grad_tol must be >= 0, got {self.grad_tol}")
        if self.init not in INITS:
            raise ValueError(f"unknown init '{self.init}' (known: {', '.join(INITS)})")
        if self.line_search not in LINE_SEARCHES:
            raise ValueError(
                f"line_search must be 'auto', None or 'strong_wolfe', got {self.line_search}"
            )
        for name, known in (("label_recovery", LABEL_RECOVERIES), ("layer_weights", LAYER_WEIGHTS)):
            if getattr(self, name) not in known:
                raise ValueError(f"unknown {name} '{getattr(self, name)}' (known: {', '.join(known)})")


@dataclass
class Reconstruction:
    """An attack's answer: images, labels and how it got there."""

    images: torch.Tensor  # (B, C, H, W) clamped to [0, 1], what gets scored
    labels: torch.Tensor  # (B,) int64
    stats: dict[str, Any] = field(default_factory=dict)  # see Attack.reconstruct
    raw_images: torch.Tensor | None = None  # (B, C, H, W) the optimiser's iterate, unclamped


class Attack(ABC):
    """A gradient-inversion attack: (model, observation) -> reconstruction."""

    name = "attack"

    def __init__(self, config: AttackConfig | None = None) -> None:
        self.config = config if config is not None else AttackConfig()

    @abstractmethod
    def reconstruct(
        self, model: nn.Module, obs: Observation, *, callback: Callback | None = None
    ) -> Reconstruction:
        """Reconstruct the batch behind `obs.gradients` taken of `model`.

        Args:
            model: the model at the version the gradient was taken at; left untouched.
            obs: the observed update.
            callback: `callback(iteration, images)` after each outer step with the
                best-so-far images clamped to [0, 1]; returning True stops the attack.

        Returns:
            A Reconstruction whose stats hold: attack, iterations, evaluations,
            grad_distance, seconds, label_source ("analytic" | "optimised"),
            diverged, stop_reason, device.
        """


_REGISTRY: Registry[type[Attack]] = Registry("attack")
ATTACKS: Mapping[str, type[Attack]] = _REGISTRY.view


def register_attack(name: str) -> Callable[[type[Attack]], type[Attack]]:
    """Register an Attack subclass under `name` (ValueError if the name is taken)."""

    def wrap(cls: type[Attack]) -> type[Attack]:
        cls.name = name
        return _REGISTRY.register(name)(cls)

    return wrap


def create_attack(name: str, config: AttackConfig | None = None) -> Attack:
    """Instantiate a registered attack (ValueError listing the known names on an unknown one)."""
    return _REGISTRY.get(name)(config)


def compute_gradients(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """What an honest peer sends: d(mean cross-entropy)/d(params), in parameters() order.

    Args:
        model: the peer's model; its .grad fields are not touched.
        images: (B, C, H, W) private batch.
        labels: (B,) int64 private labels.

    Returns:
        One detached float32 tensor per parameter.
    """
    loss = F.cross_entropy(model(images), labels)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return tuple(g.detach().to(torch.float32) for g in grads)


def _private_copy(model: nn.Module) -> nn.Module:
    """A deep copy the attack may differentiate through without touching the caller's.

    The copy keeps the caller's train/eval mode: the gradient was taken in the
    sender's mode, and layers such as BatchNorm compute differently in each.
    """
    victim = copy.deepcopy(model)
    for param in victim.parameters():
        param.requires_grad_(True)
        param.grad = None
    return victim


def _targets(model: nn.Module, obs: Observation) -> list[torch.Tensor]:
    """The observed gradients on the model's device/dtype, after checking they fit it."""
    params = list(model.parameters())
    if len(obs.gradients) != len(params):
        raise ValueError(f"observation has {len(obs.gradients)} gradients, model has {len(params)}")
    for i, (grad, param) in enumerate(zip(obs.gradients, params, strict=True)):
        if grad.shape != param.shape:
            raise ValueError(
                f"gradient {i} has shape {tuple(grad.shape)}, parameter {tuple(param.shape)}"
            )
    return [g.detach().to(device=p.device, dtype=p.dtype) for g, p in zip(obs.gradients, params)]


def _initial_images(
    config: AttackConfig, obs: Observation, generator: torch.Generator, like: torch.Tensor
) -> torch.Tensor:
    """Seeded dummy images, drawn on the CPU so a seed gives the same start on any device."""
    shape = (obs.batch_size, *obs.input_shape)
    if config.init == "randn":
        start = torch.randn(shape, generator=generator)
    else:
        start = torch.rand(shape, generator=generator)
    return start.to(device=like.device, dtype=like.dtype).requires_grad_(True)


def _run(
    config: AttackConfig,
    model: nn.Module,
    targets: list[torch.Tensor],
    data: torch.Tensor,
    callback: Callback | None,
    line_search: str | None,
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
        **labels,
    )


def _reconstruction(
    name: str, result: MatchResult, labels: torch.Tensor, source: str, start: float
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

    def reconstruct(
        self, model: nn.Module, obs: Observation, *, callback: Callback | None = None
    ) -> Reconstruction:
        """See Attack.reconstruct; labels are the argmax of the optimised soft labels."""
        start = time.perf_counter()
        victim = _private_copy(model)
        targets = _targets(victim, obs)
        generator = torch.Generator().manual_seed(self.config.seed)
        # DLG draws the dummy images first, then the dummy labels.
        data = _initial_images(self.config, obs, generator, targets[0])
        label_logits = torch.randn((obs.batch_size, obs.num_classes), generator=generator)
        label_logits = label_logits.to(targets[0]).requires_grad_(True)
        line_search = None if self.config.line_search == "auto" else self.config.line_search
        result = _run(
            self.config, victim, targets, data, callback, line_search, label_logits=label_logits
        )
        assert result.label_logits is not None  # joint optimisation always returns them
        labels = result.label_logits.argmax(dim=-1)
        return _reconstruction(self.name, result, labels, "optimised", start)


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

    def reconstruct(
        self, model: nn.Module, obs: Observation, *, callback: Callback | None = None
    ) -> Reconstruction:
        """See Attack.reconstruct."""
        start = time.perf_counter()
        victim = _private_copy(model)
        targets = _targets(victim, obs)
        labels = analytic_labels(self.config, victim, targets, obs, certified_only=True)
        if labels is None:
            # No analytic labels (B > 1 under "auto", "optimised", or no usable signs).
            recon = DLG(self.config).reconstruct(model, obs, callback=callback)
            recon.stats["attack"] = self.name
            return recon
        generator = torch.Generator().manual_seed(self.config.seed)
        data = _initial_images(self.config, obs, generator, targets[0])
        line_search = IDLG_LINE_SEARCH if self.config.line_search == "auto" else self.config.line_search
        result = _run(self.config, victim, targets, data, callback, line_search, hard_labels=labels)
        return _reconstruction(self.name, result, labels, "analytic", start)


IDLG_LINE_SEARCH = "strong_wolfe"  # idlg's "auto" line search


def analytic_labels(
    config: AttackConfig,
    model: nn.Module,
    targets: list[torch.Tensor],
    obs: Observation,
    *,
    certified_only: bool = False,
) -> torch.Tensor | None:
    """(B,) labels recovered from the gradient, or None where config or signal says no.

    Args:
        certified_only: under label_recovery "auto", B > 1 labels only where the
            gradient certifies them (labels.certified_labels), as idlg wants.
    """
    if config.label_recovery == "optimised":
        return None
    if obs.batch_size == 1:
        label = _analytic_label(model, targets)
        if label is None:
            return None
        return torch.tensor([label], dtype=torch.int64, device=targets[0].device)
    try:
        if certified_only and config.label_recovery == "auto":
            return certified_labels(model, targets, obs.batch_size)
        return recover_labels(model, targets, obs.batch_size)
    except ValueError:
        return None


def _analytic_label(model: nn.Module, targets: list[torch.Tensor]) -> int | None:
    """iDLG's label from the last linear layer, or None when the gradient gives none."""
    weight_grad, bias_grad = find_last_linear_grads(model, targets)
    try:
        return recover_label_batch1(weight_grad, bias_grad)
    except ValueError:
        return None


# Registers "analytic" and "ig"; at the end because both build on the helpers above.
from attacker import analytic as _analytic  # noqa: F401
from attacker import ig as _ig  # noqa: F401
