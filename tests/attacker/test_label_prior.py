"""Label counts with the attacker's own data (attacker/label_prior.py): exact where the
gradient-only counts are wrong, on a model that has trained; bad aux data refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attacker.api import compute_gradients
from attacker.label_prior import LabelPrior
from attacker.labels import logit_counts, recover_labels
from gradleak.core.models import create_model, init_model
from gradleak.trained import adam_steps

AUX = slice(1597, None)  # the attacker's shard: never trained on, never in the batch
COUNTS = [7, 1, 0, 4, 4, 0, 9, 2, 5, 0]  # B = 32, labels repeat


def _trained_lenet(images: torch.Tensor, labels: torch.Tensor, steps: int) -> nn.Module:
    """The sigmoid-initialised LeNet after `steps` Adam steps (the peers' lr) on the first 1500."""
    model = init_model(create_model("lenet", in_channels=1, num_classes=10, image_size=16), "sigmoid", 0)
    return adam_steps(model, images[:1500], labels[:1500], steps)


def _planted(images, labels, counts: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`counts[c]` random training digits (first 1500) of each class c."""
    gen = torch.Generator().manual_seed(seed)
    idx: list[int] = []
    for c, k in enumerate(counts):
        pool = torch.nonzero(labels[:1500] == c).flatten()
        idx += pool[torch.randperm(len(pool), generator=gen)[:k]].tolist()
    return images[idx], labels[idx]


@pytest.fixture(scope="module")
def trained(digits):
    images, labels = digits
    return _trained_lenet(images, labels, 50), LabelPrior.from_data(images[AUX], labels[AUX], 10)


@pytest.mark.parametrize("seed", [0, 1])
def test_aux_data_makes_counts_exact_where_the_gradient_alone_is_wrong(digits, trained, seed):
    model, prior = trained
    x, y = _planted(*digits, COUNTS, seed)
    grads = compute_gradients(model, x, y)
    assert logit_counts(model, grads, 32).tolist() != COUNTS  # the prior-less counts miss
    got = recover_labels(model, grads, 32, correct=False, prior=prior)
    assert got.tolist() == sorted(y.tolist())


def test_no_bias_layer_uses_the_prior_too(digits):
    """Without a bias the gradient-only fallback is the weight-row signs; the prior still counts."""
    images, labels = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 32), nn.Sigmoid(), nn.Linear(32, 10, bias=False))
    prior = LabelPrior.from_data(images[AUX], labels[AUX], 10)
    x, y = _planted(images, labels, COUNTS, 0)
    grads = compute_gradients(model, x, y)
    assert recover_labels(model, grads, 32, correct=False).tolist() != sorted(y.tolist())
    got = recover_labels(model, grads, 32, correct=False, prior=prior)
    assert got.tolist() == sorted(y.tolist())


@pytest.mark.parametrize(("images", "labels", "match"), [
    (torch.zeros(0, 1, 16, 16), torch.zeros(0, dtype=torch.int64), "non-empty"),
    (torch.zeros(4, 1, 16, 16), torch.zeros(3, dtype=torch.int64), "do not match"),
    (torch.full((2, 1, 16, 16), float("nan")), torch.zeros(2, dtype=torch.int64), "finite"),
    (torch.zeros(2, 1, 16, 16), torch.tensor([0, 10]), r"\[0, 10\)"),
    (torch.zeros(2, 1, 16, 16), torch.tensor([-1, 0]), r"\[0, 10\)"),
    (torch.zeros(2, 1, 16, 16), torch.tensor([0.0, 1.0]), "integers"),
])
def test_bad_aux_data_is_refused(images, labels, match):
    with pytest.raises(ValueError, match=match):
        LabelPrior.from_data(images, labels, 10)


def test_aux_images_that_do_not_fit_the_model_are_refused(digits, trained):
    model, _ = trained
    prior = LabelPrior.from_data(torch.zeros(3, 3, 8, 8), torch.tensor([0, 1, 2]), 10)
    x, y = _planted(*digits, [1] * 8 + [0, 0], 0)
    with pytest.raises(ValueError, match="do not fit"):
        recover_labels(model, compute_gradients(model, x, y), 8, correct=False, prior=prior)
    wrong_classes = LabelPrior.from_data(torch.zeros(3, 1, 16, 16), torch.tensor([0, 1, 2]), 5)
    with pytest.raises(ValueError, match="classes"):
        recover_labels(model, compute_gradients(model, x, y), 8, correct=False, prior=wrong_classes)


def test_attacks_use_the_observation_s_label_prior(digits, trained):
    """analytic_labels (idlg, ig) take the counts from obs.label_prior where it is set."""
    from attacker.api import AttackConfig, Observation
    from attacker.labels import analytic_labels

    model, prior = trained
    x, y = _planted(*digits, COUNTS, 0)
    grads = [g.detach() for g in compute_gradients(model, x, y)]
    obs = Observation(gradients=tuple(grads), batch_size=32, input_shape=(1, 16, 16), num_classes=10)
    config = AttackConfig(label_recovery="analytic")
    assert analytic_labels(config, model, grads, obs).tolist() != sorted(y.tolist())  # type: ignore[union-attr]
    with_prior = Observation(gradients=tuple(grads), batch_size=32, input_shape=(1, 16, 16),
                             num_classes=10, label_prior=prior)
    labels = analytic_labels(config, model, grads, with_prior)
    assert labels is not None and labels.tolist() == sorted(y.tolist())
