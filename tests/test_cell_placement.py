"""Placing a sweep's cells on nodes: one cell's peers together, cells by the policy, the attacker marked."""

from __future__ import annotations

import pytest

from gradleak.cell_placement import Ledger, cell_demand, describe, place
from gradleak.config import AttackSettings, PeerConfig, RunConfig

# A head of 2 CPUs, a 1-CPU node, and a 1-CPU GPU node marked for the attacker (the test cluster's shape).
NODES = {"a-head": {"CPU": 2.0}, "b-cpu": {"CPU": 1.0},
         "c-gpu": {"CPU": 1.0, "GPU": 1.0, "attacker": 1.0}}


def _cfg(honest: int = 2, cpus: float = 0.25, resource: str | None = None, gpus: float = 0.0) -> RunConfig:
    return RunConfig(peers=PeerConfig(honest=honest, num_cpus=cpus),
                     attack=AttackSettings(resource=resource, num_gpus=gpus))


def _run(policy: str, cells: int, cfg: RunConfig, per: int = 1) -> list[tuple[tuple[str, ...], str]]:
    """Place `cells` identical cells one after the other, each holding its share, as the sweep does."""
    ledger, out = Ledger(NODES), []
    need = cell_demand(cfg, per)
    for _ in range(cells):
        nodes = ledger.place(need, policy=policy, per_process=per)
        assert nodes is not None
        ledger.hold(nodes, need)
        out.append((nodes.hosts, nodes.attacker))
    return out


def test_spread_puts_parallel_cells_on_different_nodes_each_cell_on_one() -> None:
    placed = _run("spread", 3, _cfg(cpus=0.125))
    assert [hosts for hosts, _a in placed] == [("a-head",) * 2, ("b-cpu",) * 2, ("c-gpu",) * 2]
    assert all(a == hosts[0] for hosts, a in placed)  # the attacker beside its peers


def test_pack_fills_the_tightest_node_before_the_next() -> None:
    # A cell holds 3 x 0.125 CPU: two fit on a 1-CPU node (best fit), the third goes to the next.
    placed = _run("pack", 3, _cfg(cpus=0.125))
    assert [hosts[0] for hosts, _a in placed] == ["b-cpu", "b-cpu", "c-gpu"]
    assert all(set(hosts) == {a} for hosts, a in placed)


def test_a_marked_attacker_node_takes_the_attacker_and_no_peer() -> None:
    cfg = _cfg(honest=3, resource="attacker", gpus=1.0)
    ledger = Ledger(NODES)
    need = cell_demand(cfg, 1)
    first = ledger.place(need, policy="spread", per_process=1)
    assert first is not None and first.attacker == "c-gpu" and set(first.hosts) == {"a-head"}
    ledger.hold(first, need)
    # The marker (1 on the node) is held: the next cell waits, it is not put elsewhere.
    assert ledger.place(need, policy="spread", per_process=1) is None
    ledger.hold(first, need, -1)
    assert ledger.free == NODES and not +ledger.cells_on  # given back exactly
    packed = ledger.place(need, policy="pack", per_process=1)  # the tighter CPU node, same attacker node
    assert packed is not None and packed.hosts == ("b-cpu",) * 3 and packed.attacker == "c-gpu"


def test_peers_that_fit_no_single_node_are_split_and_too_many_do_not_fit() -> None:
    # 5 hosts of 0.5 CPU: 4 fill the head, the fifth goes to the next node; the attacker finds
    # no room beside the first host and goes where the policy says (the emptiest node).
    nodes = place(NODES, cell_demand(_cfg(honest=5, cpus=0.5), 1), policy="spread", per_process=1)
    assert nodes is not None and nodes.hosts == ("a-head",) * 4 + ("b-cpu",) and nodes.attacker == "c-gpu"
    assert place(NODES, cell_demand(_cfg(honest=8, cpus=0.5), 1), policy="spread", per_process=1) is None


def test_the_last_host_asks_for_its_own_peers_gpus_and_bad_policy_is_refused() -> None:
    cfg = RunConfig(peers=PeerConfig(honest=5, num_cpus=0.5, num_gpus=0.1))
    need = cell_demand(cfg, 2)
    assert [h["GPU"] for h in need.hosts] == pytest.approx([0.2, 0.2, 0.1])
    assert "3 peer processes of 0.5 CPU, 0.2 GPU each" in describe(need)
    with pytest.raises(ValueError, match="known: spread, pack"):
        place(NODES, need, policy="scatter", per_process=2)
