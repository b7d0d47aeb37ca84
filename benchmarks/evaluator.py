"""How many ground truths per second one evaluator files: the bound a 1,000-peer run meets first.

    .venv/bin/python benchmarks/evaluator.py                 # ~1 minute
    .venv/bin/python benchmarks/evaluator.py --callers 16 --batch-size 8

Every honest peer hands the evaluator its private batch once per local step and waits
for it (gradleak/runtime/peer_node.py: share_truth), so a run's steps per second across
all peers cannot exceed what one evaluator files per second. Three figures, same run:

- in-process: `Evaluator.register_truth` called in a loop, first with the truth written
  to RUN_DIR/truth/ (the first 4,096 of a run are), then held in memory only;
- through Ray: C caller threads, each `ray.get(actor.register_truth.remote(...))` back to
  back as peers do, against the EvaluatorActor the runner starts;
- the baseline: the same callers on a no-op method of a trivial actor (Ray's own cost
  per call on this machine), so the ratio says what filing a truth adds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray

from gradleak.runtime.evaluation import Evaluator
from gradleak.runtime.evaluator_node import EvaluatorActor
from gradleak.runtime.evaluator_shards import EvaluatorShards
from gradleak.runtime.record import RunRecord


@ray.remote
class Noop:
    def call(self, *args: Any, **kwargs: Any) -> None:
        return None

    def pid(self) -> int:
        return os.getpid()


def batch(b: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return rng.random((b, 1, size, size), dtype=np.float32), rng.integers(0, 10, b)


def in_process(n: int, b: int, size: int, persist: bool) -> float:
    rng = np.random.default_rng(0)
    images, labels = batch(b, size, rng)
    with tempfile.TemporaryDirectory() as d:
        ev = Evaluator(RunRecord(d), keep_truths=n + 1, persist_truths=persist)
        t0 = time.perf_counter()
        for i in range(n):
            ev.register_truth(f"peer-{i % 64}/r{i}", images, labels, origin=f"peer-{i % 64}", round=i,
                              defence="none", model_version=i)
        return n / (time.perf_counter() - t0)


def through_ray(actor: Any, method: str, callers: int, seconds: float, b: int, size: int) -> float:
    """Calls per second of C threads calling actor.method back to back (actor: a handle, or
    EvaluatorShards, each call then going to its update's shard as the peers' do)."""
    shards = actor if isinstance(actor, EvaluatorShards) else None
    images, labels = batch(b, size, np.random.default_rng(1))
    done = [0] * callers
    stop = time.perf_counter() + seconds

    def caller(k: int) -> None:
        i = 0
        while time.perf_counter() < stop:
            uid = f"c{k}/r{i}"
            target = shards.for_update(uid) if shards is not None else actor
            ray.get(getattr(target, method).remote(uid, images, labels, origin=f"c{k}", round=i,
                                                  defence="none", model_version=i))
            i += 1
        done[k] = i

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(callers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - t0)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--callers", type=int, default=8, help="concurrent peers calling the actor")
    p.add_argument("--seconds", type=float, default=10.0, help="per Ray measurement")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--n", type=int, default=4000, help="calls per in-process measurement")
    p.add_argument("--shards", default="2,4", help="evaluator shard counts to measure too (comma-separated)")
    a = p.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; "
          f"batch {a.batch_size} x {a.image_size}x{a.image_size}")
    disk = in_process(a.n, a.batch_size, a.image_size, persist=True)
    mem = in_process(a.n, a.batch_size, a.image_size, persist=False)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as d:
            ev = EvaluatorActor.options(num_cpus=0).remote(d)
            noop = Noop.options(num_cpus=0).remote()
            ray.get([ev.pid.remote(), noop.call.remote()])
            noop_pid = ray.get(noop.pid.remote())
            cpu0 = cpu_seconds([noop_pid])
            base = through_ray(noop, "call", a.callers, a.seconds, a.batch_size, a.image_size)
            per_noop = (cpu_seconds([noop_pid]) - cpu0) / max(1.0, base * a.seconds)
            pid = ray.get(ev.pid.remote())
            cpu0 = cpu_seconds([pid])
            real = through_ray(ev, "register_truth", a.callers, a.seconds, a.batch_size, a.image_size)
            per_truth = (cpu_seconds([pid]) - cpu0) / max(1.0, real * a.seconds)
            sharded = []
            for n in [int(x) for x in a.shards.split(",") if x]:
                handles = [EvaluatorActor.options(num_cpus=0).remote(d, shard=k, shards=n) for k in range(n)]
                ray.get([h.pid.remote() for h in handles])
                rate = through_ray(EvaluatorShards(handles), "register_truth", a.callers, a.seconds,
                                   a.batch_size, a.image_size)
                sharded.append((n, rate))
                for h in handles:
                    ray.kill(h)
    finally:
        ray.shutdown()
    print("| path | truths/s | vs Ray no-op |")
    print("|---|---|---|")
    print(f"| in-process, written to disk | {disk:,.0f} | |")
    print(f"| in-process, memory only | {mem:,.0f} | |")
    print(f"| Ray no-op call, {a.callers} callers (baseline) | {base:,.0f} | 1.00 |")
    print(f"| Ray EvaluatorActor.register_truth, {a.callers} callers | {real:,.0f} | {real / base:.2f} |")
    print(f"the evaluator's own CPU per truth filed: {per_truth * 1e3:.2f} ms, so one evaluator on a core of "
          f"its own files up to {1 / per_truth:,.0f} truths/s (a no-op actor: {per_noop * 1e3:.2f} ms per call, "
          "Ray's own share); the rest of a call's time is the callers'")
    for n, rate in sharded:
        print(f"| Ray, {n} evaluator shards (by update id), {a.callers} callers | {rate:,.0f} | {rate / base:.2f} |")
    print(f"1,000 peers at 4 steps/s file 4,000 truths/s: {4000 / real:.1f} evaluators at this rate")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
