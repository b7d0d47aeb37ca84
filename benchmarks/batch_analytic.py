"""`analytic` on colour batches whose labels repeat: PSNR and seconds per update.

    .venv/bin/python benchmarks/batch_analytic.py --sizes 2,4,8 --batches 4 --budget 3

Images: random 64-160 px crops of scikit-image's bundled photos (astronaut, coffee,
chelsea, rocket, hubble, immunohistochemistry, retina, cat), downscaled by area to
--image px colour; none is in the repository's test fixtures. Labels: drawn at random
from 10 classes until at least one repeats. Model: gradleak's LeNet (3 sigmoid
convolutions + Linear), init "sigmoid" (the live runs' default), seeded per batch;
with --trained N it first takes N Adam steps (lr 0.005) on crops labelled by the
photo they come from, so the updates come from a model that has learnt something.

Per batch size it prints mean/min PSNR over the batches (each batch's PSNR the mean
over its samples after matching), the share of batches at >= 30 dB, and seconds per
update p50/p95 for: `analytic` as it is by default (batch_method "auto": layers solved
in closed form where the counts allow, else the feature inversion), the previous path
(batch_method "features" always) and the published DLG loop
(benchmarks/baseline_dlg.py, --dlg-steps outer steps), all in this one process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline_dlg import published_dlg

from attacker.analytic import Analytic
from attacker.api import AttackConfig, Observation, compute_gradients
from attacker.metrics import match_batch, psnr
from gradleak.core.models import create_model, init_model

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "cat")


def photos() -> list[np.ndarray]:
    import skimage.data

    return [np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0 for name in PHOTOS]


def crops(pics: list[np.ndarray], n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, size, size) crops in [0, 1] and the index of the photo each came from."""
    rng = np.random.default_rng(seed)
    out, source = [], []
    for _ in range(n):
        k = int(rng.integers(len(pics)))
        pic = pics[k]
        side = int(rng.integers(64, 160))
        y, x = int(rng.integers(0, pic.shape[0] - side)), int(rng.integers(0, pic.shape[1] - side))
        patch = torch.from_numpy(pic[y:y + side, x:x + side].transpose(2, 0, 1).copy())[None]
        out.append(F.interpolate(patch, size=(size, size), mode="area")[0])
        source.append(k)
    return torch.stack(out).clamp(0.0, 1.0), torch.tensor(source)


def digit_batches(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, size, size), labels) of scikit-learn's digits, as the live runs load them."""
    from gradleak.data import load_dataset

    data = load_dataset("digits", image_size=size)
    return (torch.as_tensor(data.images, dtype=torch.float32)[:n],
            torch.as_tensor(data.labels, dtype=torch.int64)[:n])


def repeated_labels(batch: int, rng: np.random.Generator) -> torch.Tensor:
    while True:
        labels = rng.integers(0, 10, batch)
        if len(set(labels.tolist())) < batch:
            return torch.tensor(labels, dtype=torch.int64)


def victim(pics: list[np.ndarray], size: int, seed: int, trained: int,
           digits: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.nn.Module:
    channels = 3 if digits is None else 1
    model = init_model(create_model("lenet", in_channels=channels, num_classes=10, image_size=size),
                       "sigmoid", seed)
    if trained:
        opt = torch.optim.Adam(model.parameters(), lr=0.005)
        gen = torch.Generator().manual_seed(seed)
        for step in range(trained):
            if digits is None:
                x, y = crops(pics, 8, size, 10_000 + step)
            else:
                idx = torch.randint(0, digits[1].numel(), (8,), generator=gen)
                x, y = digits[0][idx], digits[1][idx]
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model


def score(images: torch.Tensor, truth: torch.Tensor) -> float:
    perm = match_batch(images.numpy(), truth.numpy())
    return float(np.mean([psnr(images[int(perm[j])], truth[j]) for j in range(truth.shape[0])]))


def row(name: str, scores: list[float], seconds: list[float]) -> str:
    p95 = float(np.percentile(seconds, 95))
    share = sum(s >= 30.0 for s in scores)
    return (f"| {name} | {statistics.mean(scores):.1f} | {min(scores):.1f} | {share}/{len(scores)} | "
            f"{statistics.median(seconds):.2f} | {p95:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2,4,8")
    parser.add_argument("--batches", type=int, default=4, help="batches per size")
    parser.add_argument("--image", type=int, default=16, help="pixels a side")
    parser.add_argument("--budget", type=float, default=3.0, help="time_budget_s per update")
    parser.add_argument("--trained", type=int, default=0, help="Adam steps before the attack")
    parser.add_argument("--dlg-steps", type=int, default=30, help="published DLG outer steps")
    parser.add_argument("--skip-old", action="store_true", help="leave out the previous path")
    parser.add_argument("--digits", action="store_true",
                        help="grey 16x16 digits with their own labels (the live runs' data) "
                             "instead of colour photos")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pics = photos()
    digits = digit_batches(1797, args.image) if args.digits else None
    channels = 1 if digits is not None else 3
    kind = "grey digits (labels their own; batches with a repeat)" if digits is not None else "colour"
    print(f"load average at start: {os.getloadavg()[0]:.2f} (1 torch thread, {os.cpu_count()} cores)")
    print(f"{args.image}x{args.image} {kind}, LeNet init sigmoid, {args.trained} Adam steps, "
          f"budget {args.budget} s, {args.batches} batches per size\n")
    print("| B | attack | mean PSNR (dB) | min PSNR (dB) | batches >= 30 dB | s/update p50 | p95 |")
    print("|---|---|---|---|---|---|---|")
    config = AttackConfig(max_iters=100, time_budget_s=args.budget)
    for batch in (int(b) for b in args.sizes.split(",")):
        rng = np.random.default_rng(batch)
        results: dict[str, tuple[list[float], list[float]]] = {}
        stops: list[str] = []
        for trial in range(args.batches):
            model = victim(pics, args.image, trial, args.trained, digits)
            if digits is None:
                x, _ = crops(pics, batch, args.image, 100 * batch + trial)
                y = repeated_labels(batch, rng)
            else:
                while True:  # a batch of the digits' own labels with at least one repeat
                    idx = torch.from_numpy(rng.choice(digits[1].numel(), batch, replace=False))
                    x, y = digits[0][idx], digits[1][idx]
                    if len(set(y.tolist())) < batch:
                        break
            grads = compute_gradients(model, x, y)
            obs = Observation(gradients=grads, batch_size=batch,
                              input_shape=(channels, args.image, args.image), num_classes=10)
            methods = ["auto"] if args.skip_old else ["auto", "features"]
            for method in methods:
                begin = time.perf_counter()
                rec = Analytic(config, batch_method=method).reconstruct(model, obs)
                seconds = time.perf_counter() - begin
                if method == "auto":
                    stops.append(f"{rec.stats['batch_method']}:{rec.stats['stop_reason']}")
                name = "`analytic`" if method == "auto" else "previous `analytic`"
                results.setdefault(name, ([], []))[0].append(score(rec.images, x))
                results[name][1].append(seconds)
            begin = time.perf_counter()
            dummy = published_dlg(model, list(grads), tuple(x.shape), 10, steps=args.dlg_steps)
            results.setdefault("published DLG", ([], []))[0].append(score(dummy, x))
            results["published DLG"][1].append(time.perf_counter() - begin)
        for name, (scores, seconds) in results.items():
            print(row(f"{batch} | {name}", scores, seconds))
        estimate = Analytic(config).expected_seconds(model, obs)
        dlg = statistics.median(results["published DLG"][1])
        ours = statistics.median(results["`analytic`"][1])
        print(f"<!-- B = {batch}: stop reasons {', '.join(stops)}; expected_seconds {estimate:.2f}; "
              f"DLG / analytic time ratio {dlg / ours:.1f}x -->")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
