"""The attack scheduler: fair across groups, freshest first, bounded, nothing lost silently."""

from __future__ import annotations

import threading
import time

import pytest

from attacker.scheduler import Scheduler


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_burst_into_a_slow_worker_attacks_the_freshest_of_every_group() -> None:
    """100 updates across 4 groups arrive while a slow attack runs: the worker gets the
    freshest ones, every group some, evictions are counted and the books balance."""
    clock = Clock()
    evicted: list[tuple[str, str]] = []
    s = Scheduler(capacity=8, clock=clock, on_evict=lambda job, why: evicted.append((job.key, why)))
    groups = [(1, "none"), (2, "none"), (4, "prune"), (8, "noise")]
    attacked: list[str] = []
    for i in range(100):
        clock.t = float(i)
        s.put(f"u{i}", groups[i % 4], payload=i)
        if i % 10 == 9:  # the slow attack finishes one job every 10 arrivals
            job = s.take(timeout=0)
            assert job is not None
            attacked.append(job.key)
            s.done(job)
        assert s.counts().balanced
    while (job := s.take(timeout=0)) is not None:  # drain
        attacked.append(job.key)
        s.done(job)
    c = s.counts()
    assert c.received == 100 and c.pending == 0 and c.in_flight == 0
    assert c.attacked == len(attacked) == 17  # 10 mid-burst + the 7 left pending
    assert c.evicted == {"capacity": 83} and len(evicted) == 83
    assert c.balanced
    # Every job taken mid-burst was the freshest of its group at that moment: i.e.
    # from the last 8 arrivals (capacity), never an old one.
    mid = [int(k[1:]) for k in attacked[:10]]
    assert all(9 + 10 * n - idx < 8 for n, idx in enumerate(mid)), mid
    # Every group got some.
    assert {int(k[1:]) % 4 for k in attacked} == {0, 1, 2, 3}
    # The evicted are the stalest ones: none of the last 8 arrivals was evicted.
    assert not {k for k, _ in evicted} & {f"u{i}" for i in range(92, 100)}


def test_fair_across_groups_even_when_one_group_floods() -> None:
    clock = Clock()
    s = Scheduler(capacity=100, clock=clock)
    for i in range(50):
        clock.t = float(i)
        s.put(f"a{i}", "big")
    s.put("b0", "rare")
    s.put("c0", "other")
    order = []
    for _ in range(4):
        job = s.take(timeout=0)
        assert job is not None
        order.append(job.key)
        s.done(job)
    # Never-served groups first, freshest first; then round robin.
    assert set(order[:3]) == {"a49", "b0", "c0"}
    assert order[3] == "a48"


def test_freshest_first_within_a_group() -> None:
    clock = Clock()
    s = Scheduler(capacity=10, clock=clock)
    for i in range(5):
        clock.t = float(i)
        s.put(f"u{i}", "g")
    keys = []
    while (job := s.take(timeout=0)) is not None:
        keys.append(job.key)
        s.done(job)
    assert keys == ["u4", "u3", "u2", "u1", "u0"]


def test_capacity_evicts_the_stalest_not_the_newcomer() -> None:
    clock = Clock()
    s = Scheduler(capacity=2, clock=clock)
    for i, g in enumerate(["a", "b", "a"]):
        clock.t = float(i)
        s.put(f"u{i}", g)
    c = s.counts()
    assert c.evicted == {"capacity": 1} and c.pending == 2 and c.balanced
    keys = set()
    while (job := s.take(timeout=0)) is not None:
        keys.add(job.key)
        s.done(job)
    assert keys == {"u1", "u2"}


def test_stale_jobs_are_evicted_on_take() -> None:
    clock = Clock()
    seen: list[str] = []
    s = Scheduler(capacity=10, max_age_s=5.0, clock=clock, on_evict=lambda j, why: seen.append(why))
    s.put("old", "a")
    clock.t = 3.0
    s.put("mid", "b")
    clock.t = 6.0
    job = s.take(timeout=0)
    assert job is not None and job.key == "mid"
    s.done(job)
    c = s.counts()
    assert c.evicted == {"stale": 1} and seen == ["stale"] and c.attacked == 1 and c.balanced
    clock.t = 100.0
    s.put("new", "a")
    assert s.take(timeout=0).key == "new"  # type: ignore[union-attr]


def test_discard_and_refuse_count_by_reason() -> None:
    s = Scheduler(capacity=4)
    s.put("u0", "a")
    s.refuse("u1", "b", "batch_too_large")
    job = s.take(timeout=0)
    assert job is not None
    c = s.counts()
    assert c.in_flight == 1 and c.balanced
    s.discard(job, "version_gone")
    c = s.counts()
    assert c.evicted == {"batch_too_large": 1, "version_gone": 1} and c.received == 2 and c.balanced
    assert c.coverage == 0.0
    with pytest.raises(ValueError, match="not in flight"):
        s.done(job)


def test_take_blocks_until_a_put_and_stop_wakes_it() -> None:
    s = Scheduler(capacity=4)
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(s.take()))
    t.start()
    time.sleep(0.05)
    s.put("u0", "a")
    t.join(2)
    assert got and got[0] is not None
    t = threading.Thread(target=lambda: got.append(s.take()))
    t.start()
    time.sleep(0.05)
    start = time.monotonic()
    s.stop()
    t.join(2)
    assert not t.is_alive() and got[-1] is None and time.monotonic() - start < 1.0
    assert s.take(timeout=0) is None


def test_validation() -> None:
    with pytest.raises(ValueError, match="capacity"):
        Scheduler(capacity=0)
    with pytest.raises(ValueError, match="max_age_s"):
        Scheduler(capacity=1, max_age_s=0)


def test_fair_by_attacker_time_cheap_groups_are_attacked_more_often() -> None:
    """A group of cheap problems is not held to the rate of a group of slow ones."""
    sched = Scheduler(100)
    for i in range(40):
        sched.put(f"cheap/{i}", "cheap")
        sched.put(f"slow/{i}", "slow")
    taken: dict[str, int] = {"cheap": 0, "slow": 0}
    for _ in range(30):
        job = sched.take(timeout=1)
        assert job is not None
        if job.group == "slow":
            time.sleep(0.02)  # a slow attack; the cheap ones take no time
        taken[str(job.group)] += 1
        sched.done(job)
    assert taken["slow"] >= 1 and taken["cheap"] >= 3 * taken["slow"], taken


def test_a_group_back_from_idle_does_not_get_a_monopoly() -> None:
    sched = Scheduler(100)
    for i in range(10):
        sched.put(f"a/{i}", "a")
    for _ in range(10):  # only a is backlogged: it accumulates attack time alone
        job = sched.take(timeout=1)
        assert job is not None
        time.sleep(0.005)
        sched.done(job)
    for i in range(10):
        sched.put(f"a/{10 + i}", "a")
        sched.put(f"b/{i}", "b")  # b joins late, at a's level, not at zero
    order = []
    for _ in range(8):
        job = sched.take(timeout=1)
        assert job is not None
        time.sleep(0.005)
        order.append(job.group)
        sched.done(job)
    assert order.count("a") >= 2, order  # b has no monopoly
