import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2p.defences import (
    DP_DELTA,
    clip_update,
    gaussian_epsilon,
    parse_defence,
    prune_smallest,
    quantise_int8,
    update_norm,
)


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


# ------------------------------------------------------------------ bf16 / int8

_values = st.lists(
    st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=200
)


@given(values=_values)
@settings(max_examples=60, deadline=None)
def test_bf16_round_trip_is_within_half_an_ulp(values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    out = parse_defence("bf16").apply({"w": x}, torch.Generator())["w"]
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, x.bfloat16())
    # 8 significant bits: round to nearest errs by at most 2**-8 of the value
    # (plus half of bf16's smallest subnormal, 2**-133, down among the subnormals).
    err = (out.double() - x.double()).abs()
    assert bool((err <= 2.0**-8 * x.double().abs() + 2.0**-134).all())


def test_bf16_loses_precision() -> None:
    g = _grads()
    out = parse_defence("bf16").apply(g, torch.Generator())
    assert not torch.equal(out["w"].float(), g["w"])


@given(values=_values, scale=st.sampled_from([1e-30, 1e-6, 1.0, 1e6]))
@settings(max_examples=80, deadline=None)
def test_int8_values_lie_on_the_grid_and_err_by_half_a_step(values: list[float], scale: float) -> None:
    x = torch.tensor(values, dtype=torch.float64).mul(scale).float()
    out = parse_defence("int8").apply({"w": x}, torch.Generator())["w"]
    assert out.dtype == torch.float32
    max_abs = float(x.abs().max())
    if max_abs == 0:
        assert torch.equal(out, torch.zeros_like(x))
        return
    q8, s8 = quantise_int8(x)
    assert torch.equal(out.double(), q8.double() * s8)  # on the grid, exactly
    assert max_abs / 127 <= s8 and float(q8.abs().max()) <= 127
    assert float((out.double() - x.double()).abs().max()) <= s8 / 2
    if max_abs >= 2.0**-100:  # away from float32's subnormals the scale is tight
        assert s8 <= max_abs / 127 * (1 + 2.0**-16)
        # ... and the receiver recovers s = max|out| / 127 and integer q = out / s.
        s = float(out.abs().max()) / 127
        q = out.double() / s
        assert s == s8 and torch.equal(q, q8.double())


def test_int8_uses_at_most_255_levels() -> None:
    out = parse_defence("int8").apply(_grads(), torch.Generator())["w"]
    assert len(torch.unique(out)) <= 255


# ------------------------------------------------------------------ dp


@given(
    numel=st.integers(1, 200),
    seed=st.integers(0, 10_000),
    spread=st.floats(1e-3, 1e3),
    clip=st.floats(1e-2, 1e2),
)
@settings(max_examples=60, deadline=None)
def test_clip_bounds_the_whole_update_norm_and_keeps_direction(
    numel: int, seed: int, spread: float, clip: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    g = {"a": torch.randn(numel, generator=gen) * spread, "b": torch.randn(3, generator=gen)}
    out = clip_update(g, max_norm=clip)
    norm = update_norm(g)
    assert update_norm(out) <= clip * (1 + 1e-6)
    if norm <= clip:
        assert all(torch.equal(out[k], g[k]) for k in g)
    else:
        assert update_norm(out) == pytest.approx(clip, rel=1e-6)
        factor = clip / norm
        for k, v in g.items():
            assert torch.allclose(out[k], v * factor, rtol=1e-5, atol=1e-30)


def test_dp_clips_then_adds_noise_of_std_sigma_times_clip() -> None:
    d = parse_defence("dp:2:0.5")
    big = {"w": torch.full((100_000,), 3.0), "b": torch.full((10,), -1.0)}  # norm ~949
    noised = d.apply(big, torch.Generator().manual_seed(7))
    # Same seed on zeros: the very same noise alone (the noise ignores the values).
    noise = d.apply({k: torch.zeros_like(v) for k, v in big.items()}, torch.Generator().manual_seed(7))
    clipped = {k: noised[k] - noise[k] for k in big}
    assert update_norm(clipped) == pytest.approx(2.0, rel=1e-3)
    assert torch.allclose(clipped["w"] / clipped["w"][0], torch.ones(100_000), atol=1e-3)
    assert noise["w"].std().item() == pytest.approx(0.5 * 2.0, rel=0.02)
    assert abs(noise["w"].mean().item()) < 0.01


def test_dp_reports_its_privacy_parameters() -> None:
    d = parse_defence("dp:1.0:1.10")
    assert d.name == "dp:1:1.1"
    p = d.params["dp:1:1.1"]
    assert (p["clip"], p["noise_multiplier"], p["noise_std"], p["delta"]) == (1.0, 1.1, 1.1, DP_DELTA)
    assert 0 < p["epsilon"] < 10
    # An independent evaluation of the analytic Gaussian mechanism at the reported epsilon.
    from scipy.stats import norm

    s, eps = 1.1, p["epsilon"]
    delta = norm.cdf(0.5 / s - eps * s) - math.exp(eps) * norm.cdf(-0.5 / s - eps * s)
    assert delta == pytest.approx(DP_DELTA, rel=1e-6)
    # The classical bound sqrt(2 ln(1.25/delta)) / sigma is looser (it holds for eps < 1).
    assert gaussian_epsilon(noise_multiplier=6.0, delta=1e-5) < math.sqrt(2 * math.log(1.25e5)) / 6.0
    more_noise = parse_defence("dp:1:4").params["dp:1:4"]["epsilon"]
    assert more_noise < eps
    assert parse_defence("prune:0.3+fp16").params == {"prune:0.3": {"ratio": 0.3}, "fp16": {}}


def test_new_canonical_names_compose() -> None:
    assert parse_defence(" int8 + dp:1e0:0.50 ").name == "int8+dp:1:0.5"
    assert parse_defence("prune:0.3+bf16").name == "prune:0.3+bf16"


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("dp:0:1", "clip bound"),
        ("dp:-1:1", "clip bound"),
        ("dp:1", r"needs 2 numbers \(clip, noise_multiplier\), as in 'dp:1:0.5'"),
        ("dp", "needs 2 numbers"),
        ("dp:1:2:3", "needs 2 numbers"),
        ("dp:1:0", "noise multiplier"),
        ("dp:1:x", "needs numbers"),
        ("dp:inf:1", "finite"),
        ("int8:3", "takes no parameter"),
        ("bf16:1", "takes no parameter"),
        ("secagg:3", "not a defence step"),
    ],
)
def test_bad_new_specs_raise_clear_errors(spec: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_defence(spec)
