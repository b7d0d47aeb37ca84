"""spear on a ReLU MLP: share of batches recovered exactly against batch size and DP noise.

    .venv/bin/python benchmarks/spear.py --sizes 4,8,12,16 --batches 3 --budget 60

32x32 colour crops (benchmarks/data.py), the `relu-mlp` model at PyTorch's init
(seeded per batch), random labels (they repeat), 1 torch thread. A batch counts as
recovered when every image is at 60 dB or more after matching. Noise: Gaussian added
to every gradient entry with std sigma x the gradient's rms (DP-style), at --noise-batch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import colour_crops

import attacker  # noqa: F401  (registers every attack)
from attacker.api import AttackConfig, Observation, compute_gradients, create_attack
from attacker.metrics import match_batch, psnr
from gradleak.core.models import create_model


def one(batch: int, seed: int, sigma: float, budget: float) -> tuple[float, float]:
    """(worst image PSNR in dB, seconds) for one batch."""
    torch.manual_seed(seed)
    model = create_model("relu-mlp", in_channels=3, num_classes=10, image_size=32)
    x = torch.from_numpy(colour_crops(batch, seed=seed))
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(seed))
    grads = compute_gradients(model, x, y)
    gen = torch.Generator().manual_seed(seed + 1)
    grads = tuple(g + sigma * g.pow(2).mean().sqrt() * torch.randn(g.shape, generator=gen)
                  for g in grads)
    obs = Observation(gradients=grads, batch_size=batch, input_shape=(3, 32, 32), num_classes=10)
    start = time.perf_counter()
    rec = create_attack("spear", AttackConfig(seed=seed, time_budget_s=budget)).reconstruct(model, obs)
    seconds = time.perf_counter() - start
    perm = match_batch(rec.images.numpy(), x.numpy())
    worst = min(psnr(rec.images[int(perm[j])], x[j]) for j in range(batch))
    print(f"  B={batch} seed={seed} sigma={sigma:g}: worst {worst:.1f} dB in {seconds:.1f} s "
          f"({rec.stats['found']}/{batch} found, {rec.stats['trials']} subsets)", file=sys.stderr, flush=True)
    return worst, seconds


def table(rows: list[tuple[str, list[tuple[float, float]]]], head: str) -> None:
    print(f"| {head} | recovered (every image >= 60 dB) | median worst PSNR (dB) | median seconds |")
    print("|---|---|---|---|")
    for key, res in rows:
        hit = sum(p >= 60 for p, _ in res)
        print(f"| {key} | {hit}/{len(res)} | {statistics.median(p for p, _ in res):.1f} | "
              f"{statistics.median(s for _, s in res):.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="4,8,12,16")
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--budget", type=float, default=60.0, help="seconds per batch")
    p.add_argument("--noise", default="1e-6,1e-4,1e-2", help="sigma / gradient rms")
    p.add_argument("--noise-batch", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    print(f"torch {torch.__version__}, 1 thread, relu-mlp on 32x32 colour crops, budget {args.budget} s")
    table([(str(b), [one(b, 100 * b + i, 0.0, args.budget) for i in range(args.batches)])
           for b in sizes], "batch size")
    print()
    sigmas = [float(s) for s in args.noise.split(",") if s]
    table([(f"{s:g}", [one(args.noise_batch, 100 * args.noise_batch + i, s, args.budget)
                       for i in range(args.batches)]) for s in sigmas],
          f"noise sigma / rms (B = {args.noise_batch})")


if __name__ == "__main__":
    main()
