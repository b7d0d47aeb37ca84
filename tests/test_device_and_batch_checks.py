"""Issue 15: the attacker's device is a fact (a GPU asked for and missing fails at start, in one
line; the device is in Prometheus and in the addresses/summary), and `gradleak run` refuses
batch sizes the attacker would skip unless told. None of this starts Ray."""

from __future__ import annotations

import pytest
import ray
import torch
from prometheus_client import generate_latest

from gradleak import runner
from gradleak.cli import build_parser, config_from_args, main
from gradleak.config import AttackSettings, ConfigError, DataConfig, RunConfig, from_dict
from gradleak.placement import FitError
from gradleak.runtime.peer_node import PeerNode, PeerSpec


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine where torch sees no GPU, with no cluster configured and no Ray running; Ray must
    not be started by what is tested here."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def no_ray(_cfg: RunConfig) -> bool:
        raise AssertionError("Ray was started before the device check")

    monkeypatch.setattr(runner, "ensure_ray", no_ray)


def _cfg(*flags: str) -> RunConfig:
    return config_from_args(build_parser().parse_args(["run", *flags]))


@pytest.mark.parametrize("flags, who", [
    (["--attack-gpus", "1"], "the attacker (--attack-gpus 1, device cuda)"),
    (["--device", "cuda"], "the attacker (--device cuda)"),
    (["--peer-device", "cuda"], "the honest peers (--peer-device cuda)"),
    (["--peer-gpus", "0.5"], "the honest peers (--peer-gpus 0.5, device cuda)"),
])
def test_gpu_request_without_cuda_fails_at_start_in_one_line(
        no_cuda: None, tmp_path, capsys: pytest.CaptureFixture[str], flags: list[str], who: str) -> None:
    rc = main(["run", *flags, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"gradleak: error: {who}") and "torch sees no CUDA device" in lines[0]
    assert list(tmp_path.iterdir()) == [], "nothing ran, so no run directory is left behind"


def test_explicit_auto_keeps_the_fallback(no_cuda: None) -> None:
    cfg = _cfg("--attack-gpus", "1", "--device", "auto")
    assert cfg.attack.effective_device == "auto"
    runner.check_local_gpus(cfg)  # no error: the attacker falls back to the CPU (with a warning)
    runner.check_local_gpus(_cfg("--peer-gpus", "1", "--peer-device", "auto"))
    runner.check_local_gpus(_cfg())  # no GPU asked for at all
    with pytest.raises(FitError, match="torch sees no CUDA device"):
        runner.check_local_gpus(_cfg("--attack-gpus", "1"))


def test_on_a_cluster_the_node_checks_not_the_driver(no_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver of a cluster run sits on a CPU head: it must not refuse a GPU it cannot see."""
    runner.check_local_gpus(_cfg("--attack-gpus", "1", "--ray-address", "auto"))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    runner.check_local_gpus(_cfg("--attack-gpus", "1"))


def test_the_device_follows_the_gpu_request() -> None:
    assert AttackSettings().effective_device == "auto"
    assert AttackSettings(num_gpus=1).effective_device == "cuda"
    assert AttackSettings(num_gpus=1, device="auto").effective_device == "auto"
    assert AttackSettings(device="cpu").effective_device == "cpu"
    with pytest.raises(ConfigError):
        from_dict({"attack": {"device": "gpu"}}).validate()
    assert from_dict(RunConfig(attack=AttackSettings(num_gpus=1)).to_dict()).attack.device is None
    assert _cfg("--peer-gpus", "1").peers.effective_device == "cuda"
    assert _cfg().peers.effective_device == "cpu"
    assert _cfg("--peer-gpus", "1", "--peer-device", "cpu").peers.effective_device == "cpu"


def test_an_actor_that_cannot_start_is_one_line() -> None:
    class Fake(ray.exceptions.RayActorError):
        def __str__(self) -> str:
            return ("The actor died because of an error raised in its creation task\n"
                    "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                    "ValueError: device 'cuda' requested but torch sees no CUDA device\n")

    assert runner._start_error(Fake()) == "ValueError: device 'cuda' requested but torch sees no CUDA device"


def test_peer_exports_its_device(digits_data) -> None:
    spec = PeerSpec(
        peer_id="a", role="honest", shard_images=digits_data.images[:40], shard_labels=digits_data.labels[:40],
        test_images=digits_data.images[40:60], test_labels=digits_data.labels[40:60], input_shape=(1, 16, 16),
        num_classes=10, model="lenet", batch_size=2, defence="none", lr=0.01, optimizer="adam", seed=1,
        model_seed=0, fanout=1, device="cpu")
    node = PeerNode(spec)
    try:
        text = generate_latest(node.metrics.registry).decode()
        assert 'gradleak_device_info{device="cpu",role="honest"} 1.0' in text
        assert node.addresses()["device"] == "cpu"
    finally:
        node.stop()


# -- batch sizes the attacker would skip -------------------------------------------------------

def test_batch_sizes_above_max_batch_size_are_refused(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"batch size\(s\) 16 exceed the attacker's max_batch_size 8"):
        _cfg("--batch-size", "1,4,16")
    assert main(["run", "--batch-size", "1,16", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-batch-size" in err[0] and "--allow-unattacked on" in err[0]


def test_max_batch_size_flag_and_the_opt_out() -> None:
    cfg = _cfg("--batch-size", "1,4,16", "--max-batch-size", "16")
    assert cfg.attack.max_batch_size == 16 and max(cfg.peers.batch_sizes) <= cfg.attack.max_batch_size
    cfg = _cfg("--batch-size", "1,4,16", "--allow-unattacked", "on")
    assert cfg.attack.allow_unattacked and cfg.attack.max_batch_size == 8
    with pytest.raises(ConfigError):
        _cfg("--max-batch-size", "0")


def test_evaluator_is_pinned_to_the_drivers_node(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The evaluator writes the run records beside the driver's config.yaml, on the node whose
    --out is mounted: Testbed.start creates it with hard affinity to the driver's node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    seen: dict[str, object] = {}
    NODE = "ab" * 28  # a node id: 28 bytes in hex

    class Stop(Exception):
        pass

    class FakeEvaluator:
        @staticmethod
        def options(**kw: object) -> FakeEvaluator:
            seen.update(kw)
            raise Stop

    class Context:
        @staticmethod
        def get_node_id() -> str:
            return NODE

    monkeypatch.setattr(runner, "EvaluatorActor", FakeEvaluator)
    monkeypatch.setattr(runner, "ensure_ray", lambda _cfg: False)
    monkeypatch.setattr(runner, "fit", lambda _cfg: None)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: Context())
    bed = runner.Testbed(RunConfig(out_dir=str(tmp_path), data=DataConfig(limit=100)))
    with pytest.raises(Stop):
        bed.start()
    strategy = seen["scheduling_strategy"]
    assert isinstance(strategy, NodeAffinitySchedulingStrategy)
    assert strategy.node_id == NODE and strategy.soft is False

