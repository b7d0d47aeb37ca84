"""Ray hosting of peers: one actor process may host several peers.

Each hosted peer keeps its own gRPC server, address, exporter, model and loop; the
host only fans the driver's calls out to them. Several peers per process is how
many peers fit on a small machine: each Ray worker process costs a few hundred MB
and a share of a CPU, a peer thread only its model and its steps.
"""

from __future__ import annotations

import os
from typing import Any

import ray
import torch

from gradleak.runtime.peer_node import PeerNode, PeerSpec


class PeerHost:
    """Several PeerNodes in one process, driven together."""

    def __init__(self, specs: list[PeerSpec], evaluator: Any = None, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.nodes: list[PeerNode] = []
        try:
            for spec in specs:
                self.nodes.append(PeerNode(spec, evaluator))
        except Exception:
            self.stop()  # servers already started must not outlive a failed start
            raise

    def addresses(self) -> list[dict[str, str]]:
        return [n.addresses() for n in self.nodes]

    def set_members(self, members: dict[str, str]) -> None:
        for n in self.nodes:
            n.set_members(members)

    def step(self, round_: int) -> list[dict[str, int]]:
        return [n.step(round_) for n in self.nodes]

    def apply(self, evaluate: bool = False) -> list[dict[str, Any]]:
        return [n.apply(evaluate) for n in self.nodes]

    def model_send(self, step: int, mix_round: int) -> list[dict[str, int]]:
        return [n.model_send(step, mix_round) for n in self.nodes]

    def model_mix(self, step: int, mix_round: int, evaluate: bool = False) -> list[dict[str, Any]]:
        return [n.model_mix(step, mix_round, evaluate) for n in self.nodes]

    def model_weights(self) -> list[dict[str, Any]]:
        return [n.model_weights() for n in self.nodes]

    def evaluate_all(self) -> list[float]:
        return [n.evaluate() for n in self.nodes]

    def start_loops(self, steps: int, start_at: float, eval_every: int) -> None:
        for n in self.nodes:
            n.start_loop(steps, start_at, eval_every)

    def rejoin(self, plans: list[dict[str, Any]], steps: int, start_at: float,
               eval_every: int) -> list[dict[str, Any]]:
        """Each hosted peer rejoins by its plan (sources, shipped, incarnation): PeerNode.rejoin."""
        return [n.rejoin(p["sources"], p["shipped"], p["incarnation"], steps, start_at, eval_every)
                for n, p in zip(self.nodes, plans, strict=True)]

    def pid(self) -> int:
        """This process's id (a fault test kills it)."""
        return os.getpid()

    def progress(self) -> list[dict[str, Any]]:
        return [n.progress() for n in self.nodes]

    def flush(self) -> int:
        return sum(n.flush_log(wait=True) for n in self.nodes)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


PeerHostActor = ray.remote(PeerHost)
