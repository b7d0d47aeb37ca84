"""The rules behind a lost peer's rejoin, and the records that must stay whole across it
(pure logic, and peer nodes driven in-process over real gRPC on 127.0.0.1)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gradleak.runtime.evaluation import Evaluator, summarise
from gradleak.runtime.faults import FaultLog, rejoin_sources, rejoin_version, resume_step
from gradleak.runtime.peer_node import PeerNode, PeerSpec
from gradleak.runtime.record import RunRecord
from p2p.clock import PeerClock
from p2p.defences import parse_defence
from p2p.errors import UpdateRejected, VersionNotFound
from p2p.peer import Peer


def test_resume_step_continues_after_the_last_shipped_step_and_skips_missed_ones() -> None:
    start = 1000.0
    assert resume_step(PeerClock(1.0, 0.0, 0, start), 0, now=start - 5) == 1
    assert resume_step(PeerClock(1.0, 0.0, 0, start), 4, now=start) == 5  # never an id used before
    # Step k is due at start + k - 1. Back at start + 9.5: steps 5..9 fell due more than a gap
    # (1 s) ago and are skipped; step 10, due half a second ago, runs at once.
    assert resume_step(PeerClock(1.0, 0.0, 0, start), 4, now=start + 9.5) == 10
    assert resume_step(PeerClock(0.0, 0.0, 0, start), 7, now=start + 100) == 8  # no period: nothing missed
    with pytest.raises(ValueError, match="after_step"):
        resume_step(PeerClock(1.0, 0.0, 0, start), -1, now=start)


def test_rejoin_version_is_the_neighbours_but_above_every_version_shipped() -> None:
    assert rejoin_version(40, None) == 40
    assert rejoin_version(40, 12) == 40
    assert rejoin_version(40, 55) == 56  # a pull for the dead incarnation's version 55 must not get these
    with pytest.raises(ValueError):
        rejoin_version(-1, None)


def test_rejoin_sources_prefer_live_topology_neighbours() -> None:
    members = ["mallory", "peer-0", "peer-1", "peer-2", "peer-3"]
    live = ["peer-0", "peer-2", "peer-3"]
    # ring over the sorted members: peer-2's neighbours are peer-1 (dead) and peer-3.
    assert rejoin_sources("peer-2", members, live, "ring") == ["peer-3", "peer-0"]
    assert rejoin_sources("peer-1", members, live, "complete") == ["peer-0", "peer-2", "peer-3"]


def test_fault_log_counts_restarts_against_the_limit_and_reports_steps_after() -> None:
    log = FaultLog(max_restarts=1)
    first = log.lost(0, ["peer-0"], "killed", {"peer-0": 9})
    assert log.may_restart()
    first.restarted_at = first.rejoined_at = first.lost_at + 2.0
    first.rejoin = {"peer-0": {"first_step": 15}}
    assert not log.may_restart()
    log.lost(1, ["peer-1"], "killed", {"peer-1": 3})
    out = json.loads(json.dumps(log.to_dict({"peer-0": 40})))
    assert out["restarts"] == 1 and out["max_restarts"] == 1
    assert out["lost_hosts"][0]["rejoin"]["peer-0"]["steps_after"] == 26
    assert out["lost_hosts"][0]["restart_s"] == 2.0 and out["lost_hosts"][1]["restart_s"] is None
    with pytest.raises(ValueError):
        FaultLog(-1)


def _peer(lenet, digits_data) -> Peer:
    return Peer("p", lenet, digits_data.images[:40], digits_data.labels[:40], batch_size=2,
                defence=parse_defence("none"), lr=0.01, keep_versions=8, seed=1)


def test_adopt_copies_the_weights_exactly_and_drops_the_old_versions(lenet, digits_data) -> None:
    peer = _peer(lenet, digits_data)
    peer.apply_pending()
    theirs = {k: torch.randn_like(v) for k, v in peer.model.state_dict().items()}
    peer.adopt(theirs, 30)
    version, state = peer.model_at(None)
    assert version == 30 and all(torch.equal(state[k], theirs[k]) for k in theirs)
    with pytest.raises(VersionNotFound):
        peer.model_at(1)  # the dead incarnation's weights are not served as these
    bad = {**theirs, next(iter(theirs)): torch.full_like(next(iter(theirs.values())), float("nan"))}
    with pytest.raises(UpdateRejected):
        peer.adopt(bad, 31)
    with pytest.raises(ValueError, match="below"):
        peer.adopt(theirs, 3)
    assert peer.version == 30 and torch.equal(peer.model_at(None)[1][next(iter(theirs))], next(iter(theirs.values())))


def test_evaluator_keeps_one_truth_and_one_record_per_update(tmp_path: Path) -> None:
    ev = Evaluator(RunRecord(tmp_path), persist_truths=False)
    images = np.random.default_rng(0).random((1, 1, 16, 16), dtype=np.float32)
    ev.register_truth("a/r3", images, np.array([4]), origin="a", round=3, defence="none", model_version=7)
    with pytest.raises(ValueError, match="already filed"):
        ev.register_truth("a/r3", images * 0, np.array([1]), origin="a", round=3, defence="none")
    ev.register_truth("a/r4", images, np.array([4]), origin="a", round=4, defence="none", model_version=9,
                      incarnation=1)
    assert ev.last_shipped("a") == {"step": 4, "model_version": 9} and ev.last_shipped("b") is None
    ev.score("a/r3", "analytic", images, np.array([4]), {})
    ev.score("a/r3", "analytic", images * 0, np.array([1]), {})  # a second score of it is refused
    ev.score("a/r4", "analytic", images, np.array([4]), {})
    rows = RunRecord(tmp_path).rows()
    assert [r["update_id"] for r in rows] == ["a/r3", "a/r4"] and ev.duplicates == 1
    assert [r["incarnation"] for r in rows] == [0, 1] and rows[0]["mean_psnr"] == 100.0
    assert summarise(rows) == ev.summary()  # the driver's summary from disk equals the evaluator's


def _spec(pid: str, digits_data, seed: int = 1) -> PeerSpec:
    return PeerSpec(
        peer_id=pid, role="honest", shard_images=digits_data.images[:40], shard_labels=digits_data.labels[:40],
        test_images=digits_data.images[40:60], test_labels=digits_data.labels[40:60], input_shape=(1, 16, 16),
        num_classes=10, model="lenet", batch_size=2, defence="none", lr=0.01, optimizer="adam", seed=seed,
        model_seed=0, fanout=1, period_s=0.02, mix_every=0,
    )


def test_a_restarted_node_is_redialled_and_rejoins_from_its_neighbour(digits_data) -> None:
    a, b = PeerNode(_spec("a", digits_data)), PeerNode(_spec("b", digits_data, seed=2))
    b2 = None
    try:
        book = {"a": a.server.address, "b": b.server.address}
        a.set_members(book)
        b.set_members(book)
        for r in (1, 2):
            assert a.step(r)["sent"] == 1
            a.apply()
        b.stop()  # b's process is gone: sends to it fail and are counted, they do not hang
        t0 = time.monotonic()
        assert a.step(3) == {"sent": 0, "failed": 1, "bytes": 0} and time.monotonic() - t0 < 5
        a.apply()
        b2 = PeerNode(_spec("b", digits_data, seed=3))
        book = {"a": a.server.address, "b": b2.server.address}
        a.set_members(book)
        b2.set_members(book)
        done = b2.rejoin(["a"], {"step": 2, "model_version": 1}, 1, steps=6, start_at=time.time(), eval_every=3)
        assert done["source"] == "a" and done["first_step"] == 3 and done["version"] == a.peer.version
        adopted = b2.peer.model_at(done["version"])[1]
        theirs = a.peer.model_at(done["source_version"])[1]
        assert all(torch.equal(adopted[k], theirs[k]) for k in theirs)
        assert a.step(4)["sent"] == 1  # a redialled b at its new address
        assert b2._loop is not None
        b2._loop.join(10)
        assert b2.steps_done == 6 and b2.loop_error is None and b2.sent == 4  # steps 3..6, all delivered
    finally:
        a.stop()
        b.stop()
        if b2 is not None:
            b2.stop()
