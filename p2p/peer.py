"""An honest gossip peer as plain Python: local step, receive, aggregate, apply.

No gRPC and no Ray here: the transport calls `accept_update` / `model_at` (the
UpdateHandler protocol) from its threads, the host calls the rest. A lock keeps
the pending updates and the weight history consistent between the two.

Each apply aggregates everything that arrived since the previous one, whatever
step it was computed at: an update's weight is its samples x mixing weight x the
staleness rule's factor of its version lag (p2p.staleness). In lock-step rounds
every lag is 0, so this is the plain sample-weighted mean of the round.

A peer given a `SecureAggregation` (p2p.secagg) sends its defended update masked
(int64 fixed point, header defence `...+secagg:G`) and sums its group's masked
updates of one step: only with every member's update of that step present does the
sum unmask. A step's masked updates wait up to `secagg_wait` applies for the rest
of the group (0 in lock-step rounds, where all arrive before the apply); then the
group's contribution to that step is dropped and counted in `secagg_stats` (no
dropout recovery). Group members must therefore send their update to every other
member. Updates from outside the group aggregate as before.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from p2p.defences import Defence
from p2p.errors import DuplicateUpdate, UpdateRejected, VersionNotFound
from p2p.identity import Caller
from p2p.secagg import SecureAggregation, is_secagg
from p2p.staleness import Staleness, parse_staleness
from p2p.update import Update, UpdateHeader


@dataclass(frozen=True)
class Batch:
    """A private batch: stays with the peer and the evaluator, never in an Update."""

    images: np.ndarray  # (B, C, H, W) float32 in [0, 1]
    labels: np.ndarray  # (B,) int64


@dataclass(frozen=True)
class Applied:
    """One update as it entered an aggregate: for the run record's per-update rows."""

    header: UpdateHeader
    received_at: float  # wall clock when this peer accepted it (Unix seconds)
    lag: int  # local steps this peer's model was ahead of the update's weights
    weight: float  # samples x mixing weight x staleness factor (0: dropped by the rule)


OPTIMIZERS = ("adam", "sgd")


def make_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The local optimiser a peer applies the aggregated gradient with.

    Adam by default: the DLG paper's sigmoid LeNet barely moves under plain SGD at
    the small batches whose leakage we study, and the utility side of the trade-off
    must be measured on a model that learns.
    """
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    raise ValueError(f"unknown optimizer '{name}' (known: {', '.join(OPTIMIZERS)})")


class Peer:
    """One honest FL peer holding a model copy, a private shard and the updates pending."""

    def __init__(
        self, peer_id: str, model: nn.Module, images: np.ndarray, labels: np.ndarray, *,
        batch_size: int, defence: Defence, lr: float, keep_versions: int, seed: int,
        optimizer: str = "adam", device: str = "cpu", secagg: SecureAggregation | None = None,
        staleness: Staleness | None = None, secagg_wait: int = 0,
    ) -> None:
        if batch_size > len(labels):
            raise ValueError(f"batch size {batch_size} exceeds the shard's {len(labels)} samples")
        if secagg is not None and secagg.member != peer_id:
            raise ValueError(f"secure-aggregation keys of {secagg.member!r} given to peer {peer_id!r}")
        self.peer_id = peer_id
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.batch_size = batch_size
        self.defence = defence
        self.secagg = secagg
        self.secagg_wait = secagg_wait
        # steps whose group sum was unmasked / dropped for a missing member
        self.secagg_stats = {"unmasked_rounds": 0, "dropped_rounds": 0, "dropped_updates": 0}
        self.staleness = staleness or parse_staleness("poly:0.5")
        self.lr = lr
        self._opt = make_optimizer(optimizer, model, lr)
        self._images = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        self._labels = torch.from_numpy(np.ascontiguousarray(labels)).to(self.device)
        self._shapes = {n: p.shape for n, p in model.named_parameters()}
        self._rng = np.random.default_rng(seed)
        self._noise = torch.Generator().manual_seed(seed)
        self._lock = threading.Lock()
        self._pending: list[tuple[Update, float]] = []  # plain updates since the last apply
        self._masked: dict[int, list[tuple[Update, float]]] = {}  # by step, until the group is whole
        self._masked_age: dict[int, int] = {}  # applies a step's masked updates have waited
        self._seen: deque[str] = deque(maxlen=100_000)
        self._seen_set: set[str] = set()
        self._history: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._keep = keep_versions
        self.version = 0
        self._snapshot()

    def local_update(self, round_: int) -> tuple[Update, Batch]:
        """Take a gradient on a fresh private batch, defend it and file it as own update."""
        idx = torch.from_numpy(self._rng.choice(len(self._labels), size=self.batch_size, replace=False))
        x, y = self._images[idx], self._labels[idx]
        self.model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        grads = torch.autograd.grad(loss, list(self.model.parameters()))
        # Updates leave on the CPU: the codec serialises host memory.
        named = {n: g.detach().cpu() for (n, _), g in zip(self.model.named_parameters(), grads)}
        header = UpdateHeader(
            update_id=f"{self.peer_id}/r{round_}", origin=self.peer_id, sender=self.peer_id,
            round=round_, model_version=self.version, num_samples=self.batch_size,
            defence=self.defence_name, sent_at=time.time(),
        )
        tensors = self.defence.apply(named, self._noise)
        if self.secagg is not None:
            tensors = self.secagg.mask(tensors, round_, weight=header.num_samples * header.mixing_weight)
        update = Update(header, tensors)
        with self._lock:
            self._remember(header.update_id)
            self._file(update, time.time())
        return update, Batch(x.cpu().numpy().copy(), y.cpu().numpy().copy())

    @property
    def defence_name(self) -> str:
        """The defence chain as sent in headers, with `+secagg:G` when masking."""
        if self.secagg is None:
            return self.defence.name
        return self.secagg.name if self.defence.name == "none" else f"{self.defence.name}+{self.secagg.name}"

    def accept_update(self, update: Update, wire_bytes: int = 0, caller: Caller | None = None, *,
                      received_at: float | None = None) -> None:
        """Validate a received update from caller and file it for the next apply; bad ones change nothing.

        However late it is, a valid update is kept: the staleness rule weighs it.
        """
        self._validate(update)
        h = update.header
        with self._lock:
            if h.update_id in self._seen_set:
                raise DuplicateUpdate(f"update {h.update_id} already received")
            if is_secagg(h.defence) and any(
                u.header.origin == h.origin for u, _t in self._masked.get(h.round, [])
            ):
                raise UpdateRejected(f"a masked update of {h.origin} for step {h.round} is already held")
            self._remember(h.update_id)
            self._file(update, time.time() if received_at is None else received_at)

    def _file(self, update: Update, received_at: float) -> None:
        if is_secagg(update.header.defence):
            self._masked.setdefault(update.header.round, []).append((update, received_at))
        else:
            self._pending.append((update, received_at))

    def pending(self) -> int:
        """Updates waiting for the next apply (masked ones included)."""
        with self._lock:
            return len(self._pending) + sum(len(v) for v in self._masked.values())

    def apply_pending(self) -> list[Applied]:
        """Aggregate what arrived since the last apply (own update included) and step once.

        Returns the updates that entered the aggregate, with their lag and weight.
        """
        with self._lock:
            plain, self._pending = self._pending, []
            masked = self._ripe_masked()
        # A fixed order makes the float sum, and so lock-step runs, bit-reproducible.
        plain.sort(key=lambda item: item[0].header.update_id)
        applied: list[Applied] = []
        contributions: list[tuple[dict[str, torch.Tensor], float]] = []
        total = 0.0
        for u, received_at in plain:
            lag = max(0, self.version - u.header.model_version)
            w = u.header.num_samples * u.header.mixing_weight * self.staleness(lag)
            applied.append(Applied(u.header, received_at, lag, w))
            if w > 0:
                contributions.append((u.tensors, w))
                total += w
        for group in masked:
            summed, weight, members = self._unmask(group)
            contributions.append((summed, 1.0))
            total += weight
            applied += members
        if contributions and total > 0:
            for name, p in self.model.named_parameters():
                agg = torch.zeros_like(p)
                for tensors, w in contributions:
                    agg += tensors[name].to(device=self.device, dtype=torch.float32) * w
                p.grad = agg / total
            self._opt.step()
            self._opt.zero_grad(set_to_none=True)
        with self._lock:
            self.version += 1
            self._snapshot()
        return applied

    def mix(self, state: dict[str, torch.Tensor], weight: float) -> int:
        """Move every parameter `weight` of the way to a neighbour's (gossip averaging); new version.

        A new version, not a change of the current one: an update already sent was
        taken at the current version's weights, and a pull at that version must still
        return them. Buffers (none in the sigmoid LeNet) are averaged the same way.
        """
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"mixing weight must be in (0, 1], got {weight}")
        own = self.model.state_dict()
        if set(state) != set(own):
            raise UpdateRejected("the neighbour's model has other parameter names")
        for name, t in state.items():
            if t.shape != own[name].shape or not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise UpdateRejected(f"the neighbour's '{name}' has the wrong shape or dtype, or NaN/inf")
        with torch.no_grad():
            for name, t in own.items():
                t.lerp_(state[name].to(device=t.device, dtype=t.dtype), weight)
        with self._lock:
            self.version += 1
            self._snapshot()
        return self.version

    def _ripe_masked(self) -> list[list[tuple[Update, float]]]:
        """Masked steps whose whole group is here; steps waiting too long are dropped."""
        ripe = []
        for step in sorted(self._masked):
            group = self._masked[step]
            whole = self.secagg is not None and sorted(u.header.origin for u, _t in group) == list(
                self.secagg.group)
            age = self._masked_age.get(step, 0)
            if whole:
                ripe.append(group)
            elif age < self.secagg_wait:
                self._masked_age[step] = age + 1
                continue
            else:
                self.secagg_stats["dropped_rounds"] += 1
                self.secagg_stats["dropped_updates"] += len(group)
            del self._masked[step]
            self._masked_age.pop(step, None)
        return ripe

    def _unmask(self, group: list[tuple[Update, float]]) -> tuple[dict[str, torch.Tensor], float, list[Applied]]:
        """The unmasked group sum, the members' total weight, and their Applied rows.

        Masked updates were pre-weighted by their senders, so the sum enters with
        weight 1 while its members' weights join the total (no staleness factor:
        the masks cancel only in the unweighted sum).
        """
        assert self.secagg is not None  # _ripe_masked returns groups only with keys
        group.sort(key=lambda item: item[0].header.origin)
        self.secagg_stats["unmasked_rounds"] += 1
        rows, weight = [], 0.0
        for u, received_at in group:
            w = u.header.num_samples * u.header.mixing_weight
            rows.append(Applied(u.header, received_at, max(0, self.version - u.header.model_version), w))
            weight += w
        return self.secagg.unmask([u.tensors for u, _t in group]), weight, rows

    def schema(self) -> dict[str, tuple[int, ...]]:
        """The model's parameters {name: shape}: the server checks every update's frames against it."""
        return {n: tuple(s) for n, s in self._shapes.items()}

    def model_at(self, version: int | None, caller: Caller | None = None) -> tuple[int, dict[str, torch.Tensor]]:
        """Weights at `version` (None = latest) from the kept history."""
        with self._lock:
            v = self.version if version is None else version
            if v not in self._history:
                oldest = next(iter(self._history))
                raise VersionNotFound(
                    f"peer {self.peer_id} holds versions {oldest}..{self.version}, not {v}"
                )
            return v, self._history[v]

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        """Share of `images` the current model classifies correctly."""
        with torch.no_grad():
            pred = self.model(torch.from_numpy(images).to(self.device)).argmax(dim=1).cpu().numpy()
        return float((pred == labels).mean())

    def _snapshot(self) -> None:
        state = {n: t.detach().cpu().clone() for n, t in self.model.state_dict().items()}
        self._history[self.version] = state
        while len(self._history) > self._keep:
            self._history.popitem(last=False)

    def _remember(self, update_id: str) -> None:
        if len(self._seen) == self._seen.maxlen:
            self._seen_set.discard(self._seen[0])
        self._seen.append(update_id)
        self._seen_set.add(update_id)

    def _validate(self, update: Update) -> None:
        h: UpdateHeader = update.header
        if h.num_samples < 1:
            raise UpdateRejected(f"num_samples must be >= 1, got {h.num_samples}")
        if h.round < 1 or h.model_version < 0:
            raise UpdateRejected(f"bad round {h.round} or model version {h.model_version}")
        if not (h.mixing_weight > 0 and h.mixing_weight < float("inf")):
            raise UpdateRejected(f"mixing weight must be positive and finite, got {h.mixing_weight}")
        if not (h.sent_at >= 0 and math.isfinite(h.sent_at)):
            raise UpdateRejected(f"sent_at must be a finite time >= 0, got {h.sent_at}")
        if set(update.tensors) != set(self._shapes):
            missing = sorted(set(self._shapes) - set(update.tensors))
            extra = sorted(set(update.tensors) - set(self._shapes))
            raise UpdateRejected(f"parameter names do not match the model: missing {missing}, unknown {extra}")
        masked = is_secagg(h.defence)
        if masked:
            self._validate_masked(h)
        for name, t in update.tensors.items():
            if t.shape != self._shapes[name]:
                raise UpdateRejected(
                    f"tensor '{name}' has shape {list(t.shape)}, the model's is {list(self._shapes[name])}"
                )
            if masked:
                # Every int64 is a valid ring element; nothing else is.
                if t.dtype != torch.int64:
                    raise UpdateRejected(f"masked tensor '{name}' must be int64, got {t.dtype}")
                continue
            if not t.is_floating_point():
                raise UpdateRejected(f"tensor '{name}' has non-float dtype {t.dtype}")
            if not bool(torch.isfinite(t).all()):
                raise UpdateRejected(f"tensor '{name}' holds NaN or infinite values")

    def _validate_masked(self, h: UpdateHeader) -> None:
        sa = self.secagg
        if sa is None:
            raise UpdateRejected(
                f"masked update ({h.defence}) but peer {self.peer_id} is in no secure-aggregation group"
            )
        if h.defence != sa.name and not h.defence.endswith("+" + sa.name):
            raise UpdateRejected(f"masked update says '{h.defence}', this peer's group is {sa.name}")
        if h.origin not in sa.group or h.origin == self.peer_id:
            raise UpdateRejected(f"masked update from {h.origin}, not another member of {list(sa.group)}")
