"""Start and stop `gradleak peer` processes for tests: free ports, a roster, status files.

Each process gets a session of its own, so a test can prove that nothing it started
is left behind (its process group is gone after the stop).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2p.roster import Roster, write_roster

ROOT = Path(__file__).resolve().parents[2]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n ports free on host now (held together while picking, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def make_roster(path: Path, addresses: dict[str, str]) -> Path:
    return write_roster(path, Roster(addresses))


def peer_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(ROOT)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def peer_command(peer_id: str, listen: str, roster: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gradleak.cli", "peer", "--peer-id", peer_id, "--listen", listen,
            "--roster", str(roster), "--out", str(out), *extra]


@dataclass
class PeerProcess:
    peer_id: str
    proc: subprocess.Popen[str]
    log: Path
    status_path: Path

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.status_path.read_text()))

    def wait_serving(self, timeout: float = 90.0) -> None:
        """Until the process prints its serving line (or dies, or the timeout passes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " serving gossip on " in self.output():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.peer_id} exited {self.proc.returncode}: {self.output()[-2000:]}")
            time.sleep(0.2)
        raise AssertionError(f"{self.peer_id} not serving after {timeout:.0f} s: {self.output()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send sig, wait for the exit; the return code (the group is killed if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_group(self.proc)
            raise AssertionError(f"{self.peer_id} did not stop within {timeout:.0f} s of {sig!r}") from None

    def group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True


def kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def start_peer(cmd: list[str], peer_id: str, out: Path, prefix: list[str] | None = None) -> PeerProcess:
    """Run cmd (a peer_command, optionally behind prefix, e.g. `ip netns exec NS`) in its own session."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"{peer_id}.log"
    with log.open("w") as f:
        proc = subprocess.Popen([*(prefix or []), *cmd], stdout=f, stderr=subprocess.STDOUT, text=True,
                                env=peer_env(), cwd=ROOT, start_new_session=True)
    return PeerProcess(peer_id, proc, log, out / f"{peer_id}.status.json")


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def run_to_done(peers: list[PeerProcess], timeout: float) -> list[int]:
    """Wait until every peer serves and has done its steps, stop them with SIGTERM; their exit codes.

    Any peer still running when this fails is killed, so a failing test leaves nothing behind.
    """
    try:
        for p in peers:
            p.wait_serving()
        wait_until(lambda: all(p.status_path.exists() and p.status()["state"] == "done" for p in peers),
                   timeout, "every peer to finish its steps")
        return [p.stop(signal.SIGTERM) for p in peers]
    finally:
        for p in peers:
            if p.proc.poll() is None:
                p.stop(signal.SIGKILL)
