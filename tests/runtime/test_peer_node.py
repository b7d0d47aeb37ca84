"""Peer nodes (gRPC server + clients + Peer) driven in-process: TLS links, secure aggregation."""

from __future__ import annotations

import numpy as np
import pytest

from gradleak.config import ConfigError, from_dict
from gradleak.runtime.peer_node import PeerNode, PeerSpec
from p2p.errors import TransportError
from p2p.secagg import create_group
from p2p.tls import make_test_pki
from p2p.transport import GossipClient


def _spec(pid: str, digits_data, tls=None, secagg=None, members=()) -> PeerSpec:
    return PeerSpec(
        peer_id=pid, role="honest", shard_images=digits_data.images[:40], shard_labels=digits_data.labels[:40],
        test_images=digits_data.images[40:60], test_labels=digits_data.labels[40:60], input_shape=(1, 16, 16),
        num_classes=10, model="lenet", batch_size=2, defence="none", lr=0.01, optimizer="adam", seed=1,
        model_seed=0, fanout=1, tls=tls, secagg=secagg, members=members,
    )


def test_nodes_gossip_over_tls_and_refuse_plaintext(digits_data) -> None:
    _ca, material = make_test_pki(peers=["a", "b"])
    a = PeerNode(_spec("a", digits_data, material["a"], members=("a", "b")))
    b = PeerNode(_spec("b", digits_data, material["b"], members=("a", "b")))
    try:
        book = {"a": a.server.address, "b": b.server.address}
        a.set_members(book)
        b.set_members(book)
        sent = a.step(1)
        assert sent["sent"] == 1 and sent["failed"] == 0 and sent["bytes"] > 0
        assert b.step(1)["sent"] == 1
        assert b.apply()["applied"] == 2  # its own update + a's, received over TLS
        assert a.mix()  # a member's pull over TLS is served
        with GossipClient(b.server.address, timeout_s=3) as plain, pytest.raises(TransportError) as err:
            plain.get_model()
        assert err.value.code == "UNAVAILABLE"
        assert np.isfinite(b.evaluate())
    finally:
        a.stop()
        b.stop()


def test_tls_flag_parses() -> None:
    assert from_dict({"gossip": {"tls": True}}).validate().gossip.tls is True
    with pytest.raises(ConfigError, match="wrong type"):
        from_dict({"gossip": {"tls": "yes"}})


def test_secure_aggregation_group_over_grpc(digits_data) -> None:
    import torch

    group = create_group(["a", "b", "c"], seed=3)
    nodes = {pid: PeerNode(_spec(pid, digits_data, secagg=group[pid])) for pid in group}
    try:
        book = {pid: n.server.address for pid, n in nodes.items()}
        for n in nodes.values():
            n.set_members(book)
        # Fanout is 1, but a group member must reach every other member.
        assert all(n.step(1)["sent"] == 2 for n in nodes.values())
        assert all(n.apply()["applied"] == 3 for n in nodes.values())
        states = [n.peer.model_at(None)[1] for n in nodes.values()]
        assert all(torch.equal(states[0][k], s[k]) for s in states[1:] for k in states[0])
        assert nodes["a"].addresses()["defence"] == "secagg:3"
    finally:
        for n in nodes.values():
            n.stop()


def test_a_refused_step_is_counted_in_prometheus_and_the_progress(digits_data) -> None:
    import dataclasses

    node = PeerNode(dataclasses.replace(_spec("a", digits_data), max_update_norm=1e-3, optimizer="sgd"))
    try:
        before = node.peer.model_at(None)[1]
        node.peer.local_update(1)  # its own gradient alone is over a bound of 1e-3
        node.apply()
        value = node.metrics.registry.get_sample_value("gradleak_gossip_steps_refused_total",
                                                       {"reason": "over_norm"})
        assert value == 1.0 and node.progress()["refused_steps"] == 1
        after = node.peer.model_at(None)[1]
        assert all(bool((before[n] == after[n]).all()) for n in before)
    finally:
        node.stop()


def test_aggregation_and_inbox_settings_parse_and_bad_ones_say_why() -> None:
    cfg = from_dict({"gossip": {"aggregate": "trimmed:0.2", "max_update_norm": 50.0}}).validate()
    assert cfg.gossip.aggregate == "trimmed:0.2" and cfg.to_dict()["gossip"]["max_update_norm"] == 50.0
    for bad, why in ({"aggregate": "trimmed:0.7"}, "0 < F < 0.5"), ({"aggregate": "avg"}, "unknown aggregation"), \
            ({"max_update_norm": 0.0}, "max_update_norm"), ({"inbox_per_origin": 0}, "inbox_per_origin"):
        with pytest.raises(ConfigError, match=why):
            from_dict({"gossip": bad}).validate()


def test_every_member_draws_the_random_topology_from_the_run_seed(digits_data, monkeypatch) -> None:
    import dataclasses

    from gradleak.core.graphs import build_graph
    from gradleak.runtime import peer_node
    from gradleak.runtime.model_exchange import model_gossip_for

    members = tuple(f"p{i}" for i in range(8))
    graphs = {seed: build_graph("er:2", sorted(members), seed) for seed in (0, 1)}
    assert graphs[0] != graphs[1]  # else this test could not tell the seeds apart
    base = dataclasses.replace(_spec("p3", digits_data, members=members), topology="er:2", exchange="models",
                               optimizer="sgd")
    for seed, graph in graphs.items():
        spec = dataclasses.replace(base, run_seed=seed)
        gossip = model_gossip_for(spec, {"w": (1,)})
        assert gossip is not None and gossip.neighbours == list(graph["p3"])
    # Gradient gossip: the node hands the run seed to the choice of targets.
    seeds: list[int] = []
    monkeypatch.setattr(peer_node, "choose_targets", lambda *a: seeds.append(a[-1]) or [])
    node = PeerNode(dataclasses.replace(base, exchange="gradients", optimizer="adam", run_seed=7))
    try:
        node.set_members({"p3": node.server.address})
        node.step(1)
    finally:
        node.stop()
    assert seeds == [7]
