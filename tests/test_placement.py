"""Fitting peers to a cluster: peers per process, or one line naming the shortfall and the flag."""

from __future__ import annotations

import pytest

from gradleak.placement import FitError, Node, plan

TWO_CPUS = [Node(2.0)]


def test_auto_packs_peers_into_the_processes_that_fit() -> None:
    # 2 CPUs, 0.25 each, the attacker's 0.25 first: 7 processes fit.
    assert plan(TWO_CPUS, honest=4, per_process=0, host_cpus=0.25, attacker_cpus=0.25).per_process == 1
    p16 = plan(TWO_CPUS, honest=16, per_process=0, host_cpus=0.25, attacker_cpus=0.25)
    assert (p16.per_process, p16.hosts) == (3, 6) and p16.cpus <= 2.0
    p32 = plan(TWO_CPUS, honest=32, per_process=0, host_cpus=0.25, attacker_cpus=0.25)
    assert p32.per_process * p32.hosts >= 32 and p32.hosts <= 7


def test_an_oversubscribed_layout_names_the_shortfall_and_the_flag() -> None:
    with pytest.raises(FitError) as err:
        plan(TWO_CPUS, honest=16, per_process=1, host_cpus=0.25, attacker_cpus=0.25)
    msg = str(err.value)
    assert "\n" not in msg and "16 processes" in msg and "4.25 CPUs" in msg
    assert "--peers-per-process" in msg and "the cluster has 2 CPUs" in msg


def test_gpus_and_the_attacker_resource_must_exist() -> None:
    with pytest.raises(FitError, match="--attack-gpus"):
        plan(TWO_CPUS, honest=2, per_process=0, host_cpus=0.25, attacker_cpus=0.25, attacker_gpus=1)
    with pytest.raises(FitError, match="--attack-resource"):
        plan(TWO_CPUS, honest=2, per_process=0, host_cpus=0.25, attacker_cpus=0.25, attacker_resource="attacker")
    cluster = [Node(2.0), Node(1.0, 1.0, frozenset({"attacker"}))]
    # Honest peers may use only the unmarked node's 2 CPUs; the attacker's share is on the other.
    p = plan(cluster, honest=8, per_process=1, host_cpus=0.25, attacker_cpus=0.25, attacker_gpus=1,
             attacker_resource="attacker")
    assert p.hosts == 8
    with pytest.raises(FitError, match="9 processes"):
        plan(cluster, honest=9, per_process=1, host_cpus=0.25, attacker_cpus=0.25, attacker_resource="attacker")
    with pytest.raises(FitError, match="--peer-gpus|GPUs"):
        plan(TWO_CPUS, honest=2, per_process=1, host_cpus=0.25, attacker_cpus=0.25, peer_gpus=1)

