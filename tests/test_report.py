"""`gradleak report`: figures, summary.md and the claims table from a synthetic sweep store."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gradleak.report import add_report_parser, run_report_command, write_report
from gradleak.report_claims import (
    FAILS,
    HOLDS,
    NOT_MEASURED,
    check_claims,
    defence_family,
    defence_strength,
    group_cells,
)
from gradleak.runtime.record import write_grid

# (attack, batch_size, defence) -> (mean PSNR, share >= 30 dB, honest accuracy).
# Under dlg every claim of the paper holds; idlg still breaks prune:0.3 at batch size 1.
LEAKAGE: dict[tuple[str, int, str], tuple[float, float, float]] = {
    ("dlg", 1, "none"): (45.0, 1.0, 0.80), ("dlg", 8, "none"): (12.0, 0.0, 0.85),
    ("dlg", 1, "prune:0.3"): (14.0, 0.0, 0.79), ("dlg", 8, "prune:0.3"): (10.0, 0.0, 0.84),
    ("dlg", 1, "gauss:1e-2"): (12.0, 0.0, 0.50), ("dlg", 8, "gauss:1e-2"): (10.0, 0.0, 0.55),
    ("dlg", 1, "fp16"): (44.0, 1.0, 0.80), ("dlg", 8, "fp16"): (12.5, 0.0, 0.85),
    ("dlg", 1, "secagg:5"): (8.0, 0.0, 0.80), ("dlg", 8, "secagg:5"): (8.0, 0.0, 0.85),
    ("idlg", 1, "none"): (60.0, 1.0, 0.80), ("idlg", 8, "none"): (13.0, 0.0, 0.85),
    ("idlg", 1, "prune:0.3"): (35.0, 0.8, 0.79), ("idlg", 8, "prune:0.3"): (11.0, 0.0, 0.84),
    ("idlg", 1, "gauss:1e-2"): (12.0, 0.0, 0.50), ("idlg", 8, "gauss:1e-2"): (10.0, 0.0, 0.55),
    ("idlg", 1, "fp16"): (58.0, 1.0, 0.80), ("idlg", 8, "fp16"): (13.0, 0.0, 0.85),
    ("idlg", 1, "secagg:5"): (8.0, 0.0, 0.80), ("idlg", 8, "secagg:5"): (8.0, 0.0, 0.85),
}
RECONSTRUCTIONS = 3


def cell_row(attack: str, batch_size: int, defence: str, psnr: float, share: float,
             accuracy: float, seed: int = 0) -> dict[str, Any]:
    cell_id = f"{attack}-b{batch_size}-{defence.replace(':', '_')}-s{seed}"
    return {
        "cell_id": cell_id, "batch_size": batch_size, "defence": defence, "attack": attack,
        "seed": seed, "peers": 4, "fanout": 2, "topology": "complete",
        "honest_accuracy": accuracy, "honest_accuracy_min": accuracy - 0.01, "messages": 100,
        "bytes_sent": 10_000, "reconstructions": RECONSTRUCTIONS, "mean_psnr": psnr,
        "share_psnr_30": share, "mean_ssim": 0.5, "label_accuracy": 1.0, "captured": 5,
        "dropped": 0, "attacker_share": 0.2, "seconds": 1.5, "run_dir": f"runs/{cell_id}",
        "defence_params": {},
    }


def write_cell(store: Path, row: dict[str, Any], *, done: bool = True) -> None:
    """One cell as the sweep writes it: its run dir, and cell.json once done."""
    run_dir = store / row["run_dir"]
    run_dir.mkdir(parents=True)
    with open(run_dir / "reconstructions.jsonl", "w") as f:
        for i in range(RECONSTRUCTIONS):
            psnr = [row["mean_psnr"] + i - 1] * row["batch_size"]
            f.write(json.dumps({"update_id": f"u{i}", "origin": "peer-0", "round": i,
                                "batch_size": row["batch_size"], "defence": row["defence"],
                                "attack": row["attack"], "psnr": psnr, "ssim": [0.5],
                                "mean_psnr": row["mean_psnr"] + i - 1, "mean_ssim": 0.5,
                                "mse": 0.01, "label_accuracy": 1.0, "seconds": 0.1,
                                "iterations": 10, "time": 0.0}) + "\n")
    truth = np.linspace(0, 1, 16, dtype=np.float32).reshape(1, 4, 4)
    write_grid(run_dir / "grid.png", [(truth, truth[:, ::-1], row["cell_id"])], tile=8)
    (run_dir / "summary.json").write_text("{}")
    (store / "cells" / row["cell_id"]).mkdir(parents=True)
    if done:
        (store / "cells" / row["cell_id"] / "cell.json").write_text(json.dumps(row))


Leakage = dict[tuple[str, int, str], tuple[float, float, float]]


def rows_of(leakage: Leakage) -> list[dict[str, Any]]:
    return [cell_row(a, b, d, *v) for (a, b, d), v in leakage.items()]


def make_store(tmp_path: Path, leakage: Leakage) -> Path:
    store = tmp_path / "sweep"
    for row in rows_of(leakage):
        write_cell(store, row)
    return store


def verdicts_in(summary: str) -> dict[tuple[int, str], str]:
    """(claim number, attack) -> verdict, read back from summary.md's claims table."""
    found = re.findall(r"^\| (\d) \| [^\n]*? \| (\w+) \| [^\n]* \| \*\*([a-z ]+)\*\* \|$",
                       summary, flags=re.MULTILINE)
    return {(int(n), attack): verdict for n, attack, verdict in found}


def verdicts(rows: list[dict[str, Any]]) -> dict[tuple[int, str], str]:
    results, _ = check_claims(rows)
    return {(r.number, r.attack): r.verdict for r in results}


def report(store: Path, *extra: str) -> int:
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    return run_report_command(parser.parse_args(["report", str(store), *extra]))


@pytest.fixture(scope="module")
def default_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LEAKAGE store with its report written by the command (rendered once per module)."""
    store = make_store(tmp_path_factory.mktemp("default"), LEAKAGE)
    assert report(store) == 0
    return store


# ------------------------------------------------------------------ the files


def test_report_writes_decodable_figures_and_summary(default_store: Path) -> None:
    store = default_store
    out = store / "report"
    names = {"heatmap_dlg.png", "heatmap_idlg.png", "privacy_utility.png", "grids_dlg.png",
             "grids_idlg.png", "summary.md"}
    assert {p.name for p in out.iterdir()} == names
    with Image.open(store / "runs" / "dlg-b1-none-s0" / "grid.png") as one:
        single = one.size
    for name in names - {"summary.md"}:
        with Image.open(out / name) as im:
            im.load()
            if name.startswith("grids_"):  # 10 cells composed: far larger than one grid
                assert im.width * im.height > 10 * single[0] * single[1]
            else:
                assert im.width > 300 and im.height > 200
    summary = (out / "summary.md").read_text()
    for name in names - {"summary.md"}:
        assert f"]({name})" in summary
    assert "- batch_size: `1`, `8`" in summary
    assert "- defence: `none`, `fp16`, `gauss:1e-2`, `prune:0.3`, `secagg:5`" in summary
    assert "| dlg-b1-gauss_1e-2-s0 | dlg | 1 | gauss:1e-2 | 0 | 3 | 12.0 | 13.0 |" in summary


def test_report_is_deterministic(default_store: Path, tmp_path: Path) -> None:
    assert report(default_store, "--out", str(tmp_path)) == 0
    for again in sorted(tmp_path.iterdir()):
        assert again.read_bytes() == (default_store / "report" / again.name).read_bytes()


# ------------------------------------------------------------------ the claims table


def test_claims_table_holds_under_dlg_and_reads_the_store(default_store: Path,
                                                          tmp_path: Path) -> None:
    table = verdicts_in((default_store / "report" / "summary.md").read_text())
    assert {n: table[(n, "dlg")] for n in range(1, 6)} == {n: HOLDS for n in range(1, 6)}
    assert table[(3, "idlg")] == FAILS

    # gauss:1e-2 leaking under dlg must flip claim 1 in the written table.
    flipped = dict(LEAKAGE) | {("dlg", 1, "gauss:1e-2"): (40.0, 0.9, 0.50)}
    store2 = make_store(tmp_path / "flip", flipped)
    write_report(store2)
    summary = (store2 / "report" / "summary.md").read_text()
    table2 = verdicts_in(summary)
    assert table2[(1, "dlg")] == FAILS
    assert table2[(3, "dlg")] == HOLDS
    assert "b1 gauss:1e-2: 40.0 dB, 90% >= 30 dB" in summary


@pytest.mark.parametrize(("change", "flipped"), [
    # noise costs no accuracy (utility has no attacker: both attacks' cells say so)
    ({("dlg", 1, "gauss:1e-2"): (12.0, 0.0, 0.80), ("idlg", 1, "gauss:1e-2"): (12.0, 0.0, 0.80)},
     {(1, "dlg"), (1, "idlg")}),
    ({("dlg", 1, "fp16"): (20.0, 0.0, 0.80)}, {(2, "dlg")}),  # fp16 suddenly defends
    ({("dlg", 1, "prune:0.3"): (31.0, 0.6, 0.79)}, {(3, "dlg")}),
    # batch 8 leaks as much as batch 1 (fp16 with it, so that claim 2 still holds)
    ({("dlg", 8, "none"): (44.0, 1.0, 0.85), ("dlg", 8, "fp16"): (44.0, 1.0, 0.85)}, {(4, "dlg")}),
    ({("dlg", 8, "secagg:5"): (25.0, 0.2, 0.85)}, {(5, "dlg")}),  # 20% of images >= 30 dB
])
def test_each_claim_flips_with_the_measurements(
    change: dict[Any, Any], flipped: set[tuple[int, str]],
) -> None:
    before, after = verdicts(rows_of(LEAKAGE)), verdicts(rows_of(LEAKAGE | change))
    assert {k for k in before if before[k] != after[k]} == flipped
    assert all(before[k] == HOLDS and after[k] == FAILS for k in flipped)


def test_finding_when_idlg_breaks_pruning(default_store: Path) -> None:
    summary = (default_store / "report" / "summary.md").read_text()
    finding = [line for line in summary.splitlines() if line.startswith("- FINDING:")]
    assert finding == [("- FINDING: idlg breaks `prune:0.3` at batch size 1 (mean PSNR 35.0 dB, "
                        "80% of reconstructions >= 30 dB), although the paper says pruning > 20% "
                        "defends (claim 3).")]
    _, none = check_claims(rows_of(LEAKAGE | {("idlg", 1, "prune:0.3"): (20.0, 0.0, 0.79)}))
    assert none == []


def test_claims_without_cells_are_not_measured(tmp_path: Path) -> None:
    no_secagg = {k: v for k, v in LEAKAGE.items() if k[2] != "secagg:5"}
    store = make_store(tmp_path, no_secagg)
    write_report(store)
    summary = (store / "report" / "summary.md").read_text()
    assert verdicts_in(summary)[(5, "dlg")] == NOT_MEASURED
    row = "| 5 | secure aggregation defends | dlg | no secagg cells | **not measured** |"
    assert row in summary
    only_idlg = verdicts(rows_of({k: v for k, v in LEAKAGE.items() if k[0] == "idlg"}))
    assert {only_idlg[(n, "dlg")] for n in range(1, 6)} == {NOT_MEASURED}
    assert only_idlg[(2, "idlg")] == HOLDS


def test_noise_cost_needs_none_at_the_same_batch_size() -> None:
    rows = rows_of({k: v for k, v in LEAKAGE.items() if not (k[1] == 1 and k[2] == "none")})
    assert verdicts(rows)[(1, "dlg")] == NOT_MEASURED


def test_cells_pool_over_seeds_weighted_by_reconstructions() -> None:
    a = cell_row("dlg", 1, "none", 40.0, 1.0, 0.8, seed=0) | {"reconstructions": 3}
    b = cell_row("dlg", 1, "none", 20.0, 0.0, 0.6, seed=1) | {"reconstructions": 1}
    empty = cell_row("dlg", 1, "none", 0.0, 0.0, 0.7, seed=2) | {
        "reconstructions": 0, "mean_psnr": None, "share_psnr_30": None}
    g = group_cells([a, b, empty])[("dlg", 1, "none")]
    assert (g.cells, g.reconstructions) == (3, 4)
    assert g.mean_psnr == pytest.approx(35.0) and g.share_psnr_30 == pytest.approx(0.75)
    assert g.honest_accuracy == pytest.approx(0.7)


def test_defence_spec_parsing() -> None:
    assert defence_family("prune:0.3+fp16") == "prune+fp16"
    assert defence_family("none") == "none"
    assert defence_strength("gauss:1e-2") == pytest.approx(0.01)
    assert defence_strength("fp16") is None
    rows = rows_of(LEAKAGE | {("dlg", 1, "prune:0.3+gauss:1e-2"): (40.0, 1.0, 0.5),
                              ("dlg", 1, "prune:0.1"): (40.0, 1.0, 0.8)})
    assert verdicts(rows)[(3, "dlg")] == HOLDS  # chains and pruning <= 20% are not claim 3


# ------------------------------------------------------------------ bad input


def test_incomplete_cell_is_ignored(tmp_path: Path) -> None:
    store = make_store(tmp_path, LEAKAGE)
    running = cell_row("dlg", 64, "prune:0.3", 99.0, 1.0, 0.1)
    write_cell(store, running, done=False)
    write_report(store)
    summary = (store / "report" / "summary.md").read_text()
    assert "- done cells: 20 (ignored 1 not done)" in summary
    assert running["cell_id"] not in summary and "`64`" not in summary
    assert verdicts_in(summary)[(3, "dlg")] == HOLDS


def test_bad_store_is_one_line_and_writes_nothing(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert report(tmp_path / "missing") == 2
    err = capsys.readouterr().err
    assert err.startswith("gradleak: error: ") and err.count("\n") == 1
    assert not (tmp_path / "missing").exists()

    store = tmp_path / "sweep"
    write_cell(store, cell_row("dlg", 1, "none", 45.0, 1.0, 0.8), done=False)
    assert report(store, "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "no done cells" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (store / "report").exists()


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("cell.json", "{not json", "unreadable"),
    ("cell.json", "[1, 2]", "is not a JSON object"),
    ("cell.json", '{"cell_id": "x", "attack": "dlg"}', "lacks batch_size, defence"),
    ("reconstructions.jsonl", '{"psnr": [1]}\n[', "unreadable"),
])
def test_invalid_store_file_is_named_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: str, needle: str,
) -> None:
    store = make_store(tmp_path, {k: v for k, v in LEAKAGE.items() if k[0] == "dlg"})
    bad = (store / "runs" / "dlg-b1-none-s0" if name.endswith("jsonl")
           else store / "cells" / "broken") / name
    bad.parent.mkdir(exist_ok=True)
    bad.write_text(content)
    assert report(store) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradleak: error: ") and err.count("\n") == 1
    assert str(bad) in err and needle in err
    assert not (store / "report").exists()


def test_attacker_view_groups_by_network_shape() -> None:
    from gradleak.report import attacker_view

    rows = [
        {"attack": "idlg", "peers": 4, "fanout": 2, "topology": "complete", "attacker_share": 0.4,
         "reconstructions": 10, "mean_psnr": 60.0},
        {"attack": "idlg", "peers": 4, "fanout": 2, "topology": "complete", "attacker_share": 0.2,
         "reconstructions": 30, "mean_psnr": 20.0},
        {"attack": "idlg", "peers": 16, "fanout": 2, "topology": "complete", "attacker_share": 0.1,
         "reconstructions": 0, "mean_psnr": None},
    ]
    view = attacker_view(rows)
    assert view[0] == ("idlg", 16, 2, "complete", 1, 0.1, 0, None)
    _a, peers, _f, _t, cells, share, n, psnr = view[1]
    assert (peers, cells, n) == (4, 2, 40) and abs(share - 0.3) < 1e-12 and psnr == 30.0


def test_several_network_shapes_get_a_figure_and_claims_compare_one_shape(
    default_store: Path, tmp_path: Path,
) -> None:
    assert not (default_store / "report" / "attacker_view.png").exists()  # one shape there
    assert "attacker_view.png" not in (default_store / "report" / "summary.md").read_text()
    store = make_store(tmp_path, LEAKAGE)  # 20 cells at 4 peers
    for peers in (8, 16):  # batch 8 leaks at more peers: pooled, claim 4 would fail
        for attack, batch_size in [(a, b) for a in ("dlg", "idlg") for b in (1, 8)]:
            row = cell_row(attack, batch_size, "none", 45.0, 1.0, 0.8)
            cell_id = f"{row['cell_id']}-p{peers}"
            write_cell(store, row | {"cell_id": cell_id, "run_dir": f"runs/{cell_id}",
                                     "peers": peers, "attacker_share": 2 / peers})
    written = write_report(store)
    figure = store / "report" / "attacker_view.png"
    assert figure in written
    with Image.open(figure) as im:
        im.load()
        assert im.width > 600 and im.height > 300
    summary = (store / "report" / "summary.md").read_text()
    assert "](attacker_view.png)" in summary
    assert "| dlg | 16 | 2 | complete | 2 | 0.125 | 6 | 45.0 |" in summary
    # 4 peers: only its 'none' cells (45 and 12 dB) face the other shapes, not its defences
    assert "| dlg | 4 | 2 | complete | 2 | 0.200 | 6 | 28.5 |" in summary
    assert verdicts_in(summary)[(4, "dlg")] == HOLDS
    assert "| dlg | 8 | none | 1 | 3 | 12.0 | 0.000 | 0.850 |" in summary  # pooled: 4 peers only
    assert "the 20 cells of peers `4`, fanout `2`, topology `complete`" in summary


def test_swept_attack_parameters_are_kept_apart(tmp_path: Path) -> None:
    """A sweep over idlg.lr reports each lr as its own attack: pooling them would average a
    tuned attack with an untuned one. An analytic cell at either lr is the same run: pooled."""
    store = tmp_path / "sweep"
    for lr, psnr in ((0.1, 12.0), (1.0, 40.0)):
        for attack, value in (("idlg", psnr), ("analytic", 90.0)):
            row = cell_row(attack, 1, "none", value, 1.0 if value >= 30 else 0.0, 0.8)
            row["cell_id"] = row["run_dir"] = f"{attack}-lr{lr}"
            row["run_dir"] = f"runs/{attack}-lr{lr}"
            row["attack_params"] = {"idlg.lr": lr}
            write_cell(store, row)
    assert report(store) == 0
    out = store / "report"
    summary = (out / "summary.md").read_text()
    pooled = summary.split("## Leakage pooled over seeds")[1].split("## The attacker's view")[0]
    assert "| idlg (lr=0.1) | 1 | none | 1 | 3 | 12.0 |" in pooled
    assert "| idlg (lr=1.0) | 1 | none | 1 | 3 | 40.0 |" in pooled
    assert "| analytic | 1 | none | 2 | 6 | 90.0 |" in pooled
    assert "- attack: `analytic`, `idlg (lr=0.1)`, `idlg (lr=1.0)`" in summary
    assert {"heatmap_idlg__lr_0.1_.png", "heatmap_idlg__lr_1.0_.png", "heatmap_analytic.png"} <= {
        p.name for p in out.iterdir()}
