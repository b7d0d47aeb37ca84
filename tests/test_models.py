"""Model registry, output shapes for every image size we use, seeded DLG init."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradleak.core.models import MODELS, create_model, init_dlg_uniform, register_model


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError) as info:
        create_model("resnet9000", in_channels=1, num_classes=10, image_size=16)
    assert "lenet" in str(info.value) and "mlp" in str(info.value)


def test_duplicate_registration_and_bad_sizes_raise():
    with pytest.raises(ValueError, match="already registered"):
        register_model("lenet")(lambda c, k, s: nn.Identity())
    with pytest.raises(ValueError):
        create_model("lenet", in_channels=0, num_classes=10, image_size=16)
    assert {"lenet", "mlp", "resnet18"} <= set(MODELS)


@pytest.mark.parametrize("name", ["lenet", "mlp"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [16, 28, 32, (15, 21)])
def test_output_shape(name, channels, size):
    h, w = (size, size) if isinstance(size, int) else size
    model = create_model(name, in_channels=channels, num_classes=7, image_size=size)
    logits = model(torch.rand(2, channels, h, w))
    assert logits.shape == (2, 7)


def test_lenet_matches_dlg_paper_layout():
    """32x32 RGB with 100 classes is the paper's CIFAR-100 LeNet: a 768-wide classifier."""
    model = create_model("lenet", in_channels=3, num_classes=100, image_size=32)
    assert model.classifier.in_features == 12 * 8 * 8
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (1, 1)]
    assert sum(isinstance(m, nn.Sigmoid) for m in model.modules()) == 3


def test_dlg_uniform_init_is_seeded_and_in_range():
    def build(seed: int) -> nn.Module:
        model = create_model("lenet", in_channels=1, num_classes=10, image_size=16)
        return init_dlg_uniform(model, torch.Generator().manual_seed(seed))

    first, again, other = build(0), build(0), build(1)
    for a, b, c in zip(first.parameters(), again.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
        assert a.min() >= -0.5 and a.max() <= 0.5
    biases = torch.cat([p.flatten() for n, p in first.named_parameters() if n.endswith("bias")])
    assert biases.abs().max() > 0.3  # biases re-drawn too, not left at torch's small init


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [16, 32])
def test_resnet18_output_shape_and_cifar_stem(channels, size):
    model = create_model("resnet18", in_channels=channels, num_classes=7, image_size=size)
    assert model(torch.rand(2, channels, size, size)).shape == (2, 7)
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert stem.in_channels == channels
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20
    assert "resnet18" in MODELS
