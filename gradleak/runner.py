"""Build a testbed from a RunConfig on Ray, let the network run, collect the results.

The driver only starts, watches and stops the network: in async mode (the default)
every peer steps on its own clock; in rounds mode the driver clocks lock-step rounds
(deterministic, bit-reproducible for a seed). The same code runs embedded (a local
Ray started here) or against a cluster (`ray_address` in the config or RAY_ADDRESS).

Every wait here is sliced (`_get`), so a stop request (Ctrl-C, SIGTERM) is seen
within a fraction of a second, during start-up too.

Faults (async mode): a peer host found dead at a watch poll is recorded, re-created
and its peers rejoin (new addresses to everyone, the current model from a live
neighbour, the rest of their steps; gradleak.runtime.faults has the rules). A lost
attacker or evaluator ends the run: what was recorded is kept, the summary names the
lost actor, and `run` raises ActorLost (the CLI: one line, exit 1).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from gradleak.attackers import attacker_name, pool_status
from gradleak.cell_placement import CellNodes
from gradleak.config import RunConfig
from gradleak.core.colluders import attacker_ids, honest_ids, placement_record
from gradleak.data import Dataset, load_dataset, split
from gradleak.placement import FitError, Node, Plan, plan
from gradleak.runtime.evaluation import summarise
from gradleak.runtime.evaluator_node import EvaluatorActor
from gradleak.runtime.evaluator_shards import EvaluatorShards, merge_counts, merge_shipped
from gradleak.runtime.faults import FaultLog, rejoin_sources
from gradleak.runtime.host import PeerHostActor
from gradleak.runtime.malicious_node import MaliciousActor
from gradleak.runtime.peer_node import PeerSpec
from gradleak.runtime.record import RunRecord
from gradleak.runtime.summary import accuracy_timeline
from gradleak.specs import peer_spec
from p2p.secagg import create_group
from p2p.tls import TlsMaterial, make_test_pki

Progress = Callable[[str], None]
log = logging.getLogger(__name__)
START_TIMEOUT_S = 180.0  # actors not up by then: the cluster is busy or short
RESEED = 1_000_003  # a restarted peer's seed moves by this per incarnation: it draws other batches
EVALUATOR = "the evaluator"


class Interrupted(Exception):
    """A stop was requested (Ctrl-C, SIGTERM) while the run was starting or running."""


class ActorLost(ConnectionError):
    """An actor the run cannot go on without (the attacker, the evaluator) is gone.

    A ConnectionError, so the CLI reports it in one line with exit status 1. Raised by
    `run` after the summary of what was recorded until then is written.
    """


def _one_line(exc: BaseException) -> str:
    """Ray's death reports run over many lines: the first that says something."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


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
    interrupted: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def make_run_dir(out_dir: str, seed: int) -> Path:
    """A fresh directory per run: <out>/<UTC time>-s<seed>[-n]."""
    base = Path(out_dir) / time.strftime(f"%Y%m%d-%H%M%S-s{seed}", time.gmtime())
    path, n = base, 1
    while path.exists():
        path, n = Path(f"{base}-{n}"), n + 1
    path.mkdir(parents=True)
    return path


def cluster_nodes() -> list[tuple[str, Node]]:
    """(node id, what it can host) of every alive node with CPUs."""
    out = []
    for n in ray.nodes():
        r = n["Resources"]
        if n["Alive"] and r.get("CPU", 0) > 0:
            custom = frozenset(k for k in r if k not in ("CPU", "GPU", "memory", "object_store_memory")
                               and not k.startswith("node:") and not k.startswith("accelerator_type"))
            out.append((n["NodeID"], Node(float(r["CPU"]), float(r.get("GPU", 0.0)), custom)))
    return sorted(out)


def run_pki(peer_ids: list[str], host: str) -> dict[str, TlsMaterial]:
    """A private CA and one certificate per peer, valid for every address a peer may bind.

    Each certificate names its peer (URI SAN gradleak://peer/<id>), so a peer's server
    knows which member a call comes from and refuses updates sent in another's name.
    """
    hosts = {"127.0.0.1", "localhost"}
    if host == "auto":
        hosts |= {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    else:
        hosts.add(host)
    _ca, material = make_test_pki(hosts=tuple(sorted(hosts)), peers=peer_ids)
    return material


def ensure_ray(cfg: RunConfig) -> bool:
    """Connect to the configured cluster, or start a fresh local Ray; True if we started it.

    Without an address this never joins another local instance (a plain `ray.init()`
    would join the last one `ray start` or a test cluster recorded in /tmp/ray).
    """
    if ray.is_initialized():
        return False
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, log_to_driver=False)
    else:
        host = cfg.telemetry.host if cfg.telemetry.host != "auto" else "127.0.0.1"
        ray.init(address="local", include_dashboard=False, _node_ip_address=host,
                 log_to_driver=False, configure_logging=False)
    return True


def check_local_gpus(cfg: RunConfig) -> None:
    """A run that starts its own local Ray computes on this machine: a device of cuda (the
    attacker's with --attack-gpus and no --device, or an explicit cuda) needs a GPU torch sees
    here. FitError, one line, before anything starts. On a cluster each actor checks on its node."""
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if (address and address != "local") or ray.is_initialized() or torch.cuda.is_available():
        return
    a, pc = cfg.attack, cfg.peers
    asks, fallbacks = [], []
    if a.effective_device == "cuda":
        asks.append(f"the attacker (--attack-gpus {a.num_gpus:g}, device cuda)" if a.device is None
                    else "the attacker (--device cuda)")
        fallbacks.append("--device auto")
    if pc.effective_device == "cuda":
        asks.append(f"the honest peers (--peer-gpus {pc.num_gpus:g}, device cuda)" if pc.device is None
                    else "the honest peers (--peer-device cuda)")
        fallbacks.append("--peer-device auto")
    if asks:
        raise FitError(f"{' and '.join(asks)} asked for a GPU but torch sees no CUDA device on this "
                       f"machine; drop the GPU request, or pass {' '.join(fallbacks)} to fall back "
                       "to the CPU")


def driver_node() -> NodeAffinitySchedulingStrategy:
    """Hard affinity to the node this driver runs on."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def _start_error(exc: ray.exceptions.RayError) -> str:
    """The one line that says why an actor could not start (its exception, not Ray's traceback)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", ln)]
    return (errors or lines or [type(exc).__name__])[-1]


def fit(cfg: RunConfig) -> Plan:
    """How the run's peers fit the cluster Ray is connected to (FitError if they cannot)."""
    pc, ac = cfg.peers, cfg.attack
    return plan([n for _id, n in cluster_nodes()], honest=pc.honest, per_process=pc.per_process,
                host_cpus=pc.num_cpus, attacker_cpus=pc.num_cpus, attacker_gpus=ac.num_gpus,
                peer_gpus=pc.num_gpus, attacker_resource=ac.resource, attackers=ac.count)


def member_ids(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """(honest ids in index order, the malicious peers' ids in slot order) of a run."""
    a, h = cfg.attack, cfg.peers.honest
    return honest_ids(h), attacker_ids(h, a.count, a.placement, cfg.seed)


class Testbed:
    """The live system of one run: evaluator, honest peer hosts and the malicious peer."""

    __test__ = False  # not a pytest class, despite the name

    def __init__(self, cfg: RunConfig, progress: Progress = lambda _s: None, *,
                 handle_signals: bool = False, nodes: CellNodes | None = None) -> None:
        self.cfg = cfg.validate()
        self.placed = nodes  # a sweep's choice of nodes (pinned); None: the fit and Ray choose
        # SIGINT/SIGTERM become a stop request (main thread only: the CLI, not tests).
        self.handle_signals = handle_signals and threading.current_thread() is threading.main_thread()
        self._previous_handlers: dict[int, Any] = {}
        self.progress = progress
        self.run_dir = make_run_dir(cfg.out_dir, cfg.seed)
        self.started_ray = False
        self.hosts: list[Any] = []
        self.attackers: list[Any] = []  # the malicious peers' actors, in slot order
        self.attacker_ids: list[str] = []
        self.placement: dict[str, Any] = {}  # where the attackers sit (RUN_DIR/attackers.json)
        self.evaluator: Any = None  # shard 0 of self.evaluators: the run's endpoint
        self.evaluators: list[Any] = []
        self.shards: EvaluatorShards | None = None
        self.metrics_urls: list[str] = []
        self.addresses: list[dict[str, str]] = []  # honest peers first, the attacker last
        self.metrics_url = ""
        self.started_at = time.time()
        self.stop_requested = threading.Event()
        self._messages = self._bytes = 0
        self._accuracy: dict[str, float] = {}
        self._progress_rows: list[dict[str, Any]] = []
        # Per host: its specs, placement and latest progress rows, so that a lost one can be re-created.
        self._host_specs: list[list[PeerSpec]] = []
        self._host_options: list[dict[str, Any]] = []
        self._host_rows: list[list[dict[str, Any]]] = []
        self._incarnations: list[int] = []
        self._found_dead: dict[int, str] = {}  # hosts a poll found dead -> why
        self._dead: set[int] = set()  # hosts lost and not (yet, or ever) re-created
        self._attacker_status: dict[str, dict[str, Any]] = {}  # the last read per attacker: kept if one is lost
        self._attacker_rows: dict[str, dict[str, Any]] = {}
        self._loop_args: tuple[int, float, int] | None = None  # (steps, start_at, eval_every) of async loops
        self.faults = FaultLog(cfg.peers.max_restarts)

    # -- waiting, always interruptible ---------------------------------------------------
    def request_stop(self, *_signal: Any) -> None:
        self.stop_requested.set()

    def _install_handlers(self) -> None:
        # Installed again after ray.init, which sets a SIGTERM handler of its own.
        if self.handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous = signal.signal(sig, self.request_stop)
                self._previous_handlers.setdefault(sig, previous)

    def _restore_handlers(self) -> None:
        for sig, previous in self._previous_handlers.items():
            signal.signal(sig, previous)
        self._previous_handlers.clear()

    def _check(self) -> None:
        if self.stop_requested.is_set():
            raise Interrupted("stop requested")

    def _get(self, refs: Any, timeout: float | None = None, what: str = "actors") -> Any:
        """ray.get in slices of 0.25 s, raising Interrupted on a stop request."""
        single = not isinstance(refs, list)
        pending = [refs] if single else list(refs)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._check()
            _ready, waiting = ray.wait(pending, num_returns=len(pending), timeout=0.25)
            if not waiting:
                out = ray.get(pending)
                return out[0] if single else out
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not answer within {timeout:.0f} s: the cluster is busy "
                                   "or short of resources")

    # -- start ---------------------------------------------------------------------------
    def start(self) -> None:
        """Load data, check the fit, create every actor and exchange addresses."""
        cfg = self.cfg
        # Handlers first: a Ctrl-C while the data or torch is still loading is a stop request too.
        self._install_handlers()
        self.progress(f"starting: run {self.run_dir.name}")
        check_local_gpus(cfg)
        data = load_dataset(cfg.data.dataset, data_root=cfg.data.data_root, image_size=cfg.data.image_size,
                            limit=cfg.data.limit, seed=cfg.seed)
        self._check()
        self.started_ray = ensure_ray(cfg)
        self._install_handlers()
        self._check()
        placed = self.placed
        layout = fit(cfg) if placed is None else Plan(
            placed.per_process, len(placed.hosts), (len(placed.hosts) + cfg.attack.count) * cfg.peers.num_cpus)
        tel = cfg.telemetry
        # The evaluator writes the run records: pinned to the driver's node, it writes where the
        # driver writes config.yaml, i.e. where --out is mounted (KubeRay: the head pod's claim).
        n = tel.evaluators
        self.evaluators = [EvaluatorActor.options(num_cpus=0, scheduling_strategy=driver_node()).remote(
            str(self.run_dir), host=tel.host, metrics_port=tel.metrics_port + k if tel.metrics_port else 0,
            shard=k, shards=n) for k in range(n)]
        self.evaluator = self.evaluators[0]
        self.shards = EvaluatorShards(self.evaluators)
        self.metrics_urls = [f"http://{a}/metrics" for a in self._get(
            [e.metrics_address.remote() for e in self.evaluators], START_TIMEOUT_S)]
        self.metrics_url = self.metrics_urls[0]
        specs = self._specs(data)
        count = cfg.attack.count
        self._start_hosts(specs[:-count], layout)
        self._start_attackers(specs[-count:])
        try:  # an actor whose device is missing on its node fails here: say why in one line
            honest = self._get([h.addresses.remote() for h in self.hosts], START_TIMEOUT_S)
            self.addresses = [x for group in honest for x in group]
            self.addresses += self._get([m.addresses.remote() for m in self.attackers], START_TIMEOUT_S)
        except ray.exceptions.RayActorError as exc:
            raise FitError(f"a peer could not start: {_start_error(exc)}") from None
        book = {x["peer_id"]: x["gossip"] for x in self.addresses}
        self._get([n.set_members.remote(book) for n in self.nodes])
        self._write_targets()
        RunRecord(self.run_dir).write_config(cfg.to_dict())
        self._attacker_status = dict(zip(self.attacker_ids, self._get([m.status.remote() for m in self.attackers]),
                                         strict=True))
        status = pool_status(self._attacker_status)
        a = cfg.attack
        if a.num_gpus > 0 and status["device"] == "cpu":  # --device auto chose the fallback
            log.warning("the attacker holds %g Ray GPU(s) but torch sees no CUDA device on its node: "
                        "it attacks on the CPU (--device auto)", a.num_gpus)
            self.progress(f"WARNING: the attacker asked for {a.num_gpus:g} GPU(s) but attacks on the CPU")
        self.progress(f"{cfg.peers.honest} honest peers in {layout.hosts} processes ({layout.per_process} per "
                      f"process) + {count} malicious peer{'s' if count > 1 else ''} ({', '.join(self.attacker_ids)}; "
                      f"attacks on {status['device']}); {cfg.gossip.sync} mode; "
                      f"leakage at {self.metrics_url}")

    def _start_hosts(self, specs: list[PeerSpec], layout: Plan) -> None:
        cfg, a = self.cfg, self.cfg.attack
        peer_nodes = [i for i, n in cluster_nodes() if a.resource not in n.resources] if a.resource else []
        if self.placed is not None:
            peer_nodes = list(self.placed.hosts)
        for k in range(layout.hosts):
            # Honest peers stay off the nodes marked for the attacker (or where a sweep put them).
            where = ({"scheduling_strategy": NodeAffinitySchedulingStrategy(peer_nodes[k % len(peer_nodes)],
                                                                            soft=False)}
                     if peer_nodes else {})
            group = specs[k * layout.per_process:(k + 1) * layout.per_process]
            options = {"num_cpus": cfg.peers.num_cpus, "num_gpus": cfg.peers.num_gpus * len(group), **where}
            self._host_specs.append(group)
            self._host_options.append(options)
            self._host_rows.append([])
            self._incarnations.append(0)
            self.hosts.append(PeerHostActor.options(**options).remote(group, self.shards, cfg.peers.threads))

    def _start_attackers(self, specs: list[PeerSpec]) -> None:
        """One actor per malicious peer, each with its own scheduler, attacks and transcript."""
        cfg, a = self.cfg, self.cfg.attack
        marker: dict[str, Any] = {"resources": {a.resource: 1}} if a.resource else {}
        if self.placed is not None:
            marker["scheduling_strategy"] = NodeAffinitySchedulingStrategy(self.placed.attacker, soft=False)
        several = len(specs) > 1
        for spec in specs:
            self.attacker_ids.append(spec.peer_id)
            self.attackers.append(MaliciousActor.options(num_cpus=cfg.peers.num_cpus, num_gpus=a.num_gpus,
                                                         **marker).remote(
                spec, self.shards, attacks=a.attacks, fallback=a.fallback, max_age_s=a.max_age_s,
                attack_config=a.attack_config(cfg.seed), attack_params=a.params,
                queue_size=a.queue_size, max_batch_size=a.max_batch_size, device=a.effective_device,
                attack_threads=a.threads, run_dir=str(self.run_dir), transcript_bytes=a.transcript_bytes,
                model_strategy=a.strategy, transcript_subdir=spec.peer_id if several else None,
                shared_pool=several and a.dedupe, colluders=tuple(s.peer_id for s in specs),
                shard_label_prior=a.label_prior == "shard",
            ))
        members = [s.peer_id for s in specs] + honest_ids(cfg.peers.honest)
        placement = {**placement_record(cfg.gossip.topology, members, self.attacker_ids, cfg.seed),
                     "count": a.count, "placement": a.placement, "dedupe": a.dedupe and several}
        (self.run_dir / "attackers.json").write_text(json.dumps(placement, indent=2))
        self.placement = placement

    @property
    def attacker(self) -> Any:
        """The first malicious peer's actor (the only one of a default run), None before start."""
        return self.attackers[0] if self.attackers else None

    def nodes_used(self) -> dict[str, Any]:
        """The Ray node ids the honest peers (sorted, distinct) and the attacker ran on."""
        honest = sorted({x["node_id"] for x in self.addresses if x.get("role") == "honest" and x.get("node_id")})
        attackers = [x.get("node_id") for x in self.addresses if x.get("role") == "malicious"]
        out: dict[str, Any] = {"honest": honest, "attacker": (attackers[0] if attackers else None) or None}
        if len(attackers) > 1:
            out["attackers"] = sorted({n for n in attackers if n})
        return out

    @property
    def nodes(self) -> list[Any]:
        return [*self.hosts, *self.attackers]

    def _specs(self, data: Dataset) -> list[PeerSpec]:
        cfg, pc, gc = self.cfg, self.cfg.peers, self.cfg.gossip
        honest, attackers = member_ids(cfg)
        shards, test = split(data, pc.honest + len(attackers), test_fraction=cfg.data.test_fraction, seed=cfg.seed)
        ids = honest + attackers
        tls = run_pki(ids, cfg.telemetry.host) if gc.tls else {}
        groups = create_group(ids, seed=cfg.seed) if pc.secagg else {}
        secagg_name = next(iter(groups.values())).name if groups else None
        return [peer_spec(cfg, i, ids[i], role="malicious" if i >= pc.honest else "honest", shard=shard,
                          test=test, data=data, members=tuple(ids), host=cfg.telemetry.host,
                          secagg_name=secagg_name, tls=tls.get(ids[i]), secagg=groups.get(ids[i]))
                for i, shard in enumerate(shards)]

    def _write_targets(self) -> None:
        """Prometheus file_sd list of every exporter of this run."""
        groups = [{"targets": [url.split("/")[2]], "labels": {"role": "evaluator", "shard": str(k)}}
                  for k, url in enumerate(self.metrics_urls)]
        groups += [{"targets": [a["metrics"]], "labels": {"role": a["role"]}} for a in self.addresses]
        (self.run_dir / "prometheus_targets.json").write_text(json.dumps(groups, indent=2))

    # -- run -----------------------------------------------------------------------------
    def run_network(self) -> None:
        """Run every peer's steps: on their own clocks (async) or in lock-step rounds."""
        if self.cfg.gossip.sync == "rounds":
            self.run_rounds()
        else:
            self.run_async()

    def run_model_rounds(self) -> None:
        """Lock-step model gossip: at every (step, mix round) everyone sends, then everyone averages.

        A push returns once the receiver accepted it, so each round's models are all in
        before anyone averages that round: bit-reproducible for a seed.
        """
        gc, pc = self.cfg.gossip, self.cfg.peers
        self._evaluate_start()
        for s in range(1, gc.rounds + 1):
            t0 = time.monotonic()
            evaluate = s % pc.eval_every == 0 or s == gc.rounds
            for r in range(gc.mix_rounds):
                if self.cfg.attack.strategy == "honest":
                    sent = self._get([h.model_send.remote(s, r) for h in self.hosts]
                                     + [m.model_send.remote(s, r) for m in self.attackers])
                else:  # a rushing attacker: it sends once the round's honest models are in (attacker/active.py)
                    sent = self._get([h.model_send.remote(s, r) for h in self.hosts])
                    sent += self._get([m.model_send.remote(s, r) for m in self.attackers])
                self._count_sent(sent)
                last = r == gc.mix_rounds - 1
                self._get([h.model_mix.remote(s, r, evaluate and last) for h in self.hosts]
                          + [m.model_mix.remote(s, r) for m in self.attackers])
            if evaluate:
                self._poll()
                self.progress(self._status_line(s))
            pause = min(gc.period_s) - (time.monotonic() - t0)
            if pause > 0 and self.stop_requested.wait(pause):
                self._check()

    def consensus_distance(self) -> float | None:
        """Mean pairwise L2 distance between the honest peers' models (model gossip), None if unknown."""
        live = [h for k, h in enumerate(self.hosts) if k not in self._dead]
        got = self._get_each([h.model_weights.remote() for h in live], 30.0)
        vectors = [np.concatenate([np.asarray(w[n], dtype=np.float64).ravel() for n in sorted(w)])
                   for group in got if not isinstance(group, Exception) for w in group]
        return pairwise_distance(vectors)

    def run_rounds(self) -> None:
        """Lock-step rounds: everyone steps and sends, then everyone applies."""
        gc, pc = self.cfg.gossip, self.cfg.peers
        if gc.exchange == "models":
            self.run_model_rounds()
            return
        self._evaluate_start()
        for r in range(1, gc.rounds + 1):
            t0 = time.monotonic()
            self._count_sent(self._get([h.step.remote(r) for h in self.hosts]
                                       + [m.step.remote(r) for m in self.attackers]))
            evaluate = r % pc.eval_every == 0 or r == gc.rounds
            self._get([h.apply.remote(evaluate) for h in self.hosts] + [m.apply.remote() for m in self.attackers])
            if evaluate:
                self._poll()
                self.progress(self._status_line(r))
            pause = min(gc.period_s) - (time.monotonic() - t0)
            if pause > 0 and self.stop_requested.wait(pause):
                self._check()

    def _count_sent(self, sent: list[Any]) -> None:
        """Add a lock-step round's sends: a list per host, then one row per attacker."""
        hosts = len(self.hosts)
        flat = [x for group in sent[:hosts] for x in group] + list(sent[hosts:])
        self._messages += sum(x["sent"] for x in flat)
        self._bytes += sum(x["bytes"] for x in flat)

    def _evaluate_start(self) -> None:
        """Accuracy before the first step: the start of the accuracy timeline."""
        self._get([h.evaluate_all.remote() for h in self.hosts])

    def run_async(self) -> None:
        """Start every peer's own loop, then watch until all are done (or a stop request)."""
        gc, pc = self.cfg.gossip, self.cfg.peers
        self._evaluate_start()
        start_at = time.time() + 0.5  # every loop's clock starts together
        self._loop_args = (gc.rounds, start_at, pc.eval_every)
        self._get([h.start_loops.remote(gc.rounds, start_at, pc.eval_every) for h in self.hosts]
                  + [m.start_loop.remote(gc.rounds, start_at, pc.eval_every) for m in self.attackers])
        shown = 0
        while True:
            if self.stop_requested.wait(1.0):
                self._check()
            rows = self._poll()
            lost = self._newly_dead()
            for k, reason in lost:
                self._restart_host(k, reason)
            if lost:
                continue  # the restarted peers' rows come with the next poll
            errors = [f"{r['peer_id']}: {r['error']}" for r in rows if r["error"]]
            if errors:
                raise RuntimeError("peer loop failed: " + "; ".join(errors))
            least = min(r["steps"] for r in rows)
            tenth = least * 10 // gc.rounds
            if tenth > shown:
                shown = tenth
                self.progress(self._status_line(least))
            if not any(r["running"] for r in rows):
                return

    def _get_each(self, refs: list[Any], timeout: float, what: str = "actors") -> list[Any]:
        """Like _get, but an actor's failure comes back in its place (the exception) instead of raising."""
        deadline = time.monotonic() + timeout
        while True:
            self._check()
            _ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=0.25)
            if not waiting:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not answer within {timeout:.0f} s: the cluster is busy "
                                   "or short of resources")
        out: list[Any] = []
        for ref in refs:
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayActorError as exc:
                out.append(exc)
        return out

    def _poll(self, strict: bool = True) -> list[dict[str, Any]]:
        """Every peer's progress; keeps the totals and the latest accuracies.

        A host found dead is noted for `_newly_dead` (its last rows stand in); a dead
        attacker or evaluator raises ActorLost (with strict; finish() polls without).
        """
        hosts, count = len(self.hosts), len(self.attackers)
        refs = ([h.progress.remote() for h in self.hosts] + [m.progress.remote() for m in self.attackers]
                + [e.counts.remote() for e in self.evaluators])
        got = self._get_each(refs, 30.0, "the peers")
        named = [(EVALUATOR, answer) for answer in got[hosts + count:]] + [
            (attacker_name(aid, count), answer)
            for aid, answer in zip(self.attacker_ids, got[hosts:hosts + count], strict=True)]
        for who, answer in named:
            if isinstance(answer, ray.exceptions.ActorDiedError):
                self.faults.lost_actor = self.faults.lost_actor or who
                if strict:
                    raise ActorLost(f"{who} was lost: {_one_line(answer)}")
        for k, answer in enumerate(got[:hosts]):
            if isinstance(answer, ray.exceptions.ActorDiedError):
                self._found_dead.setdefault(k, _one_line(answer))
            elif not isinstance(answer, Exception):  # unavailable for a moment: the last rows stand
                self._host_rows[k] = answer
        for aid, answer in zip(self.attacker_ids, got[hosts:hosts + count], strict=True):
            if not isinstance(answer, Exception):
                self._attacker_rows[aid] = answer
        return self._rows()

    def _rows(self) -> list[dict[str, Any]]:
        rows = [r for group in self._host_rows for r in group] + list(self._attacker_rows.values())
        self._progress_rows = rows
        if self.cfg.gossip.sync == "async":
            self._messages = sum(r["sent"] for r in rows)
            self._bytes = sum(r["bytes"] for r in rows)
        self._accuracy = {r["peer_id"]: r["accuracy"] for r in rows
                          if r["role"] == "honest" and r["accuracy"] is not None}
        return rows

    # -- faults ------------------------------------------------------------------------
    def _newly_dead(self) -> list[tuple[int, str]]:
        """Hosts the last poll found dead that are not handled yet, with why."""
        return [(k, why) for k, why in sorted(self._found_dead.items()) if k not in self._dead]

    def _restart_host(self, k: int, reason: str) -> None:
        """Record host k's loss; re-create it (within max_restarts) and let its peers rejoin.

        Beyond the limit, or when the restart fails, its peers stay lost and the others go on.
        """
        peers = [s.peer_id for s in self._host_specs[k]]
        self._dead.add(k)
        loss = self.faults.lost(k, peers, reason, {r["peer_id"]: r["steps"] for r in self._host_rows[k]})
        self._host_rows[k] = [{**r, "running": False} for r in self._host_rows[k]]
        self.evaluator.count_fault.remote(lost=len(peers))
        ray.kill(self.hosts[k])
        if not self.faults.may_restart() or self._loop_args is None:
            loss.error = f"not restarted: {self.faults.max_restarts} restart(s) allowed (--max-restarts)"
            self.progress(f"lost {', '.join(peers)}: {reason}; {loss.error}")
            return
        self.progress(f"lost {', '.join(peers)}: {reason}; restarting")
        self._incarnations[k] += 1
        incarnation = self._incarnations[k]
        specs = [dataclasses.replace(s, seed=s.seed + RESEED * incarnation) for s in self._host_specs[k]]
        try:
            host: Any = PeerHostActor.options(**self._host_options[k]).remote(specs, self.shards,
                                                                         self.cfg.peers.threads)
            self.hosts[k] = host
            fresh = self._get(host.addresses.remote(), START_TIMEOUT_S, "the restarted peers")
            loss.restarted_at = time.time()
            by_id = {a["peer_id"]: a for a in fresh}
            self.addresses = [by_id.get(a["peer_id"], a) for a in self.addresses]
            book = {a["peer_id"]: a["gossip"] for a in self.addresses}
            live = [n for j, n in enumerate(self.hosts) if j not in self._dead] + [host, *self.attackers]
            self._get_each([n.set_members.remote(book) for n in live], 30.0)  # the others redial
            n = len(self.evaluators)
            asked = self._get([e.last_shipped.remote(p) for p in peers for e in self.evaluators])
            shipped = [merge_shipped(asked[i * n:(i + 1) * n]) for i in range(len(peers))]
            honest = [a["peer_id"] for a in self.addresses if a["role"] == "honest" and a["peer_id"] not in
                      {p for j in self._dead for p in (s.peer_id for s in self._host_specs[j])}]
            plans = [{"sources": rejoin_sources(p, list(book), honest, self.cfg.gossip.topology, self.cfg.seed),
                      "shipped": sh, "incarnation": incarnation} for p, sh in zip(peers, shipped, strict=True)]
            steps, start_at, eval_every = self._loop_args
            done = self._get(host.rejoin.remote(plans, steps, start_at, eval_every), START_TIMEOUT_S,
                             "the restarted peers")
        except (ray.exceptions.RayActorError, TimeoutError) as exc:
            loss.error = f"restart failed: {_one_line(exc)}"
            self.progress(f"could not restart {', '.join(peers)}: {loss.error}")
            return
        loss.rejoin = dict(zip(peers, done, strict=True))
        loss.rejoined_at = time.time()
        self._dead.discard(k)
        self._found_dead.pop(k, None)
        self._host_rows[k] = []
        self.evaluator.count_fault.remote(restarted=len(peers))
        self._write_targets()
        self.progress(f"restarted {', '.join(peers)} in {loss.rejoined_at - loss.lost_at:.1f} s: " + "; ".join(
            f"{p} from {d['source'] or 'its initial weights'} (version {d['version']}), step {d['first_step']}"
            for p, d in loss.rejoin.items()))

    def lost_actor(self, exc: BaseException) -> ActorLost:
        """Which actor a RayActorError from a call came from, as an ActorLost (pings each, 5 s)."""
        count = len(self.attackers)
        critical = [(EVALUATOR, e) for e in self.evaluators] + [(attacker_name(aid, count), m)
                                                    for aid, m in zip(self.attacker_ids, self.attackers, strict=True)]
        named = critical + [
            (f"the peer host of {', '.join(s.peer_id for s in self._host_specs[k])}", h)
            for k, h in enumerate(self.hosts)]
        refs = [a.pid.remote() for _w, a in named]
        ray.wait(refs, num_returns=len(refs), timeout=5)
        for (who, _a), ref in zip(named, refs, strict=True):
            try:
                ray.get(ref, timeout=0.1)
            except ray.exceptions.RayActorError:
                if who in {w for w, _a in critical}:
                    self.faults.lost_actor = self.faults.lost_actor or who
                return ActorLost(f"{who} was lost: {_one_line(exc)}")
            except ray.exceptions.GetTimeoutError:
                continue
        return ActorLost(f"an actor was lost: {_one_line(exc)}")

    def counts(self, timeout: float | None = None) -> dict[str, Any]:
        """The evaluators' counts, merged over the shards."""
        return merge_counts(self._get([e.counts.remote() for e in self.evaluators], timeout))

    def _status_line(self, step: int) -> str:
        counts = self.counts()
        self._attacker_status = dict(zip(self.attacker_ids, self._get([m.status.remote() for m in self.attackers]),
                                         strict=True))
        status = pool_status(self._attacker_status)
        acc = sum(self._accuracy.values()) / max(1, len(self._accuracy))
        psnr = counts["mean_psnr"]
        received = status.get("received", status.get("captured", 0) + status.get("dropped", 0))
        return (f"step {step}/{self.cfg.gossip.rounds} | updates sent {self._messages} | honest accuracy "
                f"{acc:.2f} | attacker received {received}, attacked {status.get('attacked', 0)} | "
                f"reconstructions {counts['reconstructions']} | mean PSNR "
                f"{'-' if psnr is None else f'{psnr:.1f} dB'}{self._refused_note()}")

    def _refused_note(self) -> str:
        """' | refused steps N' once some peer refused an aggregate (poisoned or over the norm bound)."""
        n = sum(r.get("refused_steps", 0) for r in self._progress_rows)
        return f" | refused steps {n}" if n else ""

    def drain(self) -> bool:
        """Give the attacker up to drain_timeout_s to finish what it holds."""
        timeout = self.cfg.attack.drain_timeout_s
        self.progress(f"steps done; letting the attacker finish its queue (up to {timeout:.0f} s)")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._get([m.wait_idle.remote(0.5) for m in self.attackers])):
                return True
        return False

    # -- finish --------------------------------------------------------------------------
    def finish(self, seconds: float, interrupted: bool = False, reason: str | None = None) -> RunResult:
        """Write summary and grid, gather the figures; actors keep serving until shutdown().

        reason: why the run ended early (a lost actor). Without the attacker its last
        status read stands; without the evaluator the driver writes the summary from
        reconstructions.jsonl (every row is on disk as soon as it is scored).
        """
        extra: dict[str, Any] = {"started_at": self.started_at, "ended_at": time.time(),
                                 "interrupted": interrupted, "seconds": seconds, "sync": self.cfg.gossip.sync}
        if reason:
            extra["reason"] = reason
        if self.evaluator is None or not self.attackers:
            RunRecord(self.run_dir).write_summary([], extra)  # stopped before the network existed
            return RunResult(self.run_dir, self.metrics_url, [], {"reconstructions": 0}, {}, {}, seconds,
                             interrupted=interrupted)
        wait = 10.0 if interrupted else 60.0
        self.stop_requested.clear()  # the finish itself must not be interrupted by the same request
        try:
            live = [h for k, h in enumerate(self.hosts) if k not in self._dead]
            own_rows = [m.flush_log.remote(True) for aid, m in self._live_attackers()]
            self._get_each([h.flush.remote() for h in live] + own_rows, wait)
            self._poll(strict=False)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            log.warning("collecting the peers' last rows failed: %s", exc)
        attacker = self._final_attacker_status(wait)
        honest_rows = [r for r in self._progress_rows if r["role"] == "honest"]
        accuracy = [(r["batch_size"], r["defence"], r["accuracy"]) for r in honest_rows if r["accuracy"] is not None]
        extra["nodes"] = self.nodes_used()
        extra["colluders"] = self.placement
        extra["devices"] = {"attacker": attacker.get("device"), "honest": sorted(
            {x["device"] for x in self.addresses if x.get("role") == "honest" and x.get("device")})}
        extra.update({"messages": self._messages, "wire_bytes": self._bytes, "attacker": attacker,
                      "honest_accuracy": self._accuracy, "accuracy": accuracy_timeline(honest_rows),
                      "steps": {r["peer_id"]: r["steps"] for r in self._progress_rows},
                      "aggregate": self.cfg.gossip.aggregate,
                      "refused_steps": {r["peer_id"]: r.get("refused_steps", 0) for r in self._progress_rows}})
        extra["faults"] = self.faults.to_dict(extra["steps"])
        extra.update(self._gossip_summary())
        if self.cfg.gossip.exchange == "models" and self.faults.lost_actor != EVALUATOR:
            extra["gossip_attack"] = self._gossip_attack(interrupted)
        summary: list[dict[str, Any]] = []
        if self.faults.lost_actor != EVALUATOR:
            try:
                others = self._get([e.export.remote() for e in self.evaluators[1:]], wait)
                summary = self._get(self.evaluator.finish.remote(accuracy, extra, others), wait)
                counts = self.counts(wait)
            except ray.exceptions.RayActorError:
                self.faults.lost_actor = self.faults.lost_actor or EVALUATOR
                extra["faults"] = self.faults.to_dict(extra["steps"])
        if self.faults.lost_actor == EVALUATOR:
            record = RunRecord(self.run_dir)
            rows = record.rows()
            summary = summarise(rows)
            record.write_summary(summary, extra)
            counts = {"reconstructions": len(rows)}
        return RunResult(self.run_dir, self.metrics_url, summary, counts, attacker, dict(self._accuracy),
                         seconds, self._messages, self._bytes, interrupted, extra)

    def _live_attackers(self) -> list[tuple[str, Any]]:
        """(id, actor) of every attacker not known lost."""
        count = len(self.attackers)
        return [(aid, m) for aid, m in zip(self.attacker_ids, self.attackers, strict=True)
                if self.faults.lost_actor != attacker_name(aid, count)]

    def _final_attacker_status(self, wait: float) -> dict[str, Any]:
        """The pooled status at the end; a lost attacker's last read stands, marked lost."""
        statuses = dict(self._attacker_status)
        live = self._live_attackers()
        got = self._get_each([m.status.remote() for _aid, m in live], wait) if live else []
        for (aid, _m), answer in zip(live, got, strict=True):
            if isinstance(answer, Exception):
                self.faults.lost_actor = self.faults.lost_actor or attacker_name(aid, len(self.attackers))
            else:
                statuses[aid] = answer
        for aid in self.attacker_ids:
            if aid not in dict(self._live_attackers()):
                statuses[aid] = {**statuses.get(aid, {}), "lost": True}
        return pool_status(statuses)

    def _gossip_summary(self) -> dict[str, Any]:
        """exchange, mixing, mix_rounds, drop; in model gossip the message counts and the consensus distance."""
        gc = self.cfg.gossip
        out: dict[str, Any] = {"exchange": gc.exchange, "mixing": gc.mixing, "mix_rounds": gc.mix_rounds,
                               "drop": gc.drop}
        if gc.exchange != "models":
            return out
        totals: dict[str, int] = {}
        for r in self._progress_rows:
            for k, v in (r.get("models") or {}).items():
                totals[k] = totals.get(k, 0) + int(v)
        out["model_messages"] = totals
        try:
            out["consensus_distance"] = self.consensus_distance()
        except (ray.exceptions.RayError, TimeoutError) as exc:
            log.warning("could not read the honest models for the consensus distance: %s", exc)
            out["consensus_distance"] = None
        return out

    def _gossip_attack(self, interrupted: bool) -> dict[str, Any]:
        """The passive gossip-algebra attack on the transcript (gradleak/gossip_live.py), bounded in time."""
        from gradleak.gossip_live import live_gossip_attack

        if interrupted or self.cfg.attack.gossip_budget_s <= 0 or self.cfg.attack.transcript_bytes <= 0:
            why = "interrupted" if interrupted else "off (gossip_budget_s or transcript_bytes is 0)"
            return {"status": "skipped", "reason": why}
        self.progress(f"gossip-algebra attack on the transcript (up to {self.cfg.attack.gossip_budget_s:.0f} s)")
        try:
            return live_gossip_attack(self.cfg, self.run_dir, self.shards, lambda refs: self._get(refs, 60.0))
        except (ray.exceptions.RayError, TimeoutError, ValueError) as exc:
            log.warning("the gossip-algebra attack failed: %s", exc)
            return {"status": "failed", "reason": _one_line(exc)}

    def shutdown(self) -> None:
        """Stop every actor (in parallel, bounded), kill them, and stop a Ray we started."""
        actors = [n for n in self.nodes if n is not None]  # start() may have failed half-way
        if ray.is_initialized():
            refs = [n.stop.remote() for n in actors]
            try:
                ray.wait(refs, num_returns=len(refs), timeout=5)
            except ray.exceptions.RayError as exc:  # a dead actor has nothing to stop
                log.warning("stopping an actor failed: %s", exc)
            for n in [*actors, *self.evaluators]:
                if n is not None:
                    ray.kill(n)
        if self.started_ray:
            ray.shutdown()
        self._restore_handlers()


def pairwise_distance(vectors: list[np.ndarray]) -> float | None:
    """Mean L2 distance over all pairs of vectors (None for fewer than two)."""
    if len(vectors) < 2:
        return None
    d = [float(np.linalg.norm(a - b)) for i, a in enumerate(vectors) for b in vectors[i + 1:]]
    return sum(d) / len(d)


def run(cfg: RunConfig, progress: Progress = print, *, handle_signals: bool = False) -> RunResult:
    """Run one whole testbed: start, steps, drain, outputs, shutdown.

    With handle_signals (the CLI), SIGINT/SIGTERM end it early: what was recorded is
    written with `interrupted` set, and every actor and a Ray started here are stopped.
    """
    t0 = time.monotonic()
    bed = Testbed(cfg, progress, handle_signals=handle_signals)
    interrupted = False
    lost: ActorLost | None = None
    try:
        try:
            bed.start()
            bed.run_network()
            bed.drain()
        except Interrupted:
            interrupted = True
            progress("stopping: writing what was recorded")
        except ActorLost as exc:
            lost = exc
        except ray.exceptions.RayActorError as exc:  # a call on an actor that died since the last poll
            if bed.evaluator is None or bed.attacker is None:
                raise
            lost = bed.lost_actor(exc)
        except FitError:
            if not any(bed.run_dir.iterdir()):
                bed.run_dir.rmdir()  # nothing ran: leave no empty run behind
            raise
        if lost is not None:
            progress(f"stopping: {lost}; writing what was recorded")
            bed.finish(time.monotonic() - t0, True, str(lost))
            raise ActorLost(f"{lost}; the record in {bed.run_dir} holds what came before")
        return bed.finish(time.monotonic() - t0, interrupted)
    finally:
        bed.shutdown()


__all__ = ["ActorLost", "FitError", "Interrupted", "RunResult", "Testbed", "run"]
