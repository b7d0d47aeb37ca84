"""A crafted model whose gradient reads out a whole batch: the override target for ReLU MLPs.

After the imprint module of Fowl et al., "Robbing the Fed" (ICLR 2022), built into the
weights of an existing ReLU MLP (gradleak.core.models.ReLUMLP) instead of a new layer: the
first Linear measures each image's mean brightness, unit i fires for brightness above
threshold t_i (t ascending, e.g. quantiles of public data); every later layer gives all
first-layer units the same backward signal D_k per sample k. Then

    dW_i - dW_{i+1} = sum_{k: t_i < m_k <= t_{i+1}} D_k x_k,   db_i - db_{i+1} = the same sum of D_k,

so a bin holding one sample gives it exactly: x_k = (dW_i - dW_{i+1}) / (db_i - db_{i+1}).
Two samples in one bin come out as their mix (with W bins and B samples, about B^2 / 2W
collisions). An active gossip attacker sets a victim's model to these weights
(attacker/active.py) and reads its next gradient. Pure torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from attacker.api import Attack, Observation, Reconstruction, register_attack
from attacker.inversion import Callback


def _linears(model: nn.Module) -> list[nn.Linear]:
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if len(layers) < 2 or convs or not any(isinstance(m, nn.ReLU) for m in model.modules()):
        raise ValueError("the imprint needs a ReLU MLP: Linear layers (>= 2) with ReLU, no convolutions")
    return layers


def brightness_thresholds(images: torch.Tensor, width: int) -> list[float]:
    """`width` ascending thresholds at the quantiles of public images' mean brightness."""
    q = images.reshape(images.shape[0], -1).mean(dim=1).to(torch.float64)
    t = torch.quantile(q, torch.linspace(0.5 / width, 1 - 0.5 / width, width, dtype=torch.float64))
    return (t + torch.arange(width, dtype=torch.float64) * 1e-9).tolist()  # strictly ascending


def is_relu_mlp(model: nn.Module) -> bool:
    """Whether the imprint applies (a ReLU MLP)."""
    try:
        _linears(model)
    except ValueError:
        return False
    return True


def imprint_weights(model: nn.Module, thresholds: Sequence[float], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """The crafted weights (by parameter name) of `model` for ascending brightness `thresholds`.

    Raises:
        ValueError: when the model is not a ReLU MLP or the thresholds do not fit its first layer.
    """
    layers = _linears(model)
    first = layers[0]
    width, d = first.weight.shape
    t = torch.as_tensor(list(thresholds), dtype=torch.float64)
    if t.numel() != width or not bool((t[1:] > t[:-1]).all()):
        raise ValueError(f"need {width} strictly ascending thresholds, got {t.numel()}")
    gen = torch.Generator().manual_seed(seed)
    values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {
        id(first): (torch.full((width, d), 1.0 / d, dtype=torch.float64), -t)}
    for layer in layers[1:-1]:  # every unit of the next layer weighs the previous ones alike
        out, inp = layer.weight.shape
        c = 0.5 + torch.rand(out, 1, generator=gen, dtype=torch.float64)
        values[id(layer)] = (c.expand(out, inp) / inp, torch.full((out,), 0.01, dtype=torch.float64))
    last = layers[-1]
    values[id(last)] = (0.1 * torch.randn(last.weight.shape, generator=gen, dtype=torch.float64),
                        torch.zeros(last.weight.shape[0], dtype=torch.float64))
    owner = {id(p): (id(m), "weight" if p is m.weight else "bias") for m in layers for p in (m.weight, m.bias)}
    state = {}
    for name, p in model.named_parameters():
        key = owner.get(id(p))
        if key is None:
            raise ValueError(f"parameter {name} is not a Linear layer's")
        w, b = values[key[0]]
        state[name] = (w if key[1] == "weight" else b).to(p.dtype).clone()
    return state


def read_imprint(model: nn.Module, gradients: Sequence[torch.Tensor], batch_size: int,
                 input_shape: tuple[int, int, int]) -> Reconstruction:
    """The batch from a gradient taken at imprint weights (`gradients` in parameters() order)."""
    layers = _linears(model)
    params = list(model.parameters())
    grad = {id(p): g.to(torch.float64) for p, g in zip(params, gradients, strict=True)}
    dw, db = grad[id(layers[0].weight)], grad[id(layers[0].bias)]  # (W, d), (W,)
    ddw = torch.cat([dw[:-1] - dw[1:], dw[-1:]])  # per bin (t_i, t_{i+1}], the last one open
    ddb = torch.cat([db[:-1] - db[1:], db[-1:]])
    scale = float(ddb.abs().max()) if ddb.numel() else 0.0
    order = torch.argsort(ddb.abs(), descending=True)[:batch_size]
    images = torch.stack([ddw[i] / ddb[i] if abs(float(ddb[i])) > 1e-9 * scale else torch.zeros_like(ddw[i])
                          for i in order]).to(torch.float32).reshape(-1, *input_shape)
    # labels: the most negative entries of the last bias gradient (p - y < 0 at the true labels)
    labels = torch.argsort(grad[id(layers[-1].bias)])[:batch_size] if batch_size <= layers[-1].bias.numel() \
        else torch.zeros(batch_size, dtype=torch.int64)
    filled = int((ddb[order].abs() > 1e-9 * scale).sum()) if scale > 0 else 0
    return Reconstruction(images.clamp(0, 1), labels.to(torch.int64), {"bins_filled": filled})


def is_imprinted(model: nn.Module) -> bool:
    """Whether `model` holds imprint weights (a ReLU MLP whose first-layer rows are all alike)."""
    if not is_relu_mlp(model):
        return False
    w = _linears(model)[0].weight
    return bool((w == w[0, 0]).all())


@register_attack("imprint")
class Imprint(Attack):
    """Read a batch out of a gradient taken at imprint weights (set by an active gossip attacker)."""

    def supports(self, model: nn.Module, obs: Observation) -> str | None:
        return None if is_imprinted(model) else "not an imprinted ReLU MLP (attacker/imprint.py)"

    def reconstruct(self, model: nn.Module, obs: Observation, *, callback: Callback | None = None) -> Reconstruction:
        reason = self.supports(model, obs)
        if reason is not None:
            raise ValueError(reason)
        params = list(model.parameters())
        rec = read_imprint(model, [g.to(params[0].device) for g in obs.gradients], obs.batch_size, obs.input_shape)
        rec.stats.update({"attack": "imprint", "iterations": 0, "label_source": "analytic"})
        return rec
