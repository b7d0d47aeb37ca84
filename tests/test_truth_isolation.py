"""Ground truth never reaches the attack code: not by import, not on the wire, not back from the evaluator."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import torch

from gradleak.core.graphs import build_graph, mixing_matrix
from gradleak.gossip_sim import simulate
from gradleak.runtime.evaluation import Evaluator
from gradleak.runtime.record import RunRecord
from p2p.codec import update_to_frames
from p2p.defences import parse_defence
from p2p.peer import Peer
from p2p.update import UpdateHeader

ROOT = Path(__file__).resolve().parents[1]
# gradleak.gossip_sim holds the simulated gossip's truth (every gradient and state).
TRUTH_MODULES = {"gradleak.runtime.evaluation", "gradleak.runtime.evaluator_node", "gradleak.runtime.record",
                 "gradleak.gossip_sim"}
PURE_FORBIDDEN = {"ray", "grpc", "prometheus_client", "p2p", "gradleak.runtime"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_attacker_package_cannot_import_the_truth() -> None:
    for path in (ROOT / "attacker").glob("*.py"):
        assert not _imports(path) & TRUTH_MODULES, f"{path.name} imports the evaluator"


def test_attack_algorithms_are_pure() -> None:
    # The capture path and its Ray/gRPC adapter live in gradleak/runtime/, not here.
    for path in (ROOT / "attacker").glob("*.py"):
        bad = {m for m in _imports(path) if any(m == f or m.startswith(f + ".") for f in PURE_FORBIDDEN)}
        assert not bad, f"{path.name} imports {bad}"


def test_update_header_has_only_public_fields() -> None:
    fields = {f.name for f in dataclasses.fields(UpdateHeader)}
    assert fields == {"update_id", "origin", "sender", "round", "model_version", "num_samples",
                      "defence", "mixing_weight", "sent_at"}


def test_the_wire_does_not_carry_the_batch(digits_data, lenet) -> None:
    peer = Peer("p", lenet, digits_data.images[:20], digits_data.labels[:20], batch_size=1,
                defence=parse_defence("none"), lr=0.01, keep_versions=2, seed=0)
    update, batch = peer.local_update(1)
    wire = b"".join(f.SerializeToString() for f in update_to_frames(update))
    pixels = batch.images.astype("<f4").tobytes()
    # Any 64-byte run of the image (16 pixels) would show a leak of raw data.
    assert all(pixels[i:i + 64] not in wire for i in range(0, len(pixels) - 64, 64))


def test_the_evaluator_gives_nothing_back(tmp_path: Path) -> None:
    ev = Evaluator(RunRecord(tmp_path))
    truth = np.random.default_rng(0).random((1, 1, 16, 16), dtype=np.float32)
    ev.register_truth("u1", truth, np.array([3]), origin="p", round=1, defence="none")
    assert ev.score("u1", "idlg", truth + 0.01, np.array([3]), {"seconds": 1.0}) is None  # type: ignore[func-returns-value]
    public = [m for m in dir(ev) if not m.startswith("_")]
    assert not any("truth" in m and m != "register_truth" for m in public)
    assert ev.summary()[0]["mean_psnr"] == torch.tensor(40.0).item()


def test_the_gossip_attackers_see_only_their_own_messages() -> None:
    members = [f"p{i}" for i in range(6)]
    graph = build_graph("line", members)
    view, truth = simulate(graph, members, mixing_matrix(graph, members), ["p0", "p3"],
                           np.zeros(4), steps=2, rounds=3, drop_rate=0.2, seed=1,
                           local_update=lambda k, s, x: np.full(4, members.index(k) + s, np.float32))
    heard = {"p0", "p1", "p2", "p3", "p4"}  # the attackers and their neighbours
    assert {sender for sender, _, _ in view.observations} <= heard
    assert set(view.known) == {("x0",), *((a, s) for a in ("p0", "p3") for s in (1, 2))}
    assert all({sender, receiver} & {"p0", "p3"} for sender, receiver, _, _ in view.drops)
    assert ("p5", 1) in truth.updates and not any(k[0] == "p5" for k in view.observations)
