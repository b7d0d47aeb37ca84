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
member. Updates from outside the group aggregate as before. A whole group whose sum
unmasks outside what its members' weights allow (a foreign or forged masked update:
p2p.secagg.check_sum) is never counted as unmasked: it is dropped and counted in
`secagg_stats["corrupt_rounds"]`.

Identity (p2p.membership, the rules in full): every received update is checked against
its authenticated caller before anything else: under mutual TLS the caller must be a
member whose certificate names it, and the header's sender must be that caller; always,
origin must equal sender (no relaying), the receiver itself is no origin, and an origin
delivers one update per local step. Under mutual TLS GetModel answers members only. A
masked update is accepted only from a member of this peer's group, so an outsider
cannot take a member's masked slot.

Integrity. An update's numbers are bounded before they touch state: num_samples in
1..max_samples (the run's largest batch size), mixing weight in (0, 1], finite
values and an L2 norm of at most max_update_norm. The aggregate (p2p.aggregate: mean,
median, trimmed, clip) is computed in float64; a step whose aggregate is not finite
or over max_update_norm is refused: the model and optimiser stay as they were, the
version still advances (lock-step pulls name versions by step), and the refusal is
counted in `aggregate_stats`.

Inbox bounds. Rounds beyond max_round (the run's steps) are refused; so are rounds
more than step_window behind the newest one accepted from the same origin (late
updates inside the window are kept and weighed by staleness); at most max_pending_per_origin
updates per origin and max_pending in all wait for the next apply, and masked
updates wait for at most max_masked_steps distinct steps (ResourceExhausted).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from p2p.aggregate import Aggregator, Contribution, l2_norm, parse_aggregate
from p2p.defences import Defence
from p2p.errors import (
    DuplicateUpdate,
    PermissionDenied,
    ResourceExhausted,
    UpdateRejected,
    VersionNotFound,
)
from p2p.identity import Caller
from p2p.membership import Membership, StepSlots
from p2p.model_gossip import ModelGossip
from p2p.secagg import CorruptSum, SecureAggregation, is_secagg
from p2p.staleness import Staleness, parse_staleness
from p2p.update import Update, UpdateHeader

log = logging.getLogger(__name__)


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
KEEP_BYTES = 64 << 20  # weight history per peer: 1,700 LeNet versions, one ResNet-18


def _state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())
# Honest LeNet updates of the default run have L2 norms up to ~13 (benchmarks/update_norms.py);
# 1e4 leaves room for noise defences (gauss:S adds ~S x 97 on the 16x16 LeNet) and keeps
# any accepted update, and so any mean of them, many orders below float32 overflow.
MAX_UPDATE_NORM = 1e4
MAX_SAMPLES = 4096  # the largest batch size a run may configure (gradleak.config)


@dataclass(frozen=True)
class InboxLimits:
    """Bounds of what a peer holds between applies (see the module docstring)."""

    max_round: int | None = None  # the run's configured steps; None: no upper bound
    step_window: int = 64  # steps an update may be behind its origin's newest one accepted
    max_pending_per_origin: int = 32
    max_pending: int = 1024
    max_masked_steps: int = 32
    max_origins: int = 4096  # origins whose newest step is remembered (oldest forgotten first)

    def __post_init__(self) -> None:
        counts = (self.step_window, self.max_pending_per_origin, self.max_pending,
                  self.max_masked_steps, self.max_origins)
        if min(counts) < 1 or (self.max_round is not None and self.max_round < 1):
            raise ValueError(f"inbox limits must be >= 1, got {self}")


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
        staleness: Staleness | None = None, secagg_wait: int = 0, membership: Membership | None = None,
        aggregate: Aggregator | None = None, max_update_norm: float = MAX_UPDATE_NORM,
        max_samples: int = MAX_SAMPLES, inbox: InboxLimits | None = None,
        keep_bytes: int = KEEP_BYTES, models: ModelGossip | None = None,
    ) -> None:
        if batch_size > len(labels):
            raise ValueError(f"batch size {batch_size} exceeds the shard's {len(labels)} samples")
        if secagg is not None and secagg.member != peer_id:
            raise ValueError(f"secure-aggregation keys of {secagg.member!r} given to peer {peer_id!r}")
        if not max_update_norm > 0 or max_samples < batch_size:
            raise ValueError(f"max_update_norm must be > 0 and max_samples >= the batch size {batch_size}, "
                             f"got {max_update_norm}, {max_samples}")
        if membership is not None and membership.peer_id != peer_id:
            raise ValueError(f"membership of {membership.peer_id!r} given to peer {peer_id!r}")
        if models is not None and models.peer_id != peer_id:
            raise ValueError(f"model gossip of {models.peer_id!r} given to peer {peer_id!r}")
        # Model gossip (p2p.model_gossip): model messages go to its inbox, gradients are refused.
        self.models = models
        # Who may push and pull (p2p.membership); by default plaintext rules, no roster.
        self.membership = membership or Membership(peer_id)
        self.peer_id = peer_id
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.batch_size = batch_size
        self.defence = defence
        self.secagg = secagg
        self.secagg_wait = secagg_wait
        # steps whose group sum was unmasked / dropped for a missing member / refused as out of range
        self.secagg_stats = {"unmasked_rounds": 0, "dropped_rounds": 0, "dropped_updates": 0,
                             "corrupt_rounds": 0, "corrupt_updates": 0}
        self.staleness = staleness or parse_staleness("poly:0.5")
        self.aggregator = aggregate or parse_aggregate("mean")
        self.max_update_norm = float(max_update_norm)
        self.max_samples = max_samples
        self.inbox = inbox or InboxLimits()
        # applies whose aggregate was refused, by reason; the last apply's aggregate norm
        self.aggregate_stats = {"refused_steps": 0, "not_finite": 0, "over_norm": 0}
        self.last_refusal: str | None = None  # "not_finite" | "over_norm" | None, of the last apply
        self.last_norm: float | None = None
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
        self._held: Counter[str] = Counter()  # updates held per origin, plain and masked
        self._newest: OrderedDict[str, int] = OrderedDict()  # newest step accepted per origin (bounded)
        self._sums: dict[int, dict[str, torch.Tensor]] = {}  # range-checked group sums, by step
        self._slots = StepSlots()  # (origin, step) pairs already delivered: one update each
        self._seen: deque[str] = deque(maxlen=100_000)
        self._seen_set: set[str] = set()
        self._history: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        if keep_versions < 1 or keep_bytes < 1:
            raise ValueError(f"keep_versions and keep_bytes must be >= 1, got {keep_versions}, {keep_bytes}")
        self._keep = keep_versions
        # History is bounded by bytes too: 256 versions of a ResNet-18 would be ~11 GiB.
        self._keep_bytes = keep_bytes
        self._history_bytes = 0
        self.version = 0
        self._snapshot()

    def _gradient(self) -> tuple[dict[str, torch.Tensor], Batch]:
        """The gradient at the current weights on a fresh private batch (on the CPU), and the batch."""
        idx = torch.from_numpy(self._rng.choice(len(self._labels), size=self.batch_size, replace=False))
        x, y = self._images[idx], self._labels[idx]
        self.model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        grads = torch.autograd.grad(loss, list(self.model.parameters()))
        # Updates leave on the CPU: the codec serialises host memory.
        named = {n: g.detach().cpu() for (n, _), g in zip(self.model.named_parameters(), grads)}
        return named, Batch(x.cpu().numpy().copy(), y.cpu().numpy().copy())

    def half_step(self) -> tuple[dict[str, torch.Tensor], Batch]:
        """Model gossip's local step: h = x - lr * g, plain SGD in the weights' dtype (float32).

        The model itself does not move: the averaging rounds start from h and end in
        `set_weights`. Returns h (on the CPU) and the private batch behind g.
        """
        grads, batch = self._gradient()
        with torch.no_grad():
            h = {n: torch.add(p.detach().cpu(), grads[n], alpha=-self.lr) for n, p in self.model.named_parameters()}
        return h, batch

    def set_weights(self, state: dict[str, torch.Tensor]) -> int:
        """Take the end of a step's averaging rounds as the model: a new version, as in `mix`."""
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(state[name].to(device=p.device, dtype=p.dtype))
        with self._lock:
            self.version += 1
            self._snapshot()
        return self.version

    def local_update(self, round_: int) -> tuple[Update, Batch]:
        """Take a gradient on a fresh private batch, defend it and file it as own update."""
        named, batch = self._gradient()
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
        return update, batch

    @property
    def defence_name(self) -> str:
        """The defence chain as sent in headers, with `+secagg:G` when masking."""
        if self.secagg is None:
            return self.defence.name
        return self.secagg.name if self.defence.name == "none" else f"{self.defence.name}+{self.secagg.name}"

    def accept_update(self, update: Update, wire_bytes: int = 0, caller: Caller | None = None, *,
                      received_at: float | None = None) -> None:
        """Validate a received update from caller and file it for the next apply; bad ones change nothing.

        Who sends is checked first (p2p.membership: Unauthenticated, PermissionDenied),
        then what (UpdateRejected), then that it is new: its id, and its origin's slot
        for its step (DuplicateUpdate). However late it is, a valid update is kept: the
        staleness rule weighs it.
        """
        h = update.header
        self.membership.check_update(h, caller)
        if self.models is not None or h.kind == "model":
            if self.models is None:
                raise UpdateRejected(f"peer {self.peer_id} gossips gradients, not models")
            self.models.accept(update, time.time() if received_at is None else received_at)
            return
        self._validate(update)
        with self._lock:
            if h.update_id in self._seen_set:
                raise DuplicateUpdate(f"update {h.update_id[:80]} already received")
            if (h.origin, h.round) in self._slots:
                raise DuplicateUpdate(f"{h.origin} already delivered its update for step {h.round}")
            self._admit(h)
            self._remember(h.update_id)
            self._slots.take(h.origin, h.round)
            self._file(update, time.time() if received_at is None else received_at)

    def _admit(self, h: UpdateHeader) -> None:
        """The inbox bounds (called under the lock): ResourceExhausted when one is reached."""
        lim = self.inbox
        newest = self._newest.get(h.origin)
        if newest is not None and h.round < newest - lim.step_window:
            raise ResourceExhausted(f"step {h.round} of {h.origin} is more than {lim.step_window} steps "
                                    f"behind its newest one accepted ({newest})")
        if self._held[h.origin] >= lim.max_pending_per_origin:
            raise ResourceExhausted(f"{h.origin} already has {lim.max_pending_per_origin} updates waiting "
                                    "for the next apply")
        if sum(self._held.values()) >= lim.max_pending:
            raise ResourceExhausted(f"the inbox holds {lim.max_pending} updates, its limit")
        if is_secagg(h.defence) and h.round not in self._masked and len(self._masked) >= lim.max_masked_steps:
            raise ResourceExhausted(f"masked updates of {lim.max_masked_steps} steps already wait for "
                                    "their group")
        self._newest[h.origin] = h.round if newest is None else max(newest, h.round)
        self._newest.move_to_end(h.origin)
        if len(self._newest) > lim.max_origins:
            self._newest.popitem(last=False)

    def _file(self, update: Update, received_at: float) -> None:
        self._held[update.header.origin] += 1
        if is_secagg(update.header.defence):
            self._masked.setdefault(update.header.round, []).append((update, received_at))
        else:
            self._pending.append((update, received_at))

    def pending(self) -> int:
        """Updates waiting for the next apply (masked ones included; model messages not)."""
        with self._lock:
            return len(self._pending) + sum(len(v) for v in self._masked.values())

    def apply_pending(self) -> list[Applied]:
        """Aggregate what arrived since the last apply (own update included) and step once.

        Returns the updates that entered the aggregate, with their lag and weight. A
        refused aggregate (not finite, or over max_update_norm) leaves the model as it
        was; `last_refusal` says why, `aggregate_stats` counts it.
        """
        with self._lock:
            plain, self._pending = self._pending, []
            masked = self._ripe_masked()
            self._held = Counter(u.header.origin for group in self._masked.values() for u, _t in group)
        # A fixed order makes the float sum, and so lock-step runs, bit-reproducible.
        plain.sort(key=lambda item: item[0].header.update_id)
        applied: list[Applied] = []
        contributions: list[Contribution] = []
        for u, received_at in plain:
            lag = max(0, self.version - u.header.model_version)
            factor = self.staleness(lag)
            w = u.header.num_samples * u.header.mixing_weight * factor
            applied.append(Applied(u.header, received_at, lag, w))
            contributions.append(Contribution(u.tensors, w, factor))
        for group in masked:
            summed, weight, members = self._unmask(group)
            # The group's weighted mean, entering as one contribution of the members' weight.
            contributions.append(Contribution({n: t.to(torch.float64) / weight for n, t in summed.items()},
                                              weight, 1.0))
            applied += members
        self._step(self.aggregator(contributions))
        with self._lock:
            self.version += 1
            self._snapshot()
        return applied

    def _step(self, agg: dict[str, torch.Tensor] | None) -> None:
        """One optimiser step on the aggregate, unless it is refused."""
        self.last_refusal = None
        self.last_norm = None if agg is None else l2_norm(agg)
        if agg is None or self.last_norm is None:
            return  # nothing counted this apply
        if not math.isfinite(self.last_norm) or self.last_norm > self.max_update_norm:
            self.last_refusal = "not_finite" if not math.isfinite(self.last_norm) else "over_norm"
            self.aggregate_stats["refused_steps"] += 1
            self.aggregate_stats[self.last_refusal] += 1
            return
        for name, p in self.model.named_parameters():
            p.grad = agg[name].to(device=self.device, dtype=p.dtype)
        self._opt.step()
        self._opt.zero_grad(set_to_none=True)

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
        # A member could serve finite but huge weights (3e38): bound how far one average may move us.
        gap = l2_norm({n: state[n].to(torch.float64) - own[n].detach().cpu().to(torch.float64) for n in own})
        if not gap <= self.max_update_norm:
            raise UpdateRejected(f"the neighbour's model is {gap:.3g} (L2) from ours, over the bound "
                                 f"{self.max_update_norm:g}")
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
            if whole and self._sum_in_range(step, group):
                ripe.append(group)
            elif whole:
                self.secagg_stats["corrupt_rounds"] += 1
                self.secagg_stats["corrupt_updates"] += len(group)
            elif age < self.secagg_wait:
                self._masked_age[step] = age + 1
                continue
            else:
                self.secagg_stats["dropped_rounds"] += 1
                self.secagg_stats["dropped_updates"] += len(group)
            del self._masked[step]
            self._masked_age.pop(step, None)
        return ripe

    def _sum_in_range(self, step: int, group: list[tuple[Update, float]]) -> bool:
        """Unmask a whole group and keep its sum for `_unmask`, unless it is out of range."""
        assert self.secagg is not None
        group.sort(key=lambda item: item[0].header.origin)
        summed = self.secagg.unmask([u.tensors for u, _t in group])
        try:
            self.secagg.check_sum(summed, [u.header.num_samples * u.header.mixing_weight for u, _t in group])
        except CorruptSum as exc:
            log.warning("peer %s refused the masked sum of step %d: %s", self.peer_id, step, exc)
            return False
        self._sums[step] = summed
        return True

    def _unmask(self, group: list[tuple[Update, float]]) -> tuple[dict[str, torch.Tensor], float, list[Applied]]:
        """The unmasked group sum, the members' total weight, and their Applied rows.

        Masked updates were pre-weighted by their senders, so the sum enters with
        weight 1 while its members' weights join the total (no staleness factor:
        the masks cancel only in the unweighted sum).
        """
        assert self.secagg is not None  # _ripe_masked returns groups only with keys
        self.secagg_stats["unmasked_rounds"] += 1
        rows, weight = [], 0.0
        for u, received_at in group:
            w = u.header.num_samples * u.header.mixing_weight
            rows.append(Applied(u.header, received_at, max(0, self.version - u.header.model_version), w))
            weight += w
        return self._sums.pop(group[0][0].header.round), weight, rows

    def schema(self) -> dict[str, tuple[int, ...]]:
        """The model's parameters {name: shape}: the server checks every update's frames against it."""
        return {n: tuple(s) for n, s in self._shapes.items()}

    def model_at(self, version: int | None, caller: Caller | None = None) -> tuple[int, dict[str, torch.Tensor]]:
        """Weights at `version` (None = latest) from the kept history; under mutual TLS to members only."""
        self.membership.check_reader(caller)
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

    def adopt(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Take a neighbour's weights as this peer's, numbered `version` (a restarted peer rejoining).

        The weights are copied exactly and checked as in `mix`; the history before is
        dropped, so a pull at an older version gets NOT_FOUND rather than other weights.
        """
        if version < self.version:
            raise ValueError(f"version {version} is below this peer's {self.version}")
        self.mix(state, 1.0)  # validates; lerp with weight 1 returns the end point exactly
        with self._lock:
            adopted = self._history[self.version]
            self._history.clear()
            self.version = version
            self._history[version] = adopted
            self._history_bytes = _state_bytes(adopted)

    def _snapshot(self) -> None:
        state = {n: t.detach().cpu().clone() for n, t in self.model.state_dict().items()}
        self._history[self.version] = state
        self._history_bytes += _state_bytes(state)
        # The newest version always stays, whatever its size.
        while len(self._history) > 1 and (len(self._history) > self._keep
                                          or self._history_bytes > self._keep_bytes):
            _v, old = self._history.popitem(last=False)
            self._history_bytes -= _state_bytes(old)

    def history(self) -> tuple[int, int]:
        """(versions held, their bytes): what GetModel pulls can still be served from."""
        with self._lock:
            return len(self._history), self._history_bytes

    def _remember(self, update_id: str) -> None:
        if len(self._seen) == self._seen.maxlen:
            self._seen_set.discard(self._seen[0])
        self._seen.append(update_id)
        self._seen_set.add(update_id)

    def _validate(self, update: Update) -> None:
        h: UpdateHeader = update.header
        if not 1 <= h.num_samples <= self.max_samples:
            raise UpdateRejected(f"num_samples must be in 1..{self.max_samples} (the run's largest batch "
                                 f"size), got {h.num_samples}")
        if h.round < 1 or h.model_version < 0:
            raise UpdateRejected(f"bad round {h.round} or model version {h.model_version}")
        last = self.inbox.max_round
        if last is not None and h.round > last:
            raise UpdateRejected(f"round {h.round} is beyond this run's {last} steps")
        if not 0.0 < h.mixing_weight <= 1.0:
            raise UpdateRejected(f"mixing weight must be in (0, 1], got {h.mixing_weight}")
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
        if not masked:  # a masked update's norm is known only in its group's sum (checked at apply)
            norm = l2_norm(update.tensors)
            if not norm <= self.max_update_norm:
                raise UpdateRejected(f"the update's L2 norm {norm:.3g} exceeds the bound {self.max_update_norm:g}")

    def _validate_masked(self, h: UpdateHeader) -> None:
        sa = self.secagg
        if sa is None:
            raise UpdateRejected(
                f"masked update ({h.defence}) but peer {self.peer_id} is in no secure-aggregation group"
            )
        if h.defence != sa.name and not h.defence.endswith("+" + sa.name):
            raise UpdateRejected(f"masked update says '{h.defence}', this peer's group is {sa.name}")
        if h.origin not in sa.group or h.origin == self.peer_id:
            # A who, not a what: no outsider may take a member's masked slot.
            raise PermissionDenied(f"masked update from {h.origin[:64]!r}, not another member of {list(sa.group)}")
