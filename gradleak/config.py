"""Typed, frozen, validated run configuration, composed from sections and loadable from YAML.

Every CLI flag of `gradleak run` maps to one field here (see gradleak/cli.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# A cluster run of 1,000+ peers (docs/scale.md) must be expressible; whether the peers fit
# the cluster is gradleak.placement's check, made before any actor starts.
MAX_HONEST = 4096


class ConfigError(ValueError):
    """Raised when a config value, flag or file is invalid; the message is one line."""


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"  # digits (offline, scikit-learn) | mnist | cifar10 | cifar100
    data_root: str | None = None  # where torchvision datasets lie (never downloaded)
    image_size: int | None = None  # resize to this many pixels a side; None = dataset default
    limit: int | None = 4000  # use at most this many samples (keeps start-up small)
    test_fraction: float = 0.2  # held-out share for the honest model's accuracy

    def validate(self) -> None:
        from gradleak.data import DATASETS

        _known("dataset", self.dataset, DATASETS)
        if self.image_size is not None and not 4 <= self.image_size <= 512:
            raise ConfigError(f"image_size must be in 4..512, got {self.image_size}")
        if self.limit is not None and self.limit < 20:
            raise ConfigError(f"limit must be >= 20 samples, got {self.limit}")
        if not 0.0 < self.test_fraction < 0.9:
            raise ConfigError(f"test_fraction must be in (0, 0.9), got {self.test_fraction}")


@dataclass(frozen=True)
class PeerConfig:
    honest: int = 4  # number of honest peers
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)  # assigned to honest peers cyclically
    defences: tuple[str, ...] = ("none",)  # defence chains, assigned cyclically
    model: str = "lenet"  # model registry name
    # sigmoid | default | dlg: with "sigmoid" batch 2/4/8 peers reach >= 0.87 in 300 rounds,
    # with DLG's uniform 0.72/0.84/0.89, with PyTorch's they stay at chance (benchmarks/learning.py)
    init: str = "sigmoid"
    optimizer: str = "adam"  # local optimiser applying the aggregated gradient: adam | sgd
    lr: float = 0.005  # its learning rate
    keep_versions: int = 256  # past weight versions kept for GetModel pulls
    keep_mb: float = 64.0  # ... and at most this many MB of them per peer (the newest always stays)
    eval_every: int = 10  # rounds between held-out accuracy measurements
    num_cpus: float = 0.25  # Ray CPU share per peer process (fractional so many fit)
    per_process: int = 0  # honest peers hosted by one Ray actor process; 0 = as many as fit
    threads: int = 1  # torch threads per peer process
    secagg: bool = False  # all peers form one secure-aggregation group (each sends to every member)
    # honest peers' device: cpu | cuda | auto; unset: cuda when num_gpus > 0, else cpu
    device: str | None = None
    num_gpus: float = 0.0  # Ray GPU request per honest peer
    max_restarts: int = 3  # lost peer hosts re-created per run (async mode); then a loss ends the run

    @property
    def effective_device(self) -> str:
        if self.device is not None:
            return self.device
        return "cuda" if self.num_gpus > 0 else "cpu"

    def validate(self) -> None:
        from gradleak.core.models import INITS, MODELS
        from p2p.defences import parse_defence
        from p2p.peer import OPTIMIZERS

        if not 2 <= self.honest <= MAX_HONEST:
            raise ConfigError(f"honest peers must be in 2..{MAX_HONEST}, got {self.honest}")
        if not 0 <= self.max_restarts <= 100:
            raise ConfigError(f"max restarts must be in 0..100, got {self.max_restarts}")
        if not self.batch_sizes or any(not 1 <= b <= 4096 for b in self.batch_sizes):
            raise ConfigError(f"batch sizes must be in 1..4096, got {list(self.batch_sizes)}")
        if not self.defences:
            raise ConfigError("at least one defence (or 'none') is required")
        for spec in self.defences:
            try:
                parse_defence(spec)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        _known("model", self.model, MODELS)
        _known("init", self.init, INITS)
        _known("optimizer", self.optimizer, OPTIMIZERS)
        _positive("lr", self.lr)
        if self.keep_versions < 1 or self.eval_every < 1 or self.threads < 1:
            raise ConfigError("keep_versions, eval_every and threads must be >= 1")
        if not 0 < self.keep_mb < float("inf"):
            raise ConfigError(f"keep_mb must be a positive number of MB, got {self.keep_mb}")
        if self.device is not None:
            _known("peer device", self.device, ("auto", "cpu", "cuda"))
        if self.num_gpus < 0:
            raise ConfigError(f"peer num_gpus must be >= 0, got {self.num_gpus}")
        if not 0.0 <= self.num_cpus <= 64:
            raise ConfigError(f"num_cpus must be in 0..64, got {self.num_cpus}")
        if not 0 <= self.per_process <= 256:
            raise ConfigError(f"per_process must be in 0..256 (0 = as many as fit), got {self.per_process}")


SYNC_MODES = ("async", "rounds")
EXCHANGES = ("gradients", "models")
MIXINGS = ("metropolis", "uniform")  # gradleak.core.graphs.MIXINGS
MODEL_DTYPES = ("float32", "float64")  # p2p.model_gossip.MODEL_DTYPES


@dataclass(frozen=True)
class GossipConfig:
    # async: every peer steps on its own clock; rounds: the driver clocks lock-step
    # rounds (deterministic, bit-reproducible for a seed: tests, exact reproductions).
    sync: str = "async"
    # Local steps per peer, in both modes: 300 (with mixing) brings every default peer to
    # >= 0.89 accuracy; a step is ~2 ms of compute, so the 0.25 s period sets the time.
    rounds: int = 300
    fanout: int = 2  # neighbours each peer sends its update to per step
    topology: str = "complete"  # topology registry name
    # Seconds between a peer's local steps, assigned to peers in turn (in rounds mode
    # the shortest is a round's minimum length). 0.25 s leaves the attacker CPU on 2 cores.
    period_s: tuple[float, ...] = (0.25,)
    jitter: float = 0.1  # each gap varies by up to this share of the period (seeded, async only)
    staleness: str = "poly:0.5"  # weight of a late update by its version lag: constant | poly:A | cutoff:K
    secagg_wait: int = 4  # async: applies a masked step waits for the rest of its group before dropping
    # Every this many steps a peer averages its model with a neighbour's (0: never). With
    # gradients alone the batch-1 peer's model drifts and ends at ~0.25-0.7 accuracy; with
    # mixing every 5 steps all four reach 0.89-0.94 in 250-300 steps (benchmarks/learning.py).
    mix_every: int = 5
    mix_weight: float = 0.5  # share of the neighbour's weights in the average
    timeout_s: float = 10.0  # deadline of every RPC
    chunk_bytes: int = 1 << 20  # payload bytes per streamed chunk
    # Updates of at least this many payload bytes go over the receiver's bulk lane (p2p.bulk:
    # one TCP/TLS connection, not gRPC messages; 0.65 of raw TCP against 0.2-0.3 for the 45 MB
    # ResNet-18 update); 0 turns the lane off on both ends. LeNet updates (40 KB) never take it.
    bulk_min_bytes: int = 4 << 20
    tls: bool = False  # mutual TLS on every gossip link (a private CA is made per run)
    # How a peer combines one apply's updates: mean | median | trimmed:F | clip:C (p2p.aggregate).
    aggregate: str = "mean"
    # L2 bound of one update and of an aggregate (a step over it is refused, the model kept);
    # honest default-run updates reach ~13 at most (benchmarks/update_norms.py).
    max_update_norm: float = 1e4
    step_window: int = 64  # steps an update may lag its origin's newest one accepted (else refused)
    inbox_per_origin: int = 32  # updates one origin may have waiting for the next apply
    inbox_total: int = 1024  # updates waiting in all
    inbox_masked_steps: int = 32  # distinct steps whose masked updates may wait for their group
    # Plaintext gossip on a non-loopback --host lets anyone on the network read and forge
    # updates (nobody is authenticated): refused unless this is set.
    insecure: bool = False
    # gradients: peers send gradients and aggregate them; models: gossip averaging (D-PSGD):
    # a local SGD half-step, then mix_rounds rounds of averaging models with every neighbour.
    exchange: str = "gradients"
    mixing: str = "metropolis"  # model gossip's mixing weights: metropolis (Metropolis-Hastings) | uniform
    mix_rounds: int = 1  # model gossip: averaging rounds per local step
    drop: float = 0.0  # model gossip: probability each outgoing model message is lost (seeded per sender)
    # Model gossip: the dtype peers average and send models in. float32 is what deployments
    # send; float64 keeps every round's average exact to 1e-16, so the gossip algebra recovers
    # far nodes' values to <= 1e-6 (docs/decentralised.md (f)). The model itself stays float32.
    model_dtype: str = "float32"

    def validate(self) -> None:
        from p2p.aggregate import parse_aggregate
        from p2p.staleness import parse_staleness
        from p2p.topology import check_topology

        _known("sync mode", self.sync, SYNC_MODES)
        if not 1 <= self.rounds <= 1_000_000:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if self.fanout < 1:
            raise ConfigError(f"fanout must be >= 1, got {self.fanout}")
        try:
            check_topology(self.topology)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not self.period_s or any(not 0 <= p <= 3600 for p in self.period_s):
            raise ConfigError(f"periods must be in 0..3600 seconds, got {list(self.period_s)}")
        if not 0.0 <= self.jitter < 1.0:
            raise ConfigError(f"jitter must be in [0, 1), got {self.jitter}")
        try:
            parse_staleness(self.staleness)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.secagg_wait < 0 or self.mix_every < 0:
            raise ConfigError(f"secagg_wait and mix_every must be >= 0, got {self.secagg_wait}, {self.mix_every}")
        if not 0.0 < self.mix_weight <= 1.0:
            raise ConfigError(f"mix_weight must be in (0, 1], got {self.mix_weight}")
        _positive("timeout_s", self.timeout_s)
        if not 1024 <= self.chunk_bytes <= 4 << 20:
            raise ConfigError(f"chunk_bytes must be in 1 KiB..4 MiB, got {self.chunk_bytes}")
        if self.bulk_min_bytes < 0:
            raise ConfigError(f"bulk_min_bytes must be >= 0 (0: no bulk lane), got {self.bulk_min_bytes}")
        try:
            parse_aggregate(self.aggregate)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not self.max_update_norm > 0:  # inf allowed: then only non-finite aggregates are refused
            raise ConfigError(f"max_update_norm must be > 0, got {self.max_update_norm}")
        for name in ("step_window", "inbox_per_origin", "inbox_total", "inbox_masked_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        _known("gossip exchange", self.exchange, EXCHANGES)
        _known("mixing rule", self.mixing, MIXINGS)
        if not 1 <= self.mix_rounds <= 1023:
            raise ConfigError(f"mix_rounds must be in 1..1023, got {self.mix_rounds}")
        if not 0.0 <= self.drop < 1.0:
            raise ConfigError(f"drop must be a probability in [0, 1), got {self.drop}")
        if self.drop > 0 and self.exchange != "models":
            raise ConfigError("drop applies to model gossip only (--gossip models)")
        _known("model dtype", self.model_dtype, MODEL_DTYPES)
        if self.model_dtype != "float32" and self.exchange != "models":
            raise ConfigError("model_dtype applies to model gossip only (--gossip models)")


@dataclass(frozen=True)
class AttackSettings:
    # "auto": per update, the first attack of `fallback` that supports it; else every
    # named attack runs on each attacked update.
    attacks: tuple[str, ...] = ("auto",)
    fallback: tuple[str, ...] = ("analytic", "idlg", "dlg")  # fastest first
    max_iters: int = 100  # outer optimiser steps per reconstruction
    time_budget_s: float | None = 3.0  # wall seconds per reconstruction (None: unlimited)
    # Queued updates older than this are evicted (None: never). 4 s: a live attacker wants
    # fresh updates; at 30 s the demo's p95 receive-to-score latency was 8.6-10.9 s (the
    # drain attacked 30 s old updates), at 4 s 3.1 s for 3 points of coverage (docs/live.md).
    max_age_s: float | None = 4.0
    queue_size: int = 16  # updates waiting; when full the stalest is evicted and counted
    max_batch_size: int = 8  # updates from larger batches are captured but not attacked
    # `gradleak run` refuses honest batch sizes above max_batch_size unless this is set.
    allow_unattacked: bool = False
    num_gpus: float = 0.0  # Ray GPU request of the malicious peer
    # auto (CUDA when present, else the CPU, with a warning) | cpu | cuda; unset: cuda when
    # num_gpus > 0 (the run fails at start if torch sees no GPU there), else auto.
    device: str | None = None
    threads: int = 1  # torch threads of the attack worker
    drain_timeout_s: float = 60.0  # after the last round, time left to finish the queue
    resource: str | None = None  # custom Ray resource marking attacker nodes (e.g. "attacker")
    # Bytes the malicious peer may write to RUN_DIR/transcript/ (updates received, weights
    # pulled); entries past it are refused and counted. 0 = no transcript.
    transcript_bytes: int = 256 << 20
    # What the malicious peer sends in model gossip: honest | state-override (its neighbours'
    # next model := x0) | crafted (:= a fresh attack-friendly init); attacker/active.py.
    strategy: str = "honest"
    # Model gossip: wall seconds for the passive gossip-algebra attack at the end of the run
    # (solve, then invert each determined gradient; 0: off).
    gossip_budget_s: float = 30.0
    # Each attack's own parameters, attack name -> {field: value} (attacker.params; the
    # fields of e.g. attacker.dlg.DLGParams). Unset fields keep the attack's defaults.
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Malicious peers in the run, each its own Ray actor with its own scheduler, attacks and
    # transcript (RUN_DIR/transcript/<id>/ when more than one); they collude: the end-of-run
    # gossip algebra pools their transcripts.
    count: int = 1
    # Where they sit in the graph (gradleak/core/colluders.py): spread (evenly over the member
    # order, the first at slot 0) | random (slots drawn with the run seed).
    placement: str = "spread"
    # Colluders share one pool: an update one of them took for attack is not attacked again
    # by another that also received it (the evaluator holds the claims).
    dedupe: bool = True
    # Where batch label counts may draw on: none (the gradient alone) | shard (also the
    # malicious peer's own shard, up to 512 samples, attacker/label_prior.py). Off by default:
    # on peers trained past ~60% accuracy it did not raise live label accuracy (docs/live.md).
    label_prior: str = "none"

    @property
    def effective_device(self) -> str:
        """The device the attacker is started with: `device`, or cuda when it asks Ray for GPUs."""
        if self.device is not None:
            return self.device
        return "cuda" if self.num_gpus > 0 else "auto"

    def validate(self) -> None:
        from attacker.api import ATTACKS

        if not self.attacks:
            raise ConfigError("at least one attack is required")
        if "auto" in self.attacks:
            if len(self.attacks) > 1:
                raise ConfigError("attack 'auto' stands alone (it picks one attack of the fallback "
                                  f"chain per update), got {','.join(self.attacks)}")
            if not self.fallback:
                raise ConfigError("attack 'auto' needs a non-empty fallback chain")
        else:
            for name in self.attacks:
                _known("attack", name, ATTACKS)
        for name in self.fallback:
            _known("fallback attack", name, ATTACKS)
        if len(set(self.fallback)) != len(self.fallback):
            raise ConfigError(f"fallback names an attack twice: {','.join(self.fallback)}")
        for name in ("time_budget_s", "max_age_s"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a positive number of seconds or none, got {value}")
        if self.max_iters < 1 or self.queue_size < 1 or self.threads < 1:
            raise ConfigError("max_iters, queue_size and threads must be >= 1")
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.num_gpus < 0:
            raise ConfigError(f"num_gpus must be >= 0, got {self.num_gpus}")
        if self.device is not None:
            _known("device", self.device, ("auto", "cpu", "cuda"))
        if self.resource is not None and not self.resource.strip():
            raise ConfigError("attack resource must be a non-empty name")
        if self.drain_timeout_s < 0:
            raise ConfigError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if self.transcript_bytes < 0:
            raise ConfigError(f"transcript_bytes must be >= 0 (0: off), got {self.transcript_bytes}")
        from attacker.active import STRATEGIES

        _known("strategy", self.strategy, STRATEGIES)
        if not (self.gossip_budget_s >= 0 and math.isfinite(self.gossip_budget_s)):
            raise ConfigError(f"gossip_budget_s must be >= 0 seconds (0: off), got {self.gossip_budget_s}")
        from gradleak.core.colluders import PLACEMENTS

        if self.count < 1:
            raise ConfigError(f"the number of malicious peers (count) must be >= 1, got {self.count}")
        _known("placement", self.placement, PLACEMENTS)
        _known("label prior", self.label_prior, ("none", "shard"))
        self.attack_params()

    def attack_config(self, seed: int) -> Any:
        """The attacker.api.AttackConfig a run of this section gives its attacks."""
        from attacker.api import AttackConfig

        return AttackConfig(max_iters=self.max_iters, seed=seed, time_budget_s=self.time_budget_s)

    def attack_params(self) -> dict[str, Any]:
        """`params` checked against each attack's parameter type: name -> its parameters."""
        from attacker.api import ATTACKS
        from attacker.params import parse_params

        if not isinstance(self.params, dict):
            raise ConfigError(f"attack.params must map attack names to fields, got {self.params!r}")
        out = {}
        for name, fields in self.params.items():
            if name not in ATTACKS:
                raise ConfigError(f"attack.params names an unknown attack '{name}' (known: {', '.join(sorted(ATTACKS))})")
            try:
                out[name] = parse_params(name, ATTACKS[name].params_type, fields, self.attack_config(0))
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        return out


@dataclass(frozen=True)
class TelemetryConfig:
    metrics_port: int = 9480  # the evaluator's /metrics port (leakage); 0 = any free port
    # Address every gRPC server and exporter binds and advertises: 127.0.0.1 on one
    # machine; "auto" on a cluster, where each actor uses its own node's IP.
    host: str = "127.0.0.1"
    # Evaluator actors, each filing the truths and scores of a share of the updates (by update
    # id): one files ~500 truths/s (docs/scale.md), 1,000 peers at 4 steps/s file 4,000.
    evaluators: int = 1

    def validate(self) -> None:
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be in 0..65535, got {self.metrics_port}")
        if not 1 <= self.evaluators <= 64:
            raise ConfigError(f"evaluators must be in 1..64, got {self.evaluators}")
        if self.metrics_port and self.metrics_port + self.evaluators - 1 > 65535:
            raise ConfigError(f"metrics ports {self.metrics_port}..{self.metrics_port + self.evaluators - 1} "
                              "run past 65535")
        if not self.host:
            raise ConfigError("host must not be empty")


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0  # same seed + config = same split, init and attack starts
    out_dir: str = "runs"  # each run writes a fresh directory under it
    ray_address: str | None = None  # None: RAY_ADDRESS or a local Ray
    data: DataConfig = field(default_factory=DataConfig)
    peers: PeerConfig = field(default_factory=PeerConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    attack: AttackSettings = field(default_factory=AttackSettings)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    def validate(self) -> RunConfig:
        """Check every section; return self so calls chain."""
        from p2p.identity import is_loopback_host

        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        for section in (self.data, self.peers, self.gossip, self.attack, self.telemetry):
            section.validate()
        if not self.gossip.tls and not self.gossip.insecure and not is_loopback_host(self.telemetry.host):
            raise ConfigError(
                f"plaintext gossip on --host {self.telemetry.host} lets anyone on the network read and forge "
                "updates: add --tls on (or --insecure to accept that)"
            )
        if self.gossip.exchange == "models":
            _check_model_gossip(self)
        if self.attack.strategy != "honest" and (self.gossip.exchange != "models" or self.gossip.sync != "rounds"):
            raise ConfigError(f"--strategy {self.attack.strategy} overrides models in lock-step model gossip: "
                              "pass --gossip models --sync rounds")
        if self.attack.count > self.peers.honest:
            raise ConfigError(f"{self.attack.count} malicious peers need at least as many honest ones, "
                              f"got {self.peers.honest}: lower --malicious or raise --peers")
        if self.attack.count > 1 and self.attack.strategy != "honest":
            raise ConfigError(f"--strategy {self.attack.strategy} runs with one malicious peer; "
                              "pass --malicious 1 or --strategy honest")
        if self.gossip.fanout > self.peers.honest:
            raise ConfigError(
                f"fanout {self.gossip.fanout} exceeds the {self.peers.honest} other peers"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "peers": PeerConfig,
    "gossip": GossipConfig,
    "attack": AttackSettings,
    "telemetry": TelemetryConfig,
}


def from_dict(raw: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """Overlay a nested mapping (as in a YAML file) on `base`; unknown keys are errors."""
    base = base or RunConfig()
    if not isinstance(raw, dict):
        raise ConfigError("config must be a mapping of sections")
    top: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SECTIONS:
            top[key] = _section(key, getattr(base, key), value)
        elif key in ("seed", "out_dir", "ray_address"):
            top[key] = value
        else:
            known = sorted([*SECTIONS, "seed", "out_dir", "ray_address"])
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(known)})")
    try:
        cfg = dataclasses.replace(base, **top)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
    return _checked_types(cfg)


def load_yaml(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    """Read a YAML config file and overlay it on `base`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {str(exc).splitlines()[0]}")
    return from_dict(raw, base)


def _section(name: str, current: Any, value: Any) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"config section '{name}' must be a mapping")
    names = {f.name for f in dataclasses.fields(current)}
    for key in value:
        if key not in names:
            raise ConfigError(f"unknown key '{name}.{key}' (known: {', '.join(sorted(names))})")
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    # attack.params merges field by field: a later layer (file, flags) sets single fields.
    if "params" in fixed and isinstance(fixed["params"], dict) and isinstance(getattr(current, "params", None), dict):
        fixed["params"] = _merged(current.params, fixed["params"])
    return dataclasses.replace(current, **fixed)


def _merged(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in old.items()}
    for name, fields in new.items():
        if isinstance(fields, dict) and isinstance(out.get(name), dict):
            out[name] = {**out[name], **fields}
        else:
            out[name] = fields
    return out


def _checked_types(cfg: RunConfig) -> RunConfig:
    """Reject values of the wrong type (YAML gives strings where numbers were meant)."""
    for section in [cfg, *(getattr(cfg, s) for s in SECTIONS)]:
        for f in dataclasses.fields(section):
            if f.name in SECTIONS:
                continue
            value = getattr(section, f.name)
            if not _type_ok(str(f.type), value):
                raise ConfigError(f"'{f.name}' has the wrong type: {value!r} (expected {f.type})")
    return cfg


def _type_ok(annotation: str, value: Any) -> bool:
    if value is None:
        return "None" in annotation
    if isinstance(value, bool):
        return "bool" in annotation
    if annotation.startswith("bool"):
        return False  # a bool value returned above; anything else is the wrong type
    if annotation.startswith("tuple[int"):
        return isinstance(value, tuple) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
    if annotation.startswith("tuple[float"):
        return isinstance(value, tuple) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        )
    if annotation.startswith("tuple[str"):
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    if annotation.startswith("int"):
        return isinstance(value, int)
    if annotation.startswith("float"):
        return isinstance(value, (int, float))
    if annotation.startswith("str"):
        return isinstance(value, str)
    return True


def _check_model_gossip(cfg: RunConfig) -> None:
    """What model gossip cannot combine with: it takes plain SGD half-steps and sends whole models."""
    pc = cfg.peers
    if pc.optimizer != "sgd":
        raise ConfigError(f"--gossip models takes plain SGD half-steps (x - lr * g), not {pc.optimizer}: "
                          f"pass --optimizer sgd and an SGD learning rate (e.g. --lr {MODEL_GOSSIP_LR:g})")
    if pc.secagg or any(d != "none" for d in pc.defences):
        raise ConfigError("--gossip models sends whole models: defences and --secagg apply to gradients only")


# The SGD learning rate model gossip learns digits with: 6 honest peers, batches 1-8, a line, 2 mix
# rounds reach 0.91 mean (worst 0.89) accuracy in 300 steps (0.89 at 0.5; 0.45 at 0.1 in 150 steps;
# lr 1 diverges; benchmarks/model_gossip.py).
MODEL_GOSSIP_LR = 0.3


def parse_scalar(text: str) -> Any:
    """A value given as text (a flag, a sweep axis): 3, 0.5, 1e-4, true/false, none, else the text."""
    text = text.strip()
    if text.lower() in ("none", "null"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _known(what: str, name: str, known: Any) -> None:
    if name not in known:
        raise ConfigError(f"unknown {what} '{name}' (known: {', '.join(sorted(known))})")


def _positive(what: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{what} must be > 0, got {value}")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def check_attackable(cfg: RunConfig) -> None:
    """Refuse honest batch sizes the attacker would skip (counted as batch_too_large, never
    attacked) unless the config says that is intended (attack.allow_unattacked)."""
    a = cfg.attack
    skipped = sorted({b for b in cfg.peers.batch_sizes if b > a.max_batch_size})
    if skipped and not a.allow_unattacked:
        raise ConfigError(
            f"batch size(s) {','.join(map(str, skipped))} exceed the attacker's max_batch_size "
            f"{a.max_batch_size}: their updates would never be attacked; raise --max-batch-size or "
            "pass --allow-unattacked on")
