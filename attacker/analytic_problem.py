"""One batch-1 update made ready for the analytic attack, and the attack's small helpers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from attacker.analytic_layers import Layer
from attacker.api import Observation, Reconstruction, checked_targets, compute_gradients
from attacker.inversion import gradient_distance
from attacker.labels import recover_label_batch1


def determined(layer: Layer, batch: int) -> bool:
    """Whether the batch's solve of `layer` has at least as many equations as unknowns."""
    unknowns = batch * math.prod(layer.in_shape[1:])
    equations = batch * math.prod(layer.out_shape[1:]) + layer.module.weight.numel()
    return equations >= unknowns


def reconstruction(raw: torch.Tensor, labels: torch.Tensor, stats: dict[str, Any]) -> Reconstruction:
    images = torch.nan_to_num(raw.detach(), nan=0.0).clamp(0.0, 1.0)
    return Reconstruction(images=images, labels=labels, stats=stats, raw_images=raw.detach())


@dataclass
class Problem:
    """One batch-1 update ready for inversion: its victim copy, gradients and label."""

    victim: nn.Module
    input_shape: tuple[int, int, int]
    targets: list[torch.Tensor]  # observed gradients, the model's dtype and device
    work: list[torch.Tensor]  # the same in the working dtype (float64; float32 on mps)
    labels: torch.Tensor  # (1,) int64
    norm2: float  # ||observed gradient||^2

    @classmethod
    def of(cls, victim: nn.Module, layers: list[Layer], obs: Observation) -> Problem:
        targets = checked_targets(victim, obs)
        if not all(bool(torch.isfinite(t).all()) for t in targets):
            raise ValueError("analytic attack needs a finite gradient")
        top = layers[-1]
        assert top.bias_index is not None  # parse_chain requires the final bias
        label = recover_label_batch1(targets[top.weight_index], targets[top.bias_index])
        labels = torch.tensor([label], dtype=torch.int64, device=targets[0].device)
        dtype = torch.float32 if targets[0].device.type == "mps" else torch.float64
        norm2 = float(sum(torch.sum(t * t) for t in targets))
        return cls(victim, obs.input_shape, targets, [t.to(dtype) for t in targets], labels,
                   norm2)

    def analytic_stats(
        self, name: str, raw64: torch.Tensor, layer_stats: list[dict[str, Any]], seconds: float,
    ) -> dict[str, Any]:
        """The stats of the unpolished analytic image raw64 (1, C, H, W)."""
        raw = raw64.to(self.targets[0].dtype)
        distance = gradient_misfit(self.victim, raw, self.labels, self.targets)
        norm2 = self.norm2
        return {
            "attack": name,
            "iterations": 0,
            "evaluations": 1,
            "grad_distance": distance,
            "analytic_grad_distance": distance,
            "relative_grad_distance": distance / norm2 if norm2 > 0 else float("inf"),
            "analytic_seconds": seconds,
            "label_source": "analytic",
            "diverged": False,
            "stop_reason": "analytic",
            "device": str(raw.device),
            "polished_steps": 0,
            "cg_iterations": sum(int(s["iterations"]) for s in layer_stats),
            "layers": layer_stats,
        }


def gradient_misfit(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, targets: list[torch.Tensor]
) -> float:
    """DLG's squared gradient distance of `images` to the observation."""
    with torch.enable_grad():
        grads = compute_gradients(model, images, labels)
    return float(gradient_distance(grads, targets))
