"""`gradleak peer`: one gossip peer as a process of its own, without Ray.

It runs the same node the Ray actors host (gradleak/runtime/peer_node.py, its own
loop via `start_loop`): a private shard of the run's dataset chosen by shard index,
neighbours from a roster file (p2p/roster.py) through the run's topology and fanout,
mutual TLS from a directory (p2p.tls.load_tls). It waits for the other members to
answer health checks, takes its steps, and serves gossip until SIGTERM (exit 0) or
SIGINT (exit 130). Progress goes to `<out>/<peer-id>.status.json` every second and
once more after the stop. Bad input prints one line and exits 2 before anything binds.

This is what a user runs to join a network by hand, what the network namespaces of
deploy/netns/ run, and what a test can attack from outside. There is no evaluator:
an honest peer measures its own held-out accuracy; a malicious peer (`--role
malicious`) attacks what it receives and reports coverage (attacked / received),
which needs no ground truth.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradleak.config import ConfigError, RunConfig, from_dict, load_yaml
from gradleak.flags import FLAGS, add_flags, overlay

if TYPE_CHECKING:
    from gradleak.runtime.peer_node import PeerNode, PeerSpec
    from p2p.roster import Roster
    from p2p.tls import TlsMaterial

# The run flags that mean something for one peer; the rest (Ray, placement, the number
# of peers, the evaluator's port, the host) belong to `gradleak run` or come from the roster.
PEER_FLAGS = (
    "--batch-size", "--defence", "--model", "--init", "--optimizer", "--lr", "--peer-device",
    "--rounds", "--fanout", "--topology", "--period", "--jitter", "--staleness", "--mix-every",
    "--mix-weight", "--attack", "--fallback", "--attack-budget", "--max-age", "--max-iters",
    "--queue-size", "--max-batch-size", "--device", "--dataset", "--data-root", "--image-size",
    "--limit", "--seed", "--out", "--keep-versions", "--keep-mb", "--aggregate", "--max-update-norm",
    "--step-window", "--inbox-per-origin", "--inbox-total", "--inbox-masked-steps", "--insecure",
    "--gossip", "--mixing", "--mix-rounds", "--drop",
)
ROLES = ("honest", "malicious")
STATUS_EVERY_S = 1.0


class PeerError(ValueError):
    """Bad input for `gradleak peer`: one line, exit 2, nothing started."""


@dataclass(frozen=True)
class PeerArgs:
    """The peer's own options (the run's come as a RunConfig)."""

    peer_id: str
    listen: str
    roster: str
    tls_dir: str | None = None
    role: str = "honest"
    shard: str | None = None  # "I/N"; default: the peer's place in the roster / its size
    metrics_port: int = 0
    wait_s: float = 30.0  # how long to wait for the other members before the first step


def add_peer_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("peer", help="run one gossip peer as its own process (no Ray), serving "
                                           "until SIGTERM or Ctrl-C")
    p.add_argument("--peer-id", required=True, metavar="ID", help="this peer's id, as the roster names it")
    p.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="address the gossip server binds; its port must be the roster's for this peer")
    p.add_argument("--roster", required=True, metavar="FILE",
                   help='JSON roster of the members: {"peers": [{"id": ..., "address": "HOST:PORT"}, ...]}')
    p.add_argument("--tls-dir", metavar="DIR", help="mutual TLS material: DIR/ca.pem, cert.pem, key.pem")
    p.add_argument("--role", default="honest", choices=ROLES, help="honest (default) or malicious (attacks "
                   "what it receives, reports coverage)")
    p.add_argument("--shard", metavar="I/N", help="take private shard I of N of the dataset (default: the "
                   "peer's place in the roster / the roster's size); batch size, defence and period are "
                   "the I-th of theirs in turn, as in `gradleak run`")
    p.add_argument("--metrics-port", type=int, default=0, metavar="PORT",
                   help="this peer's /metrics port (default: 0, any free port)")
    p.add_argument("--wait", type=float, default=30.0, metavar="S",
                   help="seconds to wait for the other members to answer before the first step (default: 30)")
    p.add_argument("--config", metavar="FILE", help="YAML run config shared by the network (flags override it)")
    add_flags(p, skip=set(FLAGS) - set(PEER_FLAGS))


def peer_args(args: argparse.Namespace) -> PeerArgs:
    return PeerArgs(peer_id=args.peer_id, listen=args.listen, roster=args.roster, tls_dir=args.tls_dir,
                    role=args.role, shard=args.shard, metrics_port=args.metrics_port, wait_s=args.wait)


def config_of(args: argparse.Namespace) -> RunConfig:
    """The run config: YAML file first (if any), then the flags; ConfigError on bad values."""
    cfg = load_yaml(args.config) if args.config else RunConfig()
    return from_dict(overlay(args), cfg)


# -- checks, before anything starts ----------------------------------------------------------
def parse_listen(text: str) -> tuple[str, int]:
    """(host, port) of HOST:PORT or [IPv6]:PORT; PeerError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PeerError(f"bad --listen {text[:80]!r}: want HOST:PORT with a port 1-65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1])), int(port)
        except ValueError:
            raise PeerError(f"bad --listen {text[:80]!r}: {host} is not an IPv6 address") from None
    if ":" in host:  # "::1:5001" could be an address without a port
        raise PeerError(f"bad --listen {text[:80]!r}: an IPv6 host goes in brackets, [::1]:PORT")
    return host, int(port)


def parse_shard(text: str | None, default: tuple[int, int]) -> tuple[int, int]:
    if text is None:
        return default
    i, sep, n = text.partition("/")
    if not sep or not i.isdigit() or not n.isdigit() or not 0 <= int(i) < int(n):
        raise PeerError(f"bad --shard {text[:40]!r}: want I/N with 0 <= I < N")
    return int(i), int(n)


@dataclass(frozen=True)
class Plan:
    """Everything checked: what to start."""

    args: PeerArgs
    cfg: RunConfig
    roster: Roster
    host: str
    port: int
    shard: tuple[int, int]
    tls: TlsMaterial | None


def check(args: PeerArgs, cfg: RunConfig) -> Plan:
    """Every check that needs no data: PeerError (one line) on the first that fails."""
    from p2p.identity import is_loopback_host
    from p2p.roster import RosterError, check_peer_id, load_roster

    try:
        check_peer_id(args.peer_id)
        roster = load_roster(args.roster)
    except RosterError as exc:
        raise PeerError(str(exc)) from None
    if args.peer_id not in roster:
        raise PeerError(f"peer {args.peer_id} is not on the roster {args.roster} "
                        f"(members: {', '.join(list(roster)[:8])}{', ...' if len(roster) > 8 else ''})")
    if len(roster) < 2:
        raise PeerError(f"roster {args.roster} has no member but {args.peer_id}: nobody to gossip with")
    host, port = parse_listen(args.listen)
    listed = roster.address(args.peer_id)
    if int(listed.rpartition(":")[2]) != port:
        raise PeerError(f"--listen {args.listen} and the roster's {listed} for {args.peer_id} differ in "
                        "port: the other members would dial the wrong one")
    insecure = cfg.gossip.insecure  # --insecure, shared with `gradleak run`
    if args.tls_dir and insecure:
        raise PeerError("--insecure (plaintext) and --tls-dir (mutual TLS) exclude each other")
    if not args.tls_dir and not insecure and not is_loopback_host(host):
        raise PeerError(f"plaintext gossip on {host}, which is not a loopback address: give --tls-dir, "
                        "or --insecure to accept that anyone on the network can read and forge updates")
    if not 0 <= args.metrics_port <= 65535:
        raise PeerError(f"bad --metrics-port {args.metrics_port}: want 0-65535")
    if not 0 <= args.wait_s <= 3600:
        raise PeerError(f"bad --wait {args.wait_s}: want 0-3600 seconds")
    shard = parse_shard(args.shard, (list(roster).index(args.peer_id), len(roster)))
    # `gradleak run` counts the honest peers; here the roster says who the others are.
    others = max(2, len(roster) - 1)
    try:
        cfg = dataclasses.replace(cfg, peers=dataclasses.replace(cfg.peers, honest=others)).validate()
    except ConfigError as exc:
        raise PeerError(str(exc)) from None
    tls = None
    if args.tls_dir:
        from p2p.identity import cert_peer_id
        from p2p.tls import TlsError, load_tls

        try:
            tls = load_tls(args.tls_dir)
        except TlsError as exc:
            raise PeerError(str(exc)) from None
        named = cert_peer_id(tls.cert_pem)
        if named != args.peer_id:  # every other member would refuse its updates
            raise PeerError(f"{args.tls_dir}/cert.pem names peer {named!r}, not {args.peer_id} "
                            f"(want a URI SAN gradleak://peer/{args.peer_id})")
    return Plan(args, cfg, roster, host, port, shard, tls)


# -- the node --------------------------------------------------------------------------------
def build_spec(plan: Plan) -> PeerSpec:
    """The PeerSpec `gradleak run` would give the peer of this shard index (same seeds, same
    batch size / defence / period in turn), with this process's address and TLS."""
    from gradleak.data import load_dataset, split
    from gradleak.specs import peer_spec

    cfg, d = plan.cfg, plan.cfg.data
    i, n = plan.shard
    try:
        data = load_dataset(d.dataset, data_root=d.data_root, image_size=d.image_size, limit=d.limit,
                            seed=cfg.seed)
        shards, test = split(data, n, test_fraction=d.test_fraction, seed=cfg.seed)
    except (ValueError, OSError) as exc:  # unknown dataset, missing files, too few samples
        raise PeerError(str(exc)) from None
    return peer_spec(cfg, i, plan.args.peer_id, role=plan.args.role, shard=shards[i], test=test, data=data,
                     members=tuple(plan.roster), host=plan.host, tls=plan.tls, port=plan.port,
                     metrics_port=plan.args.metrics_port)


def start_node(plan: Plan, spec: PeerSpec) -> PeerNode:
    """The honest or malicious node, serving. PeerError when its addresses cannot be bound."""
    from gradleak.runtime.malicious_node import MaliciousNode
    from gradleak.runtime.peer_node import PeerNode

    try:
        if spec.role == "malicious":
            a = plan.cfg.attack
            return MaliciousNode(
                spec, None, attacks=a.attacks, fallback=a.fallback, max_age_s=a.max_age_s,
                attack_config=a.attack_config(plan.cfg.seed), attack_params=a.params,
                queue_size=a.queue_size, max_batch_size=a.max_batch_size, device=a.effective_device,
                attack_threads=a.threads)
        return PeerNode(spec)
    except (OSError, ValueError) as exc:  # address in use or not this host's; TLS naming another peer
        raise PeerError(str(exc)) from None


def counter_total(counter: Any, by: str | None = None) -> Any:
    """The sum of a Prometheus counter over its labels, or {label value: count} by one label."""
    out: dict[str, float] = {}
    total = 0.0
    for metric in counter.collect():
        for s in metric.samples:
            if s.name.endswith("_total"):
                total += s.value
                if by is not None:
                    out[s.labels[by]] = out.get(s.labels[by], 0) + s.value
    return {k: int(v) for k, v in out.items()} if by is not None else int(total)


class ProcessPeer:
    """One node in this process: waits for the others, runs its loop, reports, stops."""

    def __init__(self, plan: Plan, node: PeerNode) -> None:
        self.plan = plan
        self.node = node
        self.state = "waiting"
        self.started_at = time.time()
        self.status_path = Path(plan.cfg.out_dir) / f"{plan.args.peer_id}.status.json"
        self.received_from: Counter[str] = Counter()
        self._count_lock = threading.Lock()
        self._wrap_accept()

    def _wrap_accept(self) -> None:
        # Count accepted updates by origin after the node has accepted them (a rejected
        # one raises first and is not counted); the node's own method stays as it is.
        accept = self.node.accept_update

        def counted(update: Any, wire_bytes: int, caller: Any = None) -> None:
            accept(update, wire_bytes, caller)
            with self._count_lock:
                self.received_from[update.header.origin] += 1

        self.node.accept_update = counted  # type: ignore[method-assign]

    def wait_for_members(self, stop: threading.Event) -> list[str]:
        """Poll every other member's health until all serve, `wait_s` passes or a stop; the missing."""
        from p2p.errors import TransportError

        me = self.plan.args.peer_id
        missing = [p for p in self.plan.roster if p != me]
        deadline = time.monotonic() + self.plan.args.wait_s
        while missing and not stop.is_set():
            still = []
            for p in missing:
                try:
                    if self.node.client(p).health() != "SERVING":
                        still.append(p)
                except TransportError:
                    still.append(p)
            missing = still
            if not missing or time.monotonic() >= deadline or stop.wait(0.25):
                break
        return missing

    def status(self) -> dict[str, Any]:
        n = self.node
        p = n.progress()
        with self._count_lock:
            by_origin = dict(self.received_from)
        out = {
            "peer_id": p["peer_id"], "role": p["role"], "state": self.state,
            "gossip": n.server.address, "metrics": n.exporter.address, "tls": n.server.secure,
            "shard": list(self.plan.shard), "batch_size": p["batch_size"], "defence": p["defence"],
            "rounds": self.plan.cfg.gossip.rounds, "steps": p["steps"], "error": p["error"],
            "sent": p["sent"], "failed": p["failed"], "sent_bytes": p["bytes"],
            "send_failures": counter_total(n.metrics.send_failures, "code"),
            "received": counter_total(n.metrics.received), "received_from": by_origin,
            "mixes": counter_total(n.metrics.mixes, "outcome"),
            "accuracy": p["accuracy"], "accuracy_log": p["accuracy_log"],
            "started_at": self.started_at, "updated_at": time.time(),
        }
        status = getattr(n, "status", None)
        if callable(status):  # the malicious node: received, attacked, coverage, evicted
            out["attacker"] = status()
        return out

    def write_status(self) -> None:
        self.status_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.status_path.with_name(self.status_path.name + ".tmp")
        tmp.write_text(json.dumps(self.status(), indent=1, default=str) + "\n")
        tmp.replace(self.status_path)  # a reader never sees half a file


def serve(args: PeerArgs, cfg: RunConfig, stop: threading.Event, say: Callable[[str], None] = print) -> int:
    """Run one peer until `stop` is set. Returns 0, or 1 when its loop failed; PeerError on bad input."""
    plan = check(args, cfg)
    spec = build_spec(plan)
    if stop.is_set():
        return 0
    node = start_node(plan, spec)
    peer = ProcessPeer(plan, node)
    code = 0
    try:
        node.set_members(dict(plan.roster.members))
        node.evaluate()  # the start of the accuracy timeline
        peer.write_status()
        mode = "mutual TLS" if node.server.secure else "plaintext"
        say(f"peer {args.peer_id} ({args.role}, shard {plan.shard[0]}/{plan.shard[1]}, batch {spec.batch_size}, "
            f"defence {spec.defence}) serving gossip on {node.server.address} ({mode}), metrics on "
            f"{node.exporter.url}, status {peer.status_path}")
        missing = peer.wait_for_members(stop)
        if missing:
            say(f"peer {args.peer_id}: starting without {', '.join(missing)} (not serving after {args.wait_s:g} s)")
        if not stop.is_set():
            peer.state = "running"
            node.start_loop(plan.cfg.gossip.rounds, time.time(), plan.cfg.peers.eval_every)
        while not stop.wait(STATUS_EVERY_S):
            p = node.progress()
            if p["error"]:
                say(f"gradleak: error: peer {args.peer_id}'s loop failed: {p['error']}")
                code = 1
                break
            if peer.state == "running" and not p["running"]:
                peer.state = "done"
                say(f"peer {args.peer_id}: {p['steps']} steps done (accuracy {p['accuracy']:.2f}); serving "
                    "until stopped")
            peer.write_status()
    finally:
        node.stop()
        peer.state = "stopped"
        peer.write_status()
    return code


def run_peer_command(args: argparse.Namespace) -> int:
    """`gradleak peer`: exit 0 after SIGTERM, 130 after SIGINT, 1 if the loop failed, 2 on bad input."""
    import logging

    stop = threading.Event()
    got: list[int] = []

    def on_signal(sig: int, _frame: Any) -> None:
        got.append(sig)
        stop.set()

    # Handlers first: a stop while torch and the data load is a stop too.
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = serve(peer_args(args), config_of(args), stop, say=lambda s: print(s, flush=True))
    except (PeerError, ConfigError) as exc:
        print(f"gradleak: error: {exc}", file=sys.stderr)
        return 2
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if got and got[0] == signal.SIGINT:
        return 130
    return code


__all__ = ["PeerArgs", "PeerError", "Plan", "ProcessPeer", "add_peer_parser", "check", "run_peer_command",
           "serve"]
