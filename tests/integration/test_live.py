"""The live network's lifecycle: lock-step runs reproduce bit for bit, an over-subscribed run
fails at once, and Ctrl-C stops a real `gradleak run` within 10 s leaving no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from gradleak.cli import main
from gradleak.config import (
    AttackSettings,
    DataConfig,
    GossipConfig,
    PeerConfig,
    RunConfig,
    TelemetryConfig,
)
from gradleak.runner import Testbed
from p2p.transport import GossipClient

pytestmark = pytest.mark.integration
TIMES = {"sent_at", "received_at", "applied_at"}


def _lockstep_run(out: Path) -> tuple[dict[str, dict[str, torch.Tensor]], list[dict], list[dict]]:
    cfg = RunConfig(
        seed=3, out_dir=str(out), data=DataConfig(limit=300),
        peers=PeerConfig(honest=3, batch_sizes=(1, 2, 4)),
        gossip=GossipConfig(sync="rounds", rounds=6, period_s=(0.0,)),
        attack=AttackSettings(attacks=("analytic",), max_batch_size=1, drain_timeout_s=30),
        telemetry=TelemetryConfig(metrics_port=0),
    )
    bed = Testbed(cfg)
    try:
        bed.start()
        bed.run_network()
        bed.drain()
        weights = {}
        for a in bed.addresses:
            with GossipClient(a["gossip"], timeout_s=10) as client:
                weights[a["peer_id"]] = client.get_model()[1]
        bed.finish(0.0)
    finally:
        bed.shutdown()
    updates = [json.loads(x) for x in (bed.run_dir / "updates.jsonl").read_text().splitlines()]
    recs = [json.loads(x) for x in (bed.run_dir / "reconstructions.jsonl").read_text().splitlines()]
    return weights, updates, recs


def test_lockstep_rounds_are_bit_identical_for_a_seed(ray_session, tmp_path: Path) -> None:
    w1, u1, r1 = _lockstep_run(tmp_path / "a")
    w2, u2, r2 = _lockstep_run(tmp_path / "b")
    assert set(w1) == set(w2) == {"peer-0", "peer-1", "peer-2", "mallory"}
    for peer, state in w1.items():
        assert all(torch.equal(state[k], w2[peer][k]) for k in state), peer
    moved = any(not torch.equal(w1["peer-0"][k], w1["mallory"][k]) for k in w1["peer-0"])
    assert moved  # the peers' models differ from one another: the comparison is not trivial

    def strip(rows: list[dict]) -> list[dict]:
        return sorted(({k: v for k, v in r.items() if k not in TIMES} for r in rows),
                      key=lambda r: (r["receiver"], r["update_id"]))

    assert len(u1) == 6 * 4 * 2 and strip(u1) == strip(u2)
    assert all(r["lag"] == 0 and r["weight"] == r["num_samples"] for r in u1)  # lock-step: no lag
    # Reconstructions of the same updates score the same (the attack is deterministic).
    p1 = {x["update_id"]: x["psnr"] for x in r1}
    p2 = {x["update_id"]: x["psnr"] for x in r2}
    common = set(p1) & set(p2)
    assert common and all(p1[u] == p2[u] for u in common)


def test_an_oversubscribed_run_fails_at_once_with_one_line(ray_session, tmp_path: Path, capsys) -> None:
    t0 = time.monotonic()
    code = main(["run", "--peers", "16", "--peers-per-process", "1", "--out", str(tmp_path),
                 "--metrics-port", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and time.monotonic() - t0 < 15
    assert err.count("\n") == 0 and "16 processes" in err and "--peers-per-process" in err, err
    assert not any(tmp_path.iterdir())  # nothing was written


# -- Ctrl-C on a real `gradleak run` -------------------------------------------------------


def _marked_processes(marker: str) -> list[int]:
    """Pids of live processes whose environment carries `marker` (children inherit it)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                status = (proc / "status").read_text()
                if "\nState:\tZ" not in status:  # a zombie holds nothing
                    found.append(int(proc.name))
        except OSError:
            continue
    return found


class _Run:
    """`gradleak run` as a subprocess with a marker in its environment, stdout read as it comes."""

    def __init__(self, out: Path, *args: str) -> None:
        self.marker = f"GRADLEAK_TEST_RUN={uuid.uuid4().hex}"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env[self.marker.split("=")[0]] = self.marker.split("=")[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gradleak.cli", "run", "--out", str(out), "--metrics-port", "0",
             "--limit", "300", "--peers", "2", "--batch-size", "1", "--rounds", "400", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, prefix: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(x.startswith(prefix) for x in self.lines):
            assert self.proc.poll() is None, "".join(self.lines)
            assert time.monotonic() < deadline, f"no line starting {prefix!r}: {''.join(self.lines)}"
            time.sleep(0.1)

    def interrupt(self) -> float:
        """SIGINT; seconds until the process and everything it started are gone."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running 10 s after SIGINT: {''.join(self.lines)}")
        marker = self.marker.split("=")[1]
        while _marked_processes(marker) and time.monotonic() - t0 < 10:
            time.sleep(0.2)
        left = _marked_processes(marker)
        if left:
            self.kill()
        assert not left, f"processes left behind: {left}"
        return time.monotonic() - t0

    def kill(self) -> None:
        for pid in [self.proc.pid, *_marked_processes(self.marker.split("=")[1])]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _summary(out: Path) -> dict:
    runs = sorted(out.iterdir())
    assert len(runs) == 1
    return json.loads((runs[0] / "summary.json").read_text())


def test_ctrl_c_during_start_up_stops_within_10_s(tmp_path: Path) -> None:
    run = _Run(tmp_path)
    run.wait_for("starting:", timeout=60)  # the run's handlers are in place from here on
    time.sleep(1.5)  # the data is loading, Ray is starting, or the actors are
    assert run.proc.poll() is None, "".join(run.lines)
    assert run.interrupt() <= 10.0
    assert run.proc.returncode == 130, "".join(run.lines)
    assert _summary(tmp_path)["interrupted"] is True


def test_ctrl_c_during_the_steps_stops_within_10_s_and_keeps_the_record(tmp_path: Path) -> None:
    run = _Run(tmp_path, "--attack", "analytic")
    run.wait_for("step ", timeout=120)
    assert run.interrupt() <= 10.0
    assert run.proc.returncode == 130, "".join(run.lines)
    summary = _summary(tmp_path)
    assert summary["interrupted"] is True and summary["ended_at"] > summary["started_at"]
    assert 0 < min(summary["steps"].values()) < 400  # stopped part-way, not at the end
    assert (min(tmp_path.iterdir()) / "updates.jsonl").stat().st_size > 0
