"""Sweep spec, cell ids, resume planning and the store's tables, without Ray."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest
import yaml

from gradleak import store
from gradleak.config import ConfigError
from gradleak.store import Cell
from gradleak.sweep import add_sweep_parser, plan, run_sweep_command, spec_from_args


def _args(*argv: str) -> argparse.Namespace:
    """Parse as `gradleak sweep ...` through the subparser the CLI adds."""
    parser = argparse.ArgumentParser(prog="gradleak")
    add_sweep_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["sweep", *argv])


def test_flags_override_the_yaml_file_and_missing_axes_come_from_the_base(tmp_path: Path) -> None:
    f = tmp_path / "sweep.yaml"
    f.write_text("batch_sizes: [1, 2]\ndefences: [none]\nseeds: 2\npeers: [4, 8]\n"
                 "base: {gossip: {rounds: 7, topology: ring}, attack: {attacks: [dlg]}}\n")
    spec = spec_from_args(_args("--out", "x", "--config", str(f), "--defences", "prune:0.3,gauss:1e-2",
                                "--rounds", "5", "--fanout", "1,2"))
    assert spec.batch_sizes == (1, 2) and spec.peers == (4, 8) and spec.seeds == (0, 1)
    assert spec.defences == ("prune:0.3", "gauss:0.01")  # canonical specs
    assert spec.fanouts == (1, 2) and spec.base.gossip.rounds == 5  # flags win over the file
    assert spec.attacks == ("dlg",) and spec.topologies == ("ring",)  # from the base
    assert spec_from_args(_args("--out", "x", "--seeds", "3,5")).seeds == (3, 5)  # a list, not a count


def test_the_cross_product_and_its_configs() -> None:
    spec = spec_from_args(_args("--out", "x", "--batch-sizes", "1,2,4,8", "--defences",
                                "none,prune:0.3,gauss:1e-2,fp16", "--attacks", "idlg,dlg",
                                "--seeds", "2", "--peers", "4", "--fanout", "2"))
    cells = spec.cells()
    assert len(cells) == 4 * 4 * 2 * 2
    cfg = cells[-1].config(spec.base, Path("/sw"))
    assert cfg.peers.batch_sizes == (8,) and cfg.peers.defences == ("fp16",)
    assert cfg.attack.attacks == ("dlg",) and cfg.seed == 1 and cfg.telemetry.metrics_port == 0
    assert cfg.out_dir == f"/sw/cells/{cells[-1].cell_id}"


def test_cell_ids_are_deterministic_unique_and_filesystem_safe() -> None:
    spec = spec_from_args(_args("--out", "x", "--defences", "none,prune:0.3,prune:0.3+fp16,dp:1:0.5",
                                "--batch-sizes", "1,16", "--seeds", "2", "--max-batch-size", "16"))
    ids = [c.cell_id for c in spec.cells()]
    assert ids == [c.cell_id for c in spec.cells()] and len(set(ids)) == len(ids) == 16
    assert all(":" not in i and "/" not in i for i in ids)
    assert Cell(1, "prune:0.3", "idlg", 0, 4, 2, "complete").cell_id == "bs1-prune_0.3-idlg-s0-p4-f2-complete"
    assert Cell(1, "a_b", "idlg", 0, 4, 2, "complete").cell_id != Cell(1, "a:b", "idlg", 0, 4, 2,
                                                                    "complete").cell_id


def test_sweep_yaml_is_a_config_that_gives_the_same_sweep(tmp_path: Path) -> None:
    spec = spec_from_args(_args("--out", "x", "--batch-sizes", "1,2", "--rounds", "9", "--max-iters", "11"))
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump(spec.to_dict()))
    again = spec_from_args(_args("--out", "x", "--config", str(f)))
    assert again == spec and again.base.attack.max_iters == 11
    assert store.load_spec(tmp_path) == spec  # what `gradleak report` reads


def _fake_cell(root: Path, cell: Cell, psnrs: list[float], done: bool) -> None:
    run = store.cell_dir(root, cell.cell_id) / "run"
    run.mkdir(parents=True)
    rows = [{"update_id": f"peer-0/r{i}", "batch_size": cell.batch_size, "defence": cell.defence,
             "attack": cell.attack, "psnr": [p], "ssim": [0.5], "mean_psnr": p, "label_accuracy": 1.0}
            for i, p in enumerate(psnrs)]
    (run / store.RECONSTRUCTIONS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if done:
        store.write_cell(root, {**cell.axes(), **store.leakage(rows), "run_dir": f"cells/{cell.cell_id}/run",
                                "defence_params": {}})


def _fake_store(root: Path) -> list[Cell]:
    """A sweep over batch sizes 1, 2, 4 whose first cell is done and second half-run."""
    args = _args("--out", str(root), "--batch-sizes", "1,2,4", "--peers", "2", "--fanout", "1")
    spec, cells = plan(args)
    root.mkdir()
    (root / store.SPEC_FILE).write_text(yaml.safe_dump(spec.to_dict()))
    _fake_cell(root, cells[0], [40.0, 20.0], done=True)
    _fake_cell(root, cells[1], [99.0], done=False)
    return cells


def test_resume_skips_done_cells_and_redoes_partial_ones_from_scratch(tmp_path: Path) -> None:
    root = tmp_path / "sw"
    cells = _fake_store(root)
    base = ("--out", str(root), "--batch-sizes", "1,2,4", "--peers", "2", "--fanout", "1")
    with pytest.raises(ConfigError, match="not empty"):
        plan(_args(*base))
    _spec, todo = plan(_args(*base, "--resume"))
    assert todo == cells[1:]
    _spec, todo = plan(_args("--out", str(root), "--resume"))  # the stored spec alone
    assert todo == cells[1:]
    with pytest.raises(ConfigError, match="different sweep"):
        plan(_args(*base, "--resume", "--rounds", "3"))
    done_json = (store.cell_dir(root, cells[0].cell_id) / store.CELL_FILE).read_bytes()
    assert store.reset_cell(root, cells[1].cell_id) and not store.cell_dir(root, cells[1].cell_id).exists()
    assert not store.reset_cell(root, cells[0].cell_id)
    assert (store.cell_dir(root, cells[0].cell_id) / store.CELL_FILE).read_bytes() == done_json


def test_store_joins_axes_counts_only_done_cells_and_writes_csv(tmp_path: Path) -> None:
    root = tmp_path / "sw"
    cells = _fake_store(root)
    loaded, not_done = store.scan_cells(root)
    assert [c["cell_id"] for c in loaded] == [cells[0].cell_id] and not_done == 1
    assert loaded[0]["mean_psnr"] == 30.0 and loaded[0]["share_psnr_30"] == 0.5
    rows = store.load_reconstructions(root)
    assert len(rows) == 2  # the half-run cell's 99 dB row does not count
    assert all(r["cell_id"] == cells[0].cell_id and r["peers"] == 2 and r["fanout"] == 1
               and r["seed"] == 0 and r["topology"] == "complete" for r in rows)
    cells_csv, rows_csv = store.write_tables(root)
    with open(cells_csv, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["cell_id"] for r in table] == [cells[0].cell_id] and float(table[0]["mean_psnr"]) == 30.0
    assert table[0]["honest_accuracy"] == ""  # missing reads as missing
    with open(rows_csv, newline="") as f:
        table = list(csv.DictReader(f))
    assert sorted(json.loads(r["psnr"])[0] for r in table) == [20.0, 40.0]
    assert {r["cell_id"] for r in table} == {cells[0].cell_id}


@pytest.mark.parametrize("argv, needle", [
    (["--defences", "none,nope"], "unknown defence 'nope'"),
    (["--attacks", "idlg,xyz"], "unknown attack 'xyz'"),
    (["--batch-sizes", "1,x"], "batch_sizes must be integers"),
    (["--batch-sizes", "2.5"], "batch_sizes must be integers"),
    (["--peers", ""], "peers must be a non-empty list"),
    (["--config", "/no/such/sweep.yaml"], "config file not found"),
    (["--peers", "2", "--fanout", "3"], "fanout 3 exceeds"),
])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str,
) -> None:
    out = tmp_path / "sw"
    assert run_sweep_command(_args("--out", str(out), *argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradleak: error: ") and needle in err and err.count("\n") == 1
    assert not out.exists()


def test_yaml_axes_must_be_integers_and_non_empty(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("batch_sizes: [1, true]\n")
    with pytest.raises(ConfigError, match="integers"):
        spec_from_args(_args("--out", "x", "--config", str(f)))
    f.write_text("defences: []\n")
    with pytest.raises(ConfigError, match="non-empty"):
        spec_from_args(_args("--out", "x", "--config", str(f)))
    f.write_text("batch_size: [1]\n")
    with pytest.raises(ConfigError, match="unknown sweep key 'batch_size'"):
        spec_from_args(_args("--out", "x", "--config", str(f)))


def test_secagg_is_a_defence_axis_that_switches_the_run() -> None:
    from gradleak.config import RunConfig
    from gradleak.store import _defence, split_secagg

    assert _defence("secagg") == "secagg" and _defence("prune:0.30+secagg") == "prune:0.3+secagg"
    assert split_secagg("secagg") == ("none", True) and split_secagg("fp16") == ("fp16", False)
    cell = Cell(batch_size=1, defence="prune:0.3+secagg", attack="idlg", seed=0, peers=4,
                fanout=2, topology="complete")
    cfg = cell.config(RunConfig(), Path("/tmp/x")).validate()
    assert cfg.peers.secagg is True and cfg.peers.defences == ("prune:0.3",)


def test_a_sweep_refuses_batch_sizes_the_attacker_would_skip(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_batch_size 8"):
        spec_from_args(_args("--out", str(tmp_path / "sw"), "--batch-sizes", "1,16"))
    spec = spec_from_args(_args("--out", str(tmp_path / "sw"), "--batch-sizes", "1,16",
                                "--max-batch-size", "16"))
    assert sorted({c.batch_size for c in spec.cells()}) == [1, 16]


def test_the_aggregate_axis_multiplies_the_cells_and_keeps_old_ids() -> None:
    spec = spec_from_args(_args("--out", "x", "--aggregate", "mean,median,trimmed:0.20,clip:5"))
    assert spec.aggregates == ("mean", "median", "trimmed:0.2", "clip:5")
    cells = spec.cells()
    assert len(cells) == 4 * len(spec.batch_sizes)
    assert cells[0].cell_id == "bs1-none-auto-s0-p4-f2-complete"  # mean: the id stores had before the axis
    assert cells[2].cell_id.endswith("-trimmed_0.2")
    assert cells[2].config(spec.base, Path("/sw")).gossip.aggregate == "trimmed:0.2"
    assert spec.to_dict()["aggregates"] == ["mean", "median", "trimmed:0.2", "clip:5"]
    with pytest.raises(ConfigError, match="trimmed:F cuts"):
        spec_from_args(_args("--out", "x", "--aggregate", "trimmed:0.5"))


def test_a_cluster_too_small_is_one_line_exit_2_and_the_policy_reaches_the_sweep(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gradleak import sweep
    from gradleak.placement import FitError

    seen: dict[str, object] = {}

    def too_small(*_a: object, placement: str, **_k: object) -> int:
        seen["placement"] = placement
        raise FitError("the cluster cannot host even one cell (x): it needs more")

    monkeypatch.setattr(sweep, "run_sweep", too_small)
    out = tmp_path / "sw"
    assert run_sweep_command(_args("--out", str(out), "--cell-placement", "pack")) == 2
    err = capsys.readouterr().err
    assert err == "gradleak: error: the cluster cannot host even one cell (x): it needs more\n"
    assert seen == {"placement": "pack"} and not out.exists()
    with pytest.raises(SystemExit):  # an unknown policy is refused by the parser
        _args("--out", str(out), "--cell-placement", "scatter")
