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
                header = UpdateHeader(f"m/{i}", "mallory", "mallory", 1, 0, 2, f"defence-{i}", 1.0, time.time())
                client.push_update(Update(header, {n: torch.zeros(s) for n, s in shapes.items()}))
    finally:
        node.stop()
    got = series(node.metrics.received) | series(node.metrics.received_bytes)
    assert len(got) == LEARNED_VALUES + 1  # the first values seen, then `other` only
    assert (OTHER,) in got
