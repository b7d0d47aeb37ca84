"""The run flags: each maps to one RunConfig field, with a help line giving its meaning,
default and choices. `gradleak run` takes them as they are; `gradleak sweep` as the base run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from attacker.active import STRATEGIES
from gradleak.config import ConfigError, RunConfig, parse_scalar


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(","))


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(","))


def _names(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(","))


def _seconds_or_none(s: str) -> float | None:
    return None if s.strip().lower() == "none" else float(s)


def _attack_params(items: list[str]) -> dict[str, dict[str, Any]]:
    """['idlg.lr=0.5', 'ig.restarts=4'] -> {'idlg': {'lr': 0.5}, 'ig': {'restarts': 4}}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        name, dot, field = key.strip().partition(".")
        if not (eq and dot and name and field):
            raise ValueError(item)
        out.setdefault(name, {})[field] = parse_scalar(raw)
    return out


def _on_off(s: str) -> bool:
    return {"on": True, "off": False}[s]


def _models() -> Iterable[str]:
    from gradleak.core.models import MODELS

    return MODELS


def _inits() -> Iterable[str]:
    from gradleak.core.models import INITS

    return INITS


def _attacks() -> Iterable[str]:
    from attacker.api import ATTACKS

    return ATTACKS


def _attacks_or_auto() -> Iterable[str]:
    return ("auto", *_attacks())


def _topologies() -> Iterable[str]:
    from gradleak.core.graphs import topology_names

    return topology_names()


def _datasets() -> Iterable[str]:
    from gradleak.data import DATASETS

    return DATASETS


@dataclass(frozen=True)
class Flag:
    section: str  # RunConfig section, "" for a top-level field
    field: str
    parse: Callable[[Any], Any]  # the flag's text (a list of them for a `repeat` flag) -> value
    help: str  # meaning; the default and the choices are appended
    choices: Callable[[], Iterable[str]] | tuple[str, ...] | None = None
    metavar: str = "X"
    bare: str | None = None  # the value of the flag given without one (e.g. `--insecure`)
    repeat: bool = False  # may be given many times; `parse` gets the list of values

    @property
    def where(self) -> str:
        return f"{self.section}.{self.field}" if self.section else self.field

    def default(self, base: RunConfig) -> Any:
        holder = getattr(base, self.section) if self.section else base
        value = getattr(holder, self.field)
        if isinstance(value, tuple):
            return ",".join(str(v) for v in value)
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, dict):  # attack.params: NAME.FIELD=V pairs
            pairs = [f"{n}.{k}={v}" for n, fields in value.items() for k, v in fields.items()]
            return " ".join(pairs) or "none"
        return value

    def help_line(self, base: RunConfig) -> str:
        known = self.choices() if callable(self.choices) else self.choices
        choices = f"; choices: {', '.join(sorted(known))}" if known else ""
        return f"{self.help} (default: {self.default(base)}{choices}; config {self.where})"


ON_OFF = ("on", "off")
DEVICES = ("auto", "cpu", "cuda")

FLAGS: dict[str, Flag] = {
    "--peers": Flag("peers", "honest", int, "number of honest peers", metavar="N"),
    "--batch-size": Flag("peers", "batch_sizes", _ints,
                         "honest peers' batch sizes, assigned to peers in turn", metavar="B,B"),
    "--defence": Flag("peers", "defences", _names,
                      "defence chains (e.g. prune:0.3, gauss:1e-2, fp16, dp:1:1e-2; join with +), "
                      "assigned to peers in turn", metavar="D,D"),
    "--model": Flag("peers", "model", str, "the shared model", _models),
    "--init": Flag("peers", "init", str, "the shared model's initial weights (sigmoid: scaled for "
                   "sigmoid nets; dlg: the DLG paper's uniform(-0.5, 0.5))", lambda: _inits()),
    "--optimizer": Flag("peers", "optimizer", str, "local optimiser that applies the aggregate",
                        ("adam", "sgd")),
    "--lr": Flag("peers", "lr", float, "its learning rate"),
    "--keep-versions": Flag("peers", "keep_versions", int, "past weight versions each peer keeps for "
                            "model pulls", metavar="N"),
    "--keep-mb": Flag("peers", "keep_mb", float, "... and at most this many MB of them (the newest "
                      "always stays)", metavar="MB"),
    "--peer-device": Flag("peers", "device", str, "honest peers' torch device (unset: cuda with "
                          "--peer-gpus, else cpu)", DEVICES),
    "--peer-gpus": Flag("peers", "num_gpus", float, "Ray GPUs per honest peer"),
    "--secagg": Flag("peers", "secagg", _on_off,
                     "all peers form one secure-aggregation group (masked updates)", ON_OFF),
    "--rounds": Flag("gossip", "rounds", int, "local steps per peer (in both sync modes)", metavar="N"),
    "--fanout": Flag("gossip", "fanout", int, "neighbours each update is sent to", metavar="N"),
    "--topology": Flag("gossip", "topology", str, "who may send to whom", _topologies),
    "--sync": Flag("gossip", "sync", str, "async: each peer steps on its own clock; rounds: lock-step "
                   "rounds clocked by the driver (bit-reproducible)", ("async", "rounds")),
    "--period": Flag("gossip", "period_s", _floats, "seconds between a peer's local steps, assigned to "
                     "peers in turn (rounds mode: a round's minimum)", metavar="S,S"),
    "--jitter": Flag("gossip", "jitter", float, "share of the period each gap may vary by (seeded)"),
    "--staleness": Flag("gossip", "staleness", str, "weight of a late update by its version lag: "
                        "constant, poly:A ((1+lag)^-A) or cutoff:K", metavar="RULE"),
    "--mix-every": Flag("gossip", "mix_every", int, "steps between averaging the model with a "
                        "neighbour's (0: never)", metavar="N"),
    "--mix-weight": Flag("gossip", "mix_weight", float, "share of the neighbour's weights in that average"),
    "--gossip": Flag("gossip", "exchange", str, "what peers exchange: gradients (aggregated each step) or "
                     "models (a local SGD step, then --mix-rounds rounds of averaging with every "
                     "neighbour; needs --optimizer sgd)", ("gradients", "models")),
    "--mixing": Flag("gossip", "mixing", str, "model gossip's mixing weights: metropolis (Metropolis-"
                     "Hastings, doubly stochastic) or uniform (1 / (1 + degree))", ("metropolis", "uniform")),
    "--mix-rounds": Flag("gossip", "mix_rounds", int, "model gossip: averaging rounds per local step",
                         metavar="R"),
    "--model-dtype": Flag("gossip", "model_dtype", str, "model gossip: the dtype models are averaged "
                          "and sent in (float64: exact averages, for exact reproductions of the gossip "
                          "algebra; the model stays float32)", ("float32", "float64")),
    "--drop": Flag("gossip", "drop", float, "model gossip: probability each outgoing model message is "
                   "lost (seeded per sender; its weight goes to the receiver's own model)", metavar="P"),
    "--peers-per-process": Flag("peers", "per_process", int,
                                "honest peers per Ray actor process (0: as many as fit)", metavar="N"),
    "--peer-cpus": Flag("peers", "num_cpus", float, "Ray CPUs asked for each peer process"),
    "--aggregate": Flag("gossip", "aggregate", str, "how a peer combines the updates of a step: mean "
                        "(weighted), median or trimmed:F (coordinate-wise, F of the votes cut at each "
                        "end), clip:C (each update's L2 norm clipped to C, then the mean)", metavar="RULE"),
    "--bulk-min-bytes": Flag("gossip", "bulk_min_bytes", int,
                             "payloads of at least this many bytes take the receiver's bulk lane "
                             "(p2p/bulk.py; 0: no lane, the gRPC stream only)", metavar="N"),
    "--max-update-norm": Flag("gossip", "max_update_norm", float, "L2 bound of a received update "
                              "(larger: refused) and of a step's aggregate (larger or not finite: the "
                              "step is refused, the model kept)", metavar="NORM"),
    "--step-window": Flag("gossip", "step_window", int, "steps an update may lag its origin's newest "
                          "one accepted (older: RESOURCE_EXHAUSTED)", metavar="N"),
    "--inbox-per-origin": Flag("gossip", "inbox_per_origin", int, "updates one origin may have waiting "
                               "for the next apply (more: RESOURCE_EXHAUSTED)", metavar="N"),
    "--inbox-total": Flag("gossip", "inbox_total", int, "updates that may wait for the next apply in "
                          "all (more: RESOURCE_EXHAUSTED)", metavar="N"),
    "--inbox-masked-steps": Flag("gossip", "inbox_masked_steps", int, "distinct steps whose masked "
                                 "updates may wait for their group", metavar="N"),
    "--max-restarts": Flag("peers", "max_restarts", int, "lost peer processes re-created per run "
                           "(async mode; 0: a loss ends the run)", metavar="N"),
    "--tls": Flag("gossip", "tls", _on_off, "mutual TLS on every gossip link (a CA per run)", ON_OFF),
    "--insecure": Flag("gossip", "insecure", _on_off, "allow plaintext gossip on a non-loopback --host "
                       "(anyone on the network can read and forge updates); bare --insecure means on",
                       ON_OFF, bare="on"),
    "--attack": Flag("attack", "attacks", _names,
                     "attacks run on every attacked update ('auto': the first of --fallback that "
                     "supports the update)", _attacks_or_auto, metavar="A,A"),
    "--fallback": Flag("attack", "fallback", _names,
                       "the chain 'auto' picks from, fastest first", _attacks, metavar="A,A"),
    "--attack-budget": Flag("attack", "time_budget_s", _seconds_or_none,
                            "wall seconds one reconstruction may take, then its best so far is "
                            "scored ('none': no limit)", metavar="S"),
    "--max-age": Flag("attack", "max_age_s", _seconds_or_none,
                      "seconds a received update may wait for the attacker before it is evicted "
                      "('none': no limit)", metavar="S"),
    "--attack-param": Flag("attack", "params", _attack_params,
                           "one of an attack's own parameters, NAME.FIELD=VALUE (e.g. idlg.lr=0.5, "
                           "analytic.cg_tol=1e-6); repeat the flag for more; the fields per attack "
                           "are listed in README.md, 'Attack parameters'", _attacks,
                           metavar="NAME.FIELD=V", repeat=True),
    "--max-iters": Flag("attack", "max_iters", int, "outer optimiser steps per reconstruction",
                        metavar="N"),
    "--queue-size": Flag("attack", "queue_size", int,
                         "updates that may wait for the attacker (when full the stalest is evicted)",
                         metavar="N"),
    "--max-batch-size": Flag("attack", "max_batch_size", int,
                             "largest batch size the attacker attacks (larger: captured, counted, skipped)",
                             metavar="B"),
    "--allow-unattacked": Flag("attack", "allow_unattacked", _on_off,
                               "accept honest batch sizes above --max-batch-size (else refused)", ON_OFF),
    "--attack-gpus": Flag("attack", "num_gpus", float,
                          "Ray GPUs of the malicious peer (its device is then cuda unless --device says)"),
    "--device": Flag("attack", "device", str, "the attacker's torch device (auto: CUDA if torch sees it, "
                     "else the CPU with a warning; unset: cuda with --attack-gpus, else auto)", DEVICES),
    "--drain-timeout": Flag("attack", "drain_timeout_s", float,
                            "seconds after the last step for the attacker to finish", metavar="S"),
    "--attack-resource": Flag("attack", "resource", str,
                              "custom Ray resource of the nodes the attacker must run on", metavar="NAME"),
    "--strategy": Flag("attack", "strategy", str, "what the malicious peer sends in model gossip: honest, "
                       "state-override (each neighbour's next model := x0) or crafted (:= a fresh "
                       "attack-friendly init); lock-step model gossip only", STRATEGIES),
    "--label-prior": Flag("attack", "label_prior", str, "what batch label counts may draw on besides the "
                          "gradient: none, or shard (the malicious peer's own data)", ("none", "shard")),
    "--malicious": Flag("attack", "count", int, "number of colluding malicious peers, each its own "
                        "actor with its own attacks and transcript (1..--peers)", metavar="N"),
    "--malicious-placement": Flag("attack", "placement", str, "where the malicious peers sit in the "
                                  "graph: spread (evenly over the member order) or random (seeded)",
                                  ("random", "spread")),
    "--dedupe": Flag("attack", "dedupe", _on_off, "colluders share one pool: an update one attacked is "
                     "not attacked again by another", ON_OFF),
    "--transcript-bytes": Flag("attack", "transcript_bytes", int,
                               "bytes of RUN_DIR/transcript (every update the attacker receives and "
                               "the weights it pulls; entries past it are refused and counted; 0: off)",
                               metavar="BYTES"),
    "--dataset": Flag("data", "dataset", str, "dataset (torchvision ones read files under --data-root)",
                      _datasets),
    "--data-root": Flag("data", "data_root", str, "folder holding torchvision dataset files",
                        metavar="DIR"),
    "--image-size": Flag("data", "image_size", int, "resize images to this many pixels a side",
                         metavar="N"),
    "--limit": Flag("data", "limit", int, "use at most this many samples", metavar="N"),
    "--metrics-port": Flag("telemetry", "metrics_port", int,
                           "the evaluator's /metrics port (0: any free port)", metavar="PORT"),
    "--evaluators": Flag("telemetry", "evaluators", int,
                         "evaluator actors sharing the truths and scores by update id (their /metrics "
                         "on --metrics-port, +1, +2, ...)", metavar="N"),
    "--host": Flag("telemetry", "host", str,
                   "address servers bind and advertise ('auto': each node's own IP)", metavar="ADDR"),
    "--seed": Flag("", "seed", int, "seed of the split, inits, batches and attack starts", metavar="N"),
    "--out": Flag("", "out_dir", str, "each run writes a fresh directory under it", metavar="DIR"),
    "--ray-address": Flag("", "ray_address", str, "Ray cluster to join (else RAY_ADDRESS or a local Ray)",
                          metavar="ADDR"),
}


def dest(flag: str, prefix: str = "") -> str:
    return prefix + flag[2:].replace("-", "_")


def add_flags(parser: argparse.ArgumentParser, *, prefix: str = "", skip: Iterable[str] = (),
              what: str = "") -> None:
    """Add every flag (but `skip`) to `parser`, stored under `prefix` + its name."""
    base = RunConfig()
    for flag, spec in FLAGS.items():
        if flag not in skip:
            extra: dict[str, Any] = {} if spec.bare is None else {"nargs": "?", "const": spec.bare}
            if spec.repeat:
                extra["action"] = "append"
            parser.add_argument(flag, dest=dest(flag, prefix), metavar=spec.metavar,
                                help=what + spec.help_line(base), **extra)


def overlay(args: argparse.Namespace, *, prefix: str = "") -> dict[str, Any]:
    """The nested config mapping of the flags given; ConfigError on a bad value."""
    out: dict[str, Any] = {}
    for flag, spec in FLAGS.items():
        raw = getattr(args, dest(flag, prefix), None)
        if raw is None:
            continue
        try:
            value = spec.parse(raw)
        except (ValueError, KeyError):
            raise ConfigError(f"bad value for {flag}: {raw!r}") from None
        (out.setdefault(spec.section, {}) if spec.section else out)[spec.field] = value
    return out
