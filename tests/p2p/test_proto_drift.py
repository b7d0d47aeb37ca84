"""The committed generated code in p2p/proto matches what scripts/gen_protos.py makes."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("gossip_pb2.py", "gossip_pb2.pyi", "gossip_pb2_grpc.py")


@pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None,
    reason="grpc_tools (grpcio-tools, a dev dependency) is not installed",
)
def test_generated_code_matches_protos(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    for name in GENERATED:
        fresh = (tmp_path / "p2p" / "proto" / name).read_bytes()
        committed = (REPO_ROOT / "p2p" / "proto" / name).read_bytes()
        assert fresh == committed, (
            f"p2p/proto/{name} is stale: run `python scripts/gen_protos.py` and commit the result"
        )
