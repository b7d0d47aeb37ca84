"""A peer as a network node: Peer logic + gRPC server/clients + metrics exporter + its loop.

`PeerNode` is a plain class (tests drive it in-process). In lock-step mode the
driver calls `step` and `apply`; in async mode `start_loop` runs the same two on
the peer's own clock (p2p.clock) in a thread of its own, until its steps are done
or `stop`. The node only translates and delegates: the protocol logic is in
p2p/peer.py, the wire in p2p/transport.py. Ray hosting is in gradleak/runtime/host.py.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch

from gradleak.core.devices import resolve_device
from gradleak.core.models import create_model, init_model
from gradleak.runtime.evaluator_shards import as_shards
from gradleak.runtime.faults import rejoin_version, resume_step
from gradleak.runtime.model_exchange import ModelExchange, model_gossip_for
from gradleak.runtime.telemetry import Metrics, resolve_host, start_exporter
from p2p.aggregate import parse_aggregate
from p2p.clock import PeerClock
from p2p.defences import parse_defence
from p2p.errors import TransportError, UpdateRejected
from p2p.identity import Caller
from p2p.membership import membership_for
from p2p.memory import retain_freed_memory
from p2p.peer import MAX_SAMPLES, MAX_UPDATE_NORM, Applied, Batch, InboxLimits, Peer
from p2p.secagg import SecureAggregation
from p2p.staleness import parse_staleness
from p2p.tls import TlsMaterial
from p2p.topology import choose_targets
from p2p.transport import GossipClient, GossipServer
from p2p.update import Update

log = logging.getLogger(__name__)

# A model of at least RETAIN_FROM_BYTES has its freed update buffers kept warm (p2p.memory):
# room for RETAIN_UPDATES updates in flight (encoding, decoding, queued) per malloc arena.
RETAIN_FROM_BYTES = 1 << 20
RETAIN_UPDATES = 4


@dataclass(frozen=True)
class PeerSpec:
    """Everything one node needs; built by the runner from the RunConfig."""

    peer_id: str
    role: str  # "honest" | "malicious"
    shard_images: np.ndarray
    shard_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    input_shape: tuple[int, int, int]
    num_classes: int
    model: str
    batch_size: int
    defence: str
    lr: float
    optimizer: str
    seed: int  # this peer's own stream (batches, noise)
    model_seed: int  # shared by all peers: everyone starts from the same weights
    init: str = "sigmoid"  # model init (gradleak.core.models.INITS), drawn from model_seed
    keep_versions: int = 256
    keep_bytes: int = 64 << 20
    fanout: int = 2
    topology: str = "complete"
    timeout_s: float = 10.0
    chunk_bytes: int = 1 << 20
    bulk_min_bytes: int = 4 << 20  # payloads this large take the receiver's bulk lane (0: no lane)
    host: str = "127.0.0.1"
    port: int = 0  # gossip port to bind (0: any free one; a standalone peer binds its roster address)
    metrics_port: int = 0  # /metrics port (0: any free one)
    threads: int = 1
    device: str = "cpu"  # honest peers train on the CPU unless told
    tls: TlsMaterial | None = None  # mutual TLS on this peer's server and clients
    secagg: SecureAggregation | None = None  # this member's keys when the peers mask updates
    period_s: float = 0.25  # seconds between local steps in async mode
    jitter: float = 0.1  # each gap varies by up to this share of the period (seeded)
    staleness: str = "poly:0.5"  # how late updates are weighed (p2p.staleness)
    secagg_wait: int = 0  # applies a masked step may wait for the rest of its group
    mix_every: int = 0  # every this many steps, average the model with a neighbour's (0: never)
    mix_weight: float = 0.5  # how far toward the neighbour's weights
    lockstep: bool = False  # rounds mode: pull the neighbour's model at our own version (reproducible)
    aggregate: str = "mean"  # how a step's updates are combined (p2p.aggregate)
    max_update_norm: float = MAX_UPDATE_NORM  # L2 bound of an update and of an aggregate
    max_samples: int = MAX_SAMPLES  # the run's largest batch size: larger num_samples are refused
    inbox: InboxLimits = field(default_factory=InboxLimits)  # what may wait between applies (max_round: the run's steps)
    members: tuple[str, ...] = ()  # the network's peer ids (p2p.membership); empty: no roster
    insecure: bool = False  # allow a plaintext server on a non-loopback address
    # The run's defence names as headers carry them, and its batch sizes: the only metric
    # label values (anything else a header says is recorded as `other`). Empty: learn a few.
    known_defences: tuple[str, ...] = ()
    known_batch_sizes: tuple[int, ...] = ()
    run_seed: int = 0  # the run's seed: random topologies are drawn from it, alike on every peer
    exchange: str = "gradients"  # gradients | models (gossip averaging, gradleak.runtime.model_exchange)
    mixing: str = "metropolis"  # model gossip's mixing weights (gradleak.core.graphs.MIXINGS)
    mix_rounds: int = 1  # model gossip: averaging rounds per local step
    drop: float = 0.0  # model gossip: probability an outgoing model message is dropped (seeded)
    model_dtype: str = "float32"  # model gossip: the dtype models are averaged and sent in


class PeerNode:
    """One gossip member with its own gRPC server and /metrics exporter."""

    def __init__(self, spec: PeerSpec, evaluator: Any = None) -> None:
        torch.set_num_threads(spec.threads)
        self.spec = spec
        # The run's evaluator actors (EvaluatorShards, or one Ray handle), or None; a truth goes
        # to its update's shard, this peer's record rows to the shard of its own id.
        self.evaluators = as_shards(evaluator)
        self.evaluator = None if self.evaluators is None else self.evaluators.for_update(spec.peer_id)
        self.host = resolve_host(spec.host)
        self.metrics = Metrics()
        if spec.known_defences:
            self.metrics.known(defences=spec.known_defences, batch_sizes=spec.known_batch_sizes or None)
        self.exporter = start_exporter(self.metrics, host=self.host, port=spec.metrics_port)
        model = self.build_model()
        update_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if update_bytes >= RETAIN_FROM_BYTES:  # small models' buffers never leave the heap anyway
            retain_freed_memory(RETAIN_UPDATES * update_bytes)
        gossip = model_gossip_for(spec, {n: tuple(p.shape) for n, p in model.named_parameters()})
        self.peer = Peer(
            spec.peer_id, model, spec.shard_images, spec.shard_labels,
            batch_size=spec.batch_size, defence=parse_defence(spec.defence), lr=spec.lr,
            keep_versions=spec.keep_versions, keep_bytes=spec.keep_bytes, seed=spec.seed, optimizer=spec.optimizer,
            device=str(resolve_device(spec.device)), secagg=spec.secagg,
            staleness=parse_staleness(spec.staleness), secagg_wait=spec.secagg_wait,
            aggregate=parse_aggregate(spec.aggregate), max_update_norm=spec.max_update_norm,
            max_samples=spec.max_samples, inbox=spec.inbox,
            membership=membership_for(spec.peer_id, spec.members or None,
                                      spec.tls.cert_pem if spec.tls is not None else None),
            models=gossip,
        )
        self.exchange = ModelExchange(self, gossip) if gossip is not None else None
        self.metrics.device.info({"role": spec.role, "device": str(self.peer.device)})
        self.handler = self.make_handler()
        self.server = GossipServer(self, spec.peer_id, host=self.host, port=spec.port,
                                   chunk_bytes=spec.chunk_bytes, tls=spec.tls, insecure=spec.insecure,
                                   bulk=spec.bulk_min_bytes > 0)
        self.server.start()
        self._members: dict[str, str] = {}
        self._clients: dict[str, GossipClient] = {}
        self._retired: list[GossipClient] = []  # clients of replaced addresses, closed at stop
        self.incarnation = 0  # +1 each time the driver re-creates this peer after its host was lost
        self._rng = random.Random(spec.seed)
        self._mix_rng = random.Random(spec.seed + 7919)  # apart from the targets' stream
        self._lock = threading.Lock()
        self.accuracy: float | None = None
        self.accuracy_log: list[dict[str, float]] = []  # {step, time, accuracy} at each evaluation
        self.steps_done = 0
        self.sent = self.failed = self.sent_bytes = 0
        self._log: list[dict[str, Any]] = []  # per-update rows not yet handed to the evaluator
        self._log_flushed = time.monotonic()
        self._stop = threading.Event()
        self._loop: threading.Thread | None = None
        self.loop_error: str | None = None

    # -- hooks a subclass overrides ---------------------------------------------------
    def make_handler(self) -> Any:
        """What handles received updates and model pulls (the plain Peer here)."""
        return self.peer

    def build_model(self) -> torch.nn.Module:
        c, h, _w = self.spec.input_shape
        model = create_model(self.spec.model, in_channels=c, num_classes=self.spec.num_classes, image_size=h)
        init_model(model, self.spec.init, self.spec.model_seed)
        return model

    # -- UpdateHandler, called from gRPC threads -------------------------------------
    def accept_update(self, update: Update, wire_bytes: int, caller: Caller | None = None) -> None:
        self.handler.accept_update(update, wire_bytes, caller)
        d = update.header.defence
        self.metrics.received.labels(d).inc()
        self.metrics.received_bytes.labels(d).inc(wire_bytes)

    def model_at(self, version: int | None, caller: Caller | None = None) -> tuple[int, dict[str, torch.Tensor]]:
        result: tuple[int, dict[str, torch.Tensor]] = self.handler.model_at(version, caller)
        return result

    def schema(self) -> dict[str, tuple[int, ...]]:
        result: dict[str, tuple[int, ...]] = self.handler.schema()
        return result

    # -- driven by the runner --------------------------------------------------------
    def addresses(self) -> dict[str, str]:
        return {"peer_id": self.spec.peer_id, "role": self.spec.role, "defence": self.peer.defence_name,
                "device": str(self.peer.device),
                "gossip": self.server.address, "metrics": self.exporter.address,
                "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""}

    def pid(self) -> int:
        """This process's id (a fault test kills it)."""
        return os.getpid()

    def set_members(self, members: dict[str, str]) -> None:
        """The address book: peer id -> gossip address, self included.

        A peer whose address changed (restarted after its host was lost) is redialled at the
        next send. The old client is retired, not closed: a send on it from the loop thread
        may be under way, and fails on the dead address as a counted failure.
        """
        with self._lock:
            for peer_id in [p for p in self._clients if members.get(p) != self._members.get(p)]:
                self._retired.append(self._clients.pop(peer_id))
            self._members = dict(members)

    def step(self, round_: int) -> dict[str, int]:
        """Local gradient on a private batch, truth to the evaluator, update to `fanout` peers."""
        if self.spec.mix_every and round_ % self.spec.mix_every == 0:
            self.mix()
        update, batch = self.peer.local_update(round_)
        self.share_truth(update, batch)
        order = sorted(self._members)
        if self.spec.secagg is not None:  # masks cancel only in the whole group's sum
            targets = [p for p in self.spec.secagg.group if p != self.spec.peer_id]
        else:
            targets = choose_targets(self.spec.topology, self.spec.peer_id, order, self.spec.fanout, self._rng,
                                     self.spec.run_seed)
        sent = failed = nbytes = 0
        for target in targets:
            try:
                nbytes += self.client(target).push_update(update)
                sent += 1
            except TransportError as exc:
                failed += 1
                self.metrics.send_failures.labels(exc.code).inc()
        self.metrics.sent.labels(update.header.defence).inc(sent)
        self.metrics.sent_bytes.labels(update.header.defence).inc(nbytes)
        self.sent, self.failed, self.sent_bytes = self.sent + sent, self.failed + failed, self.sent_bytes + nbytes
        return {"sent": sent, "failed": failed, "bytes": nbytes}

    def mix(self) -> bool:
        """Average the model with one neighbour's (gossip averaging keeps the peers' models close).

        Peers exchange gradients taken at their own weights; without mixing, a small-batch
        peer's model drifts from the others' and learns far less (0.25 vs 0.88 held-out
        accuracy at batch 1 / 8 after 150 steps; benchmarks/learning.py). A failed pull
        or an invalid model changes nothing and is counted.
        """
        order = sorted(self._members)
        candidates = choose_targets(self.spec.topology, self.spec.peer_id, order, 1, self._mix_rng, self.spec.run_seed)
        if not candidates:
            return False
        version = self.peer.version if self.spec.lockstep else None
        try:
            _v, state = self.client(candidates[0]).get_model(version)
            self.peer.mix(state, self.spec.mix_weight)
        except (TransportError, UpdateRejected) as exc:
            self.metrics.mixes.labels("failed").inc()
            log.info("peer %s could not mix with %s: %s", self.spec.peer_id, candidates[0], exc)
            return False
        self.metrics.mixes.labels("mixed").inc()
        return True

    def share_truth(self, update: Update, batch: Batch) -> None:
        h = update.header
        self.register_truth(h.update_id, h.round, h.model_version, batch, h.defence)

    def register_truth(self, update_id: str, round_: int, model_version: int, batch: Batch,
                       defence: str = "none") -> None:
        """File a private batch with the evaluator (honest peers only); it never goes on the wire."""
        if self.evaluator is None or self.spec.role != "honest":
            return
        # Waiting makes sure the truth is filed before any attacker can score the update.
        assert self.evaluators is not None  # self.evaluator is set from it
        ray.get(self.evaluators.for_update(update_id).register_truth.remote(
            update_id, batch.images, batch.labels, origin=self.spec.peer_id, round=round_, defence=defence,
            model_version=model_version, incarnation=self.incarnation,
        ))

    # -- model gossip (exchange "models") ----------------------------------------------
    def _models(self) -> ModelExchange:
        if self.exchange is None:
            raise RuntimeError(f"peer {self.spec.peer_id} gossips gradients, not models")
        return self.exchange

    def model_for(self, neighbour: str, step: int, mix_round: int, z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model this peer sends `neighbour` at (step, mix_round): its own z (honest)."""
        return z

    def on_model_sent(self, update: Update, neighbour: str, status: str) -> None:
        """Called for every model message this peer sends: status sent | dropped | failed."""

    def model_send(self, step: int, mix_round: int) -> dict[str, int]:
        """Lock-step model gossip, first half of a round: (the half-step at round 0, then) z to every neighbour."""
        out = self._models().send(step, mix_round)
        self.sent, self.failed = self.sent + out["sent"], self.failed + out["failed"]
        self.sent_bytes += out["bytes"]
        return out

    def model_mix(self, step: int, mix_round: int, evaluate: bool = False) -> dict[str, Any]:
        """Second half: average with the round's models; the last round ends the step."""
        rows = self._models().mix(step, mix_round)
        if mix_round == self.spec.mix_rounds - 1:
            self._step_done(evaluate)
        return {"used": sum(r.lag is not None for r in rows), "missing": sum(r.lag is None for r in rows),
                "accuracy": self.accuracy}

    def _step_done(self, evaluate: bool) -> None:
        self.steps_done += 1
        self.metrics.round.set(self.steps_done)
        if time.monotonic() - self._log_flushed > 2.0:
            self.flush_log()
        if evaluate:
            self.evaluate()

    def model_weights(self) -> dict[str, Any]:
        """The current weights as numpy arrays by name (the driver's consensus distance)."""
        return self._models().weights()

    def log_row(self, row: dict[str, Any]) -> None:
        """One run record row (updates.jsonl), handed to the evaluator in batches."""
        self._log.append(row)

    def apply(self, evaluate: bool = False) -> dict[str, Any]:
        """Aggregate what arrived since the last apply and step; optionally measure accuracy."""
        applied = self.peer.apply_pending()
        if self.peer.last_refusal is not None:
            self.metrics.steps_refused.labels(self.peer.last_refusal).inc()
            log.warning("peer %s refused step %d: aggregate %s (norm %s, bound %g)", self.spec.peer_id,
                        self.steps_done + 1, self.peer.last_refusal, self.peer.last_norm,
                        self.peer.max_update_norm)
        self.steps_done += 1
        self.metrics.round.set(self.steps_done)
        self._record(applied)
        if evaluate:
            self.evaluate()
        return {"applied": len(applied), "accuracy": self.accuracy}

    def _record(self, applied: list[Applied]) -> None:
        now = time.time()
        for a in applied:
            self.metrics.update_lag.observe(a.lag)
            if a.header.origin == self.spec.peer_id:
                continue  # own update: it never travelled
            h = a.header
            self._log.append({
                "update_id": h.update_id, "origin": h.origin, "receiver": self.spec.peer_id,
                "step": h.round, "model_version": h.model_version, "num_samples": h.num_samples,
                "defence": h.defence, "sent_at": h.sent_at, "received_at": a.received_at,
                "applied_at": now, "lag": a.lag, "weight": a.weight,
            })
        if time.monotonic() - self._log_flushed > 2.0:
            self.flush_log()

    def flush_log(self, wait: bool = False) -> int:
        """Hand the per-update rows to the evaluator (the run record's updates.jsonl)."""
        rows, self._log = self._log, []
        self._log_flushed = time.monotonic()
        if rows and self.evaluator is not None:
            ref = self.evaluator.log_updates.remote(rows)
            if wait:
                ray.get(ref, timeout=10)
        return len(rows)

    def evaluate(self) -> float:
        self.accuracy = self.peer.accuracy(self.spec.test_images, self.spec.test_labels)
        self.metrics.accuracy.labels(str(self.spec.batch_size), self.peer.defence_name).set(self.accuracy)
        self.accuracy_log.append({"step": self.steps_done, "time": time.time(), "accuracy": self.accuracy})
        return self.accuracy

    # -- its own clock (async mode) ----------------------------------------------------
    def start_loop(self, steps: int, start_at: float, eval_every: int, first_step: int = 1) -> None:
        """Run local steps first_step..steps on this peer's clock from wall time `start_at`, in a thread."""
        if self._loop is not None:
            raise RuntimeError(f"peer {self.spec.peer_id} already runs its loop")
        clock = PeerClock(self.spec.period_s, self.spec.jitter, self.spec.seed, start_at)
        for _ in range(first_step - 1):  # the schedule of the steps before is not ours to keep
            clock.next_due()
        self._loop = threading.Thread(target=self._run_loop, args=(steps, clock, eval_every, first_step),
                                      name=f"loop-{self.spec.peer_id}", daemon=True)
        self._loop.start()

    def rejoin(self, sources: list[str], shipped: dict[str, int] | None, incarnation: int,
               steps: int, start_at: float, eval_every: int) -> dict[str, Any]:
        """Continue a lost peer's part: the network's current model, then the rest of its steps.

        The model comes from the first of `sources` (live peers, neighbours first) that
        answers a GetModel; with none, the peer goes on from its initial weights, and says
        so. shipped: the evaluator's last step and model version of the dead incarnation
        (faults.resume_step and faults.rejoin_version say why both matter).
        """
        self.incarnation = incarnation
        shipped_version = shipped["model_version"] if shipped and shipped["model_version"] >= 0 else None
        source: str | None = None
        source_version = None
        for candidate in sources:
            try:
                source_version, state = self.client(candidate).get_model(None)
                self.peer.adopt(state, rejoin_version(source_version, shipped_version))
            except (TransportError, UpdateRejected) as exc:
                log.warning("peer %s could not rejoin from %s: %s", self.spec.peer_id, candidate, exc)
                continue
            source = candidate
            break
        after = shipped["step"] if shipped else 0
        clock = PeerClock(self.spec.period_s, self.spec.jitter, self.spec.seed, start_at)
        first = resume_step(clock, after, time.time())
        self.steps_done = first - 1
        self.evaluate()
        self.start_loop(steps, start_at, eval_every, first)
        return {"source": source, "source_version": source_version, "version": self.peer.version,
                "after_step": after, "first_step": first, "steps_lost": first - after - 1,
                "accuracy": self.accuracy}

    def _run_loop(self, steps: int, clock: PeerClock, eval_every: int, first_step: int = 1) -> None:
        try:
            for step in range(first_step, steps + 1):
                if self._stop.wait(max(0.0, clock.next_due() - time.time())):
                    return
                evaluate = step % eval_every == 0 or step == steps
                if self.exchange is not None:
                    # Half the period for the rounds' arrivals; the clock keeps the rest.
                    gap = 0.5 * self.spec.period_s / self.spec.mix_rounds
                    if not self.exchange.run_step(step, gap, self._stop, evaluate):
                        return
                    continue
                self.step(step)
                self.apply(evaluate=evaluate)
        except Exception as exc:  # noqa: BLE001 - the driver reports it instead of a silent stop
            self.loop_error = f"{type(exc).__name__}: {exc}"
        finally:
            self.flush_log()

    def progress(self) -> dict[str, Any]:
        """Where this peer stands, for the driver's watch."""
        running = self._loop is not None and self._loop.is_alive()
        return {"peer_id": self.spec.peer_id, "role": self.spec.role, "steps": self.steps_done,
                "running": running, "error": self.loop_error, "accuracy": self.accuracy,
                "sent": self.sent, "failed": self.failed, "bytes": self.sent_bytes,
                "pending": self.peer.pending() + (self.exchange.gossip.pending() if self.exchange else 0),
                "batch_size": self.spec.batch_size,
                "defence": self.peer.defence_name, "accuracy_log": list(self.accuracy_log),
                "refused_steps": self.peer.aggregate_stats["refused_steps"],
                **({"models": {**self.exchange.counts, **self.exchange.gossip.stats}} if self.exchange else {})}

    def client(self, peer_id: str) -> GossipClient:
        with self._lock:
            if peer_id not in self._clients:
                if peer_id not in self._members:
                    raise TransportError("NOT_FOUND", f"no address for peer {peer_id}")
                self._clients[peer_id] = GossipClient(
                    self._members[peer_id], timeout_s=self.spec.timeout_s,
                    chunk_bytes=self.spec.chunk_bytes, tls=self.spec.tls,
                    bulk_min_bytes=self.spec.bulk_min_bytes or None,
                    schema=self.peer.schema(),  # a pulled model must be exactly ours in shape
                )
            return self._clients[peer_id]

    def stop(self) -> None:
        """End the loop (within one step), flush the record rows, close server and clients."""
        self._stop.set()
        if self._loop is not None:
            self._loop.join(timeout=5)
        try:
            self.flush_log(wait=True)
        except Exception as exc:  # noqa: BLE001 - an evaluator already gone must not block stopping
            log.warning("peer %s could not hand over its last update rows: %s", self.spec.peer_id, exc)
        self.server.stop(grace=0.5)
        for c in [*self._clients.values(), *self._retired]:
            c.close()
