"""Several malicious peers: the config and flags, the fit check that counts them, the pooled status."""

from __future__ import annotations

import argparse

import pytest

from gradleak.attackers import pool_status
from gradleak.config import AttackSettings, ConfigError, GossipConfig, PeerConfig, RunConfig
from gradleak.flags import FLAGS, add_flags, overlay
from gradleak.placement import FitError, Node, plan
from gradleak.runner import member_ids


def _cfg(**attack) -> RunConfig:
    return RunConfig(peers=PeerConfig(honest=4), attack=AttackSettings(**attack))


def test_count_and_placement_are_validated() -> None:
    assert _cfg().validate().attack.count == 1
    assert _cfg(count=3, placement="random").validate().attack.count == 3
    with pytest.raises(ConfigError, match="must be >= 1"):
        _cfg(count=0).validate()
    with pytest.raises(ConfigError, match="at least as many honest ones"):
        _cfg(count=5).validate()
    with pytest.raises(ConfigError, match="unknown placement 'corner'"):
        _cfg(count=2, placement="corner").validate()
    models = GossipConfig(exchange="models", sync="rounds")
    with pytest.raises(ConfigError, match="one malicious peer"):
        RunConfig(peers=PeerConfig(honest=4, optimizer="sgd", lr=0.3), gossip=models,
                  attack=AttackSettings(count=2, strategy="state-override")).validate()


def test_flags_map_to_the_fields_with_a_help_line() -> None:
    p = argparse.ArgumentParser()
    add_flags(p)
    args = p.parse_args(["--malicious", "2", "--malicious-placement", "random", "--dedupe", "off"])
    assert overlay(args) == {"attack": {"count": 2, "placement": "random", "dedupe": False}}
    line = FLAGS["--malicious"].help_line(RunConfig())
    assert "colluding malicious peers" in line and "(default: 1;" in line and "attack.count" in line
    assert "choices: random, spread" in FLAGS["--malicious-placement"].help_line(RunConfig())
    with pytest.raises(ConfigError, match="--malicious"):
        overlay(p.parse_args(["--malicious", "two"]))


def test_member_ids_follow_the_placement() -> None:
    honest, bad = member_ids(_cfg(count=2).validate())
    assert honest == ["peer-0", "peer-1", "peer-2", "peer-3"] and bad == ["mallory", "peer-1.mallory"]


def test_the_fit_check_counts_every_attacker() -> None:
    two = [Node(2.0)]
    # 0.25 CPU each on 2 CPUs: 1 attacker leaves room for 7 processes, 3 attackers for 5
    assert plan(two, honest=7, per_process=1, host_cpus=0.25, attacker_cpus=0.25).hosts == 7
    assert plan(two, honest=5, per_process=1, host_cpus=0.25, attacker_cpus=0.25, attackers=3).hosts == 5
    with pytest.raises(FitError, match=r"the 3 attackers' 0\.75 = 2\.5 CPUs"):
        plan(two, honest=7, per_process=1, host_cpus=0.25, attacker_cpus=0.25, attackers=3)
    gpu = [Node(4.0, 1.0), Node(4.0)]
    assert plan(gpu, honest=2, per_process=1, host_cpus=1, attacker_cpus=1, attacker_gpus=1).hosts == 2
    with pytest.raises(FitError, match="2 attackers at 1 GPU.* need 2 GPUs.*have 1; lower --malicious"):
        plan(gpu, honest=2, per_process=1, host_cpus=1, attacker_cpus=1, attacker_gpus=1, attackers=2)


def _status(received: int, attacked: int, evicted: dict, p95: float | None) -> dict:
    return {"received": received, "attacked": attacked, "evicted": evicted, "coverage": attacked / received,
            "pending": 0, "in_flight": 0, "latency_p50_s": p95, "latency_p95_s": p95, "captured": received,
            "dropped": 0, "reconstructions": attacked, "failed": 0, "models_received": 0, "chosen": {"idlg": attacked},
            "device": "cpu", "idle": True, "queue": 0}


def test_pool_status_sums_and_keeps_each_attacker() -> None:
    one = _status(10, 4, {"stale": 6}, 1.0)
    assert pool_status({"mallory": one}) == {**one, "ids": ["mallory"], "per_attacker": {"mallory": one}}
    two = _status(8, 3, {"stale": 2, "colluder": 3}, 2.5)
    pooled = pool_status({"mallory": one, "peer-1.mallory": two})
    assert pooled["received"] == 18 and pooled["attacked"] == 7
    assert pooled["evicted"] == {"stale": 8, "colluder": 3} and pooled["chosen"] == {"idlg": 7}
    assert pooled["coverage"] == pytest.approx(7 / 15)  # the 3 left to a colluder were attackable elsewhere
    assert pooled["latency_p95_s"] == 2.5 and pooled["device"] == "cpu"
    assert pooled["per_attacker"]["peer-1.mallory"]["attacked"] == 3 and pooled["ids"] == ["mallory", "peer-1.mallory"]


def test_pool_coverage_leaves_out_the_colluders_own_updates() -> None:
    a = _status(10, 4, {"stale": 2, "from_colluder": 4}, 1.0)
    b = _status(10, 5, {"from_colluder": 5}, 1.0)
    pooled = pool_status({"mallory": a, "peer-1.mallory": b})
    assert pooled["coverage"] == pytest.approx(9 / 11)  # 20 received, 9 of them a colluder's own
