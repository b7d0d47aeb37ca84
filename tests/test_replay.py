"""Transcript replay: live attack vs offline replay of the captured update, and the CLI's errors.

Real gRPC between an in-process honest PeerNode and MaliciousNode (no Ray); the truth is
filed with an in-process Evaluator, which also writes RUN_DIR/truth/.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from attacker.api import AttackConfig
from gradleak.cli import main
from gradleak.runtime.evaluation import Evaluator
from gradleak.runtime.malicious_node import MaliciousNode
from gradleak.runtime.peer_node import PeerNode, PeerSpec
from gradleak.runtime.record import RunRecord
from gradleak.runtime.transcript import TRANSCRIPT_DIR, UPDATES_FILE, TranscriptReader


def _spec(pid: str, digits_data, role: str = "honest", batch: int = 1, defence: str = "none") -> PeerSpec:
    return PeerSpec(
        peer_id=pid, role=role, shard_images=digits_data.images[:40], shard_labels=digits_data.labels[:40],
        test_images=digits_data.images[40:60], test_labels=digits_data.labels[40:60], input_shape=(1, 16, 16),
        num_classes=10, model="lenet", batch_size=batch, defence=defence, lr=0.01, optimizer="adam",
        seed={"a": 1, "b": 2, "c": 4, "m": 3}[pid], model_seed=0, fanout=1,
    )


@pytest.fixture(scope="module")
def live_run(tmp_path_factory, digits_data):
    """Three honest peers send two updates each to the attacker, which attacks four live with analytic."""
    run_dir = tmp_path_factory.mktemp("run")
    ev = Evaluator(RunRecord(run_dir))
    honest = [PeerNode(_spec("a", digits_data)), PeerNode(_spec("b", digits_data, batch=2, defence="fp16"))]
    # max_batch_size 2: c's batch-4 updates are received but not attacked live (no weights pulled
    # for the attack); the transcript pulls their weights itself, so the replay can attack them.
    honest.append(PeerNode(_spec("c", digits_data, batch=4, defence="prune:0.5")))
    mal = MaliciousNode(_spec("m", digits_data, role="malicious"), attacks=("analytic",),
                        attack_config=AttackConfig(max_iters=20, seed=7), device="cpu", queue_size=8,
                        max_batch_size=2, run_dir=str(run_dir), transcript_bytes=64 << 20)
    live: dict[str, object] = {}
    mal.malicious._report = lambda h, a, rec, *_when: live.__setitem__(h.update_id, rec)
    nodes = [*honest, mal]
    try:
        book = {n.spec.peer_id: n.server.address for n in nodes}
        for n in nodes:
            n.set_members(book)
        for r in (1, 2):
            for node in honest:
                update, batch = node.peer.local_update(r)
                ev.register_truth(update.header.update_id, batch.images, batch.labels,
                                  origin=node.spec.peer_id, round=r, defence=update.header.defence)
                node.client("m").push_update(update)
            assert mal.wait_idle(120)
            for node in honest:
                node.apply(r)
        for uid, rec in live.items():  # the live attacker's reconstructions, scored as in a run
            ev.score(uid, "analytic", rec.images.numpy(), rec.labels.numpy(), dict(rec.stats))  # type: ignore[attr-defined]
        status = mal.status()
    finally:
        for n in nodes:
            n.stop()
    _LIVE.update(live)
    return run_dir, {row["update_id"]: row for row in ev.record.rows()}, status


_LIVE: dict[str, object] = {}  # update_id -> the live Reconstruction


def test_replayed_reconstructions_are_bit_identical_to_the_live_ones(live_run) -> None:
    import torch

    from attacker.api import create_attack
    from attacker.metrics import score_batch
    from gradleak.replay import ReplayConfig, _attack_config, _replay_one
    from gradleak.runtime.evaluation import load_truth

    run_dir, _rows, _status = live_run
    reader = TranscriptReader(run_dir)
    attack = create_attack("analytic", _attack_config(reader.meta, ReplayConfig(str(run_dir), "-")))
    compared = 0
    for received in reader.updates():
        uid = received.update.header.update_id
        if uid not in _LIVE:
            continue
        _row, pairs = _replay_one(received, reader, attack, torch.device("cpu"), run_dir, 1, 16)
        live = _LIVE[uid].images.numpy()  # type: ignore[attr-defined]
        truth = load_truth(run_dir, uid)
        assert truth is not None
        s = score_batch(live, _LIVE[uid].labels.numpy(), truth.images, truth.labels)  # type: ignore[attr-defined]
        for j, (_t, recon, _cap) in enumerate(pairs):
            assert np.array_equal(recon, live[int(s["permutation"][j])])  # so the PSNR is the same, exactly
        compared += 1
    assert compared == 4


def test_transcript_holds_what_the_attacker_received(live_run) -> None:
    run_dir, live_rows, status = live_run
    r = TranscriptReader(run_dir)
    ids = [u.update.header.update_id for u in r.updates()]
    assert len(ids) == 6 and set(ids) - set(live_rows) == {"c/r1", "c/r2"}
    assert status["evicted"].get("batch_too_large") == 2 and r.meta["updates"] == 6 and r.meta["weights"] == 6
    assert sorted(p for p, _v in r.weight_keys()) == ["a", "a", "b", "b", "c", "c"]
    assert (run_dir / "truth").is_dir() and len(list((run_dir / "truth").glob("*.npz"))) == 6
    assert not list((run_dir / TRANSCRIPT_DIR).glob("*truth*"))


def test_replay_gives_the_live_psnr(live_run, tmp_path: Path, capsys) -> None:
    run_dir, live_rows, _status = live_run
    out = tmp_path / "replay"
    assert main(["attack", "--transcript", str(run_dir), "--attack", "analytic", "--out", str(out),
                 "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 7 and "replayed 6 of 6" in lines[-1]
    result = json.loads((out / "result.json").read_text())
    assert result["attack_config"]["seed"] == 7 and result["attack_config"]["max_iters"] == 20
    assert (out / "grid.png").stat().st_size > 0
    assert all(row["skipped"] is None and len(row["psnr"]) == row["batch_size"] for row in result["updates"])
    assert {r["batch_size"] for r in result["updates"]} == {1, 2, 4}
    for row in result["updates"]:
        if row["update_id"].startswith("c/"):
            continue  # not attacked live
        live = live_rows[row["update_id"]]
        assert row["psnr"] == live["psnr"] and row["label_accuracy"] == live["label_accuracy"]
        assert row["batch_size"] == live["batch_size"] and row["defence"] == live["defence"]
        assert row["step"] == live["round"] and row["seconds"] >= 0
    assert {r["defence"] for r in result["updates"]} == {"none", "fp16", "prune:0.5"}


def test_replay_filters(live_run, tmp_path: Path) -> None:
    run_dir, _rows, _status = live_run
    out = tmp_path / "b2"
    assert main(["attack", "--transcript", str(run_dir), "--attack", "analytic", "--out", str(out),
                 "--batch-size", "2", "--num-batches", "1", "--device", "cpu"]) == 0
    rows = json.loads((out / "result.json").read_text())["updates"]
    assert len(rows) == 1 and rows[0]["batch_size"] == 2


def _damaged(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(run_dir, copy)
    f = copy / TRANSCRIPT_DIR / UPDATES_FILE
    f.write_bytes(f.read_bytes()[:-7])
    return copy


def test_replay_takes_the_attacks_own_parameters(live_run, tmp_path: Path, capsys) -> None:
    run_dir, _rows, _status = live_run
    out = tmp_path / "params"
    assert main(["attack", "--transcript", str(run_dir), "--attack", "analytic", "--out", str(out),
                 "--num-batches", "1", "--device", "cpu", "--attack-param", "cg_max_iters=3"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["attack_params"] == {"cg_max_iters": 3}
    bad = tmp_path / "bad"
    assert main(["attack", "--transcript", str(run_dir), "--attack", "analytic", "--out", str(bad),
                 "--attack-param", "no_such_field=1"]) == 2
    assert "no_such_field" in capsys.readouterr().err and not bad.exists()


@pytest.mark.parametrize("case", ["missing", "no_transcript", "corrupt", "unknown_attack", "model"])
def test_bad_input_is_one_line_exit_2_nothing_written(live_run, tmp_path: Path, capsys, case: str) -> None:
    run_dir, _rows, _status = live_run
    src, attack, extra = str(run_dir), "analytic", []
    if case == "missing":
        src = str(tmp_path / "nope")
    elif case == "no_transcript":
        (tmp_path / "empty").mkdir()
        src = str(tmp_path / "empty")
    elif case == "corrupt":
        src = str(_damaged(run_dir, tmp_path))
    elif case == "unknown_attack":
        attack = "magic"
    else:
        extra = ["--model", "mlp"]
    out = tmp_path / "out"
    assert main(["attack", "--transcript", src, "--attack", attack, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradleak: error: ") and "\n" not in err
    expect = {"missing": "not found", "no_transcript": "no transcript", "corrupt": "updates.bin",
              "unknown_attack": "unknown attack 'magic'", "model": "--model"}[case]
    assert expect in err
    if case == "corrupt":
        assert "offset" in err
    assert not out.exists()


def test_truth_is_not_in_the_transcript(live_run) -> None:
    run_dir, _rows, _status = live_run
    truth = np.load(next((run_dir / "truth").glob("*.npz")), allow_pickle=False)["images"]
    raw = b"".join(p.read_bytes() for p in (run_dir / TRANSCRIPT_DIR).iterdir())
    pixels = truth.astype("<f4").tobytes()
    assert all(pixels[i:i + 64] not in raw for i in range(0, len(pixels) - 64, 64))


def test_a_colluders_run_is_refused_by_the_gradient_replay_with_the_way_out(tmp_path, capsys) -> None:
    for a in ("mallory", "peer-2.mallory"):
        (tmp_path / TRANSCRIPT_DIR / a).mkdir(parents=True)
        (tmp_path / TRANSCRIPT_DIR / a / "meta.json").write_text("{}")
    assert main(["attack", "--transcript", str(tmp_path), "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert "2 colluding attackers (mallory, peer-2.mallory)" in err and "--gossip-algebra" in err
    assert not (tmp_path / "out").exists()
