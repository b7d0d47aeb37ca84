"""Evaluator shards: routing by update id, merged counts and summaries, one record from many writers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradleak.runtime.evaluation import Evaluator
from gradleak.runtime.evaluator_shards import (
    EvaluatorShards,
    as_shards,
    merge_counts,
    merge_shipped,
    shard_index,
)
from gradleak.runtime.record import RunRecord


def _truth(seed: int, b: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).random((b, 1, 16, 16), dtype=np.float32)


def test_routing_is_stable_and_spreads_updates() -> None:
    ids = [f"peer-{p}/r{r}" for p in range(8) for r in range(50)]
    got = [shard_index(u, 4) for u in ids]
    assert got == [shard_index(u, 4) for u in ids]  # CRC-32: the same in every process
    counts = np.bincount(got, minlength=4)
    assert counts.min() > 60, counts  # 400 ids over 4 shards, none starved
    shards = EvaluatorShards(["e0", "e1", "e2", "e3"])
    assert shards.primary == "e0" and {shards.for_update(u) for u in ids} == {"e0", "e1", "e2", "e3"}
    assert as_shards(None) is None and len(as_shards("only")) == 1 and as_shards(shards) is shards
    with pytest.raises(ValueError, match="at least one"):
        EvaluatorShards([])


def test_counts_and_last_shipped_merge() -> None:
    merged = merge_counts([{"reconstructions": 3, "truths": 5, "mean_psnr": 30.0},
                           {"reconstructions": 1, "truths": 2, "mean_psnr": 10.0},
                           {"reconstructions": 0, "truths": 1, "mean_psnr": None}])
    assert merged == {"reconstructions": 4, "truths": 8, "mean_psnr": 25.0}
    assert merge_counts([{"reconstructions": 0, "mean_psnr": None}])["mean_psnr"] is None
    assert merge_shipped([None, {"step": 4, "model_version": 2}, {"step": 7, "model_version": 1}]) == {
        "step": 7, "model_version": 2}
    assert merge_shipped([None, None]) is None


def test_two_shards_write_one_record_and_one_summary(tmp_path: Path) -> None:
    shards = [Evaluator(RunRecord(tmp_path), truth_files=2) for _ in range(2)]
    ids = [f"a/r{i}" for i in range(8)]
    for i, u in enumerate(ids):
        shards[shard_index(u, 2)].register_truth(u, _truth(i), np.array([1, 2]), origin="a", round=i + 1,
                                                 defence="none")
    for i, u in enumerate(ids):
        shards[shard_index(u, 2)].score(u, "dlg", _truth(i), np.array([1, 2]), {})
    assert all(s.counts()["reconstructions"] > 0 for s in shards)
    assert sum(s.counts()["truth_files"] for s in shards) == 4  # each its share of the files
    own = shards[0].counts()["reconstructions"]
    shards[0].absorb(shards[1].export())
    rows = shards[0].write_outputs({}, {})
    assert rows[0]["reconstructions"] == 8 and rows[0]["mean_psnr"] == 100.0
    assert shards[0].counts()["reconstructions"] == own  # counts stay per shard: the driver sums them
    lines = (tmp_path / "reconstructions.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["update_id"] for x in lines) == sorted(ids)


# Each writer a process of its own that imports only the record module (not torch).
_WRITER = """
import sys
from gradleak.runtime.record import RunRecord
record = RunRecord(sys.argv[1])
for i in range(40):  # rows of ~20 KB: a buffered file would split them into several writes
    record.append({"writer": int(sys.argv[2]), "i": i, "pad": "x" * 20_000})
"""


def test_rows_from_several_processes_never_interleave(tmp_path: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(w)]) for w in range(3)]
    assert [p.wait(60) for p in procs] == [0, 0, 0]
    rows = [json.loads(x) for x in (tmp_path / "reconstructions.jsonl").read_text().splitlines()]
    assert sorted((r["writer"], r["i"]) for r in rows) == [(w, i) for w in range(3) for i in range(40)]
