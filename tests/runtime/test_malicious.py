"""The malicious peer's capture path, driven in-process with a fake attack (pure logic)."""

import threading

import torch

from attacker.api import Attack, Observation, Reconstruction
from gradleak.runtime.malicious import MaliciousPeer
from p2p.defences import parse_defence
from p2p.errors import UpdateRejected
from p2p.peer import Peer
from p2p.update import Update, UpdateHeader


class _Gate(Attack):
    """Blocks until released, then returns the observation's shape as a reconstruction."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.seen: list[Observation] = []

    def reconstruct(self, model, obs, *, callback=None):  # type: ignore[override]
        self.release.wait(10)
        self.seen.append(obs)
        b = obs.batch_size
        return Reconstruction(torch.zeros(b, *obs.input_shape), torch.zeros(b, dtype=torch.int64), {"seconds": 0.0})


def _setup(digits_data, lenet, queue_size=2):
    peer = Peer("m", lenet, digits_data.images[:50], digits_data.labels[:50], batch_size=1,
                defence=parse_defence("none"), lr=0.1, keep_versions=8, seed=0)
    gate = _Gate()
    reports, fetched = [], []

    def fetch(sender, version):
        fetched.append((sender, version))
        return {k: v.clone() for k, v in lenet.state_dict().items()}

    mal = MaliciousPeer(peer, attacks={"gate": gate}, build_model=lambda: type(lenet)(1, 10, (16, 16)),
                        fetch_weights=fetch, report=lambda h, a, r: reports.append((h.update_id, a, r)),
                        input_shape=(1, 16, 16), num_classes=10, queue_size=queue_size, device="cpu")
    return peer, mal, gate, reports, fetched


def _update(lenet, i: int, batch: int = 1) -> Update:
    header = UpdateHeader(f"h/r{i}", "h", "h", 1, 0, batch)
    return Update(header, {n: torch.randn_like(p) for n, p in lenet.named_parameters()})


def test_capture_never_blocks_and_drops_when_full(digits_data, lenet) -> None:
    _peer, mal, gate, reports, fetched = _setup(digits_data, lenet, queue_size=2)
    mal.start()
    try:
        mal.accept_update(_update(lenet, 0))
        assert _wait(lambda: not mal._queue.qsize() and mal._busy.is_set())
        # The worker is stuck in an attack; accepting must still return at once.
        for i in range(1, 5):
            mal.accept_update(_update(lenet, i))
        assert mal.stats["captured"] == 3 and mal.stats["dropped"] == 2
        assert mal.queue_depth() == 2
        gate.release.set()
        assert mal.wait_idle(10)
        assert [r[0] for r in reports] == ["h/r0", "h/r1", "h/r2"]
        assert fetched[0] == ("h", 0)
        obs = gate.seen[0]
        assert obs.batch_size == 1 and obs.gradients[0].dtype == torch.float32
    finally:
        gate.release.set()
        mal.stop()


def test_rejected_updates_are_not_captured(digits_data, lenet) -> None:
    _peer, mal, _gate, _reports, _fetched = _setup(digits_data, lenet)
    bad = _update(lenet, 9)
    bad = Update(bad.header, {k: v for k, v in list(bad.tensors.items())[1:]})
    try:
        mal.accept_update(bad)
    except UpdateRejected:
        pass
    else:
        raise AssertionError("malformed update accepted")
    assert mal.stats["captured"] == 0 and mal.queue_depth() == 0


def test_worker_survives_a_failing_fetch_and_skips_large_batches(digits_data, lenet) -> None:
    _peer, mal, gate, reports, _f = _setup(digits_data, lenet, queue_size=4)
    gate.release.set()
    mal._fetch = lambda s, v: (_ for _ in ()).throw(RuntimeError("gone"))
    mal.start()
    try:
        mal.accept_update(_update(lenet, 1))
        mal.accept_update(_update(lenet, 2, batch=64))
        assert mal.wait_idle(10)
        assert mal.stats["failed"] == 1 and mal.stats["skipped"] == 1 and not reports
    finally:
        mal.stop()


def _wait(cond, timeout: float = 5.0) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_every_registered_attack_runs_in_the_malicious_peer(digits_data, lenet) -> None:
    from attacker.api import ATTACKS, AttackConfig, compute_gradients, create_attack

    peer = Peer("m", lenet, digits_data.images[:50], digits_data.labels[:50], batch_size=1,
                defence=parse_defence("none"), lr=0.1, keep_versions=8, seed=0)
    x = torch.from_numpy(digits_data.images[:1])
    y = torch.from_numpy(digits_data.labels[:1])
    grads = compute_gradients(lenet, x, y)
    names = [n for n, _ in lenet.named_parameters()]
    reports: list = []
    attacks = {name: create_attack(name, AttackConfig(max_iters=5, seed=0)) for name in ATTACKS}
    mal = MaliciousPeer(peer, attacks=attacks, build_model=lambda: type(lenet)(1, 10, (16, 16)),
                        fetch_weights=lambda s, v: {k: t.clone() for k, t in lenet.state_dict().items()},
                        report=lambda h, a, r: reports.append((a, r)), input_shape=(1, 16, 16),
                        num_classes=10, queue_size=2, device="cpu")
    mal.start()
    try:
        mal.accept_update(Update(UpdateHeader("v/r1", "v", "v", 1, 0, 1), dict(zip(names, grads))))
        assert mal.wait_idle(120)
    finally:
        mal.stop()
    assert sorted(a for a, _ in reports) == sorted(ATTACKS)
    assert all(r.images.shape == (1, 1, 16, 16) for _, r in reports)
