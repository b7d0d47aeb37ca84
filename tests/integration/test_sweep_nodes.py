"""A sweep on the session's three-node cluster: cells placed by the policy, each record naming its nodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradleak import store
from gradleak.placement import FitError
from gradleak.sweep import build_parser, plan, run_sweep

from .test_sweep_live import AXES, _csv, _tiny_config

pytestmark = pytest.mark.integration


def _sweep(tmp_path: Path, *flags: str) -> tuple[Path, list, list]:
    root = tmp_path / "sw"
    args = build_parser().parse_args(["--config", str(_tiny_config(tmp_path)), *AXES, "--out", str(root),
                                      *flags])
    spec, todo = plan(args)
    return root, spec, todo


def test_spread_runs_parallel_cells_on_different_nodes_and_records_them(ray_session, tmp_path: Path) -> None:
    import ray

    # 0.125 CPU a peer: a cell (2 hosts + the attacker) would fit twice on one 1-CPU node,
    # so only the policy keeps the two parallel cells apart.
    root, spec, todo = _sweep(tmp_path, "--batch-sizes", "1,2", "--peer-cpus", "0.125")
    lines: list[str] = []
    assert run_sweep(spec, root, todo, parallel=2, progress=lines.append, placement="spread") == 0
    cells = store.load_cells(root)
    assert len(cells) == 2 and all(c["reconstructions"] > 0 for c in cells), cells
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    for c in cells:  # one cell's peers and its attacker together on one real node
        assert c["cell_placement"] == "spread"
        assert len(c["peer_nodes"]) == 1 and c["peer_nodes"][0] in alive, c
        assert c["attacker_node"] == c["peer_nodes"][0], c
        assert set(c["node_hosts"]) == {c["attacker_node"]}
    assert cells[0]["peer_nodes"] != cells[1]["peer_nodes"]  # the two cells on different nodes
    # The run's own summary says the same, and the table and the progress lines carry it.
    for c in cells:
        summary = json.loads((root / c["run_dir"] / "summary.json").read_text())
        assert summary["nodes"] == {"honest": c["peer_nodes"], "attacker": c["attacker_node"]}
    table = {r["cell_id"]: r for r in _csv(root / "cells.csv")}
    assert all(json.loads(table[c["cell_id"]]["peer_nodes"]) == c["peer_nodes"] for c in cells)
    from gradleak.report import load_done_cells

    report_nodes = {r["cell_id"]: r["nodes"] for r in load_done_cells(root)[0]}  # the report's column
    assert all(report_nodes[c["cell_id"]] == f"peers {c['peer_nodes'][0][:8]}, attacker {c['attacker_node'][:8]}"
               for c in cells), report_nodes
    assert any("placed by spread over 3 nodes" in line for line in lines), lines
    assert any(f"peers on {cells[0]['peer_nodes'][0][:8]}" in line for line in lines), lines


def test_a_cell_no_node_can_hold_is_one_line_and_writes_nothing(ray_session, tmp_path: Path) -> None:
    # Two peers in one 1.5-CPU process and an attacker of 1.5 CPU: 3 CPUs of the cluster's 4,
    # but no node has room for both (the head has 2), so the sweep refuses before any cell.
    root, spec, todo = _sweep(tmp_path, "--peer-cpus", "1.5", "--peers-per-process", "2")
    with pytest.raises(FitError) as err:
        run_sweep(spec, root, todo, parallel=1, progress=lambda _s: None)
    msg = str(err.value)
    assert "\n" not in msg and "cannot host even one cell" in msg, msg
    assert "1 peer process of 1.5 CPU + an attacker of 1.5 CPU" in msg, msg
    assert not root.exists()
