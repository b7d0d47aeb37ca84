"""Model gossip (D-PSGD / gossip averaging) of one peer: its model inbox and the averaging.

The protocol (attacker.gossip_algebra solves it, so it is fixed here):

- Every peer starts from the same x0. At local step s it takes a plain SGD half-step on a
  private batch, h = x - lr * g (p2p.peer.Peer.half_step), and z = h.
- Then R = mix_rounds averaging rounds r = 0..R-1: the peer sends z to every neighbour of
  the topology (kind "model", round s, mix_round r, mixing_weight W[receiver, me]), receives
  its neighbours' round-r models and sets z <- W[me, me] z + sum_j W[me, j] z_j, W being
  gradleak.core.graphs.mixing_matrix over the sorted members (the attacker included).
  After the R rounds x(s + 1) = z.
- A neighbour's model missing at a round (lost, late, dropped) gives its weight to the
  peer's own z: W[me, me] += W[me, j]. It is counted and recorded.

Which message a round uses: in lock-step mode (the driver clocks every (s, r)) exactly the
neighbour's (s, r) one; older ones still held are late and discarded. In async mode the
newest one received from that neighbour since this peer's previous round, whatever its
(s', r'), recorded with its lag (s - s') * R + (r - r') (negative: the neighbour is ahead).

The sum is taken in float64 over the neighbours in sorted order, then rounded to the
model's dtype (float32), so a lock-step run is bit-reproducible and a float64 replay of it
agrees to float32 precision. No gRPC, Ray or optimiser here.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from p2p.errors import DuplicateUpdate, PermissionDenied, ResourceExhausted, UpdateRejected
from p2p.update import Update

WEIGHT_TOLERANCE = 1e-9  # a header's mixing weight must be the receiver's W entry to this
Position = tuple[int, int]  # (local step, mix round)
STEP_WINDOW = 64  # a model message more steps behind this peer's own is refused
# What models are averaged and sent in: float32 as deployed; float64 keeps each round exact.
MODEL_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class MixRow:
    """One neighbour's part in one averaging round (a run record row)."""

    step: int
    mix_round: int
    sender: str
    receiver: str
    weight: float  # W[receiver, sender] applied; 0.0 when its model was missing (given to self)
    lag: int | None  # mix rounds the used model is behind this round; None when missing
    received_at: float | None


def own_update_id(peer_id: str, step: int, mix_round: int) -> str:
    """The id of a model message: one per (origin, step, mix round)."""
    return f"{peer_id}/r{step}/m{mix_round}"


class ModelGossip:
    """The model inbox and the averaging rounds of one peer.

    Args:
        peer_id: this peer.
        weights: row `peer_id` of W: every neighbour's weight and this peer's own.
        mix_rounds: R, averaging rounds per local step.
        lockstep: use exactly each round's messages (rounds mode) or the newest (async).
        shapes: the model's {name: shape}; a model message must carry exactly these.
        max_round: the run's local steps (later steps are refused); None: no bound.
        max_norm: the most a neighbour's model may be from ours (L2), as in Peer.mix.
        max_pending_per_origin: model messages one neighbour may have waiting.
    """

    def __init__(self, peer_id: str, weights: Mapping[str, float], *, mix_rounds: int, lockstep: bool,
                 shapes: Mapping[str, tuple[int, ...]], max_round: int | None = None,
                 max_norm: float = math.inf, max_pending_per_origin: int = 32,
                 dtype: torch.dtype = torch.float32) -> None:
        if mix_rounds < 1 or mix_rounds >= 1024:
            raise ValueError(f"mix_rounds must be in 1..1023, got {mix_rounds}")
        if peer_id not in weights or abs(sum(weights.values()) - 1.0) > 1e-6:
            raise ValueError(f"weights must be a row of W holding {peer_id!r} and summing to 1")
        self.peer_id = peer_id
        self.weights = {p: float(w) for p, w in weights.items()}
        self.neighbours = sorted(p for p, w in weights.items() if p != peer_id and w > 0)
        self.mix_rounds = mix_rounds
        self.lockstep = lockstep
        self.shapes = {n: tuple(s) for n, s in shapes.items()}
        self.max_round = max_round
        self.max_norm = max_norm
        self.max_pending = max_pending_per_origin
        if dtype not in MODEL_DTYPES.values():
            raise ValueError(f"model gossip dtype must be one of {', '.join(MODEL_DTYPES)}, got {dtype}")
        self.dtype = dtype
        self.stats = {"received": 0, "used": 0, "missing": 0, "late": 0}
        self._lock = threading.Lock()
        self._inbox: dict[str, dict[Position, tuple[Update, float]]] = {p: {} for p in self.neighbours}
        self._slots: set[tuple[str, int, int]] = set()  # (origin, step, mix round) delivered
        self._z: dict[str, torch.Tensor] | None = None  # the model being averaged in this step
        self._at: Position | None = None  # the (step, mix round) z is at

    # -- receive (gRPC threads) -----------------------------------------------------
    def accept(self, update: Update, received_at: float) -> None:
        """Validate a neighbour's model message and file it; a bad one changes nothing.

        The membership rules (origin == sender == the caller) are checked before, by Peer.
        """
        h = update.header
        if h.origin not in self._inbox:
            raise PermissionDenied(f"{h.origin[:64]!r} is not a neighbour of {self.peer_id} in the topology")
        self._check(update)
        slot = (h.origin, h.round, h.mix_round)
        with self._lock:
            if slot in self._slots:
                raise DuplicateUpdate(f"{h.origin} already sent its model of step {h.round}, round {h.mix_round}")
            held = self._inbox[h.origin]
            if len(held) >= self.max_pending:
                raise ResourceExhausted(f"{h.origin} already has {self.max_pending} models waiting")
            self._slots.add(slot)
            held[(h.round, h.mix_round)] = (update, received_at)
            self.stats["received"] += 1

    def _check(self, update: Update) -> None:
        h = update.header
        if h.kind != "model":
            raise UpdateRejected(f"this peer gossips models; got a {h.kind[:16]!r} message")
        if h.num_samples < 1 or h.model_version < 0:
            raise UpdateRejected(f"bad num_samples {h.num_samples} or model version {h.model_version}")
        if h.round < 1 or (self.max_round is not None and h.round > self.max_round):
            raise UpdateRejected(f"step {h.round} is outside this run's 1..{self.max_round}")
        at = self._at
        if at is not None and h.round < at[0] - STEP_WINDOW:
            raise UpdateRejected(f"step {h.round} is more than {STEP_WINDOW} steps behind this peer's {at[0]}")
        if h.mix_round >= self.mix_rounds:
            raise UpdateRejected(f"mix_round {h.mix_round} is beyond this run's {self.mix_rounds} rounds")
        expected = self.weights[h.origin]
        if not abs(h.mixing_weight - expected) <= WEIGHT_TOLERANCE:
            raise UpdateRejected(f"mixing weight {h.mixing_weight} is not W[{self.peer_id}, {h.origin}] = {expected}")
        if set(update.tensors) != set(self.shapes):
            raise UpdateRejected("the model message has other parameter names than the model")
        gap = 0.0
        for name, t in update.tensors.items():
            if tuple(t.shape) != self.shapes[name] or not t.is_floating_point():
                raise UpdateRejected(f"model tensor '{name}' has shape {list(t.shape)} or dtype {t.dtype}, "
                                     f"the model's is {list(self.shapes[name])}, floating")
            if not bool(torch.isfinite(t).all()):
                raise UpdateRejected(f"model tensor '{name}' holds NaN or infinite values")
            if self._z is not None:
                gap += float((t.to(torch.float64) - self._z[name].to(torch.float64)).pow(2).sum())
        # A member could send finite but huge weights: bound how far one average may move us.
        if not math.sqrt(gap) <= self.max_norm:
            raise UpdateRejected(f"the model is {math.sqrt(gap):.3g} (L2) from ours, over {self.max_norm:g}")

    # -- one local step (the peer's own thread) --------------------------------------
    def start(self, step: int, half_step: Mapping[str, torch.Tensor]) -> None:
        """Begin step `step` with z = the half-step h."""
        with self._lock:
            self._z = {n: t.detach().cpu().to(self.dtype, copy=True) for n, t in half_step.items()}
            self._at = (step, 0)
            # Slots of long-past steps are forgotten; accept() refuses those steps instead.
            self._slots = {slot for slot in self._slots if slot[1] >= step - STEP_WINDOW}

    def current(self) -> dict[str, torch.Tensor]:
        """z as it is now (what this peer sends at the current round)."""
        if self._z is None:
            raise RuntimeError("no step started")
        return self._z

    def average(self) -> list[MixRow]:
        """One averaging round at the current (step, mix round); then the next round.

        Returns one row per neighbour: the weight applied, or 0 for a missing model.
        """
        if self._z is None or self._at is None:
            raise RuntimeError("no step started")
        step, r = self._at
        with self._lock:
            picked = {p: self._pick(p, step, r) for p in self.neighbours}
        own = self.weights[self.peer_id] + sum(self.weights[p] for p, m in picked.items() if m is None)
        acc = {n: own * t.to(torch.float64) for n, t in self._z.items()}
        rows = []
        for p in self.neighbours:  # sorted: a fixed order of the float sum
            m = picked[p]
            if m is None:
                self.stats["missing"] += 1
                rows.append(MixRow(step, r, p, self.peer_id, 0.0, None, None))
                continue
            (update, received_at), (s2, r2) = m
            w = self.weights[p]
            for n, t in update.tensors.items():
                acc[n] += w * t.to(torch.float64)
            self.stats["used"] += 1
            rows.append(MixRow(step, r, p, self.peer_id, w, (step - s2) * self.mix_rounds + (r - r2), received_at))
        self._z = {n: acc[n].to(t.dtype) for n, t in self._z.items()}
        self._at = (step, r + 1)
        return rows

    def _pick(self, origin: str, step: int, r: int) -> tuple[tuple[Update, float], Position] | None:
        """The message of `origin` this round uses (under the lock); drops what it supersedes."""
        held = self._inbox[origin]
        if self.lockstep:
            for pos in [q for q in held if q < (step, r)]:
                del held[pos]
                self.stats["late"] += 1
            got = held.pop((step, r), None)
            return None if got is None else (got, (step, r))
        if not held:
            return None
        newest = max(held)
        got = held[newest]
        held.clear()
        return got, newest

    def held(self, step: int, mix_round: int) -> dict[str, dict[str, torch.Tensor]]:
        """The round (step, mix_round) models already received, by neighbour, without using them
        (what a rushing attacker reads before it sends its own round message)."""
        with self._lock:
            return {p: got[0].tensors for p, held in self._inbox.items()
                    if (got := held.get((step, mix_round))) is not None}

    def pending(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._inbox.values())
