"""Batch label recovery and the analytic batch attack on random batches (labels repeat).

    .venv/bin/python benchmarks/batch_labels.py [--trials N] [--corrected-trials N] [--more-models N] [--attack]

Prints (1) label counts of random batches at B = 8, 32 and 64 (labels repeat; drawn
uniformly from the data, so some classes are absent and some repeat) by four methods
in the same run: "bias" (the bias gradient's signs, `recover_label_counts`), "logits"
(attacker/label_counts.py), and attacker/label_prior.py with 200 aux samples that never
appear in a batch, "prior" (held out, never trained on) and "shard" (trained on, as a
member's own shard is): the share of batches whose counts are all exact, the per-label
accuracy (share of the B labels matched), and seconds per batch;
on the LeNet at three inits and while it trains (Adam, lr 0.005, the peers' setting;
held-out accuracy stated; 500 steps pass 0.90), on digits and on colour crops of scikit-learn's photos
(random labels: an untrained model's gradient does not depend on what they mean);
(2) with --attack, the analytic attack on batches of 8 while the LeNet trains.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacker.api import AttackConfig, Observation, compute_gradients, create_attack
from attacker.label_prior import LabelPrior
from attacker.labels import recover_labels
from attacker.metrics import match_batch, psnr
from benchmarks.data import colour_crops
from gradleak.core.models import create_model, init_dlg_uniform, init_model
from gradleak.data import load_dataset
from gradleak.trained import adam_steps


def lenet(seed: int) -> torch.nn.Module:
    model = create_model("lenet", in_channels=1, num_classes=10, image_size=16)
    return init_dlg_uniform(model, torch.Generator().manual_seed(seed))


def label_accuracy(recovered: torch.Tensor, truth: torch.Tensor, classes: int) -> float:
    """Share of the B labels matched: sum over classes of min(recovered, true) counts / B."""
    got = torch.bincount(recovered, minlength=classes)
    want = torch.bincount(truth, minlength=classes)
    return float(torch.minimum(got, want).sum()) / truth.numel()


def trained_lenet(images: torch.Tensor, labels: torch.Tensor, steps: int) -> tuple[torch.nn.Module, float]:
    """The sigmoid-initialised LeNet after `steps` Adam steps (lr 0.005, batch 32) on the
    first 1500 digits, and its accuracy on the rest."""
    model = init_model(create_model("lenet", in_channels=1, num_classes=10, image_size=16), "sigmoid", 0)
    adam_steps(model, images[:1500], labels[:1500], steps)
    with torch.no_grad():
        accuracy = float((model(images[1500:]).argmax(1) == labels[1500:]).float().mean())
    return model, accuracy


METHODS = ("bias", "logits", "prior", "shard")
AUX = 200  # the attacker's own labelled samples, never in an attacked batch
TRAINED_ON = 1500  # the training rows learn from the first 1500 samples


def part_counts(cases, trials: int, batches: tuple[int, ...] = (8, 32, 64)) -> None:
    """cases: (name, model, images, labels) rows; every batch is fed to every method.

    "prior": the last AUX samples as aux data (held out: never trained on); "shard":
    samples TRAINED_ON - AUX .. TRAINED_ON (trained on, like the victims' data, as a
    member's own shard is). Batches are drawn from the rest."""
    print("| data, model | B | exact: " + " | exact: ".join(METHODS) + " | per label: "
          + " | per label: ".join(METHODS) + " | s/batch: " + " | s/batch: ".join(METHODS) + " |")
    print("|---" * (2 + 3 * len(METHODS)) + "|")
    for name, model, images, labels in cases:
        held = slice(labels.numel() - AUX, None)
        end = min(TRAINED_ON, held.start)  # colour rows (untrained): just before the held-out part
        shard = slice(end - AUX, end)
        priors = {"prior": LabelPrior.from_data(images[held], labels[held], 10),
                  "shard": LabelPrior.from_data(images[shard], labels[shard], 10)}
        pool = torch.cat([torch.arange(shard.start), torch.arange(end, held.start)])
        for batch in batches:
            gen = torch.Generator().manual_seed(batch)
            exact = dict.fromkeys(METHODS, 0)
            per_label: dict[str, list[float]] = {m: [] for m in METHODS}
            seconds = dict.fromkeys(METHODS, 0.0)
            for _ in range(trials):
                idx = pool[torch.randint(0, pool.numel(), (batch,), generator=gen)]
                grads = compute_gradients(model, images[idx], labels[idx])
                truth = labels[idx]
                for method in METHODS:
                    start = time.perf_counter()
                    got = recover_labels(model, grads, batch, correct=False,
                                         counts=method if method in ("bias", "logits") else "logits",
                                         prior=priors.get(method))
                    seconds[method] += time.perf_counter() - start
                    exact[method] += got.tolist() == sorted(truth.tolist())
                    per_label[method].append(label_accuracy(got, truth, 10))
            print(f"| {name} | {batch} | " + " | ".join(f"{exact[m]}/{trials}" for m in METHODS)
                  + " | " + " | ".join(f"{statistics.mean(per_label[m]):.3f}" for m in METHODS)
                  + " | " + " | ".join(f"{seconds[m] / trials:.4f}" for m in METHODS) + " |", flush=True)


def more_model_cases(images: torch.Tensor, labels: torch.Tensor):
    """(name, model, images, labels): the other registered models at init."""
    colour = torch.as_tensor(colour_crops(600, size=32, seed=0))
    colour_labels = torch.randint(0, 10, (600,), generator=torch.Generator().manual_seed(0))
    for name, init in (("mlp", "default"), ("mlp", "sigmoid"), ("relu-mlp", "default")):
        model = init_model(create_model(name, in_channels=1, num_classes=10, image_size=16), init, 0)
        yield f"digits, {name} {init} init", model, images, labels
    for name in ("relu-mlp", "resnet18"):
        model = init_model(create_model(name, in_channels=3, num_classes=10, image_size=32), "default", 0)
        yield f"colour 32x32, {name} default init", model, colour, colour_labels


TRAIN_STEPS = (20, 50, 100, 500)  # 500: past 0.90 held-out accuracy


def training_cases(images: torch.Tensor, labels: torch.Tensor):
    """(name, model, images, labels): the sigmoid-initialised LeNet after TRAIN_STEPS."""
    for steps in TRAIN_STEPS:
        model, accuracy = trained_lenet(images, labels, steps)
        yield f"digits, LeNet after {steps} steps (acc {accuracy:.2f})", model, images, labels


def count_cases(images: torch.Tensor, labels: torch.Tensor):
    """(name, model, images, labels): digits at three inits and in training, colour at two inits."""
    for init in ("dlg", "default", "sigmoid"):
        model = init_model(create_model("lenet", in_channels=1, num_classes=10, image_size=16), init, 0)
        yield f"digits, LeNet {init} init", model, images, labels
    yield from training_cases(images, labels)
    colour = torch.as_tensor(colour_crops(600, size=32, seed=0))
    colour_labels = torch.randint(0, 10, (600,), generator=torch.Generator().manual_seed(0))
    for init in ("dlg", "default"):
        model = init_model(create_model("lenet", in_channels=3, num_classes=10, image_size=32), init, 0)
        yield f"colour 32x32, LeNet {init} init", model, colour, colour_labels


def part_corrected(images: torch.Tensor, labels: torch.Tensor, trials: int) -> None:
    """B = 8 with the exact-separation correction on top, as `recover_labels` answers by default."""
    print("\n| DLG LeNet, B = 8 | counts right | corrected right | s/batch (corrected) |")
    print("|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    rows = {"bias": [0, 0, 0.0], "logits": [0, 0, 0.0]}
    for trial in range(trials):
        model = lenet(trial)
        idx = torch.randint(0, labels.numel(), (8,), generator=gen)
        grads = compute_gradients(model, images[idx], labels[idx])
        truth = sorted(labels[idx].tolist())
        for method, row in rows.items():
            row[0] += recover_labels(model, grads, 8, correct=False, counts=method).tolist() == truth
            start = time.perf_counter()
            row[1] += recover_labels(model, grads, 8, counts=method).tolist() == truth
            row[2] += time.perf_counter() - start
    for method, (right, fixed, seconds) in rows.items():
        print(f"| {method} | {right}/{trials} | {fixed}/{trials} | {seconds / trials:.2f} |")


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="batches per row")
    parser.add_argument("--corrected-trials", type=int, default=4,
                        help="batches for the B = 8 correction table, 0 for none (its search takes seconds each)")
    parser.add_argument("--more-models", type=int, default=0, metavar="N",
                        help="also MLP, ReLU MLP and ResNet-18 at init, N batches per row")
    parser.add_argument("--small-batches", action="store_true",
                        help="also the training LeNet at B = 2 and 4")
    parser.add_argument("--attack", action="store_true", help="also the analytic attack while training")
    args = parser.parse_args()
    if args.trials < 1 or args.corrected_trials < 0 or args.more_models < 0:
        parser.error("--trials must be >= 1, --corrected-trials and --more-models >= 0")
    torch.set_num_threads(1)
    data = load_dataset("digits", image_size=16)
    images = torch.as_tensor(data.images, dtype=torch.float32)
    labels = torch.as_tensor(data.labels, dtype=torch.int64)
    print("## label counts of random batches (labels repeat): bias, logits, and with aux data\n")
    part_counts(count_cases(images, labels), args.trials)
    if args.small_batches:
        print("\n## the training LeNet at the live demo's batch sizes\n")
        part_counts(training_cases(images, labels), args.trials, (2, 4))
    if args.more_models:
        print("\n## the other models at init\n")
        part_counts(more_model_cases(images, labels), args.more_models)
    if args.corrected_trials:
        part_corrected(images, labels, args.corrected_trials)
    if args.attack:
        print("\n## analytic attack on batches of 8 while the LeNet trains (Adam, lr 0.005)")
        part_training(images, labels)


if __name__ == "__main__":
    main()
