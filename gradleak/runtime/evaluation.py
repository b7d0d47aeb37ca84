"""The evaluator: holds ground truth by update_id and scores reconstructions against it.

Honest peers hand it their private batch before the update leaves them; the
malicious peer hands it reconstructions. Nothing flows back: `score` returns
nothing, and there is no way to read a truth out, so the attack never sees one.

Each truth is also kept in its own file under RUN_DIR/truth/ (apart from the malicious
peer's transcript), so that an offline replay of the transcript can be scored; only the
replay's scoring step reads it back, through `load_truth`.
"""

from __future__ import annotations

import hashlib
import os
import time
import zipfile
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attacker.metrics import score_batch
from gradleak.runtime.record import RunRecord, clean, write_grid
from gradleak.runtime.telemetry import Metrics


@dataclass(frozen=True)
class Truth:
    images: np.ndarray  # (B, C, H, W)
    labels: np.ndarray  # (B,)
    origin: str
    round: int
    batch_size: int
    defence: str
    incarnation: int = 0  # of the origin peer: 0 first, +1 for each restart after its host was lost


TRUTH_FILES = 4096  # truth files a run keeps on disk (the first ones), over all its evaluators


class Evaluator:
    """Scores reconstructions, writes the run record and the leakage metrics."""

    def __init__(
        self, record: RunRecord, metrics: Metrics | None = None, *,
        keep_truths: int = TRUTH_FILES, grid_items: int = 16, persist_truths: bool = True,
        truth_files: int | None = None,
    ) -> None:
        self.record = record
        self._keep_files = keep_truths if truth_files is None else truth_files  # shards split the files
        # On disk the first keep_truths are kept (later ones counted, not written): the
        # transcript keeps the earliest updates too, so the two stay joinable.
        self._persist = persist_truths
        self._files_written = self._files_refused = 0
        self.metrics = metrics
        self._truths: OrderedDict[str, Truth] = OrderedDict()
        self._keep = keep_truths
        self._grid_items = grid_items
        self._examples: dict[tuple[int, str, str], tuple[float, np.ndarray, np.ndarray]] = {}
        self._rows: list[dict[str, Any]] = []
        self._scored: set[tuple[str, str]] = set()  # (update id, attack): one record each
        self._shipped: dict[str, tuple[int, int]] = {}  # origin -> its last (step, model version) filed
        self.unmatched = 0
        self.duplicates = 0  # second scores of one (update, attack), refused
        self._others: list[dict[str, Any]] = []  # other shards' exports, for the summary only

    def register_truth(
        self, update_id: str, images: np.ndarray, labels: np.ndarray, *,
        origin: str, round: int, defence: str, model_version: int | None = None, incarnation: int = 0,
    ) -> None:
        """File the private batch behind `update_id` (oldest dropped beyond the cap).

        A second truth for an id already held is refused (ValueError): the reconstructions
        of that update would be scored against another batch. model_version: the weights
        the update was taken at, kept per origin for `last_shipped`.
        """
        images = np.asarray(images, dtype=np.float32)
        labels = np.asarray(labels, dtype=np.int64)
        if images.ndim != 4 or labels.shape != (images.shape[0],):
            raise ValueError(f"truth shapes {images.shape} / {labels.shape} are not (B,C,H,W) / (B,)")
        if update_id in self._truths:
            raise ValueError(f"a truth for update {update_id} is already filed")
        self._truths[update_id] = Truth(images, labels, origin, round, len(labels), defence, incarnation)
        step, version = self._shipped.get(origin, (0, -1))
        self._shipped[origin] = (max(step, round), max(version, -1 if model_version is None else model_version))
        if self._persist:
            if self._files_written < self._keep_files:
                _write_truth(self.record.dir, update_id, self._truths[update_id])
                self._files_written += 1
            else:
                self._files_refused += 1
        while len(self._truths) > self._keep:
            self._truths.popitem(last=False)

    def last_shipped(self, origin: str) -> dict[str, int] | None:
        """The last step of `origin` with a truth filed, and the highest model version its
        updates were taken at (-1: not given); None if it filed none."""
        if origin not in self._shipped:
            return None
        step, version = self._shipped[origin]
        return {"step": step, "model_version": version}

    def score(
        self, update_id: str, attack: str, images: np.ndarray, labels: np.ndarray,
        stats: dict[str, Any], *, received_at: float | None = None, step: int | None = None,
    ) -> None:
        """Score one reconstruction; updates the record and metrics, returns nothing.

        received_at: when the attacker received the update (Unix seconds); step: the
        sender's local step (its header's round; the truth's round when not given).
        """
        truth = self._truths.get(update_id)
        if truth is None:
            self.unmatched += 1  # truth evicted or never filed: nothing to compare against
            return
        if (update_id, attack) in self._scored:
            self.duplicates += 1  # one record per update and attack, whoever asks twice
            return
        images = np.asarray(images, dtype=np.float32)
        if images.shape != truth.images.shape:
            raise ValueError(f"reconstruction shape {images.shape} != truth shape {truth.images.shape}")
        s = score_batch(images, np.asarray(labels), truth.images, truth.labels)
        self._scored.add((update_id, attack))
        scored_at = time.time()
        row = {
            "update_id": update_id, "origin": truth.origin, "round": truth.round,
            "batch_size": truth.batch_size, "defence": truth.defence, "attack": attack,
            "incarnation": truth.incarnation,
            "psnr": [clean(v) for v in s["psnr"]], "ssim": [clean(v) for v in s["ssim"]],
            "mean_psnr": clean(s["mean_psnr"]), "mean_ssim": clean(s["mean_ssim"]),
            "mse": clean(float(np.mean(s["mse"]))), "label_accuracy": clean(s["label_accuracy"]),
            "seconds": clean(float(stats.get("seconds", 0.0))),
            "iterations": int(stats.get("iterations", 0)),
            "stop_reason": str(stats.get("stop_reason", "")),
            "step": truth.round if step is None else int(step),
            "received_at": None if received_at is None else float(received_at),
            "scored_at": scored_at, "time": scored_at,
        }
        self.record.append(row)
        self._rows.append(row)
        self._observe(row, s)
        self._keep_example(truth, images, s, attack)

    def _observe(self, row: dict[str, Any], s: dict[str, Any]) -> None:
        if self.metrics is None:
            return
        key = (row["attack"], str(row["batch_size"]), row["defence"])
        m = self.metrics
        m.reconstructions.labels(*key).inc()
        for p, q in zip(s["psnr"], s["ssim"]):
            m.psnr.labels(*key).observe(min(float(p), 100.0))
            m.ssim.labels(*key).observe(float(q))
        m.label_accuracy.labels(*key).observe(float(s["label_accuracy"]))

    def _keep_example(self, truth: Truth, images: np.ndarray, s: dict[str, Any], attack: str) -> None:
        # The best image of each (batch size, defence, attack) group goes into the grid.
        # psnr is in truth order; permutation[j] is the reconstruction matched to truth j.
        best = int(np.argmax(s["psnr"]))
        key = (truth.batch_size, truth.defence, attack)
        psnr = float(s["psnr"][best])
        if key not in self._examples or psnr > self._examples[key][0]:
            self._examples[key] = (psnr, truth.images[best], images[int(s["permutation"][best])])

    def summary(self, honest_accuracy: dict[tuple[int, str], float] | None = None) -> list[dict[str, Any]]:
        """One row per (batch size, defence, attack) with the leakage and honest accuracy."""
        return summarise(self._rows + [r for part in self._others for r in part["rows"]], honest_accuracy)

    def write_outputs(self, honest_accuracy: dict[tuple[int, str], float], extra: dict[str, Any]) -> list[dict[str, Any]]:
        """Write summary.json / summary.md and grid.png; return the summary rows."""
        rows = self.summary(honest_accuracy)
        unmatched = self.unmatched + sum(p["unmatched"] for p in self._others)
        duplicates = self.duplicates + sum(p["duplicates"] for p in self._others)
        self.record.write_summary(rows, {**extra, "unmatched": unmatched, "duplicates": duplicates})
        pairs = [
            (t, r, f"b{bs} {d[:5]} {p:.0f}dB")
            for (bs, d, _a), (p, t, r) in sorted(self._examples.items())
        ][: self._grid_items]
        if pairs:
            write_grid(self.record.dir / "grid.png", pairs)
        return rows

    def export(self) -> dict[str, Any]:
        """Rows, best examples and counters, for another shard's summary (see absorb)."""
        return {"rows": list(self._rows), "examples": dict(self._examples),
                "unmatched": self.unmatched, "duplicates": self.duplicates}

    def absorb(self, part: dict[str, Any]) -> None:
        """Take another shard's export into this summary and grid (its rows are already on
        disk; this shard's own counts stay its own)."""
        self._others.append(part)
        for key, example in part["examples"].items():
            if key not in self._examples or example[0] > self._examples[key][0]:
                self._examples[key] = example

    def counts(self) -> dict[str, int]:
        return {"reconstructions": len(self._rows), "truths": len(self._truths), "unmatched": self.unmatched,
                "duplicates": self.duplicates,
                "truth_files": self._files_written, "truth_files_refused": self._files_refused}

    def mean_psnr(self) -> float | None:
        return _mean([r["mean_psnr"] for r in self._rows if r["mean_psnr"] is not None])


def summarise(rows: list[dict[str, Any]],
              honest_accuracy: dict[tuple[int, str], float] | None = None) -> list[dict[str, Any]]:
    """Summary rows from reconstruction rows (the evaluator's, or reconstructions.jsonl's
    when the evaluator was lost and the driver writes the summary)."""
    groups: dict[tuple[int, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["batch_size"], row["defence"], row["attack"])].append(row)
    out = []
    for (bs, defence, attack), group in sorted(groups.items()):
        psnrs = [p for r in group for p in r["psnr"] if p is not None]
        out.append({
            "batch_size": bs, "defence": defence, "attack": attack, "reconstructions": len(group),
            "mean_psnr": _mean(psnrs), "best_psnr": max(psnrs) if psnrs else None,
            "share_psnr_30": _mean([float(p >= 30.0) for p in psnrs]),
            "mean_ssim": _mean([q for r in group for q in r["ssim"] if q is not None]),
            "label_accuracy": _mean([r["label_accuracy"] for r in group]),
            "honest_accuracy": (honest_accuracy or {}).get((bs, defence)),
        })
    return out


TRUTH_DIR = "truth"


def _truth_path(run_dir: str | Path, update_id: str) -> Path:
    # update ids hold '/', so the file is named by a digest; the id is stored inside.
    return Path(run_dir) / TRUTH_DIR / (hashlib.sha256(update_id.encode()).hexdigest()[:32] + ".npz")


def _write_truth(run_dir: Path, update_id: str, t: Truth) -> None:
    path = _truth_path(run_dir, update_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:  # written whole, then renamed: a crash leaves no half file
        np.savez(f, images=t.images, labels=t.labels, update_id=np.array(update_id),
                 origin=np.array(t.origin), round=np.array(t.round, dtype=np.int64),
                 defence=np.array(t.defence))
    os.replace(tmp, path)


def load_truth(run_dir: str | Path, update_id: str) -> Truth | None:
    """The truth filed for `update_id` in RUN_DIR/truth/, or None if none was written.

    For the offline replay's scoring step only (the attack code never imports this module).

    Raises:
        ValueError: when the file exists but is unreadable or not a truth of this update.
    """
    path = _truth_path(run_dir, update_id)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            stored = str(z["update_id"])
            images = np.asarray(z["images"], dtype=np.float32)
            labels = np.asarray(z["labels"], dtype=np.int64)
            origin, round_, defence = str(z["origin"]), int(z["round"]), str(z["defence"])
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"truth file {path} is unreadable: {exc}") from None
    if stored != update_id:
        raise ValueError(f"truth file {path} holds the truth of {stored!r}, not {update_id!r}")
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise ValueError(f"truth file {path} has shapes {images.shape} / {labels.shape}")
    return Truth(images, labels, origin, round_, len(labels), defence)


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None
