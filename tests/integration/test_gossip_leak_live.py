"""The gossip-algebra attack on a live lock-step model-gossip run over real gRPC (one Ray run).

A line of 12 honest peers with the attacker at its end (mallory sorts first), batch 1, one
local step, R = 5 averaging rounds: the algebra determines hops 1..5 and nothing beyond.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from gradleak.config import (
    AttackSettings,
    DataConfig,
    GossipConfig,
    PeerConfig,
    RunConfig,
    TelemetryConfig,
)
from gradleak.gossip_live import offline_gossip_attack
from gradleak.runner import Testbed

R = 5
HONEST = 12


@pytest.fixture(scope="module")
def line_run(ray_session, tmp_path_factory):
    cfg = RunConfig(
        seed=3, out_dir=str(tmp_path_factory.mktemp("leak")), data=DataConfig(limit=600),
        peers=PeerConfig(honest=HONEST, batch_sizes=(1,), optimizer="sgd", lr=0.3),
        gossip=GossipConfig(sync="rounds", rounds=1, exchange="models", topology="line", mix_rounds=R,
                            period_s=(0.0,)),
        attack=AttackSettings(attacks=("idlg",), drain_timeout_s=2, transcript_bytes=64 << 20, gossip_budget_s=30),
        telemetry=TelemetryConfig(metrics_port=0),
    ).validate()
    bed = Testbed(cfg)
    bed.start()
    try:
        bed.run_network()
        result = bed.finish(0.0)
        metrics = urllib.request.urlopen(bed.metrics_url, timeout=10).read().decode()
        yield bed, result, metrics
    finally:
        bed.shutdown()


@pytest.mark.integration
def test_live_gossip_attack_reconstructs_within_reach_and_reports_the_rest(line_run, tmp_path) -> None:
    bed, result, metrics = line_run
    report = json.loads((bed.run_dir / "gossip_attack.json").read_text())
    assert report["status"] == "done", report
    nodes = report["nodes"]
    assert nodes["peer-0"]["hops"] == 1 and nodes["peer-0"]["steps"]["1"]["psnr"] >= 30.0, nodes["peer-0"]
    far = [n for n, v in nodes.items() if v["hops"] >= 2 and v["determined_steps"]
           and (v["best_psnr"] or 0) >= 30.0]
    assert far, {n: (v["hops"], v["best_psnr"]) for n, v in nodes.items()}
    # beyond R hops the attacker's observations say nothing about a node
    beyond = [v for v in nodes.values() if v["hops"] > R]
    assert beyond and not any(v["determined_steps"] for v in beyond)
    assert all(v["determined_steps"] == [1] for v in nodes.values() if v["hops"] <= R)
    # the summary's shares are the report's, and the run's exporter serves the same share
    summary = json.loads((bed.run_dir / "summary.json").read_text())
    part = summary["gossip_attack"]
    assert result.extra["gossip_attack"] == part
    assert part["determined_share"] == pytest.approx(R / HONEST)
    assert part["reconstructed_share"] == report["reconstructed_share"] >= 2 / HONEST
    line = next(ln for ln in metrics.splitlines() if ln.startswith("gradleak_reconstructible_nodes_ratio{"))
    assert 'topology="line"' in line and 'exchange="models"' in line
    assert float(line.rsplit(" ", 1)[1]) == pytest.approx(part["reconstructed_share"])
    # the scored rows are the evaluator's: one per reconstructed step, under the step's truth id
    rows = [json.loads(x) for x in (bed.run_dir / "reconstructions.jsonl").read_text().splitlines()]
    scored = {r["update_id"] for r in rows if r["attack"] == "gossip-algebra"}
    assert "peer-0/r1" in scored and all(nodes[u.split("/")[0]]["steps"]["1"]["determined"] for u in scored)
    # offline: the same attack from the run dir, scored against its truth files, agrees
    again = offline_gossip_attack(bed.run_dir, tmp_path)
    assert again["determined_share"] == part["determined_share"]
    assert again["nodes"]["peer-0"]["steps"]["1"]["psnr"] == pytest.approx(
        nodes["peer-0"]["steps"]["1"]["psnr"], abs=1.0)
    assert (tmp_path / "gossip_attack.json").exists()
