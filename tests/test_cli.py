"""The CLI's contract: flags and YAML map onto the config; bad input gives one line and exit != 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gradleak.cli import build_parser, config_from_args, main
from gradleak.config import ConfigError, RunConfig, from_dict, load_yaml


def _cfg(*argv: str) -> RunConfig:
    return config_from_args(build_parser().parse_args(["run", *argv]))


def test_flags_map_to_config_fields() -> None:
    cfg = _cfg("--peers", "6", "--rounds", "7", "--batch-size", "1,4", "--defence", "prune:0.3,fp16",
               "--fanout", "3", "--seed", "5", "--dataset", "digits", "--metrics-port", "0",
               "--out", "/tmp/x", "--attack", "dlg,idlg", "--topology", "ring")
    assert cfg.peers.honest == 6 and cfg.gossip.rounds == 7 and cfg.peers.batch_sizes == (1, 4)
    assert cfg.peers.defences == ("prune:0.3", "fp16") and cfg.gossip.fanout == 3
    assert cfg.seed == 5 and cfg.telemetry.metrics_port == 0 and cfg.out_dir == "/tmp/x"
    assert cfg.attack.attacks == ("dlg", "idlg") and cfg.gossip.topology == "ring"
    cfg = _cfg("--bulk-min-bytes", "0", "--evaluators", "3")
    assert cfg.gossip.bulk_min_bytes == 0 and cfg.telemetry.evaluators == 3


def test_yaml_then_flags(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("seed: 3\npeers: {honest: 5, batch_sizes: [2, 8]}\ngossip: {rounds: 9}\n")
    assert load_yaml(f).peers.batch_sizes == (2, 8)
    cfg = _cfg("--config", str(f), "--rounds", "11")
    assert (cfg.seed, cfg.peers.honest, cfg.gossip.rounds) == (3, 5, 11)


@pytest.mark.parametrize("argv, needle", [
    (["--peers", "x"], "bad value for --peers"),
    (["--peers", "1"], "honest peers must be in 2..4096"),
    (["--batch-size", "0"], "batch sizes"),
    (["--defence", "prune:7"], "prune ratio"),
    (["--defence", "shield"], "unknown defence 'shield'"),
    (["--attack", "magic"], "unknown attack 'magic'"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--fanout", "9"], "fanout 9 exceeds"),
    (["--metrics-port", "70000"], "metrics_port"),
    (["--evaluators", "0"], "evaluators must be in 1..64"),
    (["--metrics-port", "65535", "--evaluators", "2"], "run past 65535"),
    (["--bulk-min-bytes", "-1"], "bulk_min_bytes must be >= 0"),
    (["--config", "/nonexistent.yaml"], "config file not found"),
])
def test_bad_values_give_one_line_and_exit_2(argv: list[str], needle: str, capsys) -> None:
    assert main(["run", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and err.startswith("gradleak: error:")


def test_unknown_flag_is_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", "--bogus", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "unrecognized arguments: --bogus" in err and "\n" not in err


def test_bad_yaml(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("peers: {honest: [}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(f)
    f.write_text("peers: {colour: blue}\n")
    with pytest.raises(ConfigError, match="unknown key 'peers.colour'"):
        load_yaml(f)
    f.write_text("gossip: {rounds: ten}\n")
    with pytest.raises(ConfigError, match="'rounds' has the wrong type"):
        load_yaml(f)


def test_missing_dataset_files_fail_cleanly(tmp_path: Path) -> None:
    cfg = from_dict({"data": {"dataset": "mnist", "data_root": str(tmp_path)}}).validate()
    from gradleak.data import load_dataset

    with pytest.raises(FileNotFoundError, match="MNIST files not found"):
        load_dataset(cfg.data.dataset, data_root=cfg.data.data_root)


def test_console_script_reports_bad_flag_in_a_subprocess() -> None:
    proc = subprocess.run([sys.executable, "-m", "gradleak.cli", "run", "--rounds", "0"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "gradleak: error: rounds must be >= 1, got 0"


def _options(parser) -> list:
    import argparse

    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [(name, action) for name, sub in subs.choices.items() for action in sub._actions
            if action.option_strings and action.dest != "help"]


def test_every_flag_has_a_help_line_with_its_default() -> None:
    options = _options(build_parser())
    assert len(options) > 60
    missing = [f"{name} {a.option_strings[0]}" for name, a in options if not (a.help or "").strip()]
    assert not missing, missing
    # Run flags (and the sweep's base flags) name the default, the config field and the choices.
    run = {a.option_strings[0]: a.help for name, a in options if name == "run"}
    assert "default: 4" in run["--peers"] and "config peers.honest" in run["--peers"]
    assert "choices: async, rounds" in run["--sync"] and "default: async" in run["--sync"]
    assert "choices: " in run["--model"] and "lenet" in run["--model"]
    without = [f for f, h in run.items() if f != "--config" and "default:" not in h]
    assert not without, without


def test_new_gossip_flags_reach_the_config() -> None:
    cfg = _cfg("--sync", "rounds", "--period", "0.1,0.3", "--jitter", "0.2", "--staleness", "cutoff:3",
               "--peers-per-process", "4", "--peer-cpus", "0.5")
    g = cfg.gossip
    assert (g.sync, g.period_s, g.jitter, g.staleness) == ("rounds", (0.1, 0.3), 0.2, "cutoff:3")
    assert (cfg.peers.per_process, cfg.peers.num_cpus) == (4, 0.5)
    for argv, needle in ((["--sync", "lockstep"], "unknown sync mode"),
                         (["--staleness", "poly:x"], "non-numeric"),
                         (["--period", "-1"], "periods must be"), (["--jitter", "1"], "jitter")):
        with pytest.raises(ConfigError, match=needle):
            _cfg(*argv)


def test_ctrl_c_before_the_run_exists_ends_with_130_and_no_traceback(monkeypatch, capsys) -> None:
    # A SIGINT while torch or Ray is still being imported arrives as KeyboardInterrupt.
    from gradleak import cli

    def interrupted() -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "main", interrupted)
    assert cli.entry() == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


def test_model_gossip_flags_reach_the_config_and_bad_combinations_are_refused() -> None:
    cfg = _cfg("--gossip", "models", "--mixing", "uniform", "--mix-rounds", "3", "--drop", "0.1",
               "--optimizer", "sgd", "--lr", "0.3")
    g = cfg.gossip
    assert (g.exchange, g.mixing, g.mix_rounds, g.drop) == ("models", "uniform", 3, 0.1)
    assert _cfg().gossip.exchange == "gradients"  # the default keeps gradient gossip
    assert _cfg("--gossip", "models", "--optimizer", "sgd", "--model-dtype", "float64").gossip.model_dtype == "float64"
    for argv, needle in ((["--gossip", "models"], "--optimizer sgd"),
                         (["--gossip", "models", "--optimizer", "sgd", "--defence", "fp16"], "defences"),
                         (["--gossip", "weights"], "unknown gossip exchange"),
                         (["--mixing", "random"], "unknown mixing rule"),
                         (["--gossip", "models", "--optimizer", "sgd", "--mix-rounds", "0"], "mix_rounds"),
                         (["--gossip", "models", "--optimizer", "sgd", "--drop", "1"], "drop"),
                         (["--drop", "0.1"], "model gossip only"),
                         (["--model-dtype", "float64"], "model gossip only"),
                         (["--gossip", "models", "--optimizer", "sgd", "--model-dtype", "float16"],
                          "unknown model dtype")):
        with pytest.raises(ConfigError, match=needle):
            _cfg(*argv)


def test_label_prior_flag_reaches_the_config_and_a_bad_value_is_refused() -> None:
    assert _cfg().attack.label_prior == "none"
    assert _cfg("--label-prior", "shard").attack.label_prior == "shard"
    with pytest.raises(ConfigError, match="unknown label prior"):
        _cfg("--label-prior", "public")
