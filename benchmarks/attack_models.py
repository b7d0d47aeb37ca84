"""Attacks on a model that learns: at init, trained to >= 90%, and on FedAvg multi-step deltas.

    PYTHONPATH=. .venv/bin/python benchmarks/attack_models.py [--images 3] [--budget 6] [--batch 1]

The DLG LeNet (uniform init, as the attack benchmarks use; --init sigmoid for the
peers' init) on 16x16 digits. Attacked images are held-out digits (never trained
on). Model states, one table row group each:
  init        the gradient of the model at initialisation;
  trained     the gradient of the same LeNet trained on digits (gradleak.trained);
  fedavg K=k  the trained (--fedavg-on init: the initial) model's FedAvg delta of k local SGD steps at --local-lr,
              each on the whole batch (gradleak.core.fedavg), attacked "exact"
              (the attack simulates the k steps) or "first_order" (delta / (lr k)
              read as a gradient). Analytic and published DLG have no exact mode.
Per cell: mean and min PSNR, share of images >= 30 dB, seconds per update (p50),
and published DLG's p50 seconds over ours in the same state (the baseline runs the
same images under the same wall budget per update).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baseline_dlg import published_dlg

from attacker.api import (
    AttackConfig,
    Observation,
    checked_targets,
    compute_gradients,
    create_attack,
)
from attacker.metrics import match_batch, psnr
from gradleak.core.fedavg import client_update
from gradleak.core.models import create_model, init_model
from gradleak.trained import trained_lenet

SHAPE = (1, 16, 16)
CLASSES = 10
BASELINE = "published DLG"


def mean_psnr_each(recon: np.ndarray, truth: np.ndarray) -> list[float]:
    perm = match_batch(recon, truth)
    return [psnr(recon[int(perm[j])], truth[j]) for j in range(len(truth))]


def observation(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> Observation:
    if steps == 0:
        return Observation(compute_gradients(model, x, y), len(y), SHAPE, CLASSES)
    return Observation(client_update(model, x, y, steps=steps, lr=lr), len(y), SHAPE, CLASSES,
                       update_kind="delta", local_steps=steps, local_lr=lr)


def run_one(name: str, mode: str, model: torch.nn.Module, obs: Observation, x: torch.Tensor,
            seed: int, budget: float) -> tuple[list[float], float]:
    start = time.perf_counter()
    if name == BASELINE:
        grads = checked_targets(model, obs)  # a delta's first-order reading
        final = published_dlg(model, grads, tuple(x.shape), CLASSES, seed=seed,
                              on_step=lambda _s, _i: time.perf_counter() - start > budget)
        images = final
    else:
        cfg = AttackConfig(seed=seed, multi_step=mode, time_budget_s=budget)
        images = create_attack(name, cfg).reconstruct(model, obs).images
    return mean_psnr_each(images.numpy(), x.numpy()), time.perf_counter() - start


def cells(attacks: list[str], fedavg_steps: list[int]) -> list[tuple[str, int, str, str]]:
    """(state, local steps, attack, multi_step) of every table cell; steps 0 = a gradient."""
    out = []
    for state, steps in [("init", 0), ("trained", 0), *[(f"fedavg K={k}", k) for k in fedavg_steps]]:
        for name in [BASELINE, *attacks]:
            exact_too = steps > 0 and name in ("analytic", "dlg", "idlg", "ig")
            for mode in (["exact", "first_order"] if exact_too else ["first_order" if steps else "-"]):
                out.append((state, steps, name, mode))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=3, help="updates per cell")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--budget", type=float, default=6.0, help="wall seconds per update")
    p.add_argument("--attacks", default="analytic,idlg,ig")
    p.add_argument("--fedavg-steps", default="2,5")
    p.add_argument("--local-lr", type=float, default=0.5, help="FedAvg clients' SGD rate")
    p.add_argument("--fedavg-on", default="trained", choices=("trained", "init"),
                   help="the model state the FedAvg clients start their round from")
    p.add_argument("--init", default="dlg", help="dlg | sigmoid | default")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    trained = trained_lenet(args.init)
    fresh = init_model(create_model("lenet", in_channels=1, num_classes=CLASSES, image_size=16),
                       args.init, 0)  # trained_lenet starts from the same init and seed
    print(f"torch {torch.__version__}, {args.threads} thread(s), load {os.getloadavg()[0]:.2f}, "
          f"LeNet ({args.init} init) on 16x16 digits, batch {args.batch}, {args.images} updates "
          f"per cell, {args.budget:.0f} s budget per update; trained to {trained.accuracy:.1%} "
          f"held-out accuracy in {trained.steps} Adam steps; FedAvg from the {args.fedavg_on} model, "
          f"local lr {args.local_lr}")
    b = args.batch
    batches = [(trained.test_images[i * b:(i + 1) * b], trained.test_labels[i * b:(i + 1) * b])
               for i in range(args.images)]
    rows: dict[tuple[str, str, str], tuple[list[float], list[float]]] = {}
    for state, steps, name, mode in cells([a for a in args.attacks.split(",") if a],
                                          [int(k) for k in args.fedavg_steps.split(",") if k]):
        at_init = state == "init" or (steps > 0 and args.fedavg_on == "init")
        model = fresh if at_init else trained.model
        scores, seconds = [], []
        for i, (x, y) in enumerate(batches):
            obs = observation(model, x, y, steps, args.local_lr)
            try:
                s, t = run_one(name, mode if mode != "-" else "exact", model, obs, x, i, args.budget)
            except ValueError as exc:  # an attack that refuses this update
                print(f"  {state} {name}: refused ({exc})")
                break
            scores += s
            seconds.append(t)
        if scores:
            rows[(state, name, mode)] = (scores, seconds)
    print_table(rows)
    print(f"\ntotal {time.perf_counter() - started:.0f} s, load {os.getloadavg()[0]:.2f}")


def print_table(rows: dict[tuple[str, str, str], tuple[list[float], list[float]]]) -> None:
    print("\n| model state | attack | delta model | mean PSNR | min PSNR | >= 30 dB | s/update p50 "
          "| DLG s / ours s |")
    print("|---|---|---|---|---|---|---|---|")
    for (state, name, mode), (scores, seconds) in rows.items():
        base = rows.get((state, BASELINE, "first_order" if mode in ("exact", "first_order") else mode))
        p50 = statistics.median(seconds)
        ratio = f"{statistics.median(base[1]) / p50:.1f}x" if base and name != BASELINE else "-"
        hit = sum(s >= 30.0 for s in scores)
        print(f"| {state} | {name} | {mode} | {statistics.mean(scores):.1f} | {min(scores):.1f} | "
              f"{hit}/{len(scores)} | {p50:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
