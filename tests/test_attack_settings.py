"""The attacker's run settings: the auto attack, its fallback chain, the time budget and
the age limit, from flags and YAML, with one-line errors."""

from __future__ import annotations

import pytest

from gradleak.cli import build_parser, config_from_args, main
from gradleak.config import AttackSettings, ConfigError, RunConfig, from_dict
from gradleak.flags import FLAGS


def _cfg(*argv: str) -> RunConfig:
    return config_from_args(build_parser().parse_args(["run", *argv]))


def test_defaults_are_auto_with_a_fastest_first_chain() -> None:
    a = RunConfig().attack
    assert a.attacks == ("auto",) and a.fallback == ("analytic", "idlg", "dlg")
    assert a.time_budget_s is not None and a.time_budget_s > 0 and a.max_age_s is not None


def test_flags_map_to_the_new_fields() -> None:
    cfg = _cfg("--attack", "idlg,dlg", "--fallback", "idlg,dlg", "--attack-budget", "1.5",
               "--max-age", "none")
    a = cfg.attack
    assert a.attacks == ("idlg", "dlg") and a.fallback == ("idlg", "dlg")
    assert a.time_budget_s == 1.5 and a.max_age_s is None
    assert _cfg("--attack-budget", "none").attack.time_budget_s is None


def test_yaml_mapping() -> None:
    cfg = from_dict({"attack": {"fallback": ["dlg"], "time_budget_s": None, "max_age_s": 5}})
    assert cfg.attack.fallback == ("dlg",) and cfg.attack.time_budget_s is None
    assert from_dict({"attack": {"gossip_budget_s": 0}}).attack.gossip_budget_s == 0


@pytest.mark.parametrize("kwargs, needle", [
    ({"attacks": ("auto", "dlg")}, "attack 'auto' stands alone"),
    ({"fallback": ()}, "non-empty fallback"),
    ({"fallback": ("magic",)}, "unknown fallback attack 'magic'"),
    ({"fallback": ("dlg", "dlg")}, "fallback names an attack twice"),
    ({"time_budget_s": 0.0}, "time_budget_s must be a positive number"),
    ({"max_age_s": -1.0}, "max_age_s must be a positive number"),
    ({"gossip_budget_s": -1.0}, "gossip_budget_s must be >= 0"),
    ({"gossip_budget_s": float("inf")}, "gossip_budget_s must be >= 0"),
])
def test_validation(kwargs, needle) -> None:
    with pytest.raises(ConfigError, match=needle):
        AttackSettings(**kwargs).validate()


@pytest.mark.parametrize("argv, needle", [
    (["--attack", "auto,dlg"], "stands alone"),
    (["--attack-budget", "soon"], "bad value for --attack-budget"),
    (["--fallback", "magic"], "unknown fallback attack 'magic'"),
])
def test_bad_flags_give_one_line(argv, needle, capsys) -> None:
    assert main(["run", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


def test_help_lines_name_default_and_choices() -> None:
    base = RunConfig()
    line = FLAGS["--attack"].help_line(base)
    assert "default: auto" in line and "auto" in line.split("choices:")[1]
    assert "default: 3.0" in FLAGS["--attack-budget"].help_line(base)
    assert "analytic,idlg,dlg" in FLAGS["--fallback"].help_line(base)
