"""Do honest gossip peers learn? Candidate recipes (init, optimiser, lr, rounds) in-process.

    .venv/bin/python benchmarks/learning.py [--seeds 2] [--max-lag 3]

No Ray and no gRPC: p2p.peer.Peer objects driven directly, as `gradleak run` does with
its defaults: the digits data at 16x16 split into 4 honest shards plus the malicious
member's, honest batch sizes 1, 2, 4, 8, the sigmoid LeNet, fanout 2 on a complete
topology of 5 members. The malicious member trains like an honest batch-1 peer (it
gossips its own gradients) but its accuracy is not reported.

Asynchrony is simulated: every neighbour's update reaches its receiver 0..3 rounds late
(uniform), so it was taken at weights several versions older than the ones it is
applied to, and is weighed by the default staleness rule (poly:0.5). Own updates are
never late. Recipes with mixing average each peer's model with a random neighbour's
every `mix_every` rounds (Peer.mix, as PeerNode does with a GetModel pull).

Prints, per recipe, held-out accuracy at the start / middle / end of the run per honest
batch size (mean over seeds, worst seed in brackets), and the time of one local step
(gradient + aggregate + optimiser step) of LeNet per batch size.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradleak.core.models import create_model, init_model
from gradleak.data import load_dataset, split
from p2p.defences import parse_defence
from p2p.peer import Peer
from p2p.update import Update

BATCH_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Recipe:
    name: str
    init: str
    optimizer: str
    lr: float
    rounds: int = 150
    mix_every: int = 0  # 0: gradients only
    mix_weight: float = 0.5


RECIPES = (
    Recipe("old: dlg init, adam 5e-3", "dlg", "adam", 0.005),
    Recipe("pytorch init, adam 5e-3", "default", "adam", 0.005),
    Recipe("pytorch init, adam 1e-2", "default", "adam", 0.01),
    Recipe("sigmoid init, sgd 0.5", "sigmoid", "sgd", 0.5),
    Recipe("sigmoid init, adam 1e-2", "sigmoid", "adam", 0.01),
    Recipe("sigmoid init, adam 5e-3", "sigmoid", "adam", 0.005),
    Recipe("dlg init, adam 5e-3", "dlg", "adam", 0.005, rounds=300),
    Recipe("sigmoid init, adam 5e-3", "sigmoid", "adam", 0.005, rounds=300),
    Recipe("sigmoid init, adam 5e-3, mix every 5", "sigmoid", "adam", 0.005, mix_every=5),
    Recipe("dlg init, adam 5e-3, mix every 5", "dlg", "adam", 0.005, rounds=300, mix_every=5),
    Recipe("new: sigmoid init, adam 5e-3, mix every 5", "sigmoid", "adam", 0.005, rounds=300, mix_every=5),
)


def gossip(
    recipe: Recipe, *, seed: int, max_lag: int = 3, batch_sizes: Sequence[int] = BATCH_SIZES,
    checkpoints: Sequence[int] = (), snapshot: dict[int, torch.nn.Module] | None = None,
) -> dict[int, list[float]]:
    """Run the gossip; return honest accuracies per checkpoint round (0 = start).

    `snapshot`, when given, receives a copy of the batch-1 peer's model per checkpoint.
    """
    data = load_dataset("digits", limit=4000, seed=seed)
    honest = len(batch_sizes)
    shards, test = split(data, honest + 1, test_fraction=0.2, seed=seed)
    c, h, _ = data.input_shape
    ids = [f"peer-{i}" for i in range(honest)] + ["mallory"]
    sizes = [*batch_sizes, min(batch_sizes)]
    peers = []
    for i, shard in enumerate(shards):
        model = create_model("lenet", in_channels=c, num_classes=data.num_classes, image_size=h)
        init_model(model, recipe.init, seed)  # one seed: every peer starts from the same weights
        peers.append(Peer(ids[i], model, shard.images, shard.labels, batch_size=sizes[i],
                          defence=parse_defence("none"), lr=recipe.lr, keep_versions=4,
                          seed=seed * 1000 + i + 1, optimizer=recipe.optimizer))
    rng = random.Random(seed)
    acc: dict[int, list[float]] = {}
    if 0 in checkpoints:
        acc[0] = [p.accuracy(test.images, test.labels) for p in peers[:honest]]
        if snapshot is not None:
            snapshot[0] = copy.deepcopy(peers[0].model)
    in_flight: list[tuple[int, int, Update]] = []  # (due round, receiver, update)
    for r in range(1, recipe.rounds + 1):
        if recipe.mix_every and r % recipe.mix_every == 0:
            states = [p.model_at(None)[1] for p in peers]
            for i, p in enumerate(peers):
                p.mix(states[rng.choice([k for k in range(len(peers)) if k != i])], recipe.mix_weight)
        for i, p in enumerate(peers):
            update, _ = p.local_update(r)
            for j in rng.sample([k for k in range(len(peers)) if k != i], 2):
                in_flight.append((r + rng.randint(0, max_lag), j, update))
        for _due, j, update in [x for x in in_flight if x[0] == r]:
            peers[j].accept_update(update)  # late ones arrive after their sender moved on
        in_flight = [x for x in in_flight if x[0] > r]
        for p in peers:
            p.apply_pending()
        if r in checkpoints:
            acc[r] = [p.accuracy(test.images, test.labels) for p in peers[:honest]]
            if snapshot is not None:
                snapshot[r] = copy.deepcopy(peers[0].model)
    return acc


def attack_psnr(recipe: Recipe, *, seed: int = 0, samples: int = 8) -> dict[int, tuple[float, float]]:
    """The analytic attack on batch-1 updates of the batch-1 peer's model at start / middle / end.

    Returns (mean, min) PSNR in dB over `samples` held-out digits per checkpoint round.
    """
    from attacker.attacks import AttackConfig, Observation, compute_gradients, create_attack

    from attacker.metrics import psnr

    marks = (0, recipe.rounds // 2, recipe.rounds)
    models: dict[int, torch.nn.Module] = {}
    gossip(recipe, seed=seed, checkpoints=marks, snapshot=models)
    data = load_dataset("digits", limit=4000, seed=seed)
    _, test = split(data, len(BATCH_SIZES) + 1, test_fraction=0.2, seed=seed)
    attack = create_attack("analytic", AttackConfig(seed=seed))
    out = {}
    for m in marks:
        scores = []
        for k in range(samples):
            x, y = torch.from_numpy(test.images[k:k + 1]), torch.from_numpy(test.labels[k:k + 1])
            obs = Observation(gradients=compute_gradients(models[m], x, y), batch_size=1,
                              input_shape=(1, 16, 16), num_classes=10)
            rec = attack.reconstruct(models[m], obs)
            scores.append(psnr(rec.images.detach().numpy()[0], x.numpy()[0]))
        out[m] = (float(np.mean(scores)), float(np.min(scores)))
    return out


def step_seconds(batch_size: int, repeats: int = 200) -> float:
    """One local step of LeNet at `batch_size`: gradient, aggregate of 3 updates, Adam step."""
    data = load_dataset("digits", limit=400, seed=0)
    c, h, _ = data.input_shape
    model = init_model(create_model("lenet", in_channels=c, num_classes=10, image_size=h), "sigmoid", 0)
    peer = Peer("p", model, data.images, data.labels, batch_size=batch_size,
                defence=parse_defence("none"), lr=0.005, keep_versions=4, seed=0)
    start = time.perf_counter()
    for r in range(1, repeats + 1):
        update, _ = peer.local_update(r)
        for k in range(2):  # two neighbours' updates to aggregate
            peer.accept_update(Update(dataclasses.replace(update.header, update_id=f"n{k}/{r}"),
                                      update.tensors))
        peer.apply_pending()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--max-lag", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    print(f"honest accuracy on held-out digits, lag 0..{args.max_lag}, mean over {args.seeds} "
          f"seeds [worst]; chance 0.10\n")
    print("| recipe | rounds | " + " | ".join(f"b={b} start/mid/end" for b in BATCH_SIZES) + " |")
    print("|---|---|" + "---|" * len(BATCH_SIZES))
    for recipe in RECIPES:
        marks = (0, recipe.rounds // 2, recipe.rounds)
        runs = [gossip(recipe, seed=s, max_lag=args.max_lag, checkpoints=marks) for s in range(args.seeds)]
        cells = []
        for k in range(len(BATCH_SIZES)):
            vals = [[run[m][k] for run in runs] for m in marks]
            cells.append("/".join(f"{np.mean(v):.2f}" for v in vals) + f" [{min(vals[-1]):.2f}]")
        print(f"| {recipe.name} | {recipe.rounds} | " + " | ".join(cells) + " |")
    print("\n| batch size | local step (ms): gradient + aggregate 3 + Adam |")
    print("|---|---|")
    for b in BATCH_SIZES:
        print(f"| {b} | {1000 * step_seconds(b):.2f} |")
    print("\n| recipe | analytic attack on batch-1 updates, PSNR dB mean [min] of 8 digits: "
          "start / mid / end |")
    print("|---|---|")
    for recipe in (RECIPES[0], RECIPES[-3], RECIPES[-1]):
        a = attack_psnr(recipe)
        print(f"| {recipe.name}, {recipe.rounds} rounds | "
              + " / ".join(f"{mean:.1f} [{low:.1f}]" for mean, low in a.values()) + " |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
