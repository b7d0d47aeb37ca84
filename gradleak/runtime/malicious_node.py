"""The malicious peer as a network node and Ray actor: a PeerNode whose handler captures.

Only what differs from an honest node is here: the handler is a MaliciousPeer,
weights are pulled over gRPC from the update's sender, reconstructions go to the
evaluator, and the attacker's counters go to Prometheus.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import ray
import torch

from attacker.api import AttackConfig, Reconstruction, create_attack
from attacker.label_prior import LabelPrior
from attacker.scheduler import CAPACITY
from gradleak.runtime.active_strategy import ACTIVE_STRATEGIES, StateOverride
from gradleak.runtime.malicious import MaliciousPeer
from gradleak.runtime.peer_node import PeerNode, PeerSpec
from gradleak.runtime.telemetry import Metrics
from gradleak.runtime.transcript import TranscriptWriter
from p2p.identity import Caller
from p2p.update import Update, UpdateHeader

REPORTS_IN_FLIGHT = 8  # reconstructions handed to the evaluator and not yet scored, at most

log = logging.getLogger(__name__)

AUX_SAMPLES = 512  # of its own shard, for label counts: a forward pass per attacked update


class _PromObserver:
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def received(self, header: UpdateHeader) -> None:
        self.m.captured.inc()
        self.m.updates_received.labels(str(header.num_samples), header.defence).inc()

    def evicted(self, reason: str) -> None:
        if reason == CAPACITY:
            self.m.dropped.inc()
        self.m.updates_evicted.labels(reason).inc()

    def queue_depth(self, depth: int) -> None:
        self.m.queue_depth.set(depth)

    def attacked(self, header: UpdateHeader, attack: str, seconds: float) -> None:
        self.m.attack_seconds.labels(attack, str(header.num_samples), header.defence).observe(seconds)

    def scored(self, header: UpdateHeader, attack: str, latency_s: float) -> None:
        self.m.score_latency.labels(attack, str(header.num_samples), header.defence).observe(latency_s)

    def done(self, header: UpdateHeader) -> None:
        self.m.updates_attacked.labels(str(header.num_samples), header.defence).inc()

    def coverage(self, ratio: float) -> None:
        self.m.coverage.set(ratio)

    def failed(self, reason: str) -> None:
        self.m.attack_failures.labels(reason).inc()


ModelStrategy = Callable[[str, int, int, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
# What the malicious peer sends its neighbours in model gossip, by name (MaliciousNode.model_for).
MODEL_STRATEGIES: dict[str, ModelStrategy] = {"honest": lambda _neighbour, _step, _round, z: z}
# The active ones need the node (its inbox, graph, record): built per node (runtime/active_strategy.py).
STRATEGY_NAMES = (*MODEL_STRATEGIES, *ACTIVE_STRATEGIES)


class MaliciousNode(PeerNode):
    """A gossip member that reconstructs the private batches behind the updates it receives."""

    def __init__(
        self, spec: PeerSpec, evaluator: Any = None, *, attacks: tuple[str, ...] = ("auto",),
        fallback: tuple[str, ...] = ("analytic", "idlg", "dlg"),
        attack_config: AttackConfig | None = None,
        attack_params: Mapping[str, Mapping[str, Any]] | None = None, queue_size: int = 16,
        max_batch_size: int = 8, max_age_s: float | None = None, device: str = "auto",
        attack_threads: int = 1, run_dir: str | None = None, transcript_bytes: int = 0,
        model_strategy: str = "honest", transcript_subdir: str | None = None, shared_pool: bool = False,
        colluders: tuple[str, ...] = (), shard_label_prior: bool = False,
    ) -> None:
        if model_strategy not in STRATEGY_NAMES:
            raise ValueError(f"unknown model strategy '{model_strategy}' (known: {', '.join(STRATEGY_NAMES)})")
        # Set before the base __init__, which calls make_handler() and starts the server.
        self.transcript = (TranscriptWriter(
            run_dir, max_bytes=transcript_bytes, model=spec.model, input_shape=spec.input_shape,
            num_classes=spec.num_classes, attack_config=dataclasses.asdict(attack_config or AttackConfig()),
            attack_params=attack_params,
            pull=self._pull_weights, subdir=transcript_subdir,
        ) if run_dir is not None and transcript_bytes > 0 else None)
        self._attacks = () if tuple(attacks) == ("auto",) else tuple(attacks)
        # A crafted override makes an imprinted ReLU MLP read out whole batches: try that first
        # (it declines any other model).
        self._fallback = (("imprint",) if model_strategy == "crafted" and "imprint" not in fallback else ()) + tuple(fallback)
        self._attack_config = attack_config or AttackConfig()
        self._attack_params = dict(attack_params or {})  # name -> attack.params.NAME
        self._queue_size = queue_size
        self._max_age_s = max_age_s
        self._max_batch_size = max_batch_size
        self._device = device
        self._colluders = tuple(c for c in colluders if c != spec.peer_id)  # the other malicious peers
        self._shared_pool = shared_pool and evaluator is not None  # colluders: the evaluator holds the claims
        self.model_strategy = model_strategy
        # Off by default: the one live run with it (docs/live.md) showed no gain in label
        # accuracy at B = 2-8 on peers at 0.91+ accuracy, where the aux counts are neutral.
        self._shard_label_prior = shard_label_prior
        self._reports: deque[Any] = deque()  # evaluator.score refs not yet settled
        self._reports_lock = threading.Lock()
        self._active: StateOverride | None = None  # accept_update may run before __init__ ends
        super().__init__(spec, evaluator)
        self._active = ACTIVE_STRATEGIES[model_strategy](self) if model_strategy in ACTIVE_STRATEGIES else None
        torch.set_num_threads(max(spec.threads, attack_threads))
        self.malicious.start()
        self.metrics.device.info({"role": "malicious", "device": str(self.malicious.device)})
        log.warning("malicious peer %s attacks on %s", spec.peer_id, self.malicious.device)

    def make_handler(self) -> MaliciousPeer:
        config, params = self._attack_config, self._attack_params
        self.malicious = MaliciousPeer(
            self.peer, attacks={name: create_attack(name, config, params.get(name)) for name in self._attacks},
            fallback=[create_attack(name, config, params.get(name)) for name in self._fallback],
            build_model=self.build_model, fetch_weights=self._fetch_weights, report=self._report,
            input_shape=self.spec.input_shape, num_classes=self.spec.num_classes,
            queue_size=self._queue_size, max_batch_size=self._max_batch_size,
            max_age_s=self._max_age_s, device=self._device, observer=_PromObserver(self.metrics),
            claim=self._claim if self._shared_pool else None, colluders=self._colluders,
            label_prior=_own_shard(self.spec) if self._shard_label_prior else None,
        )
        return self.malicious

    def model_for(self, neighbour: str, step: int, mix_round: int, z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The hook of active model-gossip attacks: the model `neighbour` gets at (step, mix_round).

        Strategy "honest" sends z, the model this peer averages with, to everyone; an active
        one (ACTIVE_STRATEGIES: state-override, crafted) may send each neighbour another
        one. The peer's own averaging always continues from its true z.
        """
        if self._active is not None:
            return self._active(neighbour, step, mix_round, z)
        return MODEL_STRATEGIES[self.model_strategy](neighbour, step, mix_round, z)

    def on_model_sent(self, update: Update, neighbour: str, status: str) -> None:
        """Its own model messages go to the transcript too (the gossip algebra needs them)."""
        if self.transcript is not None:
            self.transcript.add_sent(update, neighbour, status)

    def accept_update(self, update: Update, wire_bytes: int, caller: Caller | None = None) -> None:
        received_at = time.time()
        super().accept_update(update, wire_bytes, caller)  # raises on a rejected update: not transcribed
        if self._active is not None:
            self._active.received(update)
        if self.transcript is not None:
            self.transcript.add_update(update, received_at)

    def _claim(self, update_id: str) -> bool:
        """The colluders' shared pool: True if no other attacker of the run took this update."""
        assert self.evaluators is not None  # the shared pool needs an evaluator
        return bool(ray.get(self.evaluators.for_update(update_id).claim.remote(update_id, self.spec.peer_id)))

    def _fetch_weights(self, sender: str, version: int) -> dict[str, torch.Tensor]:
        if self._active is not None and (chosen := self._active.weights_for(sender, version)) is not None:
            return chosen  # a gradient read back after an override: taken at the attacker's theta*
        _v, state = self.client(sender).get_model(version)
        if self.transcript is not None:
            self.transcript.add_weights(sender, version, state)
        return state

    def _pull_weights(self, sender: str, version: int) -> dict[str, torch.Tensor]:
        """The transcript's own pull (weights of updates the attacker did not attack)."""
        _v, state = self.client(sender).get_model(version)
        return state

    def _report(self, header: UpdateHeader, attack: str, rec: Reconstruction, received_at: float) -> None:
        """Hand a reconstruction to the evaluator without waiting for its score (up to
        REPORTS_IN_FLIGHT outstanding): scoring is the evaluator's time, not the worker's."""
        if self.evaluators is None:
            return
        stats = {k: v for k, v in rec.stats.items() if isinstance(v, (int, float, str, bool))}
        ref = self.evaluators.for_update(header.update_id).score.remote(
            header.update_id, attack, rec.images.detach().cpu().numpy(),
            rec.labels.detach().cpu().numpy(), stats, received_at=received_at, step=header.round,
        )
        with self._reports_lock:
            self._reports.append(ref)
            oldest = self._reports.popleft() if len(self._reports) > REPORTS_IN_FLIGHT else None
        if oldest is not None:
            self._settle([oldest])

    def _settle(self, refs: list[Any]) -> None:
        try:
            ray.get(refs)
        except Exception as exc:  # noqa: BLE001 - a refused score must not stop the worker
            log.warning("the evaluator refused a score: %s", exc)

    def flush_reports(self) -> None:
        """Wait for every reconstruction handed to the evaluator to be scored."""
        with self._reports_lock:
            refs, self._reports = list(self._reports), deque()
        if refs:
            self._settle(refs)

    def status(self) -> dict[str, Any]:
        """The attacker's part of summary.json (see MaliciousPeer.status)."""
        self.flush_reports()  # what it reports attacked, the evaluator has scored
        return {**self.malicious.status(), "queue": self.malicious.queue_depth(),
                "idle": self.malicious.idle(), "device": str(self.malicious.device),
                "transcript": self.transcript.stats() if self.transcript is not None else None}

    def wait_idle(self, timeout: float) -> bool:
        idle = self.malicious.wait_idle(timeout)
        if idle:
            self.flush_reports()
        return idle

    def stop(self) -> None:
        self.malicious.stop()
        self.flush_reports()
        if self.transcript is not None:  # before the clients close: pending pulls need them
            self.transcript.close()
        super().stop()


MaliciousActor = ray.remote(MaliciousNode)


def _own_shard(spec: PeerSpec) -> LabelPrior | None:
    """The attacker's own training shard (at most AUX_SAMPLES) as label-count aux data,
    or None where it cannot serve (logged): a member holds data like its victims'."""
    try:
        return LabelPrior.from_data(torch.as_tensor(spec.shard_images[:AUX_SAMPLES]),
                                    torch.as_tensor(spec.shard_labels[:AUX_SAMPLES]), spec.num_classes)
    except ValueError as exc:
        log.warning("own shard not usable for label counts: %s", exc)
        return None
