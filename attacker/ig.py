"""Inverting Gradients (Geiping et al. 2020), registered as attack "ig".

Cosine distance between the dummy's and the observed gradient (scale-free, so a
trained model's small gradients match as well as an untrained one's), a
total-variation prior, Adam on the signed input gradient with IG's step decays,
pixels boxed to [0, 1], and several restarts of which the one with the lowest
gradient loss wins (never judged by the truth). Labels come from the gradient
(labels.recover_labels); where it gives none they are learned jointly (DLG's soft
labels). The restarts, and in attacker.batched many updates at once, are solved
together as one vmapped problem stack (attacker.stacked).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from attacker.api import (
    Attack,
    AttackConfig,
    LoopParams,
    Observation,
    Reconstruction,
    checked_targets,
    register_attack,
    shared,
    simulated_steps,
    update_model,
)
from attacker.inversion import Callback
from attacker.labels import analytic_labels
from attacker.stacked import Schedule, StackedResult, attack_copy, invert_stacked, one_hot


@dataclass(frozen=True)
class IGParams(LoopParams):
    """ig's own parameters (attack.params.ig), each standing for an AttackConfig field
    (named where it differs): see the comments there."""

    lr: float = shared("ig_lr")
    inner: int = shared("ig_inner")
    tv_weight: float = shared("tv_weight")
    restarts: int = shared("restarts")
    tol: float = shared("ig_tol")
    layer_weights: str = shared("layer_weights")
    label_recovery: str = shared("label_recovery")


def schedule_of(config: AttackConfig) -> Schedule:
    """The signed-Adam loop's settings out of an AttackConfig."""
    return Schedule(
        max_iters=config.max_iters,
        inner=config.ig_inner,
        lr=config.ig_lr,
        tv_weight=config.tv_weight,
        tol=config.ig_tol,
        patience=config.patience,
        layer_weights=config.layer_weights,
    )


@dataclass
class Prepared:
    """One observation made ready for the stack: its restarts' starts and targets."""

    targets: list[torch.Tensor]  # observed gradients on the model's device, params order
    images: torch.Tensor  # (R, B, C, H, W) seeded starts, one per restart
    labels: torch.Tensor  # (R, B, K) one-hot targets, or label logits when learned
    hard: torch.Tensor | None  # (B,) recovered labels; None when they are learned
    source: str  # label_source: "analytic" | "optimised"


def prepare(config: AttackConfig, model: nn.Module, obs: Observation) -> Prepared:
    """Check `obs` against `model`, recover labels and draw every restart's start.

    Restart r draws from seed config.seed + r on the CPU (same start on any device):
    images first, then, when labels are learned, the label logits, as DLG does.
    """
    targets = checked_targets(model, obs)
    like = targets[0]
    hard = analytic_labels(config, model, targets, obs)
    shape = (obs.batch_size, *obs.input_shape)
    images, logits = [], []
    for r in range(config.restarts):
        generator = torch.Generator().manual_seed(config.seed + r)
        draw = torch.randn if config.init == "randn" else torch.rand
        images.append(draw(shape, generator=generator))
        if hard is None:
            logits.append(torch.randn((obs.batch_size, obs.num_classes), generator=generator))
    if hard is None:
        labels = torch.stack(logits)
    else:
        labels = one_hot(hard.cpu(), obs.num_classes).expand(config.restarts, -1, -1)
    return Prepared(
        targets=targets,
        images=torch.stack(images).to(like),
        labels=labels.to(like),
        hard=hard,
        source="optimised" if hard is None else "analytic",
    )


def pick_restart(
    name: str, config: AttackConfig, result: StackedResult, rows: range, prepared: Prepared,
    seconds: float, device: torch.device,
) -> Reconstruction:
    """The Reconstruction of the restart (among `rows`) with the lowest gradient loss."""
    best = min(rows, key=lambda j: (result.grad_loss[j], j))
    if prepared.hard is not None:
        labels = prepared.hard
    else:
        assert result.label_logits is not None  # learned labels are always returned
        labels = result.label_logits[best].argmax(dim=-1)
    reasons = [result.stop_reasons[j] for j in rows]
    stats = {
        "attack": name,
        "iterations": max(result.iterations[j] for j in rows),
        "evaluations": result.evaluations,
        "grad_loss": result.grad_loss[best],  # 1 - cos of the winning restart
        "loss": result.loss[best],  # with the TV prior
        "seconds": seconds,
        "label_source": prepared.source,
        "restarts": config.restarts,
        "best_restart": best - rows.start,
        "diverged": "diverged" in reasons,
        "stop_reason": "diverged" if "diverged" in reasons else result.stop_reasons[best],
        "device": str(device),
    }
    images = torch.nan_to_num(result.images[best], nan=0.0)
    return Reconstruction(
        images=images, labels=labels.detach().to(torch.int64), stats=stats, raw_images=images
    )


@register_attack("ig")
class InvertingGradients(Attack):
    """Inverting Gradients: cosine gradient matching + TV, signed Adam, restarts."""

    params_type = IGParams

    def reconstruct(
        self, model: nn.Module, obs: Observation, *, callback: Callback | None = None
    ) -> Reconstruction:
        """See Attack.reconstruct; stats add grad_loss, loss, restarts, best_restart.

        The callback gets the best-so-far images of the restart whose gradient
        loss is currently lowest.
        """
        start = time.perf_counter()
        victim = attack_copy(model)
        prepared = prepare(self.config, victim, obs)
        names = [n for n, _ in victim.named_parameters()]
        restarts = self.config.restarts
        targets = {
            n: t.unsqueeze(0).expand(restarts, *t.shape)
            for n, t in zip(names, prepared.targets, strict=True)
        }
        params = {n: p.detach() for n, p in victim.named_parameters()}
        buffers = {n: b.detach() for n, b in victim.named_buffers()}
        stacked_cb = None
        if callback is not None:
            user = callback

            def stacked_cb(iteration: int, images: torch.Tensor, losses: torch.Tensor) -> bool | None:
                return user(iteration, images[int(torch.argmin(losses))])

        simulate = simulated_steps(self.config, obs)
        result = invert_stacked(
            victim, params, buffers, targets, prepared.images, prepared.labels,
            schedule_of(self.config), stacked_weights=False,
            learn_labels=prepared.hard is None, callback=stacked_cb, groups=[0] * restarts,
            simulate=simulate,
        )
        recon = pick_restart(
            self.name, self.config, result, range(restarts), prepared,
            time.perf_counter() - start, prepared.images.device,
        )
        recon.stats["update_model"] = update_model(obs, simulate is not None)
        return recon
