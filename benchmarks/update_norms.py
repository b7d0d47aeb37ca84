"""How large are honest updates? L2 norms of updates and aggregates on the default run.

    .venv/bin/python benchmarks/update_norms.py [--seeds 2] [--rounds 300] [--defence none]

In-process Peers (no Ray, no gRPC) with `gradleak run`'s defaults, as
benchmarks/learning.py drives them: digits at 16x16, 4 honest peers at batch sizes
1, 2, 4, 8 plus a fifth member at batch 1, the sigmoid LeNet, Adam 5e-3, fanout 2 on
a complete topology, updates 0..3 rounds late, mixing every 5 rounds. Prints the
largest and the 99th-percentile norm of single updates, of the applied aggregates and
of the gap between the two models of each mixing (Peer.mix refuses a gap over the bound),
against the default bound gossip.max_update_norm (the ratio is the headroom), and the
honest peers' final held-out accuracy (`--aggregate` shows what a robust rule costs).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradleak.config import GossipConfig, PeerConfig
from gradleak.core.models import create_model, init_model
from gradleak.data import load_dataset, split
from p2p.aggregate import l2_norm, parse_aggregate
from p2p.defences import parse_defence
from p2p.peer import Peer
from p2p.update import Update

BATCH_SIZES = (1, 2, 4, 8)


def norms(seed: int, rounds: int, defence: str, aggregate: str) -> dict[str, list[float]]:
    """Update norms, aggregate norms, L2 gaps between the models mixed, and the honest
    peers' final held-out accuracy, of one seeded run."""
    pc, gc = PeerConfig(), GossipConfig()
    data = load_dataset("digits", limit=4000, seed=seed)
    shards, test = split(data, len(BATCH_SIZES) + 1, test_fraction=0.2, seed=seed)
    sizes = [*BATCH_SIZES, 1]
    peers = []
    for i, shard in enumerate(shards):
        model = init_model(create_model("lenet", in_channels=1, num_classes=10, image_size=16), pc.init, seed)
        peers.append(Peer(f"p{i}", model, shard.images, shard.labels, batch_size=sizes[i],
                          defence=parse_defence(defence), lr=pc.lr, keep_versions=2, seed=seed * 1000 + i + 1,
                          optimizer=pc.optimizer, aggregate=parse_aggregate(aggregate),
                          max_update_norm=float("inf"), max_samples=max(BATCH_SIZES)))
    rng = random.Random(seed)
    updates: list[float] = []
    aggregates: list[float] = []
    gaps: list[float] = []
    in_flight: list[tuple[int, int, Update]] = []
    for r in range(1, rounds + 1):
        if r % gc.mix_every == 0:
            states = [p.model_at(None)[1] for p in peers]
            for i, p in enumerate(peers):
                other = states[rng.choice([k for k in range(len(peers)) if k != i])]
                gaps.append(l2_norm({n: other[n] - t for n, t in p.model_at(None)[1].items()}))
                p.mix(other, gc.mix_weight)
        for i, p in enumerate(peers):
            update, _ = p.local_update(r)
            updates.append(l2_norm(update.tensors))
            for j in rng.sample([k for k in range(len(peers)) if k != i], gc.fanout):
                in_flight.append((r + rng.randint(0, 3), j, update))
        for _due, j, update in [x for x in in_flight if x[0] == r]:
            peers[j].accept_update(update)
        in_flight = [x for x in in_flight if x[0] > r]
        for p in peers:
            p.apply_pending()
            if p.last_norm is not None:
                aggregates.append(p.last_norm)
    return {"update": updates, "aggregate": aggregates, "mix gap": gaps,
            "accuracy": [p.accuracy(test.images, test.labels) for p in peers[:len(BATCH_SIZES)]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=GossipConfig().rounds)
    ap.add_argument("--defence", default="none")
    ap.add_argument("--aggregate", default="mean")
    args = ap.parse_args()
    torch.set_num_threads(1)
    bound = GossipConfig().max_update_norm
    got: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        for k, v in norms(seed, args.rounds, args.defence, args.aggregate).items():
            got.setdefault(k, []).extend(v)
    print(f"defence {args.defence}, aggregate {args.aggregate}, {args.seeds} seeds x {args.rounds} rounds; "
          f"default bound {bound:g}")
    for what in ("update", "aggregate", "mix gap"):
        x = np.array(got[what])
        print(f"{what:9s} n={len(x):5d} median {np.median(x):.3f} p99 {np.quantile(x, 0.99):.3f} "
              f"max {x.max():.3f} (bound / max = {bound / x.max():.0f}x)")
    acc = got["accuracy"]
    print(f"honest accuracy at the end: mean {np.mean(acc):.3f}, min {min(acc):.3f}")


if __name__ == "__main__":
    main()
