"""Integration fixtures: one real Prometheus and one live testbed run shared by the module's tests."""

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
from gradleak.runner import Testbed

from .prom import Prometheus


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests of the session testbed run last: it holds CPUs, the GPU and the attacker marker of
    the shared cluster until the session ends, and a run started after it would wait for them."""
    items.sort(key=lambda item: "testbed" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory: pytest.TempPathFactory):
    prom = Prometheus(tmp_path_factory.mktemp("prometheus"))
    yield prom
    prom.stop()


@pytest.fixture(scope="session")
def testbed(ray_session, prometheus, tmp_path_factory: pytest.TempPathFactory):
    cfg = RunConfig(
        seed=0, out_dir=str(tmp_path_factory.mktemp("runs")),
        data=DataConfig(limit=1500),
        # The batch-1 peer is the victim; the larger batches make the shared model learn.
        peers=PeerConfig(honest=3, batch_sizes=(1, 8, 16)),
        # Two clocks: peers step every 0.08 s or 0.12 s, so updates arrive late and are weighed.
        # host auto binds the node IP; plaintext there needs insecure (the test's Ray is this machine).
        gossip=GossipConfig(rounds=120, fanout=2, period_s=(0.08, 0.12), insecure=True),
        # The attacker asks for the (logical) GPU and the marker resource of the second node;
        # device auto: this machine has no CUDA, so it falls back to the CPU (unset would mean cuda).
        # No time budget: 100 iDLG steps decide the batch-1 PSNR the tests assert, not how much
        # CPU a loaded machine leaves the attacker (3 s cut it to 15-18 dB under load).
        attack=AttackSettings(attacks=("idlg",), max_iters=100, time_budget_s=None, queue_size=8, max_batch_size=1,
                              drain_timeout_s=60, num_gpus=1, device="auto", resource="attacker"),
        # Two evaluator shards: truths, scores and claims split by update id (the other live
        # tests run the default single evaluator).
        telemetry=TelemetryConfig(metrics_port=0, host="auto", evaluators=2),
    )
    bed = Testbed(cfg)
    bed.start()
    prometheus.set_targets(json.loads((bed.run_dir / "prometheus_targets.json").read_text()))
    bed.run_network()
    bed.drain()
    result = bed.finish(0.0)
    yield bed, result
    bed.shutdown()
