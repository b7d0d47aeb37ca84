"""Batch label recovery: exact for distinct labels, counts for repeats, from the last layer.

What is guaranteed (see attacker/labels.py): classes absent from the batch never get
a negative bias gradient, so every class read as present is present; distinct labels
come out exact while each present class's batch-total predicted probability stays
under one sample (true of untrained, torch-default-initialised models with B < K,
which these tests use); repeated labels' counts are estimates.
"""

from __future__ import annotations

import pytest
import torch

from attacker.api import AttackConfig, compute_gradients, create_attack
from attacker.labels import (
    find_last_linear_grads,
    recover_label_batch1,
    recover_label_counts,
    recover_labels,
)
from gradleak.core.models import create_model


def _batch(digits, classes: list[int], generator: torch.Generator):
    """One random sample of each listed class (repeats allowed)."""
    images, labels = digits
    idx = []
    for c in classes:
        pool = torch.nonzero(labels == c).flatten()
        idx.append(int(pool[torch.randint(len(pool), (1,), generator=generator)]))
    return images[idx], labels[idx]


@pytest.mark.parametrize("name", ["lenet", "mlp"])
@pytest.mark.parametrize("batch_size", [2, 4, 8])
def test_distinct_labels_are_recovered_exactly(digits, name, batch_size):
    torch.manual_seed(3)
    model = create_model(name, in_channels=1, num_classes=10, image_size=16)
    gen = torch.Generator().manual_seed(batch_size)
    for _ in range(10):
        classes = torch.randperm(10, generator=gen)[:batch_size].tolist()
        x, y = _batch(digits, classes, gen)
        recovered = recover_labels(model, compute_gradients(model, x, y), batch_size)
        assert recovered.tolist() == sorted(y.tolist())
        assert recovered.dtype == torch.int64


@pytest.mark.parametrize("classes", [[3, 3], [3, 3, 5, 1], [0, 0, 0, 7, 7, 2], [9, 9, 9, 9]])
def test_repeated_labels_get_their_counts(digits, classes):
    torch.manual_seed(3)
    model = create_model("lenet", in_channels=1, num_classes=10, image_size=16)
    x, y = _batch(digits, classes, torch.Generator().manual_seed(0))
    recovered = recover_labels(model, compute_gradients(model, x, y), len(classes))
    assert recovered.tolist() == sorted(classes)


@pytest.mark.parametrize("batch_size", [2, 4])
def test_weight_rows_alone_suffice_for_distinct_labels(digits, batch_size):
    """Without the bias the row sums carry the signs (non-negative sigmoid features)."""
    torch.manual_seed(3)
    model = create_model("lenet", in_channels=1, num_classes=10, image_size=16)
    gen = torch.Generator().manual_seed(7)
    for _ in range(5):
        classes = torch.randperm(10, generator=gen)[:batch_size].tolist()
        x, y = _batch(digits, classes, gen)
        weight_grad, _ = find_last_linear_grads(model, compute_gradients(model, x, y))
        counts = recover_label_counts(weight_grad, None, batch_size=batch_size)
        assert counts.tolist() == torch.bincount(y, minlength=10).tolist()


def test_counts_from_an_exact_bias_gradient():
    """g = (P - c) / B with equal predicted mass per class gives the counts exactly."""
    counts = torch.tensor([0, 3, 0, 1, 0, 2, 0, 0, 0, 0])
    batch = int(counts.sum())
    mass = torch.full((10,), batch / 10.0)  # P_i: every class predicted alike
    bias = (mass - counts) / batch
    weight = torch.zeros(10, 4)
    assert recover_label_counts(weight, bias, batch_size=batch).tolist() == counts.tolist()


def test_batch1_agrees_with_idlg_rule(digits, dlg_lenet):
    images, labels = digits
    grads = compute_gradients(dlg_lenet, images[5:6], labels[5:6])
    weight_grad, bias_grad = find_last_linear_grads(dlg_lenet, grads)
    assert recover_labels(dlg_lenet, grads, 1).tolist() == [
        recover_label_batch1(weight_grad, bias_grad)
    ]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="batch_size"):
        recover_label_counts(torch.ones(10, 3), batch_size=0)
    with pytest.raises(ValueError, match="no label signal"):
        recover_label_counts(torch.zeros(10, 3), torch.zeros(10), batch_size=2)
    with pytest.raises(ValueError, match="not finite"):
        recover_label_counts(torch.full((10, 3), float("nan")), batch_size=2)


def test_idlg_uses_batch_labels_when_asked(digits, make_observation):
    torch.manual_seed(3)
    model = create_model("lenet", in_channels=1, num_classes=10, image_size=16)
    x, y = _batch(digits, [2, 6], torch.Generator().manual_seed(1))
    obs = make_observation(model, x, y)
    config = AttackConfig(max_iters=2, label_recovery="analytic")
    recon = create_attack("idlg", config).reconstruct(model, obs)
    assert recon.stats["label_source"] == "analytic"
    assert recon.labels.tolist() == [2, 6]
    plain = create_attack("dlg", config).reconstruct(model, obs)
    assert plain.stats["label_source"] == "optimised"  # DLG stays as published


def test_separation_corrects_counts_on_the_confident_dlg_lenet(digits):
    """The DLG-initialised LeNet favours one class, which the bias-sign counts alone miss;
    the exact-separation search repairs most such batches (30 random batches of 4)."""
    from gradleak.core.models import init_dlg_uniform

    images, labels = digits
    gen = torch.Generator().manual_seed(0)
    counts_right = corrected_right = 0
    for trial in range(30):
        model = init_dlg_uniform(create_model("lenet", in_channels=1, num_classes=10, image_size=16),
                                 torch.Generator().manual_seed(trial))
        idx = torch.randint(0, labels.numel(), (4,), generator=gen)
        grads = compute_gradients(model, images[idx], labels[idx])
        truth = sorted(labels[idx].tolist())
        counts_right += recover_labels(model, grads, 4, correct=False, counts="bias").tolist() == truth
        corrected_right += recover_labels(model, grads, 4, counts="bias").tolist() == truth
    assert counts_right <= 20 and corrected_right >= 27  # measured: 17 and 29


def test_correction_trusts_a_far_better_separation_short_of_exact(digits):
    """Repeated labels keep the separation ill-conditioned: on this batch of 8 (labels
    0,1,1,3,4,5,6,9) the right labelling is 1000x better than the bias-sign counts' but
    not exact."""
    from gradleak.core.models import init_dlg_uniform

    images, labels = digits
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):  # the third batch of this stream
        idx = torch.randint(0, labels.numel(), (8,), generator=gen)
    model = init_dlg_uniform(create_model("lenet", in_channels=1, num_classes=10, image_size=16),
                             torch.Generator().manual_seed(2))
    grads = compute_gradients(model, images[idx], labels[idx])
    truth = sorted(labels[idx].tolist())
    assert truth == [0, 1, 1, 3, 4, 5, 6, 9]
    assert recover_labels(model, grads, 8, correct=False, counts="bias").tolist() != truth
    assert recover_labels(model, grads, 8, counts="bias").tolist() == truth
