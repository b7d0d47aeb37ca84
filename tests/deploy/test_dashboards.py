"""deploy/grafana: dashboards parse, are internally consistent, use the provisioned datasource,
and every panel query is valid PromQL (checked offline with promtool)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD_FILES = sorted((GRAFANA / "dashboards").glob("*.json"))
DATASOURCES = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
PROVIDERS = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "gradleak.yml").read_text())

# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}


def concrete(expr: str) -> str:
    """The expr as Prometheus would receive it with every template variable on "All"."""
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    return re.sub(r"\$\{?[A-Za-z_]\w*\}?", ".*", expr)


def dashboards() -> list[dict[str, Any]]:
    return [json.loads(f.read_text()) for f in DASHBOARD_FILES]


def query_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dash["panels"] if p.get("type") != "row"]


def test_there_is_a_dashboard() -> None:
    assert DASHBOARD_FILES and all(d["panels"] for d in dashboards())


def test_provisioning() -> None:
    (ds,) = DATASOURCES["datasources"]
    assert DATASOURCES["apiVersion"] == 1 and ds["type"] == "prometheus" and ds["uid"] and ds["url"]
    (provider,) = PROVIDERS["providers"]
    assert PROVIDERS["apiVersion"] == 1 and provider["type"] == "file"
    path = provider["options"]["path"]
    # docs/deploy.md mounts deploy/grafana/dashboards at exactly the provider's path.
    assert f"deploy/grafana/dashboards:{path}" in (ROOT / "docs" / "deploy.md").read_text()


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_dashboard_structure(path: Path) -> None:
    dash = json.loads(path.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    cells: dict[tuple[int, int], int] = {}
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, f"panel {p['id']} sticks out of the 24-column grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]} and {p['id']} overlap"
                cells[(x, y)] = p["id"]


def test_dashboard_uids_are_unique() -> None:
    uids = [d["uid"] for d in dashboards()]
    assert len(uids) == len(set(uids))


def test_datasources_are_the_provisioned_one() -> None:
    uid = DATASOURCES["datasources"][0]["uid"]
    for dash in dashboards():
        refs = [p["datasource"] for p in query_panels(dash)]
        refs += [t["datasource"] for p in query_panels(dash) for t in p["targets"] if "datasource" in t]
        refs += [v["datasource"] for v in dash.get("templating", {}).get("list", []) if "datasource" in v]
        assert refs and all(r == {"type": "prometheus", "uid": uid} for r in refs), dash["uid"]


def test_every_panel_has_a_query() -> None:
    for dash in dashboards():
        for p in query_panels(dash):
            targets = p.get("targets", [])
            assert targets and all(t.get("expr", "").strip() for t in targets), p["title"]
            refs = [t["refId"] for t in targets]
            assert len(refs) == len(set(refs)), p["title"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (`make prometheus`)")
def test_every_panel_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each expr (as a recording rule), so a typo fails here, not in Grafana."""
    rules = [{"record": f"dashboard:panel_{p['id']}_{t['refId']}:query", "expr": concrete(t["expr"])}
             for dash in dashboards() for p in query_panels(dash) for t in p["targets"]]
    f = tmp_path / "panels.rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    out = subprocess.run(["promtool", "check", "rules", str(f)], check=False, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(rules)} rules found" in out.stdout
