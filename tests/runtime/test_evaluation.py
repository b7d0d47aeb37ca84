from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest

from gradleak.data import load_dataset, split
from gradleak.runtime.evaluation import Evaluator
from gradleak.runtime.record import RunRecord
from gradleak.runtime.telemetry import Metrics


def _truth(seed: int, b: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).random((b, 1, 16, 16), dtype=np.float32)


def test_scores_rows_metrics_and_grid(tmp_path: Path) -> None:
    m = Metrics()
    ev = Evaluator(RunRecord(tmp_path), m)
    t = _truth(0)
    ev.register_truth("a/r1", t, np.array([1, 2]), origin="a", round=1, defence="prune:0.3")
    # Reconstruction in the other order, one image off by 0.1: matching must pair them up.
    recon = t[::-1].copy()
    recon[0] = np.clip(recon[0] + 0.1, 0, 1)
    ev.score("a/r1", "dlg", recon, np.array([2, 9]), {"seconds": 2.5, "iterations": 40})
    ev.score("missing", "dlg", recon, np.array([2, 9]), {})
    row = json.loads((tmp_path / "reconstructions.jsonl").read_text())
    assert row["batch_size"] == 2 and row["defence"] == "prune:0.3" and row["iterations"] == 40
    assert max(row["psnr"]) == 100.0 and 15 < min(row["psnr"]) < 25
    assert row["label_accuracy"] == 0.5
    assert ev.unmatched == 1
    text = generate_latest(m.registry).decode()
    assert 'gradleak_reconstructions_total{attack="dlg",batch_size="2",defence="prune:0.3"} 1.0' in text
    assert 'gradleak_reconstruction_psnr_decibels_count{attack="dlg",batch_size="2",defence="prune:0.3"} 2.0' in text
    rows = ev.write_outputs({(2, "prune:0.3"): 0.8}, {"seconds": 1})
    assert rows[0]["honest_accuracy"] == 0.8 and rows[0]["share_psnr_30"] == 0.5
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert "| 2 | prune:0.3 | dlg | 1 |" in (tmp_path / "summary.md").read_text()


def test_bad_truth_and_bad_reconstruction_shapes(tmp_path: Path) -> None:
    ev = Evaluator(RunRecord(tmp_path))
    with pytest.raises(ValueError, match="truth shapes"):
        ev.register_truth("x", np.zeros((2, 16, 16)), np.array([1, 2]), origin="a", round=1, defence="none")
    ev.register_truth("y", _truth(1), np.array([1, 2]), origin="a", round=1, defence="none")
    with pytest.raises(ValueError, match="reconstruction shape"):
        ev.score("y", "dlg", np.zeros((1, 1, 16, 16)), np.array([1]), {})
    assert not (tmp_path / "reconstructions.jsonl").exists()


def test_truths_are_bounded(tmp_path: Path) -> None:
    ev = Evaluator(RunRecord(tmp_path), keep_truths=3)
    for i in range(5):
        ev.register_truth(f"u{i}", _truth(i, 1), np.array([0]), origin="a", round=i + 1, defence="none")
    ev.score("u0", "dlg", _truth(0, 1), np.array([0]), {})
    assert ev.unmatched == 1 and ev.counts()["truths"] == 3


def test_split_is_seeded_and_disjoint() -> None:
    d = load_dataset("digits", image_size=16, limit=500, seed=1)
    assert d.images.shape == (500, 1, 16, 16) and 0 <= d.images.min() and d.images.max() <= 1
    shards, test = split(d, 4, test_fraction=0.2, seed=3)
    again, _ = split(d, 4, test_fraction=0.2, seed=3)
    assert all(np.array_equal(a.labels, b.labels) for a, b in zip(shards, again))
    assert len(test.labels) == 100 and all(len(s.labels) == 100 for s in shards)
    keys = {x.tobytes() for s in [*shards, test] for x in s.images}
    assert len(keys) >= 495  # near-duplicate digits aside, no sample is dealt twice


def test_truths_go_to_their_own_files_bounded_by_the_cap(tmp_path: Path) -> None:
    from gradleak.runtime.evaluation import load_truth

    ev = Evaluator(RunRecord(tmp_path), keep_truths=2)
    for i in range(3):
        ev.register_truth(f"a/r{i}", _truth(i), np.array([1, 2]), origin="a", round=i, defence="fp16")
    files = sorted((tmp_path / "truth").glob("*.npz"))
    assert len(files) == 2 and ev.counts()["truth_files"] == 2 and ev.counts()["truth_files_refused"] == 1
    t = load_truth(tmp_path, "a/r1")
    assert t is not None and np.array_equal(t.images, _truth(1)) and t.labels.tolist() == [1, 2]
    assert (t.origin, t.round, t.defence, t.batch_size) == ("a", 1, "fp16", 2)
    assert load_truth(tmp_path, "a/r2") is None  # past the cap: kept in memory only
    for f in files:
        f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(ValueError, match=r"truth file .*\.npz is unreadable"):
        load_truth(tmp_path, "a/r0")


def test_rows_carry_receive_and_score_times_and_the_senders_step(tmp_path: Path) -> None:
    import time

    ev = Evaluator(RunRecord(tmp_path))
    t = _truth(3, 1)
    ev.register_truth("b/r4", t, np.array([1]), origin="b", round=4, defence="none")
    received = time.time() - 2.0
    ev.score("b/r4", "analytic", t, np.array([1]), {"stop_reason": "time_budget"},
             received_at=received, step=7)
    row = json.loads((tmp_path / "reconstructions.jsonl").read_text())
    assert row["received_at"] == received and row["step"] == 7
    assert received < row["scored_at"] <= time.time() and row["stop_reason"] == "time_budget"
    ev.score("b/r4", "dlg", t, np.array([1]), {})
    row = json.loads((tmp_path / "reconstructions.jsonl").read_text().splitlines()[1])
    assert row["received_at"] is None and row["step"] == 4  # the truth's round as a fallback
