"""Model registry and the small victim models the attacks are measured on.

Pure torch: no Ray, gRPC or I/O. Every model maps (B, C, H, W) images to (B, classes)
logits so any attack and any dataset of the registry can be combined.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from gradleak.core.registry import Registry

# (in_channels, num_classes, (H, W)) -> module
ModelFactory = Callable[[int, int, tuple[int, int]], nn.Module]

_REGISTRY: Registry[ModelFactory] = Registry("model")
MODELS: Mapping[str, ModelFactory] = _REGISTRY.view
register_model = _REGISTRY.register  # decorator; ValueError if the name is taken


def create_model(
    name: str, *, in_channels: int, num_classes: int, image_size: int | tuple[int, int]
) -> nn.Module:
    """Build a registered model for (in_channels, H, W) inputs and `num_classes` outputs.

    Args:
        name: registry name (see `MODELS`).
        in_channels: image channels C.
        num_classes: number of logits.
        image_size: H == W as an int, or (H, W).

    Raises:
        ValueError: on an unknown name (the message lists the known ones) or a
            non-positive size.
    """
    factory = _REGISTRY.get(name)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or min(size) < 1 or in_channels < 1 or num_classes < 1:
        raise ValueError(
            f"need positive in_channels, num_classes and (H, W); got {in_channels}, "
            f"{num_classes}, {image_size}"
        )
    return factory(in_channels, num_classes, (int(size[0]), int(size[1])))


def init_dlg_uniform(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-initialise every parameter with uniform(-0.5, 0.5), as the DLG paper does.

    DLG's wide uniform init keeps the sigmoids out of saturation and makes the
    gradient informative; the attack success figures of the paper assume it.
    Values are drawn on the CPU generator in `model.parameters()` order and then
    copied to each parameter's device, so a seed gives the same weights on any device.

    Args:
        model: module to initialise in place.
        generator: seeded CPU generator.

    Returns:
        The same module, for chaining.
    """
    with torch.no_grad():
        for param in model.parameters():
            values = torch.rand(param.shape, generator=generator, dtype=torch.float64) - 0.5
            param.copy_(values.to(device=param.device, dtype=param.dtype))
    return model


def init_default(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-initialise with PyTorch's own per-layer init (Kaiming-uniform), seeded.

    Each module's `reset_parameters` draws from the global RNG; it runs inside a
    forked RNG seeded from `generator`, so the caller's global stream is untouched
    and the same seed gives the same weights on every peer. Draws happen where the
    parameters live: build on the CPU, then move, for identical weights on any device.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    return model


def init_sigmoid(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Init for sigmoid nets: LeCun-uniform weights x4, biases that centre sigmoid inputs.

    sigmoid'(0) = 1/4, so weights four times LeCun's scale (uniform, variance
    16 / fan_in) keep the backward signal from shrinking 4x per layer, and a layer fed
    by sigmoids (mean 0.5) gets bias -0.5 * sum(w) so its pre-activations start
    centred. PyTorch's own init leaves the sigmoid LeNet on its initial plateau for
    hundreds of steps (benchmarks/learning.py). Layers are taken in `model.modules()`
    order; each one after the first Conv/Linear is treated as fed by a sigmoid (true
    of LeNet and MLP here). Other parameters keep their values. Drawn in float64 on
    the CPU generator and copied, so a seed gives the same weights on any device.
    """
    first = True
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                continue
            weight = module.weight
            fan_in = weight[0].numel()
            bound = 4.0 * math.sqrt(3.0 / fan_in)
            w = (torch.rand(weight.shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
            weight.copy_(w.to(device=weight.device, dtype=weight.dtype))
            if module.bias is not None:
                b = torch.zeros(module.bias.shape, dtype=torch.float64) if first else -0.5 * w.flatten(1).sum(1)
                module.bias.copy_(b.to(device=module.bias.device, dtype=module.bias.dtype))
            first = False
    return model


# name -> (module, seeded CPU generator) -> the module, initialised in place
ModelInit = Callable[[nn.Module, torch.Generator], nn.Module]
INITS: Mapping[str, ModelInit] = {"sigmoid": init_sigmoid, "default": init_default, "dlg": init_dlg_uniform}


def init_model(model: nn.Module, name: str, seed: int) -> nn.Module:
    """Initialise `model` in place with the init `name` (see `INITS`) from `seed`.

    "sigmoid" (peers' default: the sigmoid LeNet trains from it), "default" (PyTorch's
    per-layer init), "dlg" (DLG's uniform(-0.5, 0.5), for attack benchmarks); see
    benchmarks/learning.py for how each trains.

    Raises:
        ValueError: on an unknown name (the message lists the known ones).
    """
    if name not in INITS:
        raise ValueError(f"unknown init '{name}' (known: {', '.join(sorted(INITS))})")
    return INITS[name](model, torch.Generator().manual_seed(seed))


class LeNet(nn.Module):
    """The DLG paper's LeNet: three sigmoid convolutions and one linear layer.

    Sigmoid (not ReLU) keeps the network twice differentiable everywhere, which the
    gradient-matching objective needs, and its non-negative outputs are what
    iDLG's label recovery relies on.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> None:
        super().__init__()
        h, w = image_size
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),  # (B, 12, ceil(H/2), ceil(W/2))
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),  # (B, 12, ceil(H/4), ceil(W/4))
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1),
            nn.Sigmoid(),  # (B, 12, ceil(H/4), ceil(W/4))
        )
        self.classifier = nn.Linear(12 * math.ceil(h / 4) * math.ceil(w / 4), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, C, H, W) images to (B, num_classes) logits."""
        features = self.features(x)  # (B, 12, ceil(H/4), ceil(W/4))
        return self.classifier(features.flatten(1))  # (B, num_classes)


class MLP(nn.Module):
    """One sigmoid hidden layer of 256 units: a cheap second victim model."""

    def __init__(self, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> None:
        super().__init__()
        h, w = image_size
        self.net = nn.Sequential(
            nn.Flatten(),  # (B, C*H*W)
            nn.Linear(in_channels * h * w, 256),
            nn.Sigmoid(),  # (B, 256)
            nn.Linear(256, num_classes),  # (B, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, C, H, W) images to (B, num_classes) logits."""
        return self.net(x)


class ReLUMLP(nn.Module):
    """ReLU MLP whose first layer is fully connected on the flattened image (SPEAR's victim).

    A ReLU after a linear layer zeroes about half of dL/dy per sample, which is what
    the `spear` attack uses to split the first layer's rank-B gradient into the B
    inputs exactly; the first layer's width bounds the batch it can split.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: tuple[int, int],
                 width: int = 256) -> None:
        super().__init__()
        h, w = image_size
        self.net = nn.Sequential(
            nn.Flatten(),  # (B, C*H*W)
            nn.Linear(in_channels * h * w, width),
            nn.ReLU(),  # (B, width)
            nn.Linear(width, width),
            nn.ReLU(),  # (B, width)
            nn.Linear(width, num_classes),  # (B, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, C, H, W) images to (B, num_classes) logits."""
        return self.net(x)


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: torchvision's, with a 3x3 stride-1 stem and no max-pool.

    The ImageNet stem (7x7 stride 2, then a max-pool) would shrink 32x32 inputs to
    8x8 before the first block; the CIFAR stem keeps the full resolution.

    BatchNorm: the gradient depends on the mode it was taken in (train mode
    normalises with the batch's own statistics, coupling the samples; eval mode uses
    the running ones). Peers train in train mode, the default of every model here,
    and the attacks run the model in whatever mode it arrives in, so a model fetched
    by the attacker (train mode by default) reproduces the victim's computation.
    Running statistics the victim's forward updated are not part of the attack: in
    train mode the output does not read them.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> None:
        super().__init__()
        from torchvision.models import resnet18  # torchvision only when ResNet is used

        del image_size  # global average pooling takes any size of at least 1x1 after 3 halvings
        self.net = resnet18(weights=None, num_classes=num_classes)
        self.net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.net.maxpool = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, C, H, W) images to (B, num_classes) logits."""
        return self.net(x)  # (B, num_classes) after (B, 512, H/8, W/8) pooled


@register_model("lenet")
def _lenet(in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    return LeNet(in_channels, num_classes, image_size)


@register_model("mlp")
def _mlp(in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    return MLP(in_channels, num_classes, image_size)


@register_model("relu-mlp")
def _relu_mlp(in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    return ReLUMLP(in_channels, num_classes, image_size)


@register_model("resnet18")
def _resnet18(in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    return ResNet18(in_channels, num_classes, image_size)
