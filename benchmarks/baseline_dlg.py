"""The published DLG loop, written out on its own as the benchmarks' baseline.

Deliberately independent of attacker/: LeNet with uniform(-0.5, 0.5) init (done by
the caller), dummy image and soft label from N(0, 1), L-BFGS with lr 1 and 20 inner
iterations, squared-L2 gradient distance, 300 outer steps. `on_step` sees the dummy
image after every outer step so time-to-target can be measured the same way as for
our attacks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def published_dlg(
    model: nn.Module, target_grads: list[torch.Tensor], shape: tuple[int, ...], num_classes: int,
    *, steps: int = 300, seed: int = 0, on_step: Callable[[int, torch.Tensor], bool] | None = None,
) -> torch.Tensor:
    """Run DLG as published; return the final dummy images (clamped to [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    device = target_grads[0].device  # drawn on the CPU, so every device starts alike
    dummy = torch.randn(shape, generator=g).to(device).requires_grad_(True)
    label = torch.randn((shape[0], num_classes), generator=g).to(device).requires_grad_(True)
    opt = torch.optim.LBFGS([dummy, label], lr=1, max_iter=20)
    params = list(model.parameters())

    def closure() -> torch.Tensor:
        opt.zero_grad()
        target = F.softmax(label, dim=-1)
        loss = torch.mean(torch.sum(-target * F.log_softmax(model(dummy), dim=-1), dim=-1))
        grads = torch.autograd.grad(loss, params, create_graph=True)
        diff = sum(((a - b) ** 2).sum() for a, b in zip(grads, target_grads))
        diff.backward()
        return diff

    for step in range(steps):
        loss = opt.step(closure)
        if not torch.isfinite(loss):
            break  # the published loop diverges on some images; nothing more to gain
        if on_step is not None and on_step(step, dummy.detach().clamp(0, 1)):
            break
    return dummy.detach().clamp(0, 1)
