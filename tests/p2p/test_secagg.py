import copy
import functools
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attacker.api import AttackConfig, Observation, compute_gradients, create_attack
from attacker.metrics import psnr
from gradleak.core.models import create_model, init_dlg_uniform
from p2p.defences import Grads, parse_defence
from p2p.errors import DuplicateUpdate, PermissionDenied, UpdateRejected
from p2p.peer import Peer
from p2p.secagg import (
    FRAC_BITS,
    SecureAggregation,
    create_group,
    decode_fixed,
    derive_private_key,
    encode_fixed,
    public_key,
    ring_sum,
    shared_secret,
    unmask_sum,
    x25519,
)
from p2p.update import Update, UpdateHeader

# ------------------------------------------------------------------ key agreement


def test_x25519_matches_rfc7748_vectors() -> None:
    k = bytes.fromhex("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4")
    u = bytes.fromhex("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")
    assert x25519(k, u).hex() == "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    assert public_key(alice).hex() == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert public_key(bob).hex() == "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert shared_secret(alice, public_key(bob)).hex() == shared
    assert shared_secret(bob, public_key(alice)).hex() == shared
    with pytest.raises(ValueError, match="low-order"):
        shared_secret(alice, bytes(32))


def test_x25519_agrees_with_the_cryptography_package() -> None:
    x25519_mod = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.x25519")
    raw = pytest.importorskip("cryptography.hazmat.primitives.serialization")
    for i in range(5):
        a, b = derive_private_key(seed=i, peer_id="a"), derive_private_key(seed=i, peer_id="b")
        ref = x25519_mod.X25519PrivateKey.from_private_bytes(a)
        assert ref.public_key().public_bytes(raw.Encoding.Raw, raw.PublicFormat.Raw) == public_key(a)
        theirs = x25519_mod.X25519PublicKey.from_public_bytes(public_key(b))
        assert ref.exchange(theirs) == shared_secret(a, public_key(b))


def test_group_members_must_bring_their_own_key() -> None:
    keys = {m: derive_private_key(seed=0, peer_id=m) for m in "ab"}
    public = {m: public_key(k) for m, k in keys.items()}
    with pytest.raises(ValueError, match="not its private key"):
        SecureAggregation("a", keys["b"], public)
    with pytest.raises(ValueError, match="at least 2"):
        SecureAggregation("a", keys["a"], {"a": public["a"]})


# ------------------------------------------------------------------ exactness


@functools.cache
def _group(size: int) -> dict[str, SecureAggregation]:
    return create_group([f"peer{i}" for i in range(size)], seed=size)


@given(
    size=st.integers(2, 6),
    shapes=st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3), min_size=1, max_size=3),
    round_=st.integers(1, 10_000),
    magnitude=st.sampled_from([1e-9, 1e-3, 1.0, 1e3]),
    seed=st.integers(0, 2**31),
    data=st.data(),
)
@settings(max_examples=60, deadline=None)
def test_masks_cancel_exactly_in_the_group_sum(
    size: int, shapes: list[list[int]], round_: int, magnitude: float, seed: int, data: st.DataObject
) -> None:
    group = _group(size)
    gen = torch.Generator().manual_seed(seed)
    updates, weights = {}, {}
    for m in group:
        updates[m] = {f"t{i}": torch.randn(s, generator=gen) * magnitude for i, s in enumerate(shapes)}
        weights[m] = float(data.draw(st.integers(1, 64)))
    masked = [group[m].mask(updates[m], round_, weight=weights[m]) for m in group]
    assert all(t.dtype == torch.int64 for u in masked for t in u.values())
    total = ring_sum(masked)
    for name in updates[next(iter(group))]:
        encoded = [encode_fixed(updates[m][name], group_size=size, weight=weights[m]) for m in group]
        exact = functools.reduce(np.add, encoded).reshape(updates["peer0"][name].shape)
        assert torch.equal(total[name], torch.from_numpy(exact))  # bit for bit
        decoded = torch.stack([decode_fixed(torch.from_numpy(e)) for e in encoded]).sum(0)
        assert torch.equal(unmask_sum(masked)[name], decoded.reshape(total[name].shape))
        true = torch.stack([weights[m] * updates[m][name].double() for m in group]).sum(0)
        assert torch.allclose(unmask_sum(masked)[name], true, rtol=0, atol=size * 2.0**-FRAC_BITS)


def test_group_sum_ignores_tensor_order_and_a_missing_member_leaves_noise() -> None:
    group = _group(3)
    u = {m: {"a": torch.randn(50), "b": torch.randn(4, 4)} for m in group}
    masked = [group[m].mask(dict(reversed(list(u[m].items()))) if m == "peer1" else u[m], 5) for m in group]
    true = torch.stack([u[m]["b"].double() for m in group]).sum(0)
    assert torch.allclose(group["peer0"].unmask(masked)["b"], true, atol=1e-6)
    partial = unmask_sum(masked[:2])["a"]
    assert float(partial.abs().median()) > 1e6  # no cancellation: uniform over the ring
    with pytest.raises(ValueError, match="needs all 3"):
        group["peer0"].unmask(masked[:2])


def test_fixed_point_refuses_values_that_could_wrap() -> None:
    limit = 2.0 ** (63 - FRAC_BITS) / 3
    encode_fixed(torch.tensor([limit * 0.99]), group_size=3)
    with pytest.raises(ValueError, match="fixed-point range"):
        encode_fixed(torch.tensor([limit * 1.01]), group_size=3)
    with pytest.raises(ValueError, match="fixed-point range"):
        encode_fixed(torch.tensor([float("nan")]))


# ------------------------------------------------------------------ hiding


def _top_bit_share(t: torch.Tensor) -> float:
    return float((t < 0).double().mean())


def test_a_single_masked_update_is_unrelated_to_the_true_one() -> None:
    group = _group(3)
    true = torch.linspace(-1, 1, 20_000)  # strongly structured
    shapes = {"w": true.shape}
    masked = group["peer0"].mask({"w": true}, 1)["w"]
    # What the third member can do: remove the mask it shares with peer0 and decode.
    view = ring_sum([{"w": masked}, group["peer2"].pair_mask("peer0", 1, shapes)])["w"]
    for seen in (masked, view):
        corr = np.corrcoef(decode_fixed(seen).numpy(), true.numpy())[0, 1]
        assert abs(corr) < 0.03
        assert _top_bit_share(seen) == pytest.approx(0.5, abs=0.02)
        # Uniform on the ring: each byte value about equally often.
        counts = np.bincount(seen.numpy().view(np.uint8), minlength=256)
        assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()
    again = group["peer0"].mask({"w": true}, 2)["w"]
    assert float((again == masked).double().mean()) < 0.001  # fresh masks every round


# ------------------------------------------------------------------ peers

IDS = ("a", "b", "m")


def _peers(digits_data, lenet, groups: dict | None) -> dict[str, Peer]:
    return {
        pid: Peer(pid, copy.deepcopy(lenet), digits_data.images[:200], digits_data.labels[:200],
                  batch_size=2 + i, defence=parse_defence("none"), lr=0.1, keep_versions=2,
                  seed=10 + i, optimizer="sgd", secagg=None if groups is None else groups[pid])
        for i, pid in enumerate(IDS)
    }


def _exchange(peers: dict[str, Peer], round_: int) -> dict[str, Update]:
    sent = {pid: p.local_update(round_)[0] for pid, p in peers.items()}
    for pid, p in peers.items():
        for other, u in sent.items():
            if other != pid:
                p.accept_update(u)
    return sent


def _recording(unmask: Callable[..., Grads], into: list[Grads]) -> Callable[..., Grads]:
    """Wrap SecureAggregation.unmask to keep what each peer unmasked."""

    def wrapped(masked: Sequence[Mapping[str, torch.Tensor]]) -> Grads:
        into.append(unmask(masked))
        return into[-1]

    return wrapped


def test_secagg_peers_apply_exactly_the_unmasked_group_sum(digits_data, lenet) -> None:
    groups = create_group(IDS, seed=3)
    masked_peers, plain_peers = _peers(digits_data, lenet, groups), _peers(digits_data, lenet, None)
    sums: list[dict[str, torch.Tensor]] = []
    for sa in groups.values():
        sa.unmask = _recording(sa.unmask, sums)  # type: ignore[method-assign]
    sent = _exchange(masked_peers, 1)
    truth = _exchange(plain_peers, 1)  # same seeds, same batches, same true gradients
    assert {u.header.defence for u in sent.values()} == {"secagg:3"}
    assert all(t.dtype == torch.int64 for u in sent.values() for t in u.tensors.values())
    assert all(len(p.apply_pending()) == 3 for p in masked_peers.values())
    assert all(len(p.apply_pending()) == 3 for p in plain_peers.values())
    assert len(sums) == 3
    for name in sums[0]:
        exact = torch.zeros(sums[0][name].shape, dtype=torch.float64)
        for u in truth.values():
            enc = encode_fixed(u.tensors[name], group_size=3, weight=u.header.num_samples)
            exact += decode_fixed(torch.from_numpy(enc)).reshape(exact.shape)
        assert all(torch.equal(s[name], exact) for s in sums)  # bit for bit, at every peer
    params = {pid: dict(p.model.named_parameters()) for pid, p in masked_peers.items()}
    for name, ref in plain_peers["a"].model.named_parameters():
        assert all(torch.equal(params[pid][name], params["a"][name]) for pid in IDS)
        # Fixed point at 2**-24 vs the float32 sum: the same step up to rounding.
        assert torch.allclose(params["a"][name], ref, rtol=0, atol=1e-6)
    assert all(p.secagg_stats["unmasked_rounds"] == 1 for p in masked_peers.values())


def test_missing_member_drops_the_group_and_keeps_plain_updates(digits_data, lenet) -> None:
    groups = create_group(IDS, seed=3)
    peers = _peers(digits_data, lenet, groups)
    a = peers["a"]
    before = {n: p.detach().clone() for n, p in a.model.named_parameters()}
    a.local_update(1)
    a.accept_update(peers["b"].local_update(1)[0])  # m's masked update never arrives
    assert len(a.apply_pending()) == 0
    assert a.secagg_stats == {"unmasked_rounds": 0, "dropped_rounds": 1, "dropped_updates": 2,
                              "corrupt_rounds": 0, "corrupt_updates": 0}
    assert all(torch.equal(p, before[n]) for n, p in a.model.named_parameters())
    # A plain update from outside the group still counts that round.
    a.local_update(2)
    plain = Update(UpdateHeader("x/r2", "x", "x", 2, 0, 4),
                   {n: torch.ones_like(t) for n, t in before.items()})
    a.accept_update(plain)
    assert len(a.apply_pending()) == 1
    for n, p in a.model.named_parameters():
        assert torch.allclose(p, before[n] - 0.1 * torch.ones_like(p), atol=1e-6)


def _masked_copy(u: Update, **changes: object) -> Update:
    return Update(UpdateHeader(**{**vars(u.header), **changes}), u.tensors)


def test_masked_tensors_pass_only_as_secagg_updates_of_the_group(digits_data, lenet) -> None:
    groups = create_group(IDS, seed=3)
    peers = _peers(digits_data, lenet, groups)
    outsider = _peers(digits_data, lenet, None)["a"]
    good = peers["b"].local_update(1)[0]
    assert peers["b"].defence_name == "secagg:3"
    cases = {
        "no secure-aggregation group": (outsider, good),
        "this peer's group is secagg:3": (peers["a"], _masked_copy(good, defence="secagg:4")),
        "non-float dtype": (peers["a"], _masked_copy(good, defence="none")),
        "must be int64": (peers["a"], Update(good.header, {n: t.float() for n, t in good.tensors.items()})),
    }
    for needle, (peer, update) in cases.items():
        with pytest.raises(UpdateRejected, match=needle):
            peer.accept_update(update)
    # From outside the group, or in this peer's own name: a who, not a what.
    for origin in ("z", "a"):
        with pytest.raises(PermissionDenied, match="not another member|this peer"):
            peers["a"].accept_update(_masked_copy(good, origin=origin, sender=origin))
    peers["a"].accept_update(good)
    with pytest.raises(DuplicateUpdate, match="already delivered its update for step 1"):
        peers["a"].accept_update(_masked_copy(good, update_id="b/r1-again"))
    chained = Peer("a", copy.deepcopy(lenet), digits_data.images[:20], digits_data.labels[:20],
                   batch_size=2, defence=parse_defence("prune:0.3"), lr=0.1, keep_versions=2, seed=0,
                   secagg=groups["a"])
    assert chained.local_update(1)[0].header.defence == "prune:0.3+secagg:3"
    with pytest.raises(ValueError, match="given to peer"):
        Peer("b", lenet, digits_data.images[:20], digits_data.labels[:20], batch_size=2,
             defence=parse_defence("none"), lr=0.1, keep_versions=2, seed=0, secagg=groups["a"])


# ------------------------------------------------------------------ the attack


@pytest.fixture
def one_thread():
    """One intra-op thread, as the attack tests use: the model is tiny."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_idlg_recovers_a_digit_from_the_plain_update_but_not_the_masked_one(digits_data, one_thread) -> None:
    model = create_model("lenet", in_channels=1, num_classes=10, image_size=16)
    init_dlg_uniform(model, torch.Generator().manual_seed(1234))
    x, y = torch.from_numpy(digits_data.images[:1]), torch.from_numpy(digits_data.labels[:1])
    names = [n for n, _ in model.named_parameters()]
    grads = dict(zip(names, compute_gradients(model, x, y)))
    groups = create_group(IDS, seed=0)
    masked = groups["a"].mask(grads, 1)
    # The malicious member "m" strips the one mask it knows and decodes the rest.
    own = groups["m"].pair_mask("a", 1, {n: g.shape for n, g in grads.items()})
    view = {n: decode_fixed(t).float() for n, t in ring_sum([masked, own]).items()}
    # Same budget for both; patience ends the masked attack's plateau early.
    attack = create_attack("idlg", AttackConfig(max_iters=300, seed=0, patience=20))

    def attack_psnr(g: dict[str, torch.Tensor]) -> float:
        obs = Observation(gradients=tuple(g[n] for n in names), batch_size=1,
                          input_shape=(1, 16, 16), num_classes=10)
        return psnr(attack.reconstruct(model, obs).images[0], x[0])

    assert attack_psnr(grads) >= 30.0
    assert attack_psnr(view) < 15.0
