"""A peer as a network node: Peer logic + gRPC server/clients + metrics exporter.

`PeerNode` is a plain class (tests drive it in-process); `PeerActor` is the same
class as a Ray actor. The node only translates and delegates: the protocol logic is
in p2p/peer.py, the wire in p2p/transport.py.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from gradleak.devices import resolve_device
from gradleak.models import create_model, init_model
from gradleak.telemetry import Metrics, resolve_host, start_exporter
from p2p.defences import parse_defence
from p2p.errors import TransportError
from p2p.peer import Batch, Peer
from p2p.secagg import SecureAggregation
from p2p.tls import TlsMaterial
from p2p.topology import choose_targets
from p2p.transport import GossipClient, GossipServer
from p2p.update import Update


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
    init: str = "sigmoid"  # model init (gradleak.models.INITS), drawn from model_seed
    keep_versions: int = 256
    fanout: int = 2
    topology: str = "complete"
    timeout_s: float = 10.0
    chunk_bytes: int = 1 << 20
    host: str = "127.0.0.1"
    threads: int = 1
    device: str = "cpu"  # honest peers train on the CPU unless told
    tls: TlsMaterial | None = None  # mutual TLS on this peer's server and clients
    secagg: SecureAggregation | None = None  # this member's keys when the peers mask updates


class PeerNode:
    """One gossip member with its own gRPC server and /metrics exporter."""

    def __init__(self, spec: PeerSpec, evaluator: Any = None) -> None:
        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.evaluator = evaluator  # Ray handle of the evaluator, or None
        self.host = resolve_host(spec.host)
        self.metrics = Metrics()
        self.exporter = start_exporter(self.metrics, host=self.host, port=0)
        self.peer = Peer(
            spec.peer_id, self.build_model(), spec.shard_images, spec.shard_labels,
            batch_size=spec.batch_size, defence=parse_defence(spec.defence), lr=spec.lr,
            keep_versions=spec.keep_versions, seed=spec.seed, optimizer=spec.optimizer,
            device=str(resolve_device(spec.device)), secagg=spec.secagg,
        )
        self.handler = self.make_handler()
        self.server = GossipServer(self, spec.peer_id, host=self.host, chunk_bytes=spec.chunk_bytes,
                                   tls=spec.tls)
        self.server.start()
        self._members: dict[str, str] = {}
        self._clients: dict[str, GossipClient] = {}
        self._rng = random.Random(spec.seed)
        self._lock = threading.Lock()
        self.accuracy: float | None = None

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
    def accept_update(self, update: Update, wire_bytes: int) -> None:
        self.handler.accept_update(update, wire_bytes)
        d = update.header.defence
        self.metrics.received.labels(d).inc()
        self.metrics.received_bytes.labels(d).inc(wire_bytes)

    def model_at(self, version: int | None) -> tuple[int, dict[str, torch.Tensor]]:
        result: tuple[int, dict[str, torch.Tensor]] = self.handler.model_at(version)
        return result

    # -- driven by the runner --------------------------------------------------------
    def addresses(self) -> dict[str, str]:
        return {"peer_id": self.spec.peer_id, "role": self.spec.role, "defence": self.peer.defence_name,
                "gossip": self.server.address, "metrics": self.exporter.address,
                "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""}

    def set_members(self, members: dict[str, str]) -> None:
        """The address book: peer id -> gossip address, self included."""
        self._members = dict(members)

    def step(self, round_: int) -> dict[str, int]:
        """Local gradient on a private batch, truth to the evaluator, update to `fanout` peers."""
        update, batch = self.peer.local_update(round_)
        self.share_truth(update, batch)
        order = sorted(self._members)
        if self.spec.secagg is not None:  # masks cancel only in the whole group's sum
            targets = [p for p in self.spec.secagg.group if p != self.spec.peer_id]
        else:
            targets = choose_targets(self.spec.topology, self.spec.peer_id, order, self.spec.fanout, self._rng)
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
        return {"sent": sent, "failed": failed, "bytes": nbytes}

    def share_truth(self, update: Update, batch: Batch) -> None:
        if self.evaluator is None or self.spec.role != "honest":
            return
        # Waiting makes sure the truth is filed before any attacker can score the update.
        ray.get(self.evaluator.register_truth.remote(
            update.header.update_id, batch.images, batch.labels,
            origin=self.spec.peer_id, round=update.header.round, defence=update.header.defence,
        ))

    def apply(self, round_: int, evaluate: bool = False) -> dict[str, Any]:
        applied = self.peer.apply_round(round_)
        self.metrics.round.set(round_)
        if evaluate:
            self.evaluate()
        return {"applied": applied, "accuracy": self.accuracy}

    def evaluate(self) -> float:
        self.accuracy = self.peer.accuracy(self.spec.test_images, self.spec.test_labels)
        self.metrics.accuracy.labels(str(self.spec.batch_size), self.peer.defence_name).set(self.accuracy)
        return self.accuracy

    def client(self, peer_id: str) -> GossipClient:
        with self._lock:
            if peer_id not in self._clients:
                if peer_id not in self._members:
                    raise TransportError("NOT_FOUND", f"no address for peer {peer_id}")
                self._clients[peer_id] = GossipClient(
                    self._members[peer_id], timeout_s=self.spec.timeout_s,
                    chunk_bytes=self.spec.chunk_bytes, tls=self.spec.tls,
                )
            return self._clients[peer_id]

    def stop(self) -> None:
        self.server.stop(grace=0.5)
        for c in self._clients.values():
            c.close()


PeerActor = ray.remote(PeerNode)
