"""End to end: Ray actors gossiping over real gRPC, a live attacker, a real Prometheus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from p2p.errors import TransportError
from p2p.transport import GossipClient
from p2p.update import Update, UpdateHeader

pytestmark = pytest.mark.integration


def test_updates_flow_and_the_model_learns(testbed) -> None:
    _bed, result = testbed
    assert result.messages == 120 * 4 * 2  # every node reached its 2 neighbours every round
    assert result.attacker["captured"] > 10
    honest = [v for k, v in result.accuracy.items() if k != "mallory"]
    assert len(honest) == 3 and min(honest) > 0.2, result.accuracy  # chance is 0.1


def test_two_evaluator_shards_split_the_truths_and_write_one_record(testbed) -> None:
    import ray

    bed, result = testbed
    per = ray.get([e.counts.remote() for e in bed.evaluators])
    assert len(per) == 2 and all(c["truths"] > 0 for c in per), per  # both filed a share of the steps
    rows = [json.loads(x) for x in (bed.run_dir / "reconstructions.jsonl").read_text().splitlines()]
    assert sum(c["reconstructions"] for c in per) == result.counts["reconstructions"] == len(rows) > 0
    summary = json.loads((bed.run_dir / "summary.json").read_text())
    assert sum(g["reconstructions"] for g in summary["groups"]) == len(rows)  # shard 1's rows in shard 0's summary
    assert len(list((bed.run_dir / "truth").glob("*.npz"))) == sum(c["truth_files"] for c in per)
    targets = json.loads((bed.run_dir / "prometheus_targets.json").read_text())
    assert [t["labels"].get("shard") for t in targets if t["labels"]["role"] == "evaluator"] == ["0", "1"]


def test_peers_on_their_own_clocks_aggregate_late_updates(testbed) -> None:
    bed, result = testbed
    assert set(result.extra["steps"].values()) == {120}  # every loop ran to its end
    rows = [json.loads(x) for x in (bed.run_dir / "updates.jsonl").read_text().splitlines()]
    assert {"step", "sent_at", "received_at", "lag", "weight", "receiver", "origin"} <= set(rows[0])
    assert all(r["received_at"] >= r["sent_at"] > 0 for r in rows)
    late = [r for r in rows if r["lag"] > 0]
    assert len(late) > 10, "peers on different clocks always deliver some updates late"
    # poly:0.5, the default rule: a late update counts (1 + lag)^-0.5 of its samples, not zero.
    assert all(abs(r["weight"] - r["num_samples"] * (1 + r["lag"]) ** -0.5) < 1e-9 for r in rows)
    # The faster clock (0.08 s) finished first: its last update was sent before the slower one's.
    last = {o: max(r["sent_at"] for r in rows if r["origin"] == o) for o in ("peer-0", "peer-1")}
    assert last["peer-0"] < last["peer-1"]


def test_attacker_reconstructs_a_batch1_image(testbed) -> None:
    bed, _result = testbed
    rows = [json.loads(line) for line in (bed.run_dir / "reconstructions.jsonl").read_text().splitlines()]
    batch1 = [r for r in rows if r["batch_size"] == 1 and r["defence"] == "none"]
    assert batch1, "no batch-1 reconstruction was scored"
    assert max(r["mean_psnr"] for r in batch1) >= 25.0
    assert {"update_id", "origin", "round", "attack", "psnr", "ssim", "label_accuracy", "seconds"} <= set(rows[0])
    assert (bed.run_dir / "grid.png").stat().st_size > 0
    assert "batch_size" in (bed.run_dir / "summary.md").read_text()
    assert json.loads((bed.run_dir / "summary.json").read_text())["groups"][0]["reconstructions"] >= 1


def test_prometheus_scrapes_leakage_by_batch_size(testbed, prometheus) -> None:
    _bed, result = testbed
    expected = result.counts["reconstructions"]

    def by_size(series: list[dict]) -> dict[str, float]:
        return {s["metric"]["batch_size"]: float(s["value"][1]) for s in series}

    series = prometheus.wait_for("sum by (batch_size) (gradleak_reconstructions_total)",
                                 until=lambda r: by_size(r).get("1") == expected)
    assert by_size(series) == {"1": expected}
    psnr = prometheus.wait_for(
        'sum by (batch_size) (gradleak_reconstruction_psnr_decibels_sum)'
        ' / sum by (batch_size) (gradleak_reconstruction_psnr_decibels_count)')
    assert float(psnr[0]["value"][1]) > 0
    # Gossip counters come from the peers' own exporters: several targets were scraped.
    sent = prometheus.wait_for("sum(gradleak_gossip_messages_sent_total)",
                               until=lambda r: bool(r) and float(r[0]["value"][1]) == result.messages)
    assert float(sent[0]["value"][1]) == result.messages
    up = prometheus.query('count(up{job="gradleak"} == 1)')
    assert float(up[0]["value"][1]) == 6  # 2 evaluator shards + 3 honest + malicious


def test_a_malformed_update_gets_a_status_and_the_peer_keeps_serving(testbed) -> None:
    bed, _result = testbed
    peer = next(a for a in bed.addresses if a["role"] == "honest")
    step = 110
    with GossipClient(peer["gossip"], timeout_s=5) as client:
        version, state = client.get_model()
        names = {n: t for n, t in state.items()}
        header = UpdateHeader("test/bad", "mallory", "mallory", step, version, 1)
        wrong_shape = Update(header, {**{n: torch.zeros_like(t) for n, t in names.items()},
                                      next(iter(names)): torch.zeros(3)})
        with pytest.raises(TransportError) as err:
            client.push_update(wrong_shape)
        assert err.value.code == "INVALID_ARGUMENT" and "shape" in err.value.details
        zeros = {n: torch.zeros_like(t) for n, t in names.items()}
        with pytest.raises(TransportError) as err:  # not on the roster
            client.push_update(Update(UpdateHeader("test/stranger", "test", "test", step, version, 1), zeros))
        assert err.value.code == "PERMISSION_DENIED"
        # As the malicious member (a member like any other), on a step it has not yet delivered
        # to this peer: one update per origin per step, so a used step is ALREADY_EXISTS.
        for step in range(120, 56, -1):
            good = Update(UpdateHeader(f"test/good{step}", "mallory", "mallory", step, version, 1), zeros)
            try:
                assert client.push_update(good) > 0
                break
            except TransportError as exc:
                assert exc.code == "ALREADY_EXISTS", exc
        else:
            raise AssertionError("every step of the malicious member was taken")
        assert client.health() == "SERVING"


def test_run_dir_has_the_resolved_config(testbed) -> None:
    bed, _ = testbed
    text = Path(bed.run_dir / "config.yaml").read_text()
    assert "batch_sizes:" in text and "- 16" in text


def test_attacker_runs_on_the_gpu_node_and_peers_elsewhere(testbed, ray_session, prometheus) -> None:
    import ray

    bed, result = testbed
    gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"] and "attacker" in n["Resources"]}
    placed = {a["role"]: a["node_id"] for a in bed.addresses}
    attacker_node = next(a["node_id"] for a in bed.addresses if a["role"] == "malicious")
    assert attacker_node in gpu_nodes
    assert all(a["node_id"] not in gpu_nodes for a in bed.addresses if a["role"] == "honest"), placed
    # Honest peers spread over both CPU nodes (hosts round-robin), and gossip crossed them:
    # honest updates arrived from the other node, and the attacker captured updates too.
    node_of = {a["peer_id"]: a["node_id"] for a in bed.addresses}
    assert len({node_of[a["peer_id"]] for a in bed.addresses if a["role"] == "honest"}) == 2, placed
    rows = [json.loads(x) for x in (bed.run_dir / "updates.jsonl").read_text().splitlines()]
    crossed = [r for r in rows if r["origin"] in node_of and node_of[r["origin"]] != node_of[r["receiver"]]
               and r["origin"] != "mallory"]
    assert len(crossed) > 20, f"{len(crossed)} honest updates crossed nodes"
    assert result.attacker["captured"] > 0
    # "auto" advertised the node's own IP (127.0.0.1 for this one-machine cluster).
    assert all(a["gossip"].startswith("127.0.0.1:") for a in bed.addresses)
    assert result.attacker["device"] in ("cpu", "cuda")
    # Both nodes' exporters reached Prometheus: attack timings from the GPU node's attacker,
    # leakage scores from the evaluator on the head node.
    attacked = prometheus.wait_for('sum(gradleak_attack_duration_seconds_count{role="malicious"})')
    scored = prometheus.wait_for('sum(gradleak_reconstructions_total{role="evaluator"})')
    assert float(attacked[0]["value"][1]) >= 1 and float(scored[0]["value"][1]) >= 1
