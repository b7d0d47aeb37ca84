"""The attack API: what an attack receives, what it returns, and the registry of attacks.

An attack gets only what a malicious peer really sees (the model at the sender's
version and an Observation: gradients plus public metadata) and returns a
Reconstruction with stats. Ground truth reaches only the scoring step (metrics.py).
This module imports no attack: implementations import it and register themselves
(attacker/__init__.py imports every implementation, so the registry is complete
whenever any part of the package is imported).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from attacker.budget import TIME_BUDGET, exhausted, time_budget
from attacker.inversion import Callback
from attacker.label_prior import LabelPrior
from attacker.params import CONFIG_KEY, NoParams, apply_shared, from_config, parse_params
from gradleak.core.registry import Registry

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
UPDATE_KINDS = ("gradient", "delta")  # what Observation.gradients holds
# How an attack models a FedAvg delta (update_kind "delta"). "first_order": the delta
# divided by local_lr * local_steps is taken for the gradient at the round's weights
# (exact for one step, an approximation for more; every attack accepts it). "exact":
# dlg, idlg and ig simulate the client's local steps on their dummy batch
# (gradleak.core.fedavg) and match the simulated delta; the others fall back to
# first order and say so in stats["update_model"].
MULTI_STEP_MODELS = ("exact", "first_order")


@dataclass(frozen=True)
class Observation:
    """What a peer receives: gradients and public metadata, nothing about ground truth."""

    gradients: tuple[torch.Tensor, ...]  # one per parameter, model.parameters() order, float32
    batch_size: int  # number of samples behind the gradient (public header field)
    input_shape: tuple[int, int, int]  # (C, H, W) of one sample
    num_classes: int  # logits of the model
    # FedAvg-style updates (public headers): "delta" means `gradients` holds the weight
    # difference w_before - w_after of `local_steps` SGD steps at rate `local_lr`, each
    # on the whole batch (gradleak.core.fedavg states the client's assumption).
    update_kind: str = "gradient"  # one of UPDATE_KINDS
    local_steps: int = 1  # local SGD steps behind a delta; 1 for a gradient
    local_lr: float | None = None  # the client's SGD rate; required for a delta
    # The attacker's own labelled data (its shard, never the attacked batch): batch label
    # counts use it where given (attacker.label_prior); None: the gradient alone.
    label_prior: LabelPrior | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "gradients", tuple(self.gradients))
        if self.update_kind not in UPDATE_KINDS:
            raise ValueError(f"unknown update_kind '{self.update_kind}' (known: {', '.join(UPDATE_KINDS)})")
        if isinstance(self.local_steps, bool) or not isinstance(self.local_steps, int) or self.local_steps < 1:
            raise ValueError(f"local_steps must be an integer >= 1, got {self.local_steps!r}")
        if self.update_kind == "gradient":
            if self.local_steps != 1 or self.local_lr is not None:
                raise ValueError("a 'gradient' update has local_steps 1 and no local_lr; "
                                 "use update_kind 'delta' for a multi-step update")
        elif self.local_lr is None or not (self.local_lr > 0 and math.isfinite(self.local_lr)):
            raise ValueError(f"a 'delta' update needs local_lr, a positive finite number, got {self.local_lr}")
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        if not self.gradients or not all(isinstance(g, torch.Tensor) for g in self.gradients):
            raise ValueError("an observation needs at least one gradient tensor")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise ValueError(f"input_shape must be positive (C, H, W), got {self.input_shape}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")

    @property
    def gradient_scale(self) -> float:
        """What `gradients` is divided by to be read as a gradient: local_lr * local_steps
        for a delta (its first-order reading), 1 for a gradient."""
        if self.update_kind == "gradient":
            return 1.0
        assert self.local_lr is not None  # checked in __post_init__
        return self.local_lr * self.local_steps

    @property
    def multi_step(self) -> bool:
        """Whether the first-order reading is only an approximation (a delta of K > 1 steps)."""
        return self.update_kind == "delta" and self.local_steps > 1


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
    # Wall seconds one reconstruct may take (None: no limit). The loops check it between
    # steps and the attack returns its best so far with stop_reason "time_budget".
    time_budget_s: float | None = None
    multi_step: str = "exact"  # how a FedAvg delta is modelled, one of MULTI_STEP_MODELS

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
        if self.time_budget_s is not None and not (
            self.time_budget_s > 0 and math.isfinite(self.time_budget_s)
        ):
            raise ValueError(f"time_budget_s must be a positive number or None, got {self.time_budget_s}")
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
        for name, known in (("label_recovery", LABEL_RECOVERIES), ("layer_weights", LAYER_WEIGHTS),
                            ("multi_step", MULTI_STEP_MODELS)):
            if getattr(self, name) not in known:
                raise ValueError(f"unknown {name} '{getattr(self, name)}' (known: {', '.join(known)})")


def shared(config_field: str) -> Any:
    """An attack parameter (attacker.params) standing for AttackConfig.`config_field`:
    its default is that field's, and the attack's config takes its value."""
    default = {f.name: f.default for f in dataclasses.fields(AttackConfig)}[config_field]
    return dataclasses.field(default=default, metadata={CONFIG_KEY: config_field})


@dataclass(frozen=True)
class LoopParams:
    """The parameters every optimisation-based attack has (dlg's, idlg's, ig's base)."""

    max_iters: int = shared("max_iters")
    init: str = shared("init")
    patience: int = shared("patience")
    multi_step: str = shared("multi_step")


@dataclass
class Reconstruction:
    """An attack's answer: images, labels and how it got there."""

    images: torch.Tensor  # (B, C, H, W) clamped to [0, 1], what gets scored
    labels: torch.Tensor  # (B,) int64
    stats: dict[str, Any] = field(default_factory=dict)  # see Attack.reconstruct
    raw_images: torch.Tensor | None = None  # (B, C, H, W) the optimiser's iterate, unclamped


class Attack(ABC):
    """A gradient-inversion attack: (model, observation) -> reconstruction.

    `params_type` is the attack's own frozen dataclass of parameters (attacker.params):
    `self.params` holds them, and `self.config` is the config given with the shared
    ones (those standing for AttackConfig fields) applied.
    """

    name = "attack"
    params_type: ClassVar[type] = NoParams

    def __init__(self, config: AttackConfig | None = None, params: Any = None) -> None:
        config = config if config is not None else AttackConfig()
        if params is None:
            params = from_config(self.params_type, config)
        elif not isinstance(params, self.params_type):
            raise TypeError(f"{type(self).__name__} takes {self.params_type.__name__} parameters, "
                            f"got {type(params).__name__}")
        self.params = params
        self.config = apply_shared(config, params)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Every implementation runs under its config's time budget and says when it hit it.
        super().__init_subclass__(**kwargs)
        inner = cls.__dict__.get("reconstruct")
        if inner is None or getattr(inner, "_budgeted", False):
            return

        @functools.wraps(inner)
        def reconstruct(
            self: Attack, model: nn.Module, obs: Observation, *, callback: Callback | None = None
        ) -> Reconstruction:
            with time_budget(self.config.time_budget_s):
                rec: Reconstruction = inner(self, model, obs, callback=callback)
                # Attacks that simulate a delta's local steps set "exact" themselves.
                rec.stats.setdefault("update_model", update_model(obs, False))
                if exhausted():
                    rec.stats["stop_reason"] = TIME_BUDGET
            return rec

        reconstruct._budgeted = True  # type: ignore[attr-defined]
        cls.reconstruct = reconstruct  # type: ignore[method-assign]

    def supports(self, model: nn.Module, obs: Observation) -> str | None:
        """None when this attack can take `obs` of `model`, else the reason it cannot."""
        return None

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


def create_attack(
    name: str, config: AttackConfig | None = None, params: Mapping[str, Any] | None = None
) -> Attack:
    """Instantiate a registered attack with `config` and its own `params` (field -> value,
    as `attack.params.NAME` of a run config). ValueError on an unknown name (listing the
    known ones), an unknown parameter or a bad value (naming it)."""
    cls = _REGISTRY.get(name)
    config = config if config is not None else AttackConfig()
    if not params:
        return cls(config)
    return cls(config, parse_params(name, cls.params_type, params, config))


def choose_attack(
    chain: Sequence[str | Attack], model: nn.Module, obs: Observation,
    config: AttackConfig | None = None, params: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[Attack | None, dict[str, str]]:
    """The first attack of `chain` that supports `obs` of `model`, and why the earlier ones
    do not (name -> reason). Names are created with `config` and their `params[name]`.
    (None, reasons) if none does."""
    reasons: dict[str, str] = {}
    params = params or {}
    for entry in chain:
        attack = create_attack(entry, config, params.get(entry)) if isinstance(entry, str) else entry
        why = attack.supports(model, obs)
        if why is None:
            return attack, reasons
        reasons[attack.name] = why
    return None, reasons


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


def private_copy(model: nn.Module) -> nn.Module:
    """A deep copy the attack may differentiate through without touching the caller's.

    The copy keeps the caller's train/eval mode: the gradient was taken in the
    sender's mode, and layers such as BatchNorm compute differently in each.
    """
    victim = copy.deepcopy(model)
    for param in victim.parameters():
        param.requires_grad_(True)
        param.grad = None
    return victim


def checked_targets(model: nn.Module, obs: Observation) -> list[torch.Tensor]:
    """The observed gradients on the model's device/dtype, after checking they fit it.

    A FedAvg delta comes back divided by local_lr * local_steps: its first-order reading
    as a gradient (exact for one step). Attacks that simulate the local steps
    (`simulated_steps`) compare their simulated delta on the same scale.
    """
    params = list(model.parameters())
    if len(obs.gradients) != len(params):
        raise ValueError(f"observation has {len(obs.gradients)} gradients, model has {len(params)}")
    for i, (grad, param) in enumerate(zip(obs.gradients, params, strict=True)):
        if grad.shape != param.shape:
            raise ValueError(
                f"gradient {i} has shape {tuple(grad.shape)}, parameter {tuple(param.shape)}"
            )
    scale = obs.gradient_scale
    return [(g.detach() / scale).to(device=p.device, dtype=p.dtype) for g, p in zip(obs.gradients, params)]


def simulated_steps(config: AttackConfig, obs: Observation) -> tuple[int, float] | None:
    """(local_steps, local_lr) for an attack to simulate exactly, or None to read the
    update as one gradient (a gradient, a one-step delta, or multi_step "first_order")."""
    if not obs.multi_step or config.multi_step != "exact":
        return None
    assert obs.local_lr is not None  # a delta always has one
    return obs.local_steps, obs.local_lr


def update_model(obs: Observation, simulated: bool) -> str:
    """stats["update_model"]: "gradient", "first_order" (a delta read as a gradient) or "exact"."""
    if obs.update_kind == "gradient":
        return "gradient"
    return "exact" if simulated or not obs.multi_step else "first_order"


def initial_images(
    config: AttackConfig, obs: Observation, generator: torch.Generator, like: torch.Tensor
) -> torch.Tensor:
    """Seeded dummy images, drawn on the CPU so a seed gives the same start on any device."""
    shape = (obs.batch_size, *obs.input_shape)
    if config.init == "randn":
        start = torch.randn(shape, generator=generator)
    else:
        start = torch.rand(shape, generator=generator)
    return start.to(device=like.device, dtype=like.dtype).requires_grad_(True)



IDLG_LINE_SEARCH = "strong_wolfe"  # what line_search "auto" means for idlg (and analytic's refinement)
