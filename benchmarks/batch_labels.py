"""Batch label recovery and the analytic batch attack on random digit batches (labels repeat).

    .venv/bin/python benchmarks/batch_labels.py

Prints (1) how often the counts from the bias gradient, and the counts corrected by
exact separation, give every label of a batch right on the DLG paper's LeNet at its
uniform init (30 random batches per size); (2) the analytic attack on batches of 8 drawn
while that LeNet trains with Adam, as an honest peer's would be: labels and PSNR.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacker.api import AttackConfig, Observation, compute_gradients, create_attack
from attacker.labels import recover_labels
from attacker.metrics import match_batch, psnr
from gradleak.core.models import create_model, init_dlg_uniform
from gradleak.data import load_dataset


def lenet(seed: int) -> torch.nn.Module:
    model = create_model("lenet", in_channels=1, num_classes=10, image_size=16)
    return init_dlg_uniform(model, torch.Generator().manual_seed(seed))


def part_labels(images: torch.Tensor, labels: torch.Tensor, trials: int = 30) -> None:
    print("| batch size | counts right | corrected right | seconds per update (corrected) |")
    print("|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for batch in (2, 4, 8):
        right, fixed, seconds = 0, 0, 0.0
        for trial in range(trials):
            model = lenet(trial)
            idx = torch.randint(0, labels.numel(), (batch,), generator=gen)
            grads = compute_gradients(model, images[idx], labels[idx])
            truth = sorted(labels[idx].tolist())
            right += recover_labels(model, grads, batch, correct=False).tolist() == truth
            start = time.perf_counter()
            fixed += recover_labels(model, grads, batch).tolist() == truth
            seconds += time.perf_counter() - start
        print(f"| {batch} | {right}/{trials} | {fixed}/{trials} | {seconds / trials:.2f} |")


def part_training(images: torch.Tensor, labels: torch.Tensor, steps: int = 6) -> None:
    print("\n| Adam step | labels | recovered | mean PSNR (dB) | seconds |")
    print("|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(7)
    model = lenet(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.005)
    for step in range(steps):
        idx = torch.randint(0, labels.numel(), (8,), generator=gen)
        x, y = images[idx], labels[idx]
        grads = compute_gradients(model, x, y)
        obs = Observation(gradients=tuple(g.detach() for g in grads), batch_size=8,
                      input_shape=(1, 16, 16), num_classes=10)
        start = time.perf_counter()
        rec = create_attack("analytic", AttackConfig(max_iters=100)).reconstruct(model, obs)
        seconds = time.perf_counter() - start
        perm = match_batch(rec.images.numpy(), x.numpy())
        mean = statistics.mean(psnr(rec.images[int(perm[j])], x[j]) for j in range(8))
        print(f"| {step} | {sorted(y.tolist())} | {rec.labels.tolist()} | {mean:.1f} | {seconds:.1f} |")
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def main() -> None:
    torch.set_num_threads(1)
    data = load_dataset("digits", image_size=16)
    images = torch.as_tensor(data.images, dtype=torch.float32)
    labels = torch.as_tensor(data.labels, dtype=torch.int64)
    print("## labels of random digit batches, DLG LeNet at its uniform init\n")
    part_labels(images, labels)
    print("\n## analytic attack on batches of 8 while the LeNet trains (Adam, lr 0.005)")
    part_training(images, labels)


if __name__ == "__main__":
    main()
