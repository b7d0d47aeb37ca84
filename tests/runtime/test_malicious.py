"""The malicious peer's capture path, driven in-process with a fake attack (pure logic)."""

import threading
import time

import torch

from attacker.api import Attack, Observation, Reconstruction
from gradleak.runtime.malicious import MaliciousPeer
from p2p.defences import parse_defence
from p2p.errors import UpdateRejected, VersionNotFound
from p2p.peer import InboxLimits, Peer
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


def _setup(digits_data, lenet, queue_size=2, attack=None, **kw):
    # The burst test files 100 updates of one origin before any apply: above the default cap.
    peer = Peer("m", lenet, digits_data.images[:50], digits_data.labels[:50], batch_size=1,
                defence=parse_defence("none"), lr=0.1, keep_versions=8, seed=0,
                inbox=InboxLimits(max_pending_per_origin=128))
    gate = attack or _Gate()
    reports, fetched = [], []

    def fetch(sender, version):
        fetched.append((sender, version))
        return {k: v.clone() for k, v in lenet.state_dict().items()}

    mal = MaliciousPeer(peer, attacks={"gate": gate}, build_model=lambda: type(lenet)(1, 10, (16, 16)),
                        fetch_weights=fetch,
                        report=lambda h, a, r, at: reports.append((h.update_id, a, r, at)),
                        input_shape=(1, 16, 16), num_classes=10, queue_size=queue_size, device="cpu", **kw)
    return peer, mal, gate, reports, fetched


def _update(lenet, i: int, batch: int = 1, defence: str = "none", origin: str = "h") -> Update:
    header = UpdateHeader(f"{origin}/r{i}", origin, origin, i + 1, 0, batch, defence)
    return Update(header, {n: torch.randn_like(p) for n, p in lenet.named_parameters()})


def _balanced(status: dict) -> bool:
    return status["received"] == (status["attacked"] + sum(status["evicted"].values())
                                  + status["pending"] + status["in_flight"])


def test_capture_never_blocks_and_evicts_the_stalest_when_full(digits_data, lenet) -> None:
    _peer, mal, gate, reports, fetched = _setup(digits_data, lenet, queue_size=2)
    mal.start()
    try:
        mal.accept_update(_update(lenet, 0))
        assert _wait(lambda: mal.status()["in_flight"] == 1)
        # The worker is stuck in an attack; accepting must still return at once.
        for i in range(1, 5):
            mal.accept_update(_update(lenet, i))
        st = mal.status()
        assert st["received"] == 5 and st["evicted"] == {"capacity": 2} and st["pending"] == 2
        assert st["captured"] == 3 and st["dropped"] == 2 and _balanced(st)
        assert mal.queue_depth() == 2
        gate.release.set()
        assert mal.wait_idle(10)
        assert [r[0] for r in reports] == ["h/r0", "h/r4", "h/r3"]  # the freshest, newest first
        assert fetched[0] == ("h", 0)
        obs = gate.seen[0]
        assert obs.batch_size == 1 and obs.gradients[0].dtype == torch.float32
        st = mal.status()
        assert st["attacked"] == 3 and st["coverage"] == 3 / 5 and _balanced(st)
        assert all(abs(r[3] - time.time()) < 60 for r in reports)  # received_at is wall clock
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
    assert mal.status()["received"] == 0 and mal.queue_depth() == 0


def test_worker_survives_failing_fetches_and_counts_every_reason(digits_data, lenet) -> None:
    _peer, mal, gate, reports, _f = _setup(digits_data, lenet, queue_size=4)
    gate.release.set()

    def fetch(sender, version):
        if sender == "gone":
            raise VersionNotFound(f"{sender} no longer holds version {version}")
        raise RuntimeError("link down")

    mal._fetch = fetch
    mal.start()
    try:
        mal.accept_update(_update(lenet, 1))
        mal.accept_update(_update(lenet, 2, batch=64))
        mal.accept_update(_update(lenet, 3, origin="gone"))
        assert mal.wait_idle(10)
        st = mal.status()
        assert st["evicted"] == {"failed": 1, "batch_too_large": 1, "version_gone": 1}
        assert st["received"] == 3 and st["attacked"] == 0 and _balanced(st) and not reports
        assert st["latency_p50_s"] is None and st["coverage"] == 0.0
    finally:
        mal.stop()


class _Slow(Attack):
    """A deliberately slow attack: SECONDS per update, recording what it was given."""

    SECONDS = 0.05

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.release.set()

    def reconstruct(self, model, obs, *, callback=None):  # type: ignore[override]
        self.release.wait(10)
        time.sleep(self.SECONDS)
        b = obs.batch_size
        return Reconstruction(torch.zeros(b, *obs.input_shape), torch.zeros(b, dtype=torch.int64),
                              {"seconds": self.SECONDS})


def test_burst_of_100_updates_into_a_slow_attack(digits_data, lenet) -> None:
    """The acceptance test: 100 updates in 4 (batch size, defence) groups arrive at once
    while a slow attack runs; the freshest are attacked, every group gets some,
    evictions are counted and no update is lost silently."""
    slow = _Slow()
    slow.release.clear()  # the first update holds the worker while the burst arrives
    _peer, mal, _g, reports, _f = _setup(digits_data, lenet, queue_size=12, attack=slow)
    groups = [(1, "none"), (2, "none"), (1, "fp16"), (4, "none")]
    mal.start()
    try:
        for i in range(100):
            batch, defence = groups[i % 4]
            mal.accept_update(_update(lenet, i, batch=batch, defence=defence))
            if i == 0:
                assert _wait(lambda: mal.status()["in_flight"] == 1)
        st = mal.status()
        assert st["received"] == 100 and st["pending"] == 12 and _balanced(st)
        assert st["evicted"] == {"capacity": 87}
        slow.release.set()
        assert mal.wait_idle(30)
    finally:
        mal.stop()
    st = mal.status()
    attacked = [int(r[0].split("/r")[1]) for r in reports]
    assert st["attacked"] == len(attacked) == len(set(attacked))
    assert st["attacked"] == 13 and st["evicted"] == {"capacity": 87}
    assert _balanced(st) and st["pending"] == 0 and st["in_flight"] == 0
    assert st["coverage"] == st["attacked"] / 100
    # The freshest: after the one in flight, the last 12 of the burst, the newest first
    # within each group, the groups in turn.
    assert attacked[0] == 0 and sorted(attacked[1:]) == list(range(88, 100)), attacked
    # The three groups not yet attacked come first, each with its newest; update 0's group,
    # which held the worker the longest, waits its turn (fair by attacker time).
    assert attacked[1:4] == [99, 98, 97]
    # Every group got some.
    assert {i % 4 for i in attacked} == {0, 1, 2, 3}
    # Latency quantiles from receive to score, in order.
    assert 0 <= st["latency_p50_s"] <= st["latency_p95_s"] < 30


def test_stale_updates_are_evicted(digits_data, lenet) -> None:
    slow = _Slow()
    _peer, mal, _g, reports, _f = _setup(digits_data, lenet, queue_size=50, attack=slow, max_age_s=0.2)
    try:
        for i in range(5):
            mal.accept_update(_update(lenet, i))
        time.sleep(0.3)
        mal.accept_update(_update(lenet, 5))
        mal.start()
        assert mal.wait_idle(10)
    finally:
        mal.stop()
    st = mal.status()
    assert st["evicted"] == {"stale": 5} and st["attacked"] == 1 and _balanced(st)
    assert [r[0] for r in reports] == ["h/r5"]


def test_auto_picks_the_first_supporting_attack_of_the_chain(digits_data, lenet) -> None:
    from attacker.api import AttackConfig, create_attack

    peer = Peer("m", lenet, digits_data.images[:50], digits_data.labels[:50], batch_size=1,
                defence=parse_defence("none"), lr=0.1, keep_versions=8, seed=0)
    reports: list = []
    config = AttackConfig(max_iters=5, time_budget_s=5.0)
    mal = MaliciousPeer(peer, fallback=[create_attack(n, config) for n in ("analytic", "idlg")],
                        build_model=lambda: type(lenet)(1, 10, (16, 16)),
                        fetch_weights=lambda s, v: {k: t.clone() for k, t in lenet.state_dict().items()},
                        report=lambda h, a, r, at: reports.append(a), input_shape=(1, 16, 16),
                        num_classes=10, queue_size=4, max_batch_size=16, device="cpu")
    mal.start()
    try:
        mal.accept_update(_update(lenet, 0, batch=1))
        mal.accept_update(_update(lenet, 1, batch=12))  # wider than the 10 classes: not analytic
        assert mal.wait_idle(120)
    finally:
        mal.stop()
    st = mal.status()
    assert st["chosen"] == {"analytic": 1, "idlg": 1}, st
    assert st["attacked"] == 2 and _balanced(st)


def _wait(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_every_registered_attack_runs_in_the_malicious_peer(digits_data, lenet) -> None:
    from attacker.api import ATTACKS, AttackConfig, Observation, compute_gradients, create_attack

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
                        report=lambda h, a, r, at: reports.append((a, r)), input_shape=(1, 16, 16),
                        num_classes=10, queue_size=2, device="cpu")
    mal.start()
    try:
        mal.accept_update(Update(UpdateHeader("v/r1", "v", "v", 1, 0, 1), dict(zip(names, grads))))
        assert mal.wait_idle(120)
    finally:
        mal.stop()
    # Every attack that supports LeNet reports; one that says it does not (spear needs a
    # fully connected first layer) fails with its reason and the others still run.
    obs = Observation(tuple(grads), 1, (1, 16, 16), 10)
    supported = sorted(n for n, a in attacks.items() if a.supports(lenet, obs) is None)
    assert "analytic" in supported and "spear" in ATTACKS and "spear" not in supported
    assert sorted(a for a, _ in reports) == supported
    assert all(r.images.shape == (1, 1, 16, 16) for _, r in reports)


def test_attacker_metrics_use_fixed_label_grids(digits_data, lenet) -> None:
    from prometheus_client import generate_latest

    from gradleak.runtime.malicious_node import _PromObserver
    from gradleak.runtime.telemetry import Metrics

    m = Metrics()
    slow = _Slow()
    _peer, mal, _g, _r, _f = _setup(digits_data, lenet, queue_size=1, attack=slow, observer=_PromObserver(m))
    mal.accept_update(_update(lenet, 0, defence="fp16"))
    mal.accept_update(_update(lenet, 1, defence="fp16"))  # evicts update 0 (capacity)
    mal.accept_update(_update(lenet, 2, batch=64))  # batch_too_large
    mal.start()
    try:
        assert mal.wait_idle(10)
    finally:
        mal.stop()
    text = generate_latest(m.registry).decode()
    for line in (
        'gradleak_attacker_updates_received_total{batch_size="1",defence="fp16"} 2.0',
        'gradleak_attacker_updates_attacked_total{batch_size="1",defence="fp16"} 1.0',
        'gradleak_attacker_updates_evicted_total{reason="capacity"} 1.0',
        'gradleak_attacker_updates_evicted_total{reason="batch_too_large"} 1.0',
        'gradleak_attacker_latency_seconds_count{attack="gate",batch_size="1",defence="fp16"} 1.0',
        "gradleak_attack_captured_total 3.0", "gradleak_attack_dropped_total 1.0",
    ):
        assert line in text, line
    coverage = [ln for ln in text.splitlines() if ln.startswith("gradleak_attacker_coverage_ratio ")]
    assert coverage and abs(float(coverage[0].split()[1]) - 1 / 3) < 1e-9
    assert "h/r" not in text  # never an update id as a label value


def test_a_colluder_leaves_an_update_another_took_to_it(digits_data, lenet) -> None:
    claims: dict[str, str] = {"h/r1": "other"}  # the shared pool: another colluder already took h/r1
    _peer, mal, gate, reports, _f = _setup(digits_data, lenet, queue_size=4,
                                           claim=lambda uid: claims.setdefault(uid, "me") == "me")
    gate.release.set()
    mal.start()
    try:
        for i in range(3):
            mal.accept_update(_update(lenet, i))
        assert mal.wait_idle(10)
        st = mal.status()
        assert sorted(r[0] for r in reports) == ["h/r0", "h/r2"] and st["attacked"] == 2
        assert st["evicted"] == {"colluder": 1} and _balanced(st)
        assert claims == {"h/r0": "me", "h/r1": "other", "h/r2": "me"}
    finally:
        mal.stop()


def test_updates_from_a_colluder_are_refused_not_attacked(digits_data, lenet) -> None:
    # A colluder's own updates carry no private batch of an honest peer: attacking them only
    # burns the worker's time (the evaluator has no truth to score them against).
    _peer, mal, gate, reports, _f = _setup(digits_data, lenet, queue_size=4, colluders=("c",))
    gate.release.set()
    mal.start()
    try:
        mal.accept_update(_update(lenet, 0, origin="c"))
        mal.accept_update(_update(lenet, 1, origin="h"))
        assert mal.wait_idle(10)
        st = mal.status()
        assert [r[0] for r in reports] == ["h/r1"] and st["attacked"] == 1
        assert st["evicted"] == {"from_colluder": 1} and _balanced(st)
    finally:
        mal.stop()


def test_its_own_shard_reaches_the_attack_as_label_prior(digits_data, lenet) -> None:
    from attacker.label_prior import LabelPrior

    shard = LabelPrior.from_data(torch.as_tensor(digits_data.images[:50]),
                                 torch.as_tensor(digits_data.labels[:50]), 10)
    gate = _Gate()
    gate.release.set()
    _peer, mal, _gate, reports, _fetched = _setup(digits_data, lenet, attack=gate, label_prior=shard)
    mal.start()
    try:
        mal.accept_update(_update(lenet, 0))
        assert mal.wait_idle(10) and reports
        assert gate.seen[0].label_prior is shard
    finally:
        mal.stop()


def test_own_shard_becomes_a_capped_label_prior_or_none(digits_data) -> None:
    from types import SimpleNamespace

    from gradleak.runtime.malicious_node import AUX_SAMPLES, _own_shard

    spec = SimpleNamespace(shard_images=digits_data.images, shard_labels=digits_data.labels, num_classes=10)
    prior = _own_shard(spec)  # type: ignore[arg-type]
    assert prior is not None and prior.labels.numel() == min(AUX_SAMPLES, len(digits_data.labels))
    bad = SimpleNamespace(shard_images=digits_data.images[:4], shard_labels=digits_data.labels[:4] + 10,
                          num_classes=10)
    assert _own_shard(bad) is None  # type: ignore[arg-type]
