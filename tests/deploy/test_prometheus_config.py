"""deploy/prometheus: the config, the rules and the rule unit tests pass Prometheus' own promtool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
RULES = sorted((PROM / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROM / "tests").glob("*.test.yml"))

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (`make prometheus` installs Debian's prometheus)")


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *map(str, args)], check=False, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


@needs_promtool
def test_config_is_valid() -> None:
    out = promtool("check", "config", PROM / "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    # The rule_files glob must pick up our rules (a wrong glob is still "valid" config).
    assert f"{len(RULES)} rule files found" in out.stdout + out.stderr


@needs_promtool
def test_rules_are_valid() -> None:
    assert RULES, "no rule files under deploy/prometheus/rules"
    out = promtool("check", "rules", *RULES)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
@pytest.mark.parametrize("test_file", RULE_TESTS, ids=lambda p: p.name)
def test_rule_unit_tests_pass(test_file: Path) -> None:
    out = promtool("test", "rules", test_file)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_rule_is_exercised_by_the_unit_tests() -> None:
    """Each recording rule appears in a promql_expr_test, each alert in an alert_rule_test,
    and each alert has a case where it must stay silent (exp_alerts: [])."""
    records, alerts = set(), set()
    for f in RULES:
        for group in yaml.safe_load(f.read_text())["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    records.add(rule["record"])
                else:
                    alerts.add(rule["alert"])
                    assert rule.get("for"), f"alert {rule['alert']} has no `for`"
                    assert rule.get("labels", {}).get("severity") in {"info", "warning", "critical"}
                    assert rule.get("annotations", {}).get("summary"), f"{rule['alert']}: no summary"
    tested_exprs, firing, silent = [], set(), set()
    for f in RULE_TESTS:
        for case in yaml.safe_load(f.read_text())["tests"]:
            tested_exprs += [t["expr"] for t in case.get("promql_expr_test", [])]
            for t in case.get("alert_rule_test", []):
                (firing if t.get("exp_alerts") else silent).add(t["alertname"])
    untested = {r for r in records if not any(r in e for e in tested_exprs)}
    assert not untested, f"recording rules without a promql_expr_test: {sorted(untested)}"
    assert alerts <= firing, f"alerts never shown to fire: {sorted(alerts - firing)}"
    assert alerts <= silent, f"alerts never shown to stay silent: {sorted(alerts - silent)}"


def test_scrape_jobs() -> None:
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    # The run's targets file is file_sd: the gradleak job reads targets/*.json next to this config.
    files = [f for sd in jobs["gradleak"]["file_sd_configs"] for f in sd["files"]]
    assert files == ["targets/*.json"] and (PROM / "targets").is_dir()
    ray_files = [f for sd in jobs["ray"]["file_sd_configs"] for f in sd["files"]]
    assert ray_files == ["/tmp/ray/prom_metrics_service_discovery.json"]
    # The alert on dead exporters and the dashboards' `up` panel use job="gradleak".
    rules_text = "".join(f.read_text() for f in RULES)
    assert 'up{job="gradleak"}' in rules_text
