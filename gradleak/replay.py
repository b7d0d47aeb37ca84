"""Offline replay of a run's transcript: any image attack on the updates the attacker received.

`gradleak attack --transcript RUN_DIR --attack NAME --out DIR` reads RUN_DIR/transcript/
(the updates and the weights the malicious peer pulled), rebuilds for each update exactly
what the live attacker saw (the model at the sender's version, the update's tensors as
float32 in parameter order, the public header), runs the attack, and only then scores the
reconstruction against the truth the evaluator kept in RUN_DIR/truth/. The attack never
sees that file: it gets the model and an Observation, as in the live peer.

Everything is read and checked before anything is attacked, and the outputs are written at
the end, so bad input leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacker.api import ATTACKS, AttackConfig, Observation, create_attack
from attacker.metrics import score_batch
from gradleak.core.devices import resolve_device
from gradleak.core.models import create_model
from gradleak.runtime.evaluation import load_truth
from gradleak.runtime.record import clean, write_grid
from gradleak.runtime.transcript import (
    ReceivedUpdate,
    TranscriptError,
    TranscriptReader,
    transcript_path,
)


class ReplayError(ValueError):
    """Bad replay input: missing run dir, no or corrupt transcript, unknown attack (one line)."""


@dataclass(frozen=True)
class ReplayConfig:
    run_dir: str  # the run directory holding transcript/ (and truth/)
    out: str  # result.json and grid.png go here
    attack: str = "analytic"
    max_iters: int | None = None  # None: the live attacker's (transcript meta)
    seed: int | None = None  # None: the live attacker's
    threads: int = 1
    device: str = "auto"
    num_batches: int | None = None  # replay only the first N updates (after the filters)
    batch_size: int | None = None  # only updates of this batch size
    defence: str | None = None  # only updates with this defence (canonical name, as in the header)
    # The attack's own parameters (attack.params of the attack replayed), over the live run's
    # (the transcript's meta keeps them); None: the live run's as they were.
    params: Mapping[str, Any] | None = None


def _attack_config(meta: dict[str, Any], cfg: ReplayConfig) -> AttackConfig:
    known = {f.name for f in dataclasses.fields(AttackConfig)}
    live = {k: v for k, v in dict(meta.get("attack_config") or {}).items() if k in known}
    if cfg.max_iters is not None:
        live["max_iters"] = cfg.max_iters
    if cfg.seed is not None:
        live["seed"] = cfg.seed
    try:
        return AttackConfig(**live)
    except (TypeError, ValueError) as exc:
        raise ReplayError(f"the transcript's attack config is not usable: {exc}") from None


def _selected(reader: TranscriptReader, cfg: ReplayConfig) -> Iterator[ReceivedUpdate]:
    """The updates to replay, decoded one at a time (the file was checked when opened)."""
    chosen = (u for u in reader.updates()
              if (cfg.batch_size is None or u.update.header.num_samples == cfg.batch_size)
              and (cfg.defence is None or u.update.header.defence == cfg.defence))
    return itertools.islice(chosen, cfg.num_batches)


def run_replay(cfg: ReplayConfig, progress: Callable[[dict[str, Any]], None] = lambda _r: None) -> dict[str, Any]:
    """Replay the transcript of cfg.run_dir with cfg.attack; write result.json and grid.png.

    Raises:
        ReplayError: on bad input (nothing is written then).
    """
    run_dir = Path(cfg.run_dir)
    if not run_dir.is_dir():
        raise ReplayError(f"run directory not found: {run_dir}")
    if cfg.attack not in ATTACKS:
        raise ReplayError(f"unknown attack '{cfg.attack}' (known: {', '.join(sorted(ATTACKS))})")
    colluders = sorted(p.parent.name for p in transcript_path(run_dir).glob("*/meta.json"))
    if colluders and not (transcript_path(run_dir) / "meta.json").exists():
        raise ReplayError(f"{run_dir} holds the transcripts of {len(colluders)} colluding attackers "
                          f"({', '.join(colluders)}): the gradient replay "
                          "reads one attacker's; --gossip-algebra pools them")
    try:
        reader = TranscriptReader(run_dir)
    except TranscriptError as exc:
        raise ReplayError(str(exc)) from None
    params = {**dict((reader.meta.get("attack_params") or {}).get(cfg.attack) or {}), **dict(cfg.params or {})}
    try:
        attack = create_attack(cfg.attack, _attack_config(reader.meta, cfg), params or None)
    except ValueError as exc:  # an unknown field or a bad value: named, nothing written
        raise ReplayError(str(exc)) from None
    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    c, h, _w = reader.input_shape
    rows: list[dict[str, Any]] = []
    pairs: list[tuple[np.ndarray, np.ndarray, str]] = []
    try:
        for received in _selected(reader, cfg):
            row, pair = _replay_one(received, reader, attack, device, run_dir, c, h)
            rows.append(row)
            pairs += pair
            progress(row)
    except ValueError as exc:  # TranscriptError, or an unreadable truth file
        raise ReplayError(str(exc)) from None
    result = {
        "run_dir": str(run_dir), "attack": cfg.attack, "model": reader.model,
        "attack_config": dataclasses.asdict(attack.config), "attack_params": params, "device": str(device),
        "transcript": {k: reader.meta.get(k) for k in ("updates", "weights", "bytes", "truncated")},
        "updates": rows,
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2, allow_nan=False))
    if pairs:
        write_grid(out / "grid.png", pairs[:64])
    return result


def _replay_one(
    received: ReceivedUpdate, reader: TranscriptReader, attack: Any, device: torch.device,
    run_dir: Path, channels: int, size: int,
) -> tuple[dict[str, Any], list[tuple[np.ndarray, np.ndarray, str]]]:
    update, hd = received.update, received.update.header
    row: dict[str, Any] = {
        "update_id": hd.update_id, "origin": hd.origin, "sender": hd.sender, "batch_size": hd.num_samples,
        "defence": hd.defence, "step": hd.round, "model_version": hd.model_version,
        "received_at": received.received_at, "psnr": None, "ssim": None, "mean_psnr": None,
        "label_accuracy": None, "seconds": None, "iterations": None, "skipped": None,
    }
    weights = reader.weights(hd.sender, hd.model_version)
    if weights is None:
        row["skipped"] = "no weights in the transcript (never pulled, or refused by its budget)"
        return row, []
    # What the live attacker did (gradleak/runtime/malicious.py), step for step.
    model = create_model(reader.model, in_channels=channels, num_classes=reader.num_classes, image_size=size)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        row["skipped"] = f"weights do not fit {reader.model}: {str(exc).splitlines()[0]}"
        return row, []
    model.to(device)
    try:
        obs = Observation(
            gradients=tuple(update.tensors[name].to(device=device, dtype=torch.float32)
                            for name, _ in model.named_parameters()),
            batch_size=hd.num_samples, input_shape=reader.input_shape, num_classes=reader.num_classes,
        )
        start = time.perf_counter()
        rec = attack.reconstruct(model, obs)
    except (KeyError, ValueError, RuntimeError) as exc:  # what the live worker counts as failed
        row["skipped"] = f"attack failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return row, []
    row["seconds"] = round(time.perf_counter() - start, 4)
    row["iterations"] = int(rec.stats.get("iterations", 0))
    images = rec.images.detach().cpu().numpy().astype(np.float32)
    # Scoring, after the attack: the only place the truth is read.
    truth = load_truth(run_dir, hd.update_id)
    if truth is None:
        row["skipped"] = "no truth in RUN_DIR/truth (not registered or past its cap)"
        return row, []
    if images.shape != truth.images.shape:
        row["skipped"] = f"reconstruction shape {images.shape} != truth shape {truth.images.shape}"
        return row, []
    s = score_batch(images, rec.labels.detach().cpu().numpy(), truth.images, truth.labels)
    row.update({
        "psnr": [clean(v) for v in s["psnr"]], "ssim": [clean(v) for v in s["ssim"]],
        "mean_psnr": clean(s["mean_psnr"]), "label_accuracy": clean(s["label_accuracy"]),
    })
    perm = s["permutation"]
    pair = [(truth.images[j], images[int(perm[j])], f"b{hd.num_samples} {float(s['psnr'][j]):.0f}dB")
            for j in range(len(truth.labels))]
    return row, pair
