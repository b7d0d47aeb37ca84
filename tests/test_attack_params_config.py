"""`attack.params` in the run config: from YAML and flags to the attack instance, its one-line
errors, and sweep axes over an attack parameter."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import yaml

from attacker.api import create_attack
from gradleak import store
from gradleak.cli import build_parser, config_from_args, main
from gradleak.config import ConfigError, RunConfig, from_dict, load_yaml
from gradleak.flags import FLAGS
from gradleak.sweep import add_sweep_parser, spec_from_args


def _run_args(*argv: str) -> RunConfig:
    return config_from_args(build_parser().parse_args(["run", *argv]))


def _sweep_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gradleak")
    add_sweep_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["sweep", *argv])


def _attack_of(cfg: RunConfig, name: str):
    """The attack as the malicious peer builds it from a run config (runtime/malicious_node.py)."""
    a = cfg.attack
    return create_attack(name, a.attack_config(cfg.seed), a.params.get(name))


def test_yaml_params_reach_the_attack_and_change_its_result(tmp_path: Path, digits_data) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("attack:\n  max_iters: 30\n  params:\n    dlg: {max_iters: 2, lr: 0.5}\n"
                 "    ig: {tv_weight: 1e-3, restarts: 1}\n")
    cfg = load_yaml(f).validate()
    assert cfg.attack.params == {"dlg": {"max_iters": 2, "lr": 0.5}, "ig": {"tv_weight": "1e-3", "restarts": 1}}
    dlg = _attack_of(cfg, "dlg")
    assert (dlg.config.max_iters, dlg.config.lr) == (2, 0.5)
    ig = _attack_of(cfg, "ig")
    assert (ig.config.tv_weight, ig.config.restarts, ig.config.max_iters) == (1e-3, 1, 30)
    # The parameter changes what the attack does: 2 outer steps instead of the run's 30.
    from attacker.api import Observation, compute_gradients
    from gradleak.core.models import create_model

    model = create_model("lenet", in_channels=1, num_classes=10, image_size=16)
    x, y = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([3])
    obs = Observation(compute_gradients(model, x, y), 1, (1, 16, 16), 10)
    assert dlg.reconstruct(model, obs).stats["iterations"] == 2
    unset = _attack_of(RunConfig(attack=cfg.attack.__class__(max_iters=30, time_budget_s=None)), "dlg")
    assert unset.reconstruct(model, obs).stats["iterations"] > 2


def test_flags_set_single_fields_over_the_file(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("attack: {params: {idlg: {lr: 0.5, patience: 4}}}\n")
    cfg = _run_args("--config", str(f), "--attack-param", "idlg.lr=0.25",
                    "--attack-param", "idlg.line_search=none", "--attack-param", "analytic.cg_tol=1e-6")
    assert cfg.attack.params == {"idlg": {"lr": 0.25, "patience": 4, "line_search": None},
                                 "analytic": {"cg_tol": 1e-6}}
    assert _attack_of(cfg, "analytic").cg_tol == 1e-6
    assert from_dict(cfg.to_dict()).attack.params == cfg.attack.params  # config.yaml round trip


@pytest.mark.parametrize(("params", "needle"), [
    ({"magic": {"lr": 1}}, "attack.params names an unknown attack 'magic' (known: analytic, dlg,"),
    ({"dlg": {"speed": 1}}, "attack 'dlg' has no parameter 'speed'"),
    ({"dlg": {"lr": "fast"}}, "attack.params.dlg.lr must be a number, got 'fast'"),
    ({"ig": {"restarts": 0}}, "attack.params.ig: max_iters, lbfgs_inner, lbfgs_history, ig_inner and"),
    ({"dlg": 3}, "attack.params.dlg must be a mapping of fields"),
])
def test_bad_params_are_config_errors_naming_them(params, needle) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"attack": {"params": params}}).validate()
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_bad_flags_are_one_line_exit_2(capsys) -> None:
    assert main(["run", "--attack-param", "dlg.lr"]) == 2
    assert "bad value for --attack-param" in capsys.readouterr().err
    assert main(["run", "--attack-param", "dlg.speed=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no parameter 'speed'" in err and "\n" not in err


def test_the_flag_help_gives_meaning_default_and_choices() -> None:
    line = FLAGS["--attack-param"].help_line(RunConfig())
    assert "NAME.FIELD=VALUE" in line and "default: none" in line and "choices: analytic, dlg" in line
    base = from_dict({"attack": {"params": {"dlg": {"lr": 0.5}}}})
    assert "default: dlg.lr=0.5" in FLAGS["--attack-param"].help_line(base)


def test_a_sweep_axis_over_an_attack_param_gives_cells_with_distinct_params(tmp_path: Path) -> None:
    spec = spec_from_args(_sweep_args("--out", "x", "--attack", "idlg", "--batch-size", "1",
                                      "--param-axis", "idlg.lr=0.1,1.0", "--param-axis", "idlg.max_iters=5,50",
                                      "--attack-param", "idlg.patience=3"))
    cells = spec.cells()
    assert len(cells) == 4 and len({c.cell_id for c in cells}) == 4
    configs = [c.config(spec.base, tmp_path).attack for c in cells]
    seen = {(a.params["idlg"]["lr"], a.params["idlg"]["max_iters"]) for a in configs}
    assert seen == {(0.1, 5), (0.1, 50), (1.0, 5), (1.0, 50)}
    assert all(a.params["idlg"]["patience"] == 3 for a in configs)  # the base's, in every cell
    assert {_attack_of_cell(c, spec, tmp_path).config.lr for c in cells} == {0.1, 1.0}
    assert cells[0].axes()["attack_params"] == {"idlg.lr": 0.1, "idlg.max_iters": 5}
    assert cells[0].cell_id.endswith("-idlg.lr_0.1-idlg.max%5Fiters_5")  # _safe escapes "_"
    # sweep.yaml holds the axis and gives the same sweep back.
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump(spec.to_dict()))
    assert yaml.safe_load(f.read_text())["attack.params.idlg.lr"] == [0.1, 1.0]
    assert spec_from_args(_sweep_args("--out", "x", "--config", str(f))) == spec


def _attack_of_cell(cell: store.Cell, spec: store.SweepSpec, root: Path):
    return _attack_of(cell.config(spec.base, root), cell.attack)


def test_a_sweep_without_param_axes_keeps_its_cells_as_they_were() -> None:
    cell = spec_from_args(_sweep_args("--out", "x", "--attack", "idlg", "--batch-size", "1")).cells()[0]
    assert cell.cell_id == "bs1-none-idlg-s0-p4-f2-complete" and "attack_params" not in cell.axes()


@pytest.mark.parametrize(("argv", "needle"), [
    (["--param-axis", "idlg.speed=1,2"], "attack 'idlg' has no parameter 'speed'"),
    (["--param-axis", "idlg.lr=fast,1"], "attack.params.idlg.lr must be a number"),
    (["--param-axis", "idlg=1"], "must be attack.params.NAME.FIELD"),
    (["--param-axis", "idlg.lr"], "--param-axis takes NAME.FIELD=A,B"),
])
def test_bad_param_axes_are_config_errors(argv, needle) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        spec_from_args(_sweep_args("--out", "x", "--attack", "idlg", "--batch-size", "1", *argv))
