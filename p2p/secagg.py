"""Secure aggregation by pairwise additive masks (Bonawitz et al., CCS 2017, no dropouts).

Every pair (i, j) of a group shares a seed; member i sends

    y_i = enc(w_i * u_i) + sum_{j > i} m_ij - sum_{j < i} m_ij   (mod 2**64)

where enc is fixed point (round(x * 2**frac_bits) as int64), m_ij = PRG(seed_ij) is
uniform on Z_{2**64} and members are ordered by id. Each m_ij is added once and
subtracted once, so sum_i y_i = sum_i enc(w_i * u_i) (mod 2**64) exactly, and because
`encode_fixed` bounds every member's |enc| below 2**63 / group_size the true sum lies
in int64's range: reading the ring sum as a signed int64 gives it bit for bit.
A single y_i is enc(...) plus at least one mask its receiver does not know (with 3 or
more members), hence uniform on Z_{2**64} and independent of u_i.

Pairwise seeds come from a key agreement, X25519 (RFC 7748), so a member knows only
the seeds of its own pairs: a malicious member can remove its own mask with i but not
the masks between i and the other honest members. Two members alone cannot hide
anything from each other (the sum minus one's own update is the other's). Round r's
mask of a pair is SHAKE-256(H(shared secret, ids, r)), a cryptographic XOF.

Testbed simplifications (what a deployment does instead):
- private keys derive from (run seed, peer id) for reproducible runs (`create_group`);
  a deployment draws them with `generate_private_key` and publishes only public keys
  through an authenticated directory / the server's key-advertisement round;
- no dropout recovery (no Shamir shares of seeds): a receiver missing any member's
  masked update for a round cannot unmask and drops the group's contribution;
- x25519 here is plain Python, correct (RFC 7748 vectors in the tests) but not
  constant-time.

Fixed point: precision 2**-frac_bits (6e-8 at the default 24), range per member
|w * x| < 2**(63 - frac_bits) / group_size (about 1.8e11 for 3 members); the decoded
float64 sum is exact while |sum| < 2**(53 - frac_bits) = 2**29.

Range check: a member masks only values |x| <= value_bound (2**24 by default, far above
the gradients and noise scales the testbed uses), so an honest group's sum lies within
sum_i(w_i) * value_bound. A sum outside it did not come from the group's true updates:
a missing or foreign masked update (its masks do not cancel, and every decoded entry
is then uniform on about +-2**39), or a member sending values beyond the bound to wrap
the int64 ring. `check_sum` refuses such a sum (CorruptSum); the peer counts it and
applies nothing of it.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

FRAC_BITS = 24  # fixed-point fraction bits: step 2**-24 ~ 6e-8, float32's resolution near 1
# Largest |entry| a member masks (~1.7e7; gradients and the defences' noise are orders below).
# A sum beyond its weights x this is corrupt; detection needs sum(weights) < 2**15.
VALUE_BOUND = 2.0**24
_DOMAIN = b"gradleak/secagg/v1/"
_P = 2**255 - 19  # Curve25519's field prime
_A24 = 121665  # (486662 - 2) / 4, RFC 7748
_BASE_U = (9).to_bytes(32, "little")
NAME = "secagg"


# ------------------------------------------------------------------ key agreement


def x25519(scalar: bytes, u: bytes) -> bytes:
    """RFC 7748 X25519: scalar multiplication on Curve25519's Montgomery u-line."""
    if len(scalar) != 32 or len(u) != 32:
        raise ValueError("x25519 takes a 32-byte scalar and a 32-byte u-coordinate")
    k = bytearray(scalar)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    n = int.from_bytes(k, "little")
    x1 = int.from_bytes(u, "little") & ((1 << 255) - 1)
    x2, z2, x3, z3, swap = 1, 0, x1, 1, 0
    for t in reversed(range(255)):  # the Montgomery ladder
        bit = (n >> t) & 1
        if swap ^ bit:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b, c, d = x2 + z2, x2 - z2, x3 + z3, x3 - z3
        aa, bb = a * a % _P, b * b % _P
        e = aa - bb
        da, cb = d * a % _P, c * b % _P
        x3, z3 = (da + cb) ** 2 % _P, x1 * (da - cb) ** 2 % _P
        x2, z2 = aa * bb % _P, e * (aa + _A24 * e) % _P
    if swap:
        x2, z2 = x3, z3
    return (x2 * pow(z2, _P - 2, _P) % _P).to_bytes(32, "little")


def public_key(private_key: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key."""
    return x25519(private_key, _BASE_U)


def generate_private_key() -> bytes:
    """A fresh random private key, as a deployment would draw it."""
    return secrets.token_bytes(32)


def derive_private_key(*, seed: int, peer_id: str) -> bytes:
    """A reproducible private key for the testbed: same run seed and peer, same key."""
    return hashlib.sha256(_DOMAIN + b"key" + seed.to_bytes(8, "little", signed=True)
                          + peer_id.encode()).digest()


def shared_secret(private_key: bytes, peer_public_key: bytes) -> bytes:
    """X25519 Diffie-Hellman; refuse the all-zero result of a low-order public key."""
    secret = x25519(private_key, peer_public_key)
    if secret == bytes(32):
        raise ValueError("public key is a low-order point: no shared secret")
    return secret


def pair_seed(*, secret: bytes, a: str, b: str, round_: int) -> bytes:
    """The 32-byte seed of pair {a, b} in `round_`; symmetric in a and b."""
    lo, hi = sorted((a, b))
    h = hashlib.sha256(_DOMAIN + b"pair" + secret)
    for s in (lo, hi):
        raw = s.encode()
        h.update(len(raw).to_bytes(4, "little") + raw)
    h.update(round_.to_bytes(8, "little", signed=True))
    return h.digest()


def prg(seed: bytes, numel: int) -> np.ndarray:
    """`numel` uniform uint64 words from SHAKE-256(seed)."""
    return np.frombuffer(hashlib.shake_256(seed).digest(8 * numel), dtype="<u8").astype(np.uint64)


# ------------------------------------------------------------------ fixed point


def encode_fixed(t: torch.Tensor, *, frac_bits: int = FRAC_BITS, group_size: int = 1,
                 weight: float = 1.0) -> np.ndarray:
    """round(weight * t * 2**frac_bits) as int64 (flat), refusing values that could wrap.

    Raises:
        ValueError: on non-finite values, or |value| >= 2**63 / group_size in fixed
            point (the group's sum could then leave int64's range).
    """
    x = np.rint(t.detach().cpu().double().reshape(-1).numpy() * weight * 2.0**frac_bits)
    bound = 2.0**63 / group_size
    if not np.isfinite(x).all() or (x.size and float(np.abs(x).max()) >= bound):
        raise ValueError(
            f"update out of the fixed-point range: |weight * x| must be finite and below "
            f"2**{63 - frac_bits} / {group_size} (frac_bits={frac_bits})"
        )
    return x.astype(np.int64)


def decode_fixed(t: torch.Tensor, *, frac_bits: int = FRAC_BITS) -> torch.Tensor:
    """int64 fixed point -> float64 (exact while |t| < 2**53)."""
    return t.to(torch.float64) / 2.0**frac_bits


# ------------------------------------------------------------------ masking


def _layout(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Offset of each tensor in the PRG stream: names in sorted order, so every member
    cuts the same stream the same way whatever order its dict has."""
    offsets, at = {}, 0
    for name in sorted(tensors):
        offsets[name] = at
        at += tensors[name].numel()
    return offsets


def mask_update(
    tensors: Mapping[str, torch.Tensor], *, member: str, seeds: Mapping[str, bytes],
    weight: float = 1.0, frac_bits: int = FRAC_BITS,
) -> dict[str, torch.Tensor]:
    """Member `member`'s masked update: int64 tensors of the same names and shapes.

    Args:
        tensors: the (defended) update, any float dtype.
        member: this member's id.
        seeds: other member id -> this round's pair seed, one per other group member.
        weight: multiplies the update before encoding (the receiver cannot weight
            masked updates one by one, so the sender pre-weights).
        frac_bits: fixed-point fraction bits; every member must use the same.
    """
    if member in seeds:
        raise ValueError(f"member {member!r} cannot hold a seed with itself")
    total = sum(t.numel() for t in tensors.values())
    # uint64 arithmetic is modular by definition (signed overflow is not).
    acc = np.zeros(total, dtype=np.uint64)
    for other, seed in seeds.items():
        if member < other:
            acc += prg(seed, total)
        else:
            acc -= prg(seed, total)
    offsets = _layout(tensors)
    out = {}
    for name, t in tensors.items():
        enc = encode_fixed(t, frac_bits=frac_bits, group_size=len(seeds) + 1, weight=weight)
        start = offsets[name]
        word = enc.view(np.uint64) + acc[start : start + t.numel()]
        out[name] = torch.from_numpy(word.view(np.int64)).reshape(t.shape)
    return out


def ring_sum(masked: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Sum int64 tensors modulo 2**64, name by name; returned as signed int64."""
    acc: dict[str, np.ndarray] = {}
    shapes: dict[str, torch.Size] = {}
    for update in masked:
        for name, t in update.items():
            if t.dtype != torch.int64:
                raise ValueError(f"masked tensor {name!r} must be int64, got {t.dtype}")
            word = t.detach().cpu().contiguous().reshape(-1).numpy().view(np.uint64)
            if name in acc:
                acc[name] = acc[name] + word
            else:
                acc[name], shapes[name] = word.copy(), t.shape
    return {n: torch.from_numpy(a.view(np.int64)).reshape(shapes[n]) for n, a in acc.items()}


def unmask_sum(
    masked: Sequence[Mapping[str, torch.Tensor]], *, frac_bits: int = FRAC_BITS
) -> dict[str, torch.Tensor]:
    """Sum of the group's true (pre-weighted) updates, float64, from ALL members' masked ones.

    With a member missing the masks do not cancel and the result is uniform noise:
    the caller must check membership first (the Peer does).
    """
    return {n: decode_fixed(t, frac_bits=frac_bits) for n, t in ring_sum(masked).items()}


# ------------------------------------------------------------------ the member object


class CorruptSum(ValueError):
    """Raised when a group sum unmasks outside what its members' weights allow."""


def is_secagg(defence: str) -> bool:
    """True when a header's defence name says the update is masked (last step secagg:G)."""
    return defence.rsplit("+", 1)[-1].startswith(NAME + ":")


class SecureAggregation:
    """One member's view of a group: its private key, the others' public keys."""

    def __init__(
        self, member: str, private_key: bytes, public_keys: Mapping[str, bytes], *,
        frac_bits: int = FRAC_BITS, value_bound: float = VALUE_BOUND,
    ) -> None:
        if member not in public_keys:
            raise ValueError(f"member {member!r} must be among the group's public keys")
        if public_keys[member] != public_key(private_key):
            raise ValueError(f"the public key listed for {member!r} is not its private key's")
        if len(public_keys) < 2:
            raise ValueError("a secure-aggregation group needs at least 2 members")
        if not 0 <= frac_bits <= 52:
            raise ValueError(f"frac_bits must be in 0..52, got {frac_bits}")
        if not 0.0 < value_bound < float("inf"):
            raise ValueError(f"value_bound must be positive and finite, got {value_bound}")
        self.member = member
        self.value_bound = value_bound
        self.group: tuple[str, ...] = tuple(sorted(public_keys))
        self.frac_bits = frac_bits
        self._secrets = {
            other: shared_secret(private_key, pk) for other, pk in public_keys.items() if other != member
        }

    @property
    def name(self) -> str:
        """What the update header's defence says, e.g. `secagg:3`."""
        return f"{NAME}:{len(self.group)}"

    def seeds(self, round_: int) -> dict[str, bytes]:
        """This member's pair seeds for `round_`, by the other member's id."""
        return {o: pair_seed(secret=s, a=self.member, b=o, round_=round_) for o, s in self._secrets.items()}

    def pair_mask(self, other: str, round_: int, shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
        """The mask this member adds for pair (member, other) in `round_`, as int64 tensors."""
        zeros = {n: torch.zeros(s) for n, s in shapes.items()}
        seed = {other: pair_seed(secret=self._secrets[other], a=self.member, b=other, round_=round_)}
        return mask_update(zeros, member=self.member, seeds=seed, frac_bits=self.frac_bits)

    def mask(self, tensors: Mapping[str, torch.Tensor], round_: int, *, weight: float = 1.0) -> dict[str, torch.Tensor]:
        """This member's masked, pre-weighted update for `round_`.

        Raises:
            ValueError: for an entry beyond value_bound: every receiver would refuse
                the group's sum as corrupt.
        """
        for name, t in tensors.items():
            peak = float(t.detach().abs().max()) if t.numel() else 0.0
            if not peak <= self.value_bound:
                raise ValueError(f"'{name}' holds |x| = {peak:.3g}, beyond the secure-aggregation "
                                 f"bound {self.value_bound:.3g}")
        return mask_update(tensors, member=self.member, seeds=self.seeds(round_), weight=weight,
                           frac_bits=self.frac_bits)

    def unmask(self, masked: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The group sum (float64) from every member's masked update of one round."""
        if len(masked) != len(self.group):
            raise ValueError(f"unmasking needs all {len(self.group)} members' updates, got {len(masked)}")
        return unmask_sum(masked, frac_bits=self.frac_bits)

    def check_sum(self, summed: Mapping[str, torch.Tensor], weights: Sequence[float]) -> None:
        """Refuse an unmasked sum no honest group with these weights can produce.

        Args:
            summed: what `unmask` returned (float64).
            weights: every member's weight (samples x mixing weight) as its header says.

        Raises:
            CorruptSum: when an entry exceeds sum(weights) x value_bound (plus the
                members' rounding), or a weight is not positive and finite.
        """
        if len(weights) != len(self.group) or not all(0.0 < w < float("inf") for w in weights):
            raise CorruptSum(f"want {len(self.group)} positive finite weights, got {list(weights)[:8]}")
        limit = sum(weights) * self.value_bound + len(self.group) * 2.0 ** -self.frac_bits
        bad = total = 0
        for t in summed.values():
            bad += int((t.abs() > limit).sum())
            total += t.numel()
        if bad:
            raise CorruptSum(f"{bad} of {total} entries of the unmasked sum exceed {limit:.3g} "
                             "(a foreign or missing masked update, or a wrapped ring)")


def create_group(
    members: Iterable[str], *, seed: int, frac_bits: int = FRAC_BITS, value_bound: float = VALUE_BOUND,
) -> dict[str, SecureAggregation]:
    """Key-agree a group in-process: each member gets its own private key and everyone's
    public key (the only thing a real deployment would exchange)."""
    ids = sorted(set(members))
    private = {m: derive_private_key(seed=seed, peer_id=m) for m in ids}
    public = {m: public_key(k) for m, k in private.items()}
    return {m: SecureAggregation(m, private[m], public, frac_bits=frac_bits, value_bound=value_bound)
            for m in ids}
