"""Several evaluator actors, each holding the truths and scores of a share of the updates.

Why: every honest peer files its private batch with the evaluator once per local step and
waits for it, and one evaluator actor files ~500 truths/s (benchmarks/evaluator.py,
docs/scale.md): 128 peers at 4 steps/s already reach that, 1,000 peers file 4,000/s.

How: the truth, the scores and the claims of one update go to the shard named by a CRC-32
of its update id, so every process agrees without asking anyone. Each shard has its own
/metrics exporter (Prometheus sums the counters and histograms over the run's targets) and
appends to the same run record files (one write per row, see gradleak.runtime.record).
Shard 0 is the run's endpoint: the driver's counters, the gossip algebra's share, and the
summary, written from every shard's rows.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any


def shard_index(key: str, shards: int) -> int:
    """The shard of key among shards (stable across processes, unlike hash())."""
    return zlib.crc32(key.encode()) % shards


class EvaluatorShards:
    """The run's evaluator actors (Ray handles), routed by update id; picklable."""

    def __init__(self, handles: Sequence[Any]) -> None:
        if not handles:
            raise ValueError("at least one evaluator is needed")
        self.handles = tuple(handles)

    def __len__(self) -> int:
        return len(self.handles)

    @property
    def primary(self) -> Any:
        """Shard 0: the run's endpoint (driver counters, summary)."""
        return self.handles[0]

    def for_update(self, update_id: str) -> Any:
        """The shard holding update_id's truth, scores and claim."""
        return self.handles[shard_index(update_id, len(self.handles))]


def as_shards(evaluator: Any) -> EvaluatorShards | None:
    """None, EvaluatorShards, or a single evaluator handle, as EvaluatorShards (or None)."""
    if evaluator is None or isinstance(evaluator, EvaluatorShards):
        return evaluator
    return EvaluatorShards((evaluator,))


def merge_counts(counts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The shards' counts as one: sums, and the mean PSNR weighted by reconstructions."""
    out: dict[str, Any] = {}
    for c in counts:
        for k, v in c.items():
            if k != "mean_psnr":
                out[k] = out.get(k, 0) + v
    scored = [(c["mean_psnr"], c.get("reconstructions", 0)) for c in counts if c.get("mean_psnr") is not None]
    weight = sum(n for _p, n in scored)
    out["mean_psnr"] = sum(p * n for p, n in scored) / weight if weight else None
    return out


def merge_shipped(answers: Sequence[dict[str, int] | None]) -> dict[str, int] | None:
    """One origin's last step and model version over every shard (None: no truth filed)."""
    got = [a for a in answers if a is not None]
    if not got:
        return None
    return {"step": max(a["step"] for a in got), "model_version": max(a["model_version"] for a in got)}
