"""The evaluator as a Ray actor with its own /metrics exporter (the run's leakage endpoint)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import ray

from gradleak.runtime.evaluation import TRUTH_FILES, Evaluator
from gradleak.runtime.record import RunRecord
from gradleak.runtime.telemetry import Metrics, resolve_host, start_exporter


class EvaluatorNode:
    """Thin adapter: owns the Evaluator, the run record and the leakage exporter."""

    def __init__(self, run_dir: str, *, host: str = "127.0.0.1", metrics_port: int = 0,
                 shard: int = 0, shards: int = 1) -> None:
        self.metrics = Metrics()
        self.exporter = start_exporter(self.metrics, host=resolve_host(host), port=metrics_port)
        # Each shard writes its share of the run's first truth files (gradleak.runtime.evaluator_shards).
        self.shard = shard
        self.evaluator = Evaluator(RunRecord(run_dir), self.metrics, truth_files=TRUTH_FILES // shards)
        self._claims: dict[str, str] = {}  # update id -> the colluder that took it for attack


    def pid(self) -> int:
        """This process's id (a fault test kills it)."""
        return os.getpid()

    def metrics_address(self) -> str:
        return self.exporter.address

    def register_truth(self, update_id: str, images: np.ndarray, labels: np.ndarray, **meta: Any) -> None:
        self.evaluator.register_truth(update_id, images, labels, **meta)

    def score(self, update_id: str, attack: str, images: np.ndarray, labels: np.ndarray,
              stats: dict[str, Any], *, received_at: float | None = None, step: int | None = None) -> None:
        self.evaluator.score(update_id, attack, images, labels, stats, received_at=received_at, step=step)

    def claim(self, update_id: str, attacker: str) -> bool:
        """The colluders' shared pool: True for the first attacker to take `update_id` (and it again)."""
        return self._claims.setdefault(update_id, attacker) == attacker

    def last_shipped(self, origin: str) -> dict[str, int] | None:
        return self.evaluator.last_shipped(origin)

    def count_fault(self, lost: int = 0, restarted: int = 0) -> None:
        """The driver's fault counters (peers lost, peers restarted) on the run's exporter."""
        self.metrics.peers_lost.inc(lost)
        self.metrics.peer_restarts.inc(restarted)

    def set_reconstructible(self, topology: str, exchange: str, share: float) -> None:
        """The gossip-algebra attack's share of honest nodes reconstructed (the driver joins it)."""
        self.metrics.reconstructible.labels(topology, exchange).set(float(share))

    def log_updates(self, rows: list[dict[str, Any]]) -> None:
        self.evaluator.record.append_updates(rows)

    def counts(self) -> dict[str, Any]:
        return {**self.evaluator.counts(), "mean_psnr": self.evaluator.mean_psnr()}

    def export(self) -> dict[str, Any]:
        """What the summary needs of this shard (its rows, best examples and counters)."""
        return self.evaluator.export()

    def finish(self, honest_accuracy: list[tuple[int, str, float]], extra: dict[str, Any],
               others: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Write the summary, from this shard's rows and the other shards' exports."""
        for part in others or []:
            self.evaluator.absorb(part)
        acc: dict[tuple[int, str], list[float]] = {}
        for bs, defence, value in honest_accuracy:
            acc.setdefault((bs, defence), []).append(value)
        mean = {k: float(np.mean(v)) for k, v in acc.items()}
        return self.evaluator.write_outputs(mean, extra)


EvaluatorActor = ray.remote(EvaluatorNode)
