"""iDLG's analytic label recovery from the last linear layer's gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attacker.api import compute_gradients
from attacker.labels import find_last_linear_grads, recover_label_batch1
from gradleak.core.models import create_model


def _two_of_each_class(labels: torch.Tensor) -> list[int]:
    """Indices of the first two samples of each of the ten digits: 20 samples."""
    return [int(i) for c in range(10) for i in torch.nonzero(labels == c).flatten()[:2]]


def _recover(model: nn.Module, x: torch.Tensor, y: torch.Tensor, use_bias: bool = True) -> int:
    grads = compute_gradients(model, x, y)
    weight_grad, bias_grad = find_last_linear_grads(model, grads)
    return recover_label_batch1(weight_grad, bias_grad if use_bias else None)


def test_recovers_20_of_20_batch1_labels_on_lenet(digits, dlg_lenet):
    images, labels = digits
    chosen = _two_of_each_class(labels)
    assert sorted(set(labels[chosen].tolist())) == list(range(10))
    recovered = [_recover(dlg_lenet, images[i : i + 1], labels[i : i + 1], False) for i in chosen]
    assert recovered == labels[chosen].tolist()


@pytest.mark.parametrize("name", ["lenet", "mlp"])
def test_recovers_labels_on_default_init(digits, name):
    torch.manual_seed(3)
    model = create_model(name, in_channels=1, num_classes=10, image_size=16)
    images, labels = digits
    chosen = _two_of_each_class(labels)
    recovered = [_recover(model, images[i : i + 1], labels[i : i + 1]) for i in chosen]
    assert recovered == labels[chosen].tolist()


def test_negative_activations_flip_signs_and_are_still_read(digits):
    """With -sigmoid features every row sum flips sign: the only positive row is the label."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(256, 32), nn.Sigmoid(), _Negate(), nn.Linear(32, 10)
    )
    images, labels = digits
    chosen = _two_of_each_class(labels)
    recovered = [_recover(model, images[i : i + 1], labels[i : i + 1], False) for i in chosen]
    assert recovered == labels[chosen].tolist()


class _Negate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -x


def test_bias_decides_when_weight_rows_are_silent():
    weight = torch.zeros(5, 7)
    bias = torch.tensor([0.1, 0.2, -0.6, 0.1, 0.2])
    assert recover_label_batch1(weight, bias) == 2
    with pytest.raises(ValueError, match="no label signal"):
        recover_label_batch1(weight)


def test_noisy_signs_fall_back_to_most_negative_row():
    weight = torch.tensor([[-0.1], [-2.0], [0.5], [-0.05]])  # three negative rows
    assert recover_label_batch1(weight) == 1


def test_rejects_non_finite_and_misshaped_gradients():
    with pytest.raises(ValueError, match="not finite"):
        recover_label_batch1(torch.tensor([[float("nan")], [1.0]]))
    with pytest.raises(ValueError):
        recover_label_batch1(torch.zeros(10))


def test_find_last_linear_grads_picks_the_output_layer(dlg_lenet):
    grads = tuple(torch.full_like(p, float(i)) for i, p in enumerate(dlg_lenet.parameters()))
    weight_grad, bias_grad = find_last_linear_grads(dlg_lenet, grads)
    assert weight_grad.shape == dlg_lenet.classifier.weight.shape
    assert bias_grad is not None and bias_grad.shape == (10,)
    assert float(weight_grad[0, 0]) == len(grads) - 2  # weight then bias, last in order


def test_find_last_linear_grads_errors():
    no_bias = nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False))
    grads = tuple(torch.zeros_like(p) for p in no_bias.parameters())
    assert find_last_linear_grads(no_bias, grads)[1] is None
    with pytest.raises(ValueError, match="gradients"):
        find_last_linear_grads(no_bias, grads + grads)
    conv_only = nn.Conv2d(1, 2, 3)
    with pytest.raises(ValueError, match="no nn.Linear"):
        find_last_linear_grads(
            conv_only, tuple(torch.zeros_like(p) for p in conv_only.parameters())
        )
