"""The layer chain the analytic attack inverts, and the per-layer algebra it needs.

A victim qualifies when its forward pass is a plain chain of affine layers
(nn.Conv2d, nn.Linear) each followed by at most one invertible elementwise
activation (nn.Sigmoid, nn.Tanh, nn.LeakyReLU with a positive slope, or none),
with flattening between them, and a final nn.Linear with a bias producing the
logits. `parse_chain` reads that chain from the module tree (registration order)
and checks it against the model's own forward pass on a probe input, so a model
whose forward does something else (skip connections, pooling in forward(), ...)
is refused rather than silently mis-inverted.

The per-layer linear algebra (convolution operators, normal equations, conjugate
gradients) lives in attacker/analytic_solvers.py; its public names are re-exported
here, so `from attacker.analytic_layers import ConvOps, solve_conv_input, ...` works.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from attacker.analytic_solvers import (
    STACK_CHUNK,
    STOP_EVERY,
    ConvOps,
    NormalSystem,
    SolveInfo,
    StackedNormal,
    conjugate_gradients,
    conjugate_gradients_many,
    linear_input,
    numeric_padding,
    relative,
    solve_conv_input,
    solve_conv_inputs,
)

__all__ = [
    "ACTIVATION_EPS", "AFFINE_KINDS", "IDENTITY", "LAYER_RULES", "SHAPE_ONLY", "STACK_CHUNK",
    "STOP_EVERY", "Activation", "Affine", "ConvOps", "Layer", "NormalSystem", "Refused", "SolveInfo",
    "StackedNormal", "chain_forward", "conjugate_gradients", "conjugate_gradients_many", "leaky",
    "linear_input", "numeric_padding", "parse_chain", "register_layer", "relative", "role_of",
    "sigmoid", "solve_conv_input", "solve_conv_inputs", "tanh",
]

# Clamp of activation outputs before inverting them: keeps logit/atanh finite in float64.
ACTIVATION_EPS = 1e-10


@dataclass(frozen=True)
class Activation:
    """An invertible elementwise activation, expressed through its output h."""

    name: str
    apply: Callable[[torch.Tensor], torch.Tensor]  # z -> h
    inverse: Callable[[torch.Tensor], torch.Tensor]  # h -> z with apply(z) = h
    slope: Callable[[torch.Tensor], torch.Tensor]  # h -> act'(z), from the output alone
    centre: float  # a neutral starting value for an unknown output of this activation


def sigmoid() -> Activation:
    def inverse(h: torch.Tensor) -> torch.Tensor:
        return torch.logit(h.clamp(ACTIVATION_EPS, 1.0 - ACTIVATION_EPS))

    def slope(h: torch.Tensor) -> torch.Tensor:
        h = h.clamp(ACTIVATION_EPS, 1.0 - ACTIVATION_EPS)
        return h * (1.0 - h)

    return Activation("sigmoid", torch.sigmoid, inverse, slope, 0.5)


def tanh() -> Activation:
    def inverse(h: torch.Tensor) -> torch.Tensor:
        return torch.atanh(h.clamp(-1.0 + ACTIVATION_EPS, 1.0 - ACTIVATION_EPS))

    def slope(h: torch.Tensor) -> torch.Tensor:
        return 1.0 - h.clamp(-1.0 + ACTIVATION_EPS, 1.0 - ACTIVATION_EPS) ** 2

    return Activation("tanh", torch.tanh, inverse, slope, 0.0)


def leaky(negative_slope: float) -> Activation:
    def apply(z: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(z, negative_slope)

    def inverse(h: torch.Tensor) -> torch.Tensor:
        return torch.where(h >= 0, h, h / negative_slope)

    def slope(h: torch.Tensor) -> torch.Tensor:
        return torch.where(h >= 0, torch.ones_like(h), torch.full_like(h, negative_slope))

    return Activation(f"leaky_relu({negative_slope:g})", apply, inverse, slope, 0.0)


def _same(h: torch.Tensor) -> torch.Tensor:
    return h


IDENTITY = Activation("identity", _same, _same, torch.ones_like, 0.0)


@dataclass
class Layer:
    """One affine layer of the chain and the activation after it (None on the logits)."""

    name: str  # qualified module name, e.g. "features.0"
    module: nn.Conv2d | nn.Linear
    weight_index: int  # index of its weight in model.parameters() (and in the gradients)
    bias_index: int | None
    activation: Activation | None
    in_shape: tuple[int, ...] = ()  # (1, C, H, W) for convolutions, (1, n) for linears
    out_shape: tuple[int, ...] = ()  # shape of its output, before the activation
    kind: str = "linear"  # its Affine kind, one of AFFINE_KINDS: which solver inverts it

    @property
    def is_conv(self) -> bool:
        return self.kind == "conv"


@dataclass(frozen=True)
class Affine:
    """A layer the chain solves through: its input from its output and weight gradient,
    by the solver of its kind (analytic_single, analytic_joint)."""

    kind: str  # "linear" (closed form) or "conv" (CG on the normal equations)


@dataclass(frozen=True)
class Refused:
    """A layer the chain cannot invert, and why ("it ..." completes the sentence)."""

    why: str


SHAPE_ONLY = "shape-only"  # leaves one sample's values as they are (flattening, identities)
AFFINE_KINDS = ("linear", "conv")
# What a rule says of one leaf module at `name`: an Affine layer, an Activation after one,
# SHAPE_ONLY, or Refused. A rule may raise ValueError for a layer it refuses outright.
Role = Affine | Activation | Refused | str
Rule = Callable[[nn.Module, str], Role]
_RULES: dict[type[nn.Module], Rule] = {}
# The registered layer types and their rules, read-only (`parse_chain` looks a module's
# class up here, then its base classes, as Opacus looks up its per-layer grad samplers).
LAYER_RULES: Mapping[type[nn.Module], Rule] = MappingProxyType(_RULES)


def register_layer(*types: type[nn.Module]) -> Callable[[Rule], Rule]:
    """Register `rule` as what the analytic attack makes of modules of `types`
    (ValueError if a type already has one)."""

    def wrap(rule: Rule) -> Rule:
        for kind in types:
            if kind in _RULES:
                raise ValueError(f"analytic layer type {kind.__name__} is already registered")
            _RULES[kind] = rule
        return rule

    return wrap


def role_of(module: nn.Module, name: str) -> Role:
    """The registered rule's answer for `module`; Refused for a type with no rule."""
    for kind in type(module).__mro__:
        rule = _RULES.get(kind)
        if rule is not None:
            return rule(module, name)
    return Refused("is not a layer type the attack has an inverter for "
                   "(attacker.analytic_layers.register_layer)")


NOT_INVERTIBLE = "is not invertible elementwise (it loses information below zero)"


@register_layer(nn.Linear)
def _linear(module: nn.Module, name: str) -> Role:
    return Affine("linear")


@register_layer(nn.Conv2d)
def _conv(module: nn.Module, name: str) -> Role:
    assert isinstance(module, nn.Conv2d)
    if module.padding_mode != "zeros":
        raise ValueError(f"analytic attack needs zero padding, '{name}' uses {module.padding_mode}")
    numeric_padding(module, name)
    return Affine("conv")


@register_layer(nn.Sigmoid)
def _sigmoid_rule(module: nn.Module, name: str) -> Role:
    return sigmoid()


@register_layer(nn.Tanh)
def _tanh_rule(module: nn.Module, name: str) -> Role:
    return tanh()


@register_layer(nn.LeakyReLU)
def _leaky_rule(module: nn.Module, name: str) -> Role:
    assert isinstance(module, nn.LeakyReLU)
    return leaky(float(module.negative_slope)) if module.negative_slope > 0 else Refused(NOT_INVERTIBLE)


@register_layer(nn.Flatten, nn.Identity)
def _shape_only(module: nn.Module, name: str) -> Role:
    return SHAPE_ONLY


@register_layer(nn.Dropout)
def _dropout(module: nn.Module, name: str) -> Role:
    assert isinstance(module, nn.Dropout)
    if module.p == 0 or not module.training:
        return SHAPE_ONLY
    return Refused("drops random units in train mode")


@register_layer(nn.ReLU, nn.ReLU6, nn.ELU, nn.GELU, nn.SiLU)
def _not_invertible(module: nn.Module, name: str) -> Role:
    return Refused(NOT_INVERTIBLE)


def _refusal(module: nn.Module, name: str, why: str) -> ValueError:
    return ValueError(
        f"analytic attack cannot invert {type(module).__name__} at '{name}': it {why}; it supports "
        "chains of Conv2d/Linear layers with Sigmoid, Tanh, LeakyReLU(slope > 0) or no activation "
        "(use dlg, idlg or ig for other models)"
    )


def parse_chain(model: nn.Module, input_shape: tuple[int, int, int]) -> list[Layer]:
    """The model as a chain of Layers with their shapes, checked against model.forward.

    Args:
        model: the victim (a private copy: a probe input runs through it).
        input_shape: (C, H, W) of one sample.

    Raises:
        ValueError: when the model is not such a chain (the message says what is not).
    """
    index = {id(p): i for i, p in enumerate(model.parameters())}
    layers: list[Layer] = []
    for name, module in model.named_modules():
        if list(module.children()):
            if any(True for _ in module.parameters(recurse=False)):
                raise ValueError(f"analytic attack cannot invert the parameters of '{name}'")
            continue
        role = role_of(module, name)
        if isinstance(role, Affine):
            bias = module.bias
            weight = module.weight
            assert isinstance(weight, torch.Tensor) and (bias is None or isinstance(bias, torch.Tensor))
            layers.append(Layer(name, module, index[id(weight)],  # type: ignore[arg-type]
                                None if bias is None else index[id(bias)], None, kind=role.kind))
        elif isinstance(role, Activation):
            if not layers or layers[-1].activation is not None:
                raise ValueError(
                    f"analytic attack needs each activation right after a Conv2d/Linear; "
                    f"'{name}' is not"
                )
            layers[-1].activation = role
        elif isinstance(role, Refused):
            raise _refusal(module, name, role.why)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Conv2d/Linear layer to invert")
    for layer in layers[:-1]:
        if layer.activation is None:
            layer.activation = IDENTITY
    last = layers[-1]
    if last.kind != "linear" or last.activation is not None:
        raise ValueError("analytic attack needs the logits to come from a final nn.Linear")
    if last.bias_index is None:
        raise ValueError("analytic attack needs a bias on the final nn.Linear")
    covered = {i for layer in layers for i in (layer.weight_index, layer.bias_index) if i is not None}
    if len(covered) != len(index):
        raise ValueError("analytic attack found parameters outside its Conv2d/Linear chain")
    _check_against_forward(model, layers, input_shape)
    return layers


def chain_forward(layers: list[Layer], x: torch.Tensor, record: bool = False) -> torch.Tensor:
    """Run the chain on x (B, C, H, W); with record, store each layer's shapes (B = 1)."""
    for layer in layers:
        if layer.kind == "linear" and x.dim() > 2:
            x = x.flatten(1)
        if layer.is_conv and x.dim() != 4:
            raise ValueError(f"analytic attack: '{layer.name}' gets a {x.dim()}-D input")
        out = layer.module(x)
        if record:
            layer.in_shape, layer.out_shape = tuple(x.shape), tuple(out.shape)
        x = out if layer.activation is None else layer.activation.apply(out)
    return x


def _check_against_forward(
    model: nn.Module, layers: list[Layer], input_shape: tuple[int, int, int]
) -> None:
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    probe = torch.rand((1, *input_shape), generator=generator).to(param)
    with torch.no_grad():
        try:
            ours = chain_forward(layers, probe, record=True)
            theirs = model(probe)
        except RuntimeError as exc:
            raise ValueError(f"analytic attack could not run the layer chain: {exc}") from exc
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5):
        raise ValueError(
            f"{type(model).__name__}.forward is not the plain chain of its Conv2d/Linear "
            "layers and activations, which the analytic attack needs"
        )
