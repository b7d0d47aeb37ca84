"""Prometheus metrics of the testbed and the exporter each process starts.

Names follow Prometheus conventions: the `gradleak_` prefix, base units, `_total`
counters, `_ratio` for 0..1. Label values come only from small fixed grids
(attack, batch_size, defence, reason); per-update detail goes to the run record.
The defence and batch size of a received update are what its sender wrote in the
header, so those two labels pass through a `Grid`: the run's configured values, and
`other` for anything else (a member sending 300 made-up defences adds one series).
Every process (peer, malicious peer, evaluator) has its own registry and exporter;
the run writes a file_sd target list so Prometheus finds them all.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

LEAK = ("attack", "batch_size", "defence")
PSNR_BUCKETS = (5, 10, 15, 20, 25, 30, 35, 40, 50, 60, 80, 100)
RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
LAG_BUCKETS = (0, 1, 2, 3, 5, 8, 13, 21, 34)
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OTHER = "other"
LEARNED_VALUES = 32  # a grid not yet told its values admits this many, first come


class Grid:
    """The values one label may take; any other value is recorded as `other`.

    Given its values (the run's configured defences or batch sizes), the grid is fixed.
    Until then it admits the first LEARNED_VALUES distinct values, so a process whose
    run did not say still has a bounded number of series.
    """

    def __init__(self, values: Iterable[object] | None = None) -> None:
        self._lock = threading.Lock()
        self._values: set[str] = set()
        self._fixed = False
        if values is not None:
            self.fix(values)

    def fix(self, values: Iterable[object]) -> None:
        """From now on only these values (and what was already recorded) are labels."""
        with self._lock:
            self._values |= {str(v) for v in values}
            self._fixed = True

    def __call__(self, value: object) -> str:
        text = str(value)
        with self._lock:
            if text in self._values:
                return text
            if self._fixed or len(self._values) >= LEARNED_VALUES:
                return OTHER
            self._values.add(text)
            return text


class _OnGrid:
    """A labelled metric whose grid labels pass through their Grid on `labels(...)`."""

    def __init__(self, metric: Any, grids: dict[str, Grid]) -> None:
        self._metric = metric
        # prometheus_client keeps the label names in this (long-stable) attribute.
        self._grids = [grids.get(name) for name in metric._labelnames]

    def labels(self, *values: object) -> Any:
        return self._metric.labels(*(
            g(v) if g is not None else v for g, v in zip(self._grids, values, strict=True)
        ))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._metric, name)


class Metrics:
    """All gradleak metrics on one private registry (one instance per process).

    defences / batch_sizes: the run's configured values, the only ones used as label
    values (others become `other`); `known` sets them later.
    """

    def __init__(
        self, defences: Iterable[str] | None = None, batch_sizes: Iterable[int] | None = None
    ) -> None:
        self.grids = {"defence": Grid(defences), "batch_size": Grid(batch_sizes)}
        r = self.registry = CollectorRegistry()
        # gradleak_device_info{role, device} 1: the torch device this process computes on
        # (role honest or malicious; device cpu, cuda or cuda:N).
        self.device = Info("gradleak_device", "The torch device this process computes on.", registry=r)
        self.reconstructions = Counter(
            "gradleak_reconstructions_total", "Reconstructions scored by the evaluator.", LEAK, registry=r)
        self.psnr = Histogram(
            "gradleak_reconstruction_psnr_decibels", "PSNR of each reconstructed image against its truth.",
            LEAK, buckets=PSNR_BUCKETS, registry=r)
        self.ssim = Histogram(
            "gradleak_reconstruction_ssim", "SSIM of each reconstructed image against its truth.",
            LEAK, buckets=RATIO_BUCKETS, registry=r)
        self.label_accuracy = Histogram(
            "gradleak_reconstruction_label_accuracy_ratio", "Share of labels the attack got right, per update.",
            LEAK, buckets=RATIO_BUCKETS, registry=r)
        self.attack_seconds = Histogram(
            "gradleak_attack_duration_seconds", "Wall time of one reconstruction.",
            LEAK, buckets=SECONDS_BUCKETS, registry=r)
        self.attack_failures = Counter(
            "gradleak_attack_failures_total", "Captured updates the attacker could not attack.",
            ("reason",), registry=r)
        # The dashboards' capture/drop panels: captured = every update handed to the
        # scheduler, dropped = evicted because the scheduler was full (reason "capacity").
        self.captured = Counter(
            "gradleak_attack_captured_total", "Updates the malicious peer handed to its scheduler.",
            registry=r)
        self.dropped = Counter(
            "gradleak_attack_dropped_total", "Updates evicted because the attack scheduler was full.",
            registry=r)
        self.queue_depth = Gauge(
            "gradleak_attack_queue_depth", "Updates waiting for the attack worker.", registry=r)
        self.updates_received = Counter(
            "gradleak_attacker_updates_received_total", "Updates the malicious peer received.",
            ("batch_size", "defence"), registry=r)
        self.updates_attacked = Counter(
            "gradleak_attacker_updates_attacked_total", "Distinct updates the attacker attacked.",
            ("batch_size", "defence"), registry=r)
        self.updates_evicted = Counter(
            "gradleak_attacker_updates_evicted_total",
            "Received updates the attacker did not attack, by reason (capacity, stale, "
            "batch_too_large, unsupported, version_gone, failed; colluders: colluder, "
            "from_colluder).", ("reason",), registry=r)
        self.score_latency = Histogram(
            "gradleak_attacker_latency_seconds", "Seconds from receiving an update to scoring its reconstruction.",
            ("attack", "batch_size", "defence"), buckets=SECONDS_BUCKETS, registry=r)
        self.coverage = Gauge(
            "gradleak_attacker_coverage_ratio", "Share of received updates the attacker attacked.",
            registry=r)
        self.sent = Counter(
            "gradleak_gossip_messages_sent_total", "Updates a peer sent.", ("defence",), registry=r)
        self.sent_bytes = Counter(
            "gradleak_gossip_sent_bytes_total", "Wire bytes of updates a peer sent.", ("defence",), registry=r)
        self.received = Counter(
            "gradleak_gossip_messages_received_total", "Updates a peer accepted.", ("defence",), registry=r)
        self.received_bytes = Counter(
            "gradleak_gossip_received_bytes_total", "Wire bytes of updates a peer accepted.",
            ("defence",), registry=r)
        self.send_failures = Counter(
            "gradleak_gossip_send_failures_total", "Updates that could not be delivered.", ("code",), registry=r)
        self.accuracy = Gauge(
            "gradleak_model_accuracy_ratio", "Honest model accuracy on the held-out set.",
            ("batch_size", "defence"), registry=r)
        self.round = Gauge("gradleak_round", "Local steps this peer has completed.", registry=r)
        self.mixes = Counter(
            "gradleak_gossip_model_mixes_total", "Model averagings with a neighbour, by outcome (mixed, failed).",
            ("outcome",), registry=r)
        self.steps_refused = Counter(
            "gradleak_gossip_steps_refused_total", "Applies whose aggregate was refused and the model kept, "
            "by reason (not_finite, over_norm).", ("reason",), registry=r)
        self.update_lag = Histogram(
            "gradleak_gossip_update_lag_versions", "Local steps a receiver was ahead of an update's weights.",
            buckets=LAG_BUCKETS, registry=r)
        # Model gossip: the passive gossip-algebra attack's outcome at the end of the run
        # (labels from the run's config only: its topology name, the exchange).
        self.reconstructible = Gauge(
            "gradleak_reconstructible_nodes_ratio", "Share of honest nodes with at least one local step "
            "reconstructed >= 30 dB by the gossip-algebra attack.", ("topology", "exchange"), registry=r)
        # The driver's fault record, on the evaluator's exporter (the run's endpoint).
        self.peers_lost = Counter(
            "gradleak_peers_lost_total", "Honest peers whose host process was lost mid-run.", registry=r)
        self.peer_restarts = Counter(
            "gradleak_peer_restarts_total", "Lost honest peers restarted and rejoined.", registry=r)
        for name, metric in list(vars(self).items()):
            if set(getattr(metric, "_labelnames", ())) & set(self.grids):
                setattr(self, name, _OnGrid(metric, self.grids))

    def known(self, *, defences: Iterable[str] | None = None, batch_sizes: Iterable[int] | None = None) -> None:
        """Fix the label grids to the run's configured defences and batch sizes."""
        if defences is not None:
            self.grids["defence"].fix(defences)
        if batch_sizes is not None:
            self.grids["batch_size"].fix(batch_sizes)


def resolve_host(host: str) -> str:
    """'auto' = this node's own IP as Ray sees it (every actor binds and advertises its
    node's address on a cluster); anything else is used as given."""
    if host != "auto":
        return host
    import ray

    return str(ray.util.get_node_ip_address())


@dataclass(frozen=True)
class Exporter:
    """A running /metrics endpoint."""

    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}/metrics"


def start_exporter(metrics: Metrics, *, host: str = "127.0.0.1", port: int = 0) -> Exporter:
    """Serve `metrics` over HTTP on host:port (0 = a free port); return the bound address."""
    try:
        server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    return Exporter(host, int(server.server_port))
