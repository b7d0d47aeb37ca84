"""The malicious peer: an honest-looking gossip member that attacks what it receives.

It wraps an ordinary `p2p.peer.Peer` (so it trains, sends and aggregates like any
other member) and adds a capture path: every update it accepts goes to the attack
scheduler (attacker.scheduler: fair across (batch size, defence) groups, freshest
first, bounded, stale ones evicted and counted by reason), and a worker thread takes
the next job, pulls the sender's weights at the update's model version and
reconstructs the batch under the attack's time budget. The gRPC threads only hand
the update over, so gossip never waits for an attack.

Attacks: either a fixed set, each run on every attacked update, or "auto": per
update, the first attack of the fallback chain that supports it (attacker.api
.choose_attack). Transport, Ray and Prometheus stay outside: weights come through
`fetch_weights`, results leave through `report`, counters through an `observer`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from attacker.api import Attack, Observation, Reconstruction, choose_attack
from attacker.label_prior import LabelPrior
from attacker.scheduler import CAPACITY, Job, Scheduler
from gradleak.core.devices import resolve_device
from p2p.errors import VersionNotFound
from p2p.identity import Caller
from p2p.peer import Peer
from p2p.update import Update, UpdateHeader

log = logging.getLogger(__name__)

FetchWeights = Callable[[str, int], dict[str, torch.Tensor]]
# (header, attack name, reconstruction, received_at Unix seconds)
Report = Callable[[UpdateHeader, str, Reconstruction, float], None]

LATENCY_WINDOW = 4096  # receive-to-score latencies kept for the status quantiles
COLLUDER = "colluder"  # discard reason: a colluding attacker already took this update
# Refusal reason: the update comes from a colluder, whose batch the pool already holds
# (there is no truth behind it to score, and nothing private to learn).
FROM_COLLUDER = "from_colluder"
# update id -> True if this attacker may attack it (the colluders' shared pool), else False
Claim = Callable[[str], bool]


class Observer(Protocol):
    """Receives the attacker's counters (the Ray actor maps them to Prometheus)."""

    def received(self, header: UpdateHeader) -> None: ...
    def evicted(self, reason: str) -> None: ...
    def queue_depth(self, depth: int) -> None: ...
    def attacked(self, header: UpdateHeader, attack: str, seconds: float) -> None: ...
    def scored(self, header: UpdateHeader, attack: str, latency_s: float) -> None: ...
    def done(self, header: UpdateHeader) -> None: ...
    def coverage(self, ratio: float) -> None: ...
    def failed(self, reason: str) -> None: ...


class _Silent:
    def received(self, header: UpdateHeader) -> None: ...
    def evicted(self, reason: str) -> None: ...
    def queue_depth(self, depth: int) -> None: ...
    def attacked(self, header: UpdateHeader, attack: str, seconds: float) -> None: ...
    def scored(self, header: UpdateHeader, attack: str, latency_s: float) -> None: ...
    def done(self, header: UpdateHeader) -> None: ...
    def coverage(self, ratio: float) -> None: ...
    def failed(self, reason: str) -> None: ...


@dataclass(frozen=True)
class Captured:
    """A scheduler job's payload: the update and its wall-clock receive time."""

    update: Update
    received_at: float  # Unix seconds


class MaliciousPeer:
    """A Peer plus an attack scheduler and an attack worker thread."""

    def __init__(
        self, peer: Peer, *, attacks: Mapping[str, Attack] | None = None,
        fallback: Sequence[Attack] = (), build_model: Callable[[], nn.Module],
        fetch_weights: FetchWeights, report: Report, input_shape: tuple[int, int, int],
        num_classes: int, queue_size: int = 16, max_batch_size: int = 8,
        max_age_s: float | None = None, device: str = "auto", observer: Observer | None = None,
        claim: Claim | None = None, colluders: Sequence[str] = (),
        label_prior: LabelPrior | None = None,
    ) -> None:
        if not attacks and not fallback:
            raise ValueError("need attacks to run, or a fallback chain to choose from")
        self.peer = peer
        self.label_prior = label_prior  # its own shard: what batch label counts lean on
        self.attacks = dict(attacks or {})
        self.fallback = list(fallback)
        self.device = resolve_device(device)
        self._build_model = build_model
        self._fetch = fetch_weights
        self._report = report
        self._input_shape = input_shape
        self._num_classes = num_classes
        self._max_batch = max_batch_size
        self._observer: Observer = observer or _Silent()
        self._claim = claim
        self._colluders = frozenset(colluders)
        self.scheduler = Scheduler(queue_size, max_age_s=max_age_s, on_evict=self._evicted)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        # per attack run, not per update; models_received: model gossip messages (not attacked)
        self.stats = {"reconstructions": 0, "failed": 0, "models_received": 0}
        self.chosen: dict[str, int] = {}  # auto mode: updates attacked by each attack
        # Worker seconds by stage (fetch the sender's weights, build the model, attack, report
        # to the evaluator): where the attacker's time goes besides the attacks themselves.
        self.seconds: dict[str, float] = {"fetch": 0.0, "build": 0.0, "attack": 0.0, "report": 0.0}

    # -- the UpdateHandler protocol the gRPC server calls --------------------------
    def accept_update(self, update: Update, wire_bytes: int = 0, caller: Caller | None = None) -> None:
        """Accept like an honest peer (which validates), then capture without blocking.

        Model messages (model gossip) are averaged like an honest peer's and counted, not
        attacked: the live attacks invert gradients; the transcript keeps the models.
        """
        self.peer.accept_update(update, wire_bytes, caller)
        if update.header.kind == "model":
            with self._lock:
                self.stats["models_received"] += 1
            return
        self._capture(update)

    def model_at(self, version: int | None, caller: Caller | None = None) -> tuple[int, dict[str, torch.Tensor]]:
        return self.peer.model_at(version, caller)

    def schema(self) -> dict[str, tuple[int, ...]]:
        return self.peer.schema()

    def capture(self, update: Update) -> None:
        """Queue a gradient the attacker derived itself (an active strategy's read-back)."""
        self._capture(update)

    def _capture(self, update: Update) -> None:
        h = update.header
        payload = Captured(update, time.time())
        self._observer.received(h)
        group = (h.num_samples, h.defence)
        if h.origin in self._colluders:
            self.scheduler.refuse(h.update_id, group, FROM_COLLUDER, payload)
        elif h.num_samples > self._max_batch:
            self.scheduler.refuse(h.update_id, group, "batch_too_large", payload)
        else:
            self.scheduler.put(h.update_id, group, payload)
        self._observer.queue_depth(self.scheduler.pending())
        self._observer.coverage(self.scheduler.counts().coverage)

    def _evicted(self, job: Job, reason: str) -> None:
        self._observer.evicted(reason)

    # -- the worker ------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="attack-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.scheduler.stop()
        if self._thread is not None:
            self._thread.join(timeout)

    def idle(self) -> bool:
        """True when nothing waits in the scheduler and no attack is running."""
        return self.scheduler.idle()

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.idle():
                return True
            time.sleep(0.05)
        return self.idle()

    def queue_depth(self) -> int:
        return self.scheduler.pending()

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self.scheduler.take(timeout=0.5)
            if job is None:
                continue
            try:
                # Claimed when taken, not when received: a colluder whose copy went stale in
                # its queue leaves the update to one that can still attack it.
                taken = self._claim is None or self._claim(job.payload.update.header.update_id)
                reason = self._attack(job.payload) if taken else COLLUDER
            except VersionNotFound as exc:
                log.info("weights of %s are gone: %s", job.key, exc)
                reason = "version_gone"
            except Exception as exc:  # noqa: BLE001 - one bad update must not stop the worker
                log.warning("attack on %s failed: %s", job.key, exc)
                self._observer.failed(type(exc).__name__)
                reason = "failed"
            if reason is None:
                self.scheduler.done(job)
                self._observer.done(job.payload.update.header)
            else:
                self.scheduler.discard(job, reason)
            self._observer.queue_depth(self.scheduler.pending())
            self._observer.coverage(self.scheduler.counts().coverage)

    def _attack(self, captured: Captured) -> str | None:
        """Attack one update; None when at least one attack ran, else the discard reason."""
        update = captured.update
        h = update.header
        t0 = time.perf_counter()
        weights = self._fetch(h.sender, h.model_version)
        t1 = time.perf_counter()
        model = self._build_model()
        model.load_state_dict(weights)
        model.to(self.device)
        self._spend("fetch", t1 - t0)
        self._spend("build", time.perf_counter() - t1)
        obs = Observation(
            gradients=tuple(
                update.tensors[name].to(device=self.device, dtype=torch.float32)
                for name, _ in model.named_parameters()
            ),
            batch_size=h.num_samples, input_shape=self._input_shape, num_classes=self._num_classes,
            label_prior=self.label_prior,
        )
        if self.attacks:
            runs = list(self.attacks.items())
        else:
            chosen, reasons = choose_attack(self.fallback, model, obs)
            if chosen is None:
                log.info("no attack of the chain supports %s: %s", h.update_id, reasons)
                return "unsupported"
            runs = [(chosen.name, chosen)]
        ran = 0
        for name, attack in runs:
            t2 = time.perf_counter()
            try:
                rec = attack.reconstruct(model, obs)
            except Exception as exc:  # noqa: BLE001 - the other attacks may still run
                log.warning("attack %s on %s failed: %s", name, h.update_id, exc)
                self._observer.failed(type(exc).__name__)
                with self._lock:
                    self.stats["failed"] += 1
                continue
            self._observer.attacked(h, name, float(rec.stats.get("seconds", 0.0)))
            t3 = time.perf_counter()
            self._spend("attack", t3 - t2)
            self._report(h, name, rec, captured.received_at)
            self._spend("report", time.perf_counter() - t3)
            latency = max(0.0, time.time() - captured.received_at)
            self._observer.scored(h, name, latency)
            with self._lock:
                self.stats["reconstructions"] += 1
                self._latencies.append(latency)
                if not self.attacks:
                    self.chosen[name] = self.chosen.get(name, 0) + 1
            ran += 1
        return None if ran else "failed"

    def _spend(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds

    # -- what the run reports --------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """received, attacked (distinct updates), evicted by reason, coverage, pending,
        in_flight, latency_p50_s / latency_p95_s (receive to score), and the per-run counts."""
        c = self.scheduler.counts()
        with self._lock:
            lat = np.asarray(self._latencies, dtype=np.float64)
            extra: dict[str, Any] = {**self.stats, "chosen": dict(self.chosen),
                                     "worker_seconds": {k: round(v, 3) for k, v in self.seconds.items()}}
        return {
            "received": c.received, "attacked": c.attacked, "evicted": c.evicted,
            "coverage": c.coverage, "pending": c.pending, "in_flight": c.in_flight,
            "latency_p50_s": float(np.quantile(lat, 0.5)) if lat.size else None,
            "latency_p95_s": float(np.quantile(lat, 0.95)) if lat.size else None,
            # Earlier fields that sweeps and reports read: captured + dropped = received,
            # dropped = evicted because the scheduler was full.
            "captured": c.received - c.evicted.get(CAPACITY, 0), "dropped": c.evicted.get(CAPACITY, 0),
            **extra,
        }
