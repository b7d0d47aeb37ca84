"""The offline attack: victim gradients of consecutive batches, a defence, a reconstruction each.

This is the evaluation side: it holds the truth, builds the victim's gradient
itself, and measures time-to-target through the attack's callback. The attack
still gets only the model and the (defended) gradient.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacker.api import AttackConfig, Observation, compute_gradients, create_attack
from attacker.metrics import match_batch, psnr, score_batch
from gradleak.core.devices import resolve_device
from gradleak.core.models import create_model, init_dlg_uniform
from gradleak.runtime.record import clean, write_grid
from p2p.defences import parse_defence


@dataclass(frozen=True)
class OfflineConfig:
    images: str  # .npz or a folder of PNG/JPEG
    out: str  # result.json and grid.png go here
    model: str = "lenet"
    attack: str = "idlg"
    batch_size: int = 1
    defence: str = "none"
    max_iters: int = 300
    target_psnr: float = 30.0  # time_to_target_seconds is measured against this
    seed: int = 0
    threads: int = 1
    num_batches: int | None = None  # attack only the first n batches
    num_classes: int = 10
    device: str = "auto"


def run_offline(cfg: OfflineConfig) -> dict[str, Any]:
    """Attack every consecutive batch of the input; write result.json and grid.png."""
    from gradleak.images import load_images

    images, labels = load_images(cfg.images, num_classes=cfg.num_classes)
    attack = create_attack(cfg.attack, AttackConfig(max_iters=cfg.max_iters, seed=cfg.seed))
    defence = parse_defence(cfg.defence)
    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    n_batches = len(labels) // cfg.batch_size
    if n_batches == 0:
        raise ValueError(f"{len(labels)} images cannot fill one batch of {cfg.batch_size}")
    if cfg.num_batches is not None:
        n_batches = min(n_batches, cfg.num_batches)
    c, h, w = images.shape[1:]
    model = create_model(cfg.model, in_channels=c, num_classes=cfg.num_classes, image_size=(h, w))
    init_dlg_uniform(model, torch.Generator().manual_seed(cfg.seed))
    model.to(device)
    noise = torch.Generator().manual_seed(cfg.seed)
    results, pairs = [], []
    for b in range(n_batches):
        idx = list(range(b * cfg.batch_size, (b + 1) * cfg.batch_size))
        row, pair = _attack_batch(cfg, model, attack, defence, noise, images[idx], labels[idx], device)
        results.append({"indices": idx, **row})
        pairs.append(pair)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"attack": cfg.attack, "model": cfg.model, "batch_size": cfg.batch_size,
              "defence": defence.name, "attacks": results}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    write_grid(out / "grid.png", [p for batch in pairs for p in batch][:64])
    return result


def _attack_batch(
    cfg: OfflineConfig, model: torch.nn.Module, attack: Any, defence: Any, noise: torch.Generator,
    x_np: np.ndarray, y_np: np.ndarray, device: torch.device,
) -> tuple[dict[str, Any], list[tuple[np.ndarray, np.ndarray, str]]]:
    x = torch.from_numpy(x_np).to(device)
    y = torch.from_numpy(y_np).to(device)
    grads = compute_gradients(model, x, y)
    names = [n for n, _ in model.named_parameters()]
    defended = defence.apply(dict(zip(names, (g.cpu() for g in grads))), noise)
    obs = Observation(
        gradients=tuple(defended[n].to(device=device, dtype=torch.float32) for n in names),
        batch_size=len(y_np), input_shape=tuple(x_np.shape[1:]), num_classes=cfg.num_classes,
    )
    start = time.perf_counter()
    reached: list[float] = []

    def watch(_iteration: int, current: torch.Tensor) -> bool:
        # Evaluation side: the attack hands out its current best, we compare with the truth.
        if not reached and _mean_psnr(current.detach().cpu().numpy(), x_np) >= cfg.target_psnr:
            reached.append(time.perf_counter() - start)
        return False

    rec = attack.reconstruct(model, obs, callback=watch)
    seconds = time.perf_counter() - start
    r_img = rec.images.detach().cpu().numpy()
    s = score_batch(r_img, rec.labels.cpu().numpy(), x_np, y_np)
    row = {
        "psnr": [clean(v) for v in s["psnr"]], "ssim": [clean(v) for v in s["ssim"]],
        "label_accuracy": s["label_accuracy"], "iterations": int(rec.stats.get("iterations", 0)),
        "seconds": round(seconds, 4),
        "time_to_target_seconds": round(reached[0], 4) if reached else None,
    }
    perm = s["permutation"]
    pair = [(x_np[j], r_img[int(perm[j])], f"{s['psnr'][j]:.0f}dB") for j in range(len(y_np))]
    return row, pair


def _mean_psnr(recon: np.ndarray, truth: np.ndarray) -> float:
    perm = match_batch(recon, truth) if len(truth) > 1 else np.zeros(1, dtype=np.int64)
    return float(np.mean([psnr(recon[int(perm[j])], truth[j]) for j in range(len(truth))]))
