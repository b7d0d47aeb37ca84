"""A run submitted to a separately started Ray head (`ray start --head`) through RAY_ADDRESS."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .prom import free_port

pytestmark = pytest.mark.integration


def _wait_line(proc: subprocess.Popen, needle: str, timeout: float) -> None:
    assert proc.stdout is not None
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if needle in line:
            return
        if not line and proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
    raise RuntimeError(f"'{needle}' not seen within {timeout} s")


def test_gradleak_run_completes_on_an_existing_head(tmp_path: Path) -> None:
    ray_bin = str(Path(sys.executable).with_name("ray"))
    port = free_port()
    # Short temp dir: Ray's unix sockets live under it and their paths are length-limited.
    temp = tempfile.mkdtemp(prefix="gl-ray-", dir="/tmp")
    # Ray's token authentication stays on: head and driver share a token, as on a real cluster.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        _wait_line(head, "Ray runtime started", 90)
        out = tmp_path / "runs"
        proc = subprocess.run(
            [sys.executable, "-m", "gradleak.cli", "run", "--peers", "2", "--rounds", "4",
             "--batch-size", "1", "--period", "0", "--limit", "200", "--max-iters", "20",
             "--drain-timeout", "30", "--metrics-port", "0", "--out", str(out)],
            env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, capture_output=True, text=True,
            timeout=240, check=False,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        run_dir = next(out.iterdir())
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["messages"] == 4 * 3 * 2  # 3 nodes, fanout 2, 4 rounds
        assert "honest peers in " in proc.stdout and "+ 1 malicious peer" in proc.stdout
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
