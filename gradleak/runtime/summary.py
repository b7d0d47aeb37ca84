"""The honest models' accuracy over a run: start, middle and end, per peer and per batch size."""

from __future__ import annotations

from collections import defaultdict
from typing import Any


def _pick(log: list[dict[str, float]]) -> dict[str, float] | None:
    """Accuracy at the first, the middle (nearest half the last step) and the last evaluation."""
    if not log:
        return None
    last = log[-1]["step"]
    middle = min(log, key=lambda e: abs(e["step"] - last / 2))
    return {"start": log[0]["accuracy"], "middle": middle["accuracy"], "end": float(log[-1]["accuracy"]),
            "start_step": log[0]["step"], "middle_step": middle["step"], "end_step": last}


def accuracy_timeline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """From the peers' progress rows (batch_size, accuracy_log): by peer and by batch size (mean)."""
    by_peer = {r["peer_id"]: p for r in rows if (p := _pick(r.get("accuracy_log") or []))}
    groups: dict[int, list[dict[str, float]]] = defaultdict(list)
    for r in rows:
        if r["peer_id"] in by_peer:
            groups[int(r["batch_size"])].append(by_peer[r["peer_id"]])
    by_size = {str(bs): {k: sum(p[k] for p in ps) / len(ps) for k in ("start", "middle", "end")}
               for bs, ps in sorted(groups.items())}
    return {"by_peer": by_peer, "by_batch_size": by_size}


def format_accuracy(timeline: dict[str, Any]) -> str:
    """A Markdown table: honest accuracy at start / middle / end by batch size."""
    rows = timeline.get("by_batch_size") or {}
    if not rows:
        return ""
    lines = ["| batch_size | accuracy start | middle | end |", "|---|---|---|---|"]
    lines += [f"| {bs} | {v['start']:.3f} | {v['middle']:.3f} | {v['end']:.3f} |" for bs, v in rows.items()]
    return "\n".join(lines)
