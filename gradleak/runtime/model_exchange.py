"""Model gossip on a peer node: the half-step, sending z to every neighbour, the averaging rounds.

The protocol is p2p.model_gossip's; this module only hosts it on a PeerNode: it
registers each local step's private batch with the evaluator (once, under
f"{peer}/r{step}"), sends each round's model to every topology neighbour over gRPC
(fanout does not apply), drops outgoing messages with probability `drop` (seeded per
sender, counted), and turns the averaging rows into run record rows.

A node's `model_for(neighbour, step, mix_round, z)` is the one place that decides what
a neighbour receives (the malicious node's strategies override it).
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any, Protocol

import torch

from gradleak.core.graphs import build_graph, mixing_weights
from p2p.errors import TransportError
from p2p.model_gossip import MODEL_DTYPES, MixRow, ModelGossip, own_update_id
from p2p.peer import Batch, Peer
from p2p.transport import GossipClient
from p2p.update import Update, UpdateHeader

EXCHANGES = ("gradients", "models")


class Node(Protocol):
    """What ModelExchange needs of its PeerNode (a protocol: peer_node imports this module)."""

    spec: Any  # the PeerSpec
    peer: Peer
    metrics: Any

    def client(self, peer_id: str) -> GossipClient: ...
    def register_truth(self, update_id: str, round_: int, model_version: int, batch: Batch,
                       defence: str = "none") -> None: ...
    def log_row(self, row: dict[str, Any]) -> None: ...
    def model_for(self, neighbour: str, step: int, mix_round: int,
                  z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...
    def on_model_sent(self, update: Update, neighbour: str, status: str) -> None: ...
    def model_send(self, step: int, mix_round: int) -> dict[str, int]: ...
    def model_mix(self, step: int, mix_round: int, evaluate: bool = False) -> dict[str, Any]: ...


def model_gossip_for(spec: Any, shapes: dict[str, tuple[int, ...]]) -> ModelGossip | None:
    """The spec's ModelGossip (None in gradient mode): its row of W over the run's members."""
    if spec.exchange == "gradients":
        return None
    if spec.exchange not in EXCHANGES:
        raise ValueError(f"unknown exchange '{spec.exchange}' (known: {', '.join(EXCHANGES)})")
    if spec.peer_id not in spec.members:
        raise ValueError("model gossip needs the run's members (the mixing weights are over all of them)")
    graph = build_graph(spec.topology, sorted(spec.members), spec.run_seed)
    return ModelGossip(spec.peer_id, mixing_weights(graph, spec.peer_id, spec.mixing),
                       mix_rounds=spec.mix_rounds, lockstep=spec.lockstep, shapes=shapes,
                       max_round=spec.inbox.max_round, max_norm=spec.max_update_norm,
                       max_pending_per_origin=spec.inbox.max_pending_per_origin,
                       dtype=MODEL_DTYPES[spec.model_dtype])


class ModelExchange:
    """One node's part of model gossip; the node's Peer holds the ModelGossip inbox."""

    def __init__(self, node: Node, gossip: ModelGossip) -> None:
        self.node = node
        self.gossip = gossip
        spec = node.spec
        graph = build_graph(spec.topology, sorted(spec.members), spec.run_seed)
        # W[receiver, me]: the weight each neighbour applies to what this peer sends it.
        self.weight_at = {p: mixing_weights(graph, p, spec.mixing)[spec.peer_id] for p in gossip.neighbours}
        self._drop = random.Random(f"drop:{spec.run_seed}:{spec.peer_id}")
        self.counts = {"sent": 0, "failed": 0, "dropped": 0, "bytes": 0, "missing": 0}
        self._lock = threading.Lock()

    def send(self, step: int, mix_round: int) -> dict[str, int]:
        """Round `mix_round` of step `step`: at round 0 the half-step first; then z to every neighbour."""
        node, spec = self.node, self.node.spec
        if mix_round == 0:
            h, batch = node.peer.half_step()
            node.register_truth(f"{spec.peer_id}/r{step}", step, node.peer.version, batch)
            self.gossip.start(step, h)
        z = self.gossip.current()
        out = {"sent": 0, "failed": 0, "dropped": 0, "bytes": 0}
        for target in self.gossip.neighbours:
            header = UpdateHeader(
                update_id=own_update_id(spec.peer_id, step, mix_round), origin=spec.peer_id,
                sender=spec.peer_id, round=step, model_version=node.peer.version,
                num_samples=spec.batch_size, mixing_weight=self.weight_at[target], sent_at=time.time(),
                kind="model", mix_round=mix_round,
            )
            update = Update(header, node.model_for(target, step, mix_round, z))
            if spec.drop > 0 and self._drop.random() < spec.drop:
                out["dropped"] += 1
                node.on_model_sent(update, target, "dropped")
                node.log_row({"kind": "model", "update_id": header.update_id, "step": step,
                              "mix_round": mix_round, "sender": spec.peer_id, "receiver": target,
                              "weight": None, "lag": None, "dropped": True, "sent_at": header.sent_at})
                continue
            try:
                out["bytes"] += node.client(target).push_update(update, sparse="never")
                out["sent"] += 1
                node.on_model_sent(update, target, "sent")
            except TransportError as exc:
                out["failed"] += 1
                node.on_model_sent(update, target, "failed")
                node.metrics.send_failures.labels(exc.code).inc()
        with self._lock:
            for k, v in out.items():
                self.counts[k] += v
        node.metrics.sent.labels("none").inc(out["sent"])
        node.metrics.sent_bytes.labels("none").inc(out["bytes"])
        return out

    def mix(self, step: int, mix_round: int) -> list[MixRow]:
        """Average round `mix_round`; after the last one the model becomes z (a new version)."""
        rows = self.gossip.average()
        now = time.time()
        for r in rows:
            if r.lag is None:
                self.counts["missing"] += 1
            self.node.log_row({"kind": "model", "update_id": own_update_id(r.sender, r.step, r.mix_round),
                               "step": r.step, "mix_round": r.mix_round, "sender": r.sender,
                               "receiver": r.receiver, "weight": r.weight, "lag": r.lag,
                               "dropped": False, "missing": r.lag is None,
                               "received_at": r.received_at, "applied_at": now})
        if mix_round == self.gossip.mix_rounds - 1:
            self.node.peer.set_weights(self.gossip.current())
        return rows

    def run_step(self, step: int, gap_s: float, stop: threading.Event, evaluate: bool) -> bool:
        """One whole local step on the peer's own clock (async): each round sends, waits `gap_s`
        for the neighbours' models, then averages. False when stopped in between."""
        for r in range(self.gossip.mix_rounds):
            self.node.model_send(step, r)
            if stop.wait(gap_s):
                return False
            self.node.model_mix(step, r, evaluate)
        return True

    def weights(self) -> dict[str, Any]:
        """The model as plain float32 lists by name (the driver's consensus distance, tests)."""
        return {n: p.detach().cpu().to(torch.float32).numpy() for n, p in self.node.peer.model.named_parameters()}
