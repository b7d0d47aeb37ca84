"""Live sweeps: tiny cells on Ray end to end, and a SIGKILLed sweep that --resume completes."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from gradleak import store
from gradleak.sweep import build_parser, plan, run_sweep

pytestmark = pytest.mark.integration
T = TypeVar("T")

TINY = ("base:\n  data: {limit: 300}\n  gossip: {rounds: 3, period_s: [0]}\n"
        "  attack: {max_iters: 10, drain_timeout_s: 15}\n")
AXES = ("--peers", "2", "--fanout", "1", "--defences", "none", "--attacks", "idlg", "--seeds", "1")


def _tiny_config(tmp_path: Path) -> Path:
    f = tmp_path / "tiny.yaml"
    f.write_text(TINY)
    return f


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_two_cell_sweep_fills_the_store(ray_session, tmp_path: Path) -> None:
    root = tmp_path / "sw"
    args = build_parser().parse_args(["--config", str(_tiny_config(tmp_path)), "--batch-sizes", "1,2",
                              *AXES, "--out", str(root)])
    spec, todo = plan(args)
    lines: list[str] = []
    assert run_sweep(spec, root, todo, parallel=2, progress=lines.append) == 0
    cells = store.load_cells(root)
    assert sorted(c["batch_size"] for c in cells) == [1, 2]
    assert all(c["reconstructions"] > 0 and c["mean_psnr"] is not None for c in cells), cells
    assert all(0 < c["attacker_share"] <= 1 and c["messages"] == 3 * 3 for c in cells)
    table = _csv(root / "cells.csv")
    assert {float(r["mean_psnr"]) for r in table} == {c["mean_psnr"] for c in cells}
    rows = _csv(root / "reconstructions.csv")
    assert Counter(r["cell_id"] for r in rows) == {c["cell_id"]: c["reconstructions"] for c in cells}
    assert any("[2/2]" in line and "mean PSNR" in line and "ETA" in line for line in lines), lines
    assert json.loads((root / store.TARGETS_FILE).read_text()) == []  # nothing runs any more
    # The report reads the real store: both batch sizes appear in its per-cell table.
    from gradleak.report import write_report

    written = {p.name for p in write_report(root)}
    assert {"summary.md", "privacy_utility.png"} <= written
    summary = (root / "report" / "summary.md").read_text()
    assert all(c["cell_id"] in summary for c in cells)


def _session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (zombies are dead already and wait to be reaped)."""
    out = subprocess.run(["ps", "-s", str(sid), "-o", "pid=,stat="], capture_output=True, text=True,
                         check=False)
    return [int(pid) for pid, stat in (line.split() for line in out.stdout.splitlines())
            if not stat.startswith("Z")]


def _reap_session(sid: int, grace_s: float) -> list[int]:
    """Wait for the processes of session `sid` (ours) to end, SIGKILL those left (by pid).

    Returns the pids that had to be killed.
    """
    end = time.monotonic() + grace_s
    while _session_pids(sid) and time.monotonic() < end:
        time.sleep(0.5)
    left = _session_pids(sid)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + 10
    while _session_pids(sid) and time.monotonic() < end:
        time.sleep(0.2)
    return left


def test_a_killed_sweep_resumes_without_losing_or_redoing_a_cell(tmp_path: Path) -> None:
    root = tmp_path / "sw"
    argv = [sys.executable, "-m", "gradleak.sweep", "--config", str(_tiny_config(tmp_path)),
            "--batch-sizes", "1,2,4", *AXES, "--parallel", "1", "--out", str(root)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # Its own session: the sweep's own Ray (gcs, raylet, workers) lives in it, so the whole
    # of it can be killed without touching the test session's cluster (never `ray stop`).
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        first = _wait_for(lambda: next(iter(sorted(root.glob("cells/*/cell.json"))), None), 240, proc)
        # Let the next cell start writing its run dir, so the kill leaves a partial cell.
        partial = _wait_for(lambda: next((d for d in (root / "cells").iterdir()
                                          if d != first.parent and any(d.iterdir())), None), 60, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = (first.read_bytes(), first.stat().st_mtime_ns)
    partial_runs = {p.name for p in partial.iterdir()}
    assert not (partial / store.CELL_FILE).exists()
    _reap_session(proc.pid, grace_s=1)  # its Ray workers, orphaned by the kill
    assert _session_pids(proc.pid) == []

    resumed = subprocess.Popen([*argv, "--resume"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = resumed.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(resumed.pid, signal.SIGKILL)
        raise
    finally:
        killed = _reap_session(resumed.pid, grace_s=30)
    assert resumed.returncode == 0, out[-3000:]
    assert "3 cells, 1 done, 2 to run" in out, out
    assert killed == []  # the sweep's ray.shutdown() left no process behind
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before  # not redone
    cells = store.load_cells(root)
    assert len(cells) == 3
    for c in cells:  # one run dir per cell; the killed try of the partial cell is gone
        runs = [p.name for p in store.cell_dir(root, c["cell_id"]).iterdir() if p.is_dir()]
        assert len(runs) == 1, runs
        if c["cell_id"] == partial.name:
            assert runs[0] not in partial_runs
    rows = _csv(root / "reconstructions.csv")
    assert Counter(r["cell_id"] for r in rows) == {c["cell_id"]: c["reconstructions"] for c in cells}
    keys = [(r["cell_id"], r["update_id"], r["attack"]) for r in rows]
    assert len(keys) == len(set(keys))


def _wait_for(find: Callable[[], T | None], timeout: float, proc: subprocess.Popen[bytes]) -> T:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the sweep exited early with {proc.returncode}")
        found = find()
        if found is not None:
            return found
        time.sleep(0.2)
    raise AssertionError(f"nothing appeared within {timeout} s")
