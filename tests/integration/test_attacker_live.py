"""The live attacker's books (same session testbed as test_testbed.py): summary fields,
record fields and the scheduler's Prometheus series."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


def test_attacker_summary_and_record_fields(testbed) -> None:
    bed, result = testbed
    a = result.attacker
    assert {"received", "attacked", "evicted", "coverage", "latency_p50_s", "latency_p95_s"} <= set(a)
    assert a["received"] == a["attacked"] + sum(a["evicted"].values()) + a["pending"] + a["in_flight"]
    assert a["attacked"] >= 1 and a["coverage"] == pytest.approx(a["attacked"] / a["received"])
    assert a["evicted"].get("batch_too_large", 0) > 0  # max_batch_size 1 with batch 8/16 peers
    assert 0 <= a["latency_p50_s"] <= a["latency_p95_s"]
    summary = json.loads((bed.run_dir / "summary.json").read_text())
    assert summary["attacker"]["received"] == a["received"]
    rows = [json.loads(line) for line in (bed.run_dir / "reconstructions.jsonl").read_text().splitlines()]
    assert rows and all(r["received_at"] <= r["scored_at"] and r["step"] >= 1 for r in rows)


def test_prometheus_has_the_attacker_series(testbed, prometheus) -> None:
    _bed, result = testbed
    for promql in ('sum(gradleak_attacker_updates_received_total{role="malicious"})',
                   'sum(gradleak_attacker_updates_attacked_total{role="malicious"})',
                   'sum(gradleak_attacker_latency_seconds_count{role="malicious"})',
                   'max(gradleak_attacker_coverage_ratio{role="malicious"})'):
        got = prometheus.wait_for(promql)
        assert got and float(got[0]["value"][1]) > 0, promql
    assert result.attacker["attacked"] >= 1
