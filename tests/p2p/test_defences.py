import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2p.defences import parse_defence, prune_smallest


def _grads(seed: int = 0, n: int = 4000) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n // 4, 4, generator=g), "b": torch.randn(7, generator=g)}


@given(
    numel=st.integers(1, 300),
    ratio=st.floats(0.0, 0.99),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=60, deadline=None)
def test_prune_zeroes_exactly_the_smallest_share(numel: int, ratio: float, seed: int) -> None:
    t = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    out = prune_smallest(t, ratio)
    k = int(ratio * numel)
    zeroed = out == 0
    assert int(zeroed.sum()) == k
    # Every kept entry is unchanged and at least as large as every pruned one.
    assert torch.equal(out[~zeroed], t[~zeroed])
    if 0 < k < numel:
        assert t[zeroed].abs().max() <= t[~zeroed].abs().min()


def test_gauss_noise_has_the_given_scale() -> None:
    g = {"w": torch.zeros(200_000)}
    out = parse_defence("gauss:0.01").apply(g, torch.Generator().manual_seed(0))
    assert out["w"].std().item() == pytest.approx(0.01, rel=0.02)
    assert abs(out["w"].mean().item()) < 1e-4


def test_laplace_noise_has_the_given_scale() -> None:
    g = {"w": torch.zeros(200_000)}
    out = parse_defence("laplace:0.01").apply(g, torch.Generator().manual_seed(1))
    # Laplace(0, b): mean |x| = b and std = sqrt(2) b.
    assert out["w"].abs().mean().item() == pytest.approx(0.01, rel=0.02)
    assert out["w"].std().item() == pytest.approx(0.01 * math.sqrt(2), rel=0.03)


def test_fp16_rounds_to_half_precision() -> None:
    g = _grads()
    out = parse_defence("fp16").apply(g, torch.Generator())
    assert out["w"].dtype == torch.float16
    assert torch.equal(out["w"], g["w"].half())
    assert not torch.equal(out["w"].float(), g["w"])  # precision was actually lost


def test_chain_applies_left_to_right_and_keeps_input() -> None:
    g = _grads()
    before = {k: v.clone() for k, v in g.items()}
    d = parse_defence("prune:0.5+fp16")
    out = d.apply(g, torch.Generator())
    assert d.name == "prune:0.5+fp16"
    assert out["w"].dtype == torch.float16
    assert int((out["w"] == 0).sum()) == int(0.5 * g["w"].numel())
    assert all(torch.equal(g[k], before[k]) for k in g)


def test_noise_is_seeded() -> None:
    d = parse_defence("gauss:0.1")
    a = d.apply(_grads(), torch.Generator().manual_seed(3))
    b = d.apply(_grads(), torch.Generator().manual_seed(3))
    assert torch.equal(a["w"], b["w"])


def test_canonical_names() -> None:
    assert parse_defence("none").name == "none"
    assert parse_defence("gauss:1e-3").name == "gauss:0.001"
    assert parse_defence(" prune:0.30 ").name == "prune:0.3"


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("bogus", "unknown defence 'bogus'"),
        ("prune", "needs a number"),
        ("prune:x", "needs a number"),
        ("prune:1.5", "prune ratio"),
        ("gauss:-1", "noise scale"),
        ("gauss:nan", "finite"),
        ("fp16:3", "takes no parameter"),
        ("", "empty"),
    ],
)
def test_bad_specs_raise_clear_errors(spec: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_defence(spec)
