"""A FedAvg client's local training as a pure, differentiable function of its batch.

One definition of what a FedAvg-style client sends, shared by the honest side
(benchmarks and tests build updates with `client_update`) and the attacks that
invert such updates exactly (attacker.dlg, attacker.ig simulate the same steps on
their dummy batch with `local_sgd_delta`).

The client's assumption, stated once: it holds one private batch of B samples and
takes `steps` plain SGD steps (no momentum, no weight decay) at rate `lr`, each
step on the WHOLE batch, in the same order every time (K local epochs of one
mini-batch each). It sends the weight difference w_before - w_after, so one step's
difference divided by lr is exactly the gradient. Buffers (BatchNorm statistics)
are read, never updated, by the simulation.

Written with torch.func (functional_call, grad) so the steps can be differentiated
with respect to the batch by ordinary autograd outside and inside vmap alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

Tensors = dict[str, torch.Tensor]
# logits (B, K) -> scalar loss; hard labels or a soft target are closed over.
LossOfLogits = Callable[[torch.Tensor], torch.Tensor]


def local_sgd_delta(
    model: nn.Module, params: Tensors, buffers: Tensors, images: torch.Tensor,
    loss_of_logits: LossOfLogits, *, steps: int, lr: float,
) -> Tensors:
    """w_before - w_after of `steps` SGD steps of `loss_of_logits` on `images`.

    Args:
        model: the architecture; its own tensors are not used (functional_call).
        params: the weights before the local steps, by parameter name.
        buffers: the model's buffers by name, read only.
        images: (B, C, H, W) the client's batch; may require grad.
        loss_of_logits: the client's loss of its logits (mean cross-entropy).
        steps: local SGD steps K >= 1, each on the whole batch.
        lr: local learning rate > 0.

    Returns:
        The weight difference by parameter name, differentiable w.r.t. `images`.
    """
    if steps < 1 or not lr > 0:
        raise ValueError(f"need steps >= 1 and lr > 0, got steps={steps}, lr={lr}")

    def loss(p: Tensors) -> torch.Tensor:
        return loss_of_logits(functional_call(model, (p, buffers), (images,)))

    current = dict(params)
    for _ in range(steps):
        g = grad(loss)(current)
        current = {n: current[n] - lr * g[n] for n in current}
    return {n: params[n] - current[n] for n in params}


def client_update(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, steps: int, lr: float,
) -> tuple[torch.Tensor, ...]:
    """What an honest FedAvg client sends: w_before - w_after in parameters() order.

    Args:
        model: the client's model at the round's start; left untouched.
        images: (B, C, H, W) private batch.
        labels: (B,) int64 private labels.
        steps, lr: the local SGD steps and rate (see the module docstring).

    Returns:
        One detached float32 tensor per parameter.
    """
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    delta = local_sgd_delta(
        model, params, buffers, images, lambda logits: F.cross_entropy(logits, labels),
        steps=steps, lr=lr,
    )
    return tuple(delta[n].detach().to(torch.float32) for n, _ in model.named_parameters())
