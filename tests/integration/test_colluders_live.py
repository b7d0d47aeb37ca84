"""Two colluding malicious peers in one live lock-step model-gossip run over real gRPC (one Ray run).

A line of 6 honest peers with the colluders spread over it (mallory at one end, the
second after peer-2), batch 1, one local step, R = 2 averaging rounds. Each attacker
writes its own transcript; the end-of-run gossip algebra pools them and must determine
more honest nodes than either attacker's transcript does alone (solved here, offline,
from the same files).
"""

from __future__ import annotations

import json

import pytest

from gradleak.config import (
    AttackSettings,
    DataConfig,
    GossipConfig,
    PeerConfig,
    RunConfig,
    TelemetryConfig,
)
from gradleak.gossip_live import colluder_readers, offline_gossip_attack
from gradleak.runner import Testbed
from gradleak.runtime.gossip_leak import (
    GossipPublic,
    determined_nodes,
    shared_model,
    solve_transcripts,
)

HONEST, R = 6, 2
COLLUDERS = ["mallory", "peer-2.mallory"]


@pytest.mark.integration
def test_colluders_pool_their_transcripts_and_determine_more(ray_session, tmp_path) -> None:
    cfg = RunConfig(
        seed=3, out_dir=str(tmp_path / "runs"), data=DataConfig(limit=400),
        peers=PeerConfig(honest=HONEST, batch_sizes=(1,), optimizer="sgd", lr=0.3),
        gossip=GossipConfig(sync="rounds", rounds=1, exchange="models", topology="line", mix_rounds=R,
                            period_s=(0.0,)),
        attack=AttackSettings(attacks=("idlg",), drain_timeout_s=2, transcript_bytes=32 << 20, gossip_budget_s=10,
                              count=2),
        telemetry=TelemetryConfig(metrics_port=0),
    ).validate()
    bed = Testbed(cfg)
    bed.start()
    try:
        bed.run_network()
        result = bed.finish(0.0)
    finally:
        bed.shutdown()
    run_dir = bed.run_dir
    # each colluder is its own peer, received its neighbours' models and kept its own transcript
    per = result.attacker["per_attacker"]
    assert result.attacker["ids"] == COLLUDERS and set(per) == set(COLLUDERS)
    assert all(per[a]["models_received"] >= R for a in COLLUDERS), per
    assert result.attacker["models_received"] == sum(per[a]["models_received"] for a in COLLUDERS)
    placed = json.loads((run_dir / "attackers.json").read_text())
    assert placed["attackers"]["peer-2.mallory"]["neighbours"] == ["peer-2", "peer-3"]
    assert placed["attackers"]["mallory"]["hops_to_colluder"] == 4
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["colluders"]["count"] == 2 and summary["attacker"]["ids"] == COLLUDERS
    # the pooled attack, live
    report = json.loads((run_dir / "gossip_attack.json").read_text())
    assert report["status"] == "done" and report["attackers"] == COLLUDERS, report.get("reason")
    # what each transcript determines alone, solved offline from the same files
    public = GossipPublic.from_config(cfg)
    readers = colluder_readers(cfg, run_dir)
    first = readers["mallory"]
    _model, x0, names = shared_model(public, first.input_shape, first.num_classes)
    alone = {a: set(determined_nodes(solve_transcripts({a: r}, public, x0, names)[1], public))
             for a, r in readers.items()}
    pooled = {n for n, v in report["nodes"].items() if v["determined_steps"]}
    assert pooled >= alone["mallory"] | alone["peer-2.mallory"]
    assert len(pooled) > max(len(v) for v in alone.values()), (pooled, alone)
    assert report["determined_alone"] == {a: len(v) for a, v in alone.items()}
    assert summary["gossip_attack"]["determined_share"] == pytest.approx(len(pooled) / HONEST)
    # offline: `gradleak attack --transcript RUN_DIR --gossip-algebra` pools them too
    again = offline_gossip_attack(run_dir, tmp_path / "offline", budget_s=5.0)
    assert again["attackers"] == COLLUDERS and again["determined_share"] == report["determined_share"]
