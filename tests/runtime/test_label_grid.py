"""Metric labels that a sender writes (defence, batch size) stay on a fixed grid (issue 11)."""

from __future__ import annotations

import time

import torch

from gradleak.runtime.peer_node import PeerNode, PeerSpec
from gradleak.runtime.telemetry import LEARNED_VALUES, OTHER, Metrics
from p2p.transport import GossipClient
from p2p.update import Update, UpdateHeader


def series(metric: object) -> set[tuple[str, ...]]:
    """The label value tuples a labelled metric has series for."""
    return {tuple(s.labels.values()) for s in metric.collect()[0].samples}  # type: ignore[attr-defined]


def test_a_configured_grid_maps_unknown_values_to_other() -> None:
    m = Metrics(defences=["none", "prune:0.9"], batch_sizes=[1, 4])
    for i in range(300):
        m.received.labels(f"made-up-{i}").inc()
        m.updates_received.labels(str(2**40 + i), "none").inc()
    m.received.labels("prune:0.9").inc()
    m.attack_seconds.labels("dlg", "4", "none").observe(1.0)
    assert series(m.received) == {(OTHER,), ("prune:0.9",)}
    assert series(m.updates_received) == {(OTHER, "none")}
    assert {s[:3] for s in series(m.attack_seconds)} == {("dlg", "4", "none")}


def test_unknown_defences_in_headers_add_a_bounded_number_of_series(digits_data) -> None:
    # Finding: 300 distinct defence strings in headers made 600 series on a peer.
    spec = PeerSpec(
        peer_id="victim", role="honest", shard_images=digits_data.images[:40],
        shard_labels=digits_data.labels[:40], test_images=digits_data.images[40:60],
        test_labels=digits_data.labels[40:60], input_shape=(1, 16, 16), num_classes=10,
        model="lenet", batch_size=2, defence="none", lr=0.01, optimizer="adam", seed=1, model_seed=0,
    )
    node = PeerNode(spec)
    shapes = node.schema()
    try:
        with GossipClient(node.server.address, timeout_s=5) as client:
            for i in range(300):
                # 300 senders, one update each: the per-step and per-origin rules refuse repeats.
                header = UpdateHeader(f"m{i}/r1", f"m{i}", f"m{i}", 1, 0, 2, f"defence-{i}", 1.0, time.time())
                client.push_update(Update(header, {n: torch.zeros(s) for n, s in shapes.items()}))
    finally:
        node.stop()
    got = series(node.metrics.received) | series(node.metrics.received_bytes)
    assert len(got) == LEARNED_VALUES + 1  # the first values seen, then `other` only
    assert (OTHER,) in got


def test_header_defences_are_the_names_peers_put_in_headers() -> None:
    # The metric label grid is fixed to these: a name that differs from what the peers
    # send would file every honest update under `other`.
    import numpy as np
    import torch

    from gradleak.specs import header_defences
    from p2p.defences import parse_defence
    from p2p.peer import Peer
    from p2p.secagg import create_group

    assert header_defences(("prune:0.3", "none", "prune:0.3"), None) == ("prune:0.3", "none")
    groups = create_group(["a", "b"], seed=0)
    for d in ("none", "prune:0.3+fp16"):
        peer = Peer("a", torch.nn.Linear(4, 2), np.zeros((4, 4), np.float32), np.zeros(4, np.int64),
                    batch_size=1, defence=parse_defence(d), lr=0.1, keep_versions=1, seed=0, secagg=groups["a"])
        assert peer.defence_name in header_defences((d,), groups["a"].name)
