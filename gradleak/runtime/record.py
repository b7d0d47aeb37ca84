"""The run directory: resolved config, one JSON line per reconstruction, PNG grid, summary."""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFont

from gradleak.runtime.summary import format_accuracy

RECONSTRUCTIONS = "reconstructions.jsonl"
UPDATES = "updates.jsonl"  # one row per update a peer received and aggregated
SUMMARY_COLUMNS = (
    "batch_size", "defence", "attack", "reconstructions", "mean_psnr", "best_psnr",
    "share_psnr_30", "mean_ssim", "label_accuracy", "honest_accuracy",
)


class RunRecord:
    """Writes one run's files; safe to call from several threads."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write_config(self, config: dict[str, Any]) -> Path:
        path = self.dir / "config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def append(self, row: dict[str, Any]) -> None:
        """Append one reconstruction row (flushed at once, so a crash loses nothing written)."""
        line = json.dumps(row, sort_keys=True, allow_nan=False, default=_finite)
        with self._lock:
            _append(self.dir / RECONSTRUCTIONS, line + "\n")

    def append_updates(self, rows: Sequence[dict[str, Any]]) -> None:
        """Append per-update rows (sender's step, sent/received times, version lag) at once."""
        text = "".join(json.dumps(r, sort_keys=True, allow_nan=False, default=_finite) + "\n" for r in rows)
        with self._lock:
            _append(self.dir / UPDATES, text)

    def rows(self) -> list[dict[str, Any]]:
        path = self.dir / RECONSTRUCTIONS
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write_summary(self, rows: list[dict[str, Any]], extra: dict[str, Any]) -> Path:
        (self.dir / "summary.json").write_text(json.dumps({"groups": rows, **extra}, indent=2))
        path = self.dir / "summary.md"
        parts = [format_table(rows)]
        if extra.get("interrupted"):
            why = f" ({extra['reason']})" if extra.get("reason") else ""
            parts.insert(0, f"**Interrupted**{why}: the run was stopped early; these are the figures recorded "
                            "until then.")
        if accuracy := format_accuracy(extra.get("accuracy") or {}):
            parts += ["Honest accuracy on the held-out set (mean over the peers of each batch size):", accuracy]
        path.write_text("\n\n".join(parts) + "\n")
        return path


def _append(path: Path, text: str) -> None:
    """Append text with one write(2) on an O_APPEND descriptor: several evaluator processes
    append to the same files (gradleak.runtime.evaluator_shards), and the kernel serialises
    whole writes to one file, so their rows never interleave (a buffered file object may
    split a long row into several writes)."""
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:  # a regular file takes it whole unless the disk is full
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _finite(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def clean(value: float) -> float | None:
    """JSON has no inf/NaN: map them to None (an identical image's PSNR is capped upstream)."""
    return None if value is None or not math.isfinite(value) else round(float(value), 4)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of the summary rows (also printed to the terminal)."""
    head = "| " + " | ".join(SUMMARY_COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in SUMMARY_COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(r.get(c)) for c in SUMMARY_COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body]) if rows else head + "\n" + rule + "\n| (no reconstructions) |"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def write_grid(path: Path, pairs: Sequence[tuple[np.ndarray, np.ndarray, str]], tile: int = 64) -> Path:
    """Save truth (top) above reconstruction (bottom) for each (truth, recon, caption) pair.

    Images are (C, H, W) in [0, 1]; tiles are upscaled with nearest neighbour so
    single pixels stay visible.
    """
    cols = max(1, min(8, len(pairs)))
    rows = max(1, math.ceil(len(pairs) / cols))
    cap = 12
    canvas = Image.new("RGB", (cols * (tile + 4), rows * (2 * tile + cap + 8)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, (truth, recon, caption) in enumerate(pairs):
        x = (i % cols) * (tile + 4)
        y = (i // cols) * (2 * tile + cap + 8)
        canvas.paste(_tile(truth, tile), (x, y))
        canvas.paste(_tile(recon, tile), (x, y + tile + 2))
        draw.text((x, y + 2 * tile + 3), caption[:12], fill="black", font=font)
    canvas.save(path)
    return path


def _tile(image: np.ndarray, size: int) -> Image.Image:
    arr = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
    return Image.fromarray(arr).convert("RGB").resize((size, size), Image.Resampling.NEAREST)
