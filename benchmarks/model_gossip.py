"""Do peers learn with model gossip (D-PSGD)? Accuracy and consensus distance per SGD learning rate.

    .venv/bin/python benchmarks/model_gossip.py [--steps 200] [--lrs 0.03,0.1,0.3] [--topology line]

The peers are the run's own (gradleak.specs.peer_spec of a `--gossip models --sync rounds`
config: digits at 16x16, honest batch sizes 1, 2, 4, 8 in turn, the malicious member as an
ordinary one), as in-process PeerNodes over real gRPC on 127.0.0.1, without Ray or an
evaluator, clocked in lock-step like the driver does. Prints per lr the honest peers' mean
(and worst) held-out accuracy, and the consensus distance (mean pairwise L2 between the
honest models) at a few points of the run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradleak.config import DataConfig, GossipConfig, PeerConfig, RunConfig
from gradleak.data import load_dataset, split
from gradleak.runner import pairwise_distance
from gradleak.runtime.peer_node import PeerNode
from gradleak.specs import peer_spec


def nodes_for(cfg: RunConfig) -> list[PeerNode]:
    """The run's peers (honest first, the attacker last) as in-process nodes that know each other."""
    data = load_dataset(cfg.data.dataset, image_size=cfg.data.image_size, limit=cfg.data.limit, seed=cfg.seed)
    shards, test = split(data, cfg.peers.honest + 1, test_fraction=cfg.data.test_fraction, seed=cfg.seed)
    ids = [f"peer-{i}" for i in range(cfg.peers.honest)] + ["mallory"]
    nodes = [PeerNode(peer_spec(cfg, i, ids[i], role="malicious" if i == cfg.peers.honest else "honest",
                                shard=shard, test=test, data=data, members=tuple(ids), host="127.0.0.1"))
             for i, shard in enumerate(shards)]
    book = {n.spec.peer_id: n.server.address for n in nodes}
    for n in nodes:
        n.set_members(book)
    return nodes


def consensus(nodes: list[PeerNode]) -> float | None:
    vectors = []
    for n in nodes:
        if n.spec.role == "honest":
            w = n.model_weights()
            vectors.append(np.concatenate([w[k].ravel().astype(np.float64) for k in sorted(w)]))
    return pairwise_distance(vectors)


def run(cfg: RunConfig, marks: list[int]) -> dict[int, tuple[float, float, float | None]]:
    """Lock-step model gossip; at each mark: (mean accuracy, worst, consensus distance)."""
    nodes = nodes_for(cfg)
    out = {}
    try:
        for s in range(1, cfg.gossip.rounds + 1):
            for r in range(cfg.gossip.mix_rounds):
                for n in nodes:
                    n.model_send(s, r)
                for n in nodes:
                    n.model_mix(s, r)
            if s in marks:
                acc = [n.evaluate() for n in nodes if n.spec.role == "honest"]
                out[s] = (float(np.mean(acc)), float(min(acc)), consensus(nodes))
    finally:
        for n in nodes:
            n.stop()
    return out


def run_async(cfg: RunConfig) -> tuple[float, float, float | None, dict[str, int]]:
    """Every node on its own clock (PeerNode.start_loop); at the end: accuracy, worst, consensus, counts."""
    nodes = nodes_for(cfg)
    try:
        start_at = time.time() + 0.5
        for n in nodes:
            n.start_loop(cfg.gossip.rounds, start_at, cfg.gossip.rounds)
        while any(n.progress()["running"] for n in nodes):
            time.sleep(0.2)
        errors = [n.loop_error for n in nodes if n.loop_error]
        if errors:
            raise RuntimeError(errors[0])
        acc = [n.evaluate() for n in nodes if n.spec.role == "honest"]
        counts: dict[str, int] = {}
        for n in nodes:
            for k, v in n.progress()["models"].items():
                counts[k] = counts.get(k, 0) + v
        return float(np.mean(acc)), float(min(acc)), consensus(nodes), counts
    finally:
        for n in nodes:
            n.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lrs", default="0.03,0.1,0.3")
    ap.add_argument("--topology", default="line")
    ap.add_argument("--honest", type=int, default=6)
    ap.add_argument("--mix-rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-sizes", default="1,2,4,8")
    ap.add_argument("--sync", default="rounds", choices=("rounds", "async"))
    ap.add_argument("--drop", type=float, default=0.0)
    ap.add_argument("--period", type=float, default=0.1, help="async: seconds between local steps")
    a = ap.parse_args()
    marks = sorted({1, a.steps // 4, a.steps // 2, a.steps})
    for lr in (float(x) for x in a.lrs.split(",")):
        cfg = RunConfig(seed=a.seed, data=DataConfig(limit=1500),
                        peers=PeerConfig(honest=a.honest, optimizer="sgd", lr=lr,
                                         batch_sizes=tuple(int(b) for b in a.batch_sizes.split(","))),
                        gossip=GossipConfig(sync=a.sync, rounds=a.steps, exchange="models", drop=a.drop,
                                            topology=a.topology, mix_rounds=a.mix_rounds,
                                            period_s=(a.period,))).validate()
        t0 = time.perf_counter()
        if a.sync == "async":
            mean, worst, dist, counts = run_async(cfg)
            print(f"lr {lr:g} async drop {a.drop:g} ({time.perf_counter() - t0:.0f} s): step {a.steps}: acc "
                  f"{mean:.2f} (worst {worst:.2f}) consensus {dist:.3f}; messages {counts}", flush=True)
            continue
        got = run(cfg, marks)
        took = time.perf_counter() - t0
        line = "  ".join(f"step {s}: acc {m:.2f} (worst {w:.2f}) consensus {c:.3f}" for s, (m, w, c) in got.items())
        print(f"lr {lr:g} ({took:.0f} s): {line}", flush=True)


if __name__ == "__main__":
    main()
