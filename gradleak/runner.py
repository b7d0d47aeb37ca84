"""Build a testbed from a RunConfig on Ray, run the gossip rounds, collect the results.

The same code runs embedded (a local Ray started here) or against a cluster
(`ray_address` in the config or RAY_ADDRESS).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from attacker.api import AttackConfig
from gradleak.config import RunConfig
from gradleak.data import Dataset, load_dataset, split
from gradleak.runtime.evaluator_node import EvaluatorActor
from gradleak.runtime.malicious_node import MaliciousActor
from gradleak.runtime.peer_node import PeerActor, PeerSpec
from gradleak.runtime.record import RunRecord
from p2p.secagg import create_group
from p2p.tls import TlsMaterial, make_test_pki

Progress = Callable[[str], None]
log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    metrics_url: str
    summary: list[dict[str, Any]]
    counts: dict[str, Any]
    attacker: dict[str, Any]
    accuracy: dict[str, float]
    seconds: float
    messages: int = 0
    wire_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def make_run_dir(out_dir: str, seed: int) -> Path:
    """A fresh directory per run: <out>/<UTC time>-s<seed>[-n]."""
    base = Path(out_dir) / time.strftime(f"%Y%m%d-%H%M%S-s{seed}", time.gmtime())
    path, n = base, 1
    while path.exists():
        path, n = Path(f"{base}-{n}"), n + 1
    path.mkdir(parents=True)
    return path


def nodes_without(resource: str) -> list[str]:
    """IDs of alive nodes with CPUs that do not declare `resource` (where honest peers go)."""
    return sorted(n["NodeID"] for n in ray.nodes()
                  if n["Alive"] and n["Resources"].get("CPU", 0) > 0 and resource not in n["Resources"])


def run_pki(peer_ids: list[str], host: str) -> dict[str, TlsMaterial]:
    """A private CA and one certificate per peer, valid for every address a peer may bind."""
    hosts = {"127.0.0.1", "localhost"}
    if host == "auto":
        hosts |= {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    else:
        hosts.add(host)
    _ca, material = make_test_pki(hosts=tuple(sorted(hosts)), peers=peer_ids)
    return material


def ensure_ray(cfg: RunConfig) -> bool:
    """Connect to the configured cluster or start a local Ray; True if we started it."""
    if ray.is_initialized():
        return False
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, _node_ip_address=cfg.telemetry.host,
                 log_to_driver=False, configure_logging=False)
    return True


class Testbed:
    """The live system of one run: evaluator, honest peers and the malicious peer."""

    __test__ = False  # not a pytest class, despite the name

    def __init__(self, cfg: RunConfig, progress: Progress = lambda _s: None) -> None:
        self.cfg = cfg.validate()
        self.progress = progress
        self.run_dir = make_run_dir(cfg.out_dir, cfg.seed)
        self.started_ray = False
        self.peers: list[Any] = []
        self.attacker: Any = None
        self.evaluator: Any = None
        self.addresses: list[dict[str, str]] = []
        self.metrics_url = ""
        self._messages = self._bytes = 0
        self._accuracy: dict[str, float] = {}

    def start(self) -> None:
        """Load data, start Ray if needed, create every actor and exchange addresses."""
        cfg = self.cfg
        data = load_dataset(cfg.data.dataset, data_root=cfg.data.data_root, image_size=cfg.data.image_size,
                            limit=cfg.data.limit, seed=cfg.seed)
        self.started_ray = ensure_ray(cfg)
        tel = cfg.telemetry
        self.evaluator = EvaluatorActor.options(num_cpus=0).remote(
            str(self.run_dir), host=tel.host, metrics_port=tel.metrics_port)
        self.metrics_url = f"http://{ray.get(self.evaluator.metrics_address.remote())}/metrics"
        specs = self._specs(data)
        a = cfg.attack
        peer_nodes = nodes_without(a.resource) if a.resource else []
        for i, spec in enumerate(specs[:-1]):
            # Honest peers stay off the nodes marked for the attacker.
            where = ({"scheduling_strategy": NodeAffinitySchedulingStrategy(peer_nodes[i % len(peer_nodes)], soft=False)}
                     if peer_nodes else {})
            self.peers.append(PeerActor.options(num_cpus=cfg.peers.num_cpus, num_gpus=cfg.peers.num_gpus,
                                                **where).remote(spec, self.evaluator))
        marker = {"resources": {a.resource: 1}} if a.resource else {}
        self.attacker = MaliciousActor.options(num_cpus=cfg.peers.num_cpus, num_gpus=a.num_gpus, **marker).remote(
            specs[-1], self.evaluator, attacks=a.attacks, fallback=a.fallback, max_age_s=a.max_age_s,
            attack_config=AttackConfig(max_iters=a.max_iters, seed=cfg.seed, time_budget_s=a.time_budget_s),
            queue_size=a.queue_size, max_batch_size=a.max_batch_size, device=a.device,
            attack_threads=a.threads,
        )
        self.addresses = ray.get([n.addresses.remote() for n in self.nodes])
        book = {a["peer_id"]: a["gossip"] for a in self.addresses}
        ray.get([n.set_members.remote(book) for n in self.nodes])
        self._write_targets()
        RunRecord(self.run_dir).write_config(cfg.to_dict())
        status = ray.get(self.attacker.status.remote())
        self.progress(f"{len(self.peers)} honest peers + 1 malicious peer (attacks on {status['device']}); "
                      f"leakage at {self.metrics_url}")

    @property
    def nodes(self) -> list[Any]:
        return [*self.peers, self.attacker]

    def _specs(self, data: Dataset) -> list[PeerSpec]:
        cfg, pc, gc = self.cfg, self.cfg.peers, self.cfg.gossip
        shards, test = split(data, pc.honest + 1, test_fraction=cfg.data.test_fraction, seed=cfg.seed)
        ids = [f"peer-{i}" for i in range(pc.honest)] + ["mallory"]
        tls = run_pki(ids, cfg.telemetry.host) if gc.tls else {}
        groups = create_group(ids, seed=cfg.seed) if pc.secagg else {}
        specs = []
        for i, shard in enumerate(shards):
            malicious = i == pc.honest
            specs.append(PeerSpec(
                peer_id=ids[i], role="malicious" if malicious else "honest", tls=tls.get(ids[i]),
                secagg=groups.get(ids[i]),
                shard_images=shard.images, shard_labels=shard.labels,
                test_images=test.images, test_labels=test.labels, input_shape=data.input_shape,
                num_classes=data.num_classes, model=pc.model,
                batch_size=min(pc.batch_sizes) if malicious else pc.batch_sizes[i % len(pc.batch_sizes)],
                defence="none" if malicious else pc.defences[i % len(pc.defences)],
                lr=pc.lr, optimizer=pc.optimizer, seed=cfg.seed * 1000 + i + 1, model_seed=cfg.seed,
                keep_versions=pc.keep_versions, fanout=gc.fanout, topology=gc.topology,
                timeout_s=gc.timeout_s, chunk_bytes=gc.chunk_bytes, host=cfg.telemetry.host,
                threads=pc.threads, device="cpu" if malicious else pc.device,
            ))
        return specs

    def _write_targets(self) -> None:
        """Prometheus file_sd list of every exporter of this run."""
        groups = [{"targets": [self.metrics_url.split("/")[2]], "labels": {"role": "evaluator"}}]
        groups += [{"targets": [a["metrics"]], "labels": {"role": a["role"]}} for a in self.addresses]
        (self.run_dir / "prometheus_targets.json").write_text(json.dumps(groups, indent=2))

    def run_rounds(self) -> None:
        """Synchronous gossip rounds: everyone steps and sends, then everyone applies."""
        gc, pc = self.cfg.gossip, self.cfg.peers
        for r in range(1, gc.rounds + 1):
            t0 = time.monotonic()
            sent = ray.get([n.step.remote(r) for n in self.nodes])
            self._messages += sum(s["sent"] for s in sent)
            self._bytes += sum(s["bytes"] for s in sent)
            evaluate = r % pc.eval_every == 0 or r == gc.rounds
            applied = ray.get([p.apply.remote(r, evaluate) for p in self.peers] + [self.attacker.apply.remote(r)])
            if evaluate:
                self._accuracy = {a["peer_id"]: x["accuracy"] for a, x in zip(self.addresses, applied)
                                  if x["accuracy"] is not None}
                self.progress(self._status_line(r))
            pause = gc.round_interval_s - (time.monotonic() - t0)
            if pause > 0:
                time.sleep(pause)

    def _status_line(self, r: int) -> str:
        counts = ray.get(self.evaluator.counts.remote())
        acc = sum(self._accuracy.values()) / max(1, len(self._accuracy))
        psnr = counts["mean_psnr"]
        return (f"round {r}/{self.cfg.gossip.rounds} | messages {self._messages} | honest accuracy "
                f"{acc:.2f} | reconstructions {counts['reconstructions']} | mean PSNR "
                f"{'-' if psnr is None else f'{psnr:.1f} dB'}")

    def drain(self) -> bool:
        """Give the attacker up to drain_timeout_s to finish what it captured."""
        timeout = self.cfg.attack.drain_timeout_s
        self.progress(f"rounds done; letting the attacker finish its queue (up to {timeout:.0f} s)")
        return bool(ray.get(self.attacker.wait_idle.remote(timeout)))

    def finish(self, seconds: float) -> RunResult:
        """Write summary and grid, gather the figures; actors keep serving until shutdown()."""
        pc = self.cfg.peers
        attacker = ray.get(self.attacker.status.remote())
        accuracy = [(pc.batch_sizes[i % len(pc.batch_sizes)], a["defence"], self._accuracy[a["peer_id"]])
                    for i, a in enumerate(self.addresses[:-1]) if a["peer_id"] in self._accuracy]
        extra = {"seconds": seconds, "messages": self._messages, "wire_bytes": self._bytes,
                 "attacker": attacker, "honest_accuracy": self._accuracy}
        summary = ray.get(self.evaluator.finish.remote(accuracy, extra))
        counts = ray.get(self.evaluator.counts.remote())
        return RunResult(self.run_dir, self.metrics_url, summary, counts, attacker, dict(self._accuracy),
                         seconds, self._messages, self._bytes)

    def shutdown(self) -> None:
        for n in [n for n in self.nodes if n is not None]:  # start() may have failed half-way
            try:
                ray.get(n.stop.remote(), timeout=10)
            except (ray.exceptions.RayError, TimeoutError) as exc:  # a dead actor has nothing to stop
                log.warning("stopping an actor failed: %s", exc)
            ray.kill(n)
        if self.evaluator is not None:
            ray.kill(self.evaluator)
        if self.started_ray:
            ray.shutdown()


def run(cfg: RunConfig, progress: Progress = print) -> RunResult:
    """Run one whole testbed: start, rounds, drain, outputs, shutdown."""
    t0 = time.monotonic()
    bed = Testbed(cfg, progress)
    try:
        bed.start()
        bed.run_rounds()
        bed.drain()
        return bed.finish(time.monotonic() - t0)
    finally:
        bed.shutdown()
