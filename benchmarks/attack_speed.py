"""Our attacks against the published DLG loop, side by side, same images, same threads.

    .venv/bin/python benchmarks/attack_speed.py --images 8 --threads 1

Prints, on 32x32 colour crops with the DLG paper's LeNet:
  1. batch 1: share of images reaching the target PSNR and median time to it, and the
     baseline/ours ratio of those medians;
  2. batches of 4 and 8: mean PSNR after the same wall-clock budget;
  3. k captured updates attacked together vs one by one: reconstructions per second.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baseline_dlg import published_dlg
from data import colour_crops

from attacker.api import AttackConfig, Observation, compute_gradients, create_attack
from attacker.metrics import match_batch, psnr
from gradleak.core.models import create_model, init_dlg_uniform

CLASSES = 10
DEVICE = torch.device("cpu")  # --device


def victim(images: np.ndarray, seed: int) -> tuple[torch.nn.Module, list[torch.Tensor], Observation]:
    model = init_dlg_uniform(create_model("lenet", in_channels=3, num_classes=CLASSES, image_size=32),
                             torch.Generator().manual_seed(seed)).to(DEVICE)
    labels = (torch.arange(len(images)) % CLASSES).to(DEVICE)
    x = torch.from_numpy(images).to(DEVICE)
    grads = [g.detach() for g in compute_gradients(model, x, labels)]
    obs = Observation(gradients=tuple(grads), batch_size=len(images), input_shape=(3, 32, 32),
                      num_classes=CLASSES)
    return model, grads, obs


def mean_psnr(recon: np.ndarray, truth: np.ndarray) -> float:
    perm = match_batch(recon, truth)
    return float(np.mean([psnr(recon[int(perm[j])], truth[j]) for j in range(len(truth))]))


class Watch:
    """Callback that records time-to-target and stops at a wall-clock budget."""

    def __init__(self, truth: np.ndarray, target: float, budget: float) -> None:
        self.truth, self.target, self.budget = truth, target, budget
        self.start = time.perf_counter()
        self.reached: float | None = None
        self.last = np.zeros_like(truth)

    def __call__(self, _it: int, images: torch.Tensor) -> bool:
        elapsed = time.perf_counter() - self.start
        self.last = images.detach().cpu().numpy()
        if self.reached is None and mean_psnr(self.last, self.truth) >= self.target:
            self.reached = elapsed
        return elapsed > self.budget


def run_baseline(images: np.ndarray, seed: int, target: float, budget: float) -> tuple[float | None, float]:
    model, grads, _ = victim(images, seed)
    watch = Watch(images, target, budget)
    final = published_dlg(model, grads, images.shape, CLASSES, seed=seed, on_step=watch)
    return watch.reached, mean_psnr(final.cpu().numpy(), images)


def run_ours(name: str, images: np.ndarray, seed: int, target: float, budget: float,
             cfg: AttackConfig) -> tuple[float | None, float]:
    model, _, obs = victim(images, seed)
    watch = Watch(images, target, budget)
    rec = create_attack(name, cfg).reconstruct(model, obs, callback=watch)
    return watch.reached, mean_psnr(rec.images.cpu().numpy(), images)


def part_batch1(crops: np.ndarray, attacks: list[str], target: float) -> None:
    print(f"\n## batch 1: {len(crops)} images, target {target} dB")
    rows = {"published DLG": [run_baseline(crops[i:i + 1], i, target, float("inf")) for i in range(len(crops))]}
    for name in attacks:
        rows[name] = [run_ours(name, crops[i:i + 1], i, target, float("inf"), AttackConfig(seed=i))
                      for i in range(len(crops))]
    base = _median_reached(rows["published DLG"])
    print("| attack | reached target | median time to target (s) | baseline / ours | mean final PSNR |")
    print("|---|---|---|---|---|")
    for name, res in rows.items():
        med = _median_reached(res)
        ratio = f"{base / med:.1f}x" if med and base else "-"
        hit = sum(r is not None for r, _ in res)
        print(f"| {name} | {hit}/{len(res)} | {med if med is None else round(med, 2)} | {ratio} | "
              f"{statistics.mean(p for _, p in res):.1f} |")


def _median_reached(res: list[tuple[float | None, float]]) -> float | None:
    times = [r for r, _ in res if r is not None]
    return statistics.median(times) if times else None


def part_batches(crops: np.ndarray, attacks: list[str], budget: float, sizes: tuple[int, ...]) -> None:
    print(f"\n## batches: mean PSNR after {budget:.0f} s wall clock each")
    print("| batch size | " + " | ".join(["published DLG", *attacks]) + " |")
    print("|---|" + "---|" * (1 + len(attacks)))
    for b in sizes:
        n = len(crops) // b
        cells = [statistics.mean(run_baseline(crops[i * b:(i + 1) * b], i, 1e9, budget)[1] for i in range(n))]
        for name in attacks:
            cfg = AttackConfig(seed=0, max_iters=10_000)
            try:
                cells.append(statistics.mean(
                    run_ours(name, crops[i * b:(i + 1) * b], i, 1e9, budget, cfg)[1] for i in range(n)))
            except ValueError:  # an attack that refuses this batch size
                cells.append(float("nan"))
        print(f"| {b} | " + " | ".join("-" if math.isnan(c) else f"{c:.1f}" for c in cells) + " |")


def part_many(crops: np.ndarray, attack: str, k: int) -> None:
    try:
        from attacker.batched import reconstruct_many
    except ImportError:
        print("\n## many updates: attacker.batched not available")
        return
    print(f"\n## {k} captured batch-1 updates: together vs one by one ({attack})")
    problems = [victim(crops[i % len(crops)][None], i) for i in range(k)]
    cfg = AttackConfig(seed=0)
    create_attack(attack, cfg).reconstruct(*problems[0][::2])  # warm-up: kernels, caches
    _sync()
    t0 = time.perf_counter()
    single = [create_attack(attack, cfg).reconstruct(m, o) for m, _, o in problems]
    _sync()
    one_by_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    together = reconstruct_many(attack, [m for m, _, _ in problems], [o for _, _, o in problems], cfg)
    _sync()
    joint = time.perf_counter() - t0
    p1 = statistics.mean(psnr(r.images[0].cpu().numpy(), crops[i % len(crops)])
                         for i, r in enumerate(single))
    p2 = statistics.mean(psnr(r.images[0].cpu().numpy(), crops[i % len(crops)])
                         for i, r in enumerate(together))
    print("| mode | seconds | reconstructions/s | mean PSNR |")
    print("|---|---|---|---|")
    print(f"| one by one | {one_by_one:.1f} | {k / one_by_one:.2f} | {p1:.1f} |")
    print(f"| together | {joint:.1f} | {k / joint:.2f} | {p2:.1f} |")
    print(f"throughput ratio: {one_by_one / joint:.1f}x")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    global DEVICE
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--attacks", default="analytic,idlg,ig")
    p.add_argument("--batch-attacks", default="analytic,idlg,ig", help="attacks for part 2")
    p.add_argument("--batch-images", type=int, default=8,
                   help="crops for part 2, cut into batches of 4 and of 8 (one seed per batch)")
    p.add_argument("--many-attack", default="ig", help="attack for part 3")
    p.add_argument("--target", type=float, default=30.0)
    p.add_argument("--budget", type=float, default=20.0, help="seconds per batch in part 2")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--parts", default="1,2,3")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    DEVICE = torch.device(args.device)
    crops = colour_crops(max(args.images, args.batch_images, 8))
    attacks = [a for a in args.attacks.split(",") if a]
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {args.threads} thread(s), {where}, "
          "LeNet on 32x32 colour crops")
    parts = set(args.parts.split(","))
    if "1" in parts:
        part_batch1(crops[:args.images], attacks, args.target)
    if "2" in parts:
        part_batches(crops[:args.batch_images], [a for a in args.batch_attacks.split(",") if a],
                     args.budget, (4, 8))
    if "3" in parts:
        part_many(crops, args.many_attack, args.k)


if __name__ == "__main__":
    main()
