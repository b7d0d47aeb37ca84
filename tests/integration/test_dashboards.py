"""Every panel query of every dashboard returns data from a real Prometheus scraping a live run.

Uses the session fixtures of conftest.py: `testbed` (3 honest peers with batch sizes 1, 8,
16, defence none, idlg on batch 1 only) and `prometheus` (scrapes the run's file_sd list,
job="gradleak", once a second). Grafana's variables are replaced by what Grafana would send
with every filter on "All".
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

DASHBOARDS = sorted((Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards").glob("*.json"))

# The run is short: 1m windows hold many 1 s scrapes; $__range covers the whole run.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}


def concrete(expr: str) -> str:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    return re.sub(r"\$\{?[A-Za-z_]\w*\}?", ".*", expr)  # template variables on "All"


def panel_queries() -> list[tuple[str, str]]:
    out = []
    for f in DASHBOARDS:
        dash = json.loads(f.read_text())
        for p in dash["panels"]:
            out += [(f"{dash['uid']}/{p['id']} {p['title']} [{t['refId']}]", concrete(t["expr"]))
                    for t in p.get("targets", [])]
    return out


QUERIES = panel_queries()


def has_data(result: list[dict[str, Any]]) -> bool:
    """At least one series with a real number (a ratio over an empty window is NaN)."""
    return any(math.isfinite(float(s["value"][1])) for s in result)


def test_the_dashboards_have_queries() -> None:
    assert len(QUERIES) >= 15


@pytest.mark.parametrize("name, expr", QUERIES, ids=[q[0] for q in QUERIES])
def test_panel_query_returns_data(testbed, prometheus, name: str, expr: str) -> None:
    result = prometheus.wait_for(expr, until=has_data, timeout=30)
    assert has_data(result), f"{name}: no data for\n{expr}\ngot {result}"


def test_leakage_panels_see_the_batch1_victim(testbed, prometheus) -> None:
    """The PSNR-by-batch-size panel shows the live run's batch-1, defence-none reconstructions."""
    expr = next(e for n, e in QUERIES if "Mean PSNR by batch size and defence" in n)
    result = prometheus.wait_for(expr, until=has_data)
    cells = {(s["metric"]["batch_size"], s["metric"]["defence"]) for s in result
             if math.isfinite(float(s["value"][1]))}
    assert ("1", "none") in cells
    alive = prometheus.query(next(e for n, e in QUERIES if "Peers alive" in n))
    assert float(alive[0]["value"][1]) == 3  # the 3 honest peers of the run
