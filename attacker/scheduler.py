"""What to attack next when the attacker cannot attack everything it receives.

Pure and thread-safe: the gRPC threads `put` jobs, one attack worker `take`s them.
A job is an opaque payload with a key (the update id), a group (for example
(batch size, defence)) and the time it was received.

Policy:
- fair across groups by attacker time: `take` serves the group with pending jobs
  that has had the least attack time so far (ties: least recently served, then
  the freshest job), so every group is attacked throughout the run, whatever the
  share of traffic it sends, and a group of cheap problems (batch-1 updates,
  ~0.01 s each) is not held to the rate of a group of slow ones (batches, up to
  the time budget). A group that had nothing pending rejoins at the level of the
  groups still waiting, so a pause never buys it a monopoly later;
- freshest first within a group: the newest job of the chosen group;
- bounded: when full, the stalest job of all is evicted (reason "capacity"), never
  the newcomer; jobs older than `max_age_s` are evicted when a take meets them
  (reason "stale"); the runtime discards a taken job with its own reason
  ("batch_too_large", "unsupported", "version_gone", "failed", ...).

Nothing is lost silently: received == attacked + evicted (all reasons) + pending
+ in_flight at every moment (`Counts.balanced`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

CAPACITY = "capacity"
STALE = "stale"


@dataclass(frozen=True)
class Job:
    key: str  # the update id
    group: Hashable  # e.g. (batch_size, defence)
    received_at: float  # on the scheduler's clock
    payload: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Counts:
    received: int
    attacked: int  # taken jobs marked done
    evicted: dict[str, int]  # by reason, discards included
    pending: int  # waiting in the scheduler
    in_flight: int  # taken, neither done nor discarded yet

    @property
    def balanced(self) -> bool:
        return self.received == self.attacked + sum(self.evicted.values()) + self.pending + self.in_flight

    @property
    def coverage(self) -> float:
        return self.attacked / self.received if self.received else 0.0


Evicted = Callable[[Job, str], None]


class Scheduler:
    """Bounded, group-fair, freshest-first job queue with counted evictions."""

    def __init__(
        self, capacity: int, *, max_age_s: float | None = None,
        clock: Callable[[], float] = time.monotonic, on_evict: Evicted | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if max_age_s is not None and not max_age_s > 0:
            raise ValueError(f"max_age_s must be > 0 or None, got {max_age_s}")
        self.capacity, self.max_age_s, self.clock = capacity, max_age_s, clock
        self._on_evict = on_evict
        self._groups: dict[Hashable, list[Job]] = {}  # each oldest first
        self._served: dict[Hashable, int] = {}  # group -> sequence number of its last take
        self._spent: dict[Hashable, float] = {}  # group -> attack seconds of its settled jobs
        self._started: dict[int, float] = {}  # in-flight job -> when it was taken
        self._seq = 0
        self._pending = 0
        self._in_flight: dict[int, Job] = {}
        self._received = 0
        self._attacked = 0
        self._evicted: dict[str, int] = {}
        self._cond = threading.Condition()
        self._stopped = False

    # -- producers ---------------------------------------------------------------------
    def put(self, key: str, group: Hashable, payload: Any = None, received_at: float | None = None) -> Job:
        """Queue a job; if full, evict the stalest pending job (possibly this one, if it is)."""
        job = Job(key, group, self.clock() if received_at is None else received_at, payload)
        evicted: list[Job] = []
        with self._cond:
            self._received += 1
            jobs = self._groups.setdefault(group, [])
            if not jobs:
                self._rejoin(group)
            # Keep each group sorted by received_at (arrivals are nearly always in order).
            i = len(jobs)
            while i > 0 and jobs[i - 1].received_at > job.received_at:
                i -= 1
            jobs.insert(i, job)
            self._pending += 1
            while self._pending > self.capacity:
                evicted.append(self._pop_stalest())
            for e in evicted:
                self._count(e, CAPACITY)
            self._cond.notify()
        self._notify(evicted, CAPACITY)
        return job

    def refuse(self, key: str, group: Hashable, reason: str, payload: Any = None) -> Job:
        """Count a job received and evicted at once (e.g. a batch the attacker cannot take)."""
        job = Job(key, group, self.clock(), payload)
        with self._cond:
            self._received += 1
            self._count(job, reason)
        self._notify([job], reason)
        return job

    # -- the worker ----------------------------------------------------------------------
    def take(self, timeout: float | None = None) -> Job | None:
        """The next job to attack, waiting up to `timeout` s (None: until one comes or stop())."""
        deadline = None if timeout is None else time.monotonic() + timeout
        stale: list[Job] = []
        try:
            with self._cond:
                while True:
                    stale.extend(self._evict_stale())
                    if self._pending:
                        job = self._pop_next()
                        self._in_flight[id(job)] = job
                        self._started[id(job)] = time.monotonic()
                        return job
                    if self._stopped:
                        return None
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return None
                    self._cond.wait(left)
        finally:
            self._notify(stale, STALE)

    def done(self, job: Job) -> None:
        """The job was attacked."""
        with self._cond:
            self._settle(job)
            self._attacked += 1
            self._cond.notify_all()

    def discard(self, job: Job, reason: str) -> None:
        """The taken job was not attacked, for `reason`."""
        with self._cond:
            self._settle(job)
            self._count(job, reason)
            self._cond.notify_all()
        self._notify([job], reason)

    def stop(self) -> None:
        """Wake every waiting take(); later takes return what is pending, then None."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    # -- views ---------------------------------------------------------------------------
    def counts(self) -> Counts:
        with self._cond:
            return Counts(self._received, self._attacked, dict(self._evicted), self._pending,
                          len(self._in_flight))

    def pending(self) -> int:
        with self._cond:
            return self._pending

    def idle(self) -> bool:
        with self._cond:
            return not self._pending and not self._in_flight

    # -- internals (under the lock) ------------------------------------------------------
    def _pop_stalest(self) -> Job:
        group = min((g for g, jobs in self._groups.items() if jobs),
                    key=lambda g: self._groups[g][0].received_at)
        self._pending -= 1
        return self._groups[group].pop(0)

    def _rejoin(self, group: Hashable) -> None:
        """A group becoming backlogged starts at the least time of those already waiting."""
        waiting = [self._spent.get(g, 0.0) for g, jobs in self._groups.items() if jobs and g != group]
        if waiting:
            self._spent[group] = max(self._spent.get(group, 0.0), min(waiting))

    def _pop_next(self) -> Job:
        # Least attack time first; ties: least recently served (never: -1), then the freshest job.
        group = min((g for g, jobs in self._groups.items() if jobs),
                    key=lambda g: (self._spent.get(g, 0.0), self._served.get(g, -1),
                                   -self._groups[g][-1].received_at))
        self._seq += 1
        self._served[group] = self._seq
        self._pending -= 1
        return self._groups[group].pop()

    def _evict_stale(self) -> list[Job]:
        if self.max_age_s is None:
            return []
        oldest_kept = self.clock() - self.max_age_s
        out: list[Job] = []
        for jobs in self._groups.values():
            while jobs and jobs[0].received_at < oldest_kept:
                job = jobs.pop(0)
                self._pending -= 1
                self._count(job, STALE)
                out.append(job)
        return out

    def _settle(self, job: Job) -> None:
        if self._in_flight.pop(id(job), None) is None:
            raise ValueError(f"job {job.key} is not in flight (settled twice, or never taken)")
        started = self._started.pop(id(job))
        self._spent[job.group] = self._spent.get(job.group, 0.0) + time.monotonic() - started

    def _count(self, job: Job, reason: str) -> None:
        self._evicted[reason] = self._evicted.get(reason, 0) + 1

    def _notify(self, jobs: list[Job], reason: str) -> None:
        if self._on_evict is not None:
            for job in jobs:
                self._on_evict(job, reason)
