"""The malicious peer: an honest-looking gossip member that attacks what it receives.

It wraps an ordinary `p2p.peer.Peer` (so it trains, sends and aggregates like any
other member) and adds a capture path: every update it accepts is put on a bounded
queue, dropped and counted when the queue is full, and a worker thread pulls the
sender's weights at the update's model version and reconstructs the batch. The
gRPC threads only enqueue, so gossip never waits for an attack.

Transport, Ray and Prometheus stay outside: weights come through `fetch_weights`,
results leave through `report`, counters through an optional `observer`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import torch
from torch import nn

from attacker.api import Attack, Observation, Reconstruction
from gradleak.core.devices import resolve_device
from p2p.peer import Peer
from p2p.update import Update, UpdateHeader

log = logging.getLogger(__name__)

FetchWeights = Callable[[str, int], dict[str, torch.Tensor]]
Report = Callable[[UpdateHeader, str, Reconstruction], None]


class Observer(Protocol):
    """Receives the attacker's counters (the Ray actor maps them to Prometheus)."""

    def captured(self) -> None: ...
    def dropped(self) -> None: ...
    def queue_depth(self, depth: int) -> None: ...
    def attacked(self, header: UpdateHeader, attack: str, seconds: float) -> None: ...
    def failed(self, reason: str) -> None: ...


class _Silent:
    def captured(self) -> None: ...
    def dropped(self) -> None: ...
    def queue_depth(self, depth: int) -> None: ...
    def attacked(self, header: UpdateHeader, attack: str, seconds: float) -> None: ...
    def failed(self, reason: str) -> None: ...


class MaliciousPeer:
    """A Peer plus a capture queue and an attack worker thread."""

    def __init__(
        self, peer: Peer, *, attacks: Mapping[str, Attack], build_model: Callable[[], nn.Module],
        fetch_weights: FetchWeights, report: Report, input_shape: tuple[int, int, int],
        num_classes: int, queue_size: int = 16, max_batch_size: int = 8,
        device: str = "auto", observer: Observer | None = None,
    ) -> None:
        self.peer = peer
        self.attacks = dict(attacks)
        self.device = resolve_device(device)
        self._build_model = build_model
        self._fetch = fetch_weights
        self._report = report
        self._input_shape = input_shape
        self._num_classes = num_classes
        self._max_batch = max_batch_size
        self._queue: queue.Queue[Update] = queue.Queue(maxsize=queue_size)
        self._observer: Observer = observer or _Silent()
        self._stop = threading.Event()
        self._busy = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = {"captured": 0, "dropped": 0, "attacked": 0, "failed": 0, "skipped": 0}

    # -- the UpdateHandler protocol the gRPC server calls --------------------------
    def accept_update(self, update: Update, wire_bytes: int = 0) -> None:
        """Accept like an honest peer (which validates), then capture without blocking."""
        self.peer.accept_update(update, wire_bytes)
        self._capture(update)

    def model_at(self, version: int | None) -> tuple[int, dict[str, torch.Tensor]]:
        return self.peer.model_at(version)

    def _capture(self, update: Update) -> None:
        try:
            self._queue.put_nowait(update)
        except queue.Full:
            self.stats["dropped"] += 1
            self._observer.dropped()
            return
        self.stats["captured"] += 1
        self._observer.captured()
        self._observer.queue_depth(self._queue.qsize())

    # -- the worker ------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="attack-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def idle(self) -> bool:
        """True when nothing waits on the queue and no attack is running."""
        return self._queue.empty() and not self._busy.is_set()

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.idle():
                return True
            time.sleep(0.05)
        return self.idle()

    def queue_depth(self) -> int:
        return self._queue.qsize()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                update = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            self._busy.set()
            try:
                self._attack(update)
            except Exception as exc:  # noqa: BLE001 - one bad update must not stop the worker
                log.warning("attack on %s failed: %s", update.header.update_id, exc)
                self.stats["failed"] += 1
                self._observer.failed(type(exc).__name__)
            finally:
                self._observer.queue_depth(self._queue.qsize())
                self._busy.clear()

    def _attack(self, update: Update) -> None:
        h = update.header
        if h.num_samples > self._max_batch:
            self.stats["skipped"] += 1
            self._observer.failed("batch_too_large")
            return
        weights = self._fetch(h.sender, h.model_version)
        model = self._build_model()
        model.load_state_dict(weights)
        model.to(self.device)
        obs = Observation(
            gradients=tuple(
                update.tensors[name].to(device=self.device, dtype=torch.float32)
                for name, _ in model.named_parameters()
            ),
            batch_size=h.num_samples, input_shape=self._input_shape, num_classes=self._num_classes,
        )
        for name, attack in self.attacks.items():
            rec = attack.reconstruct(model, obs)
            self.stats["attacked"] += 1
            self._observer.attacked(h, name, float(rec.stats.get("seconds", 0.0)))
            self._report(h, name, rec)
