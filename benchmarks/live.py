"""The live network end to end: does the attacker keep up, and does the network scale here?

Runs `gradleak run` in-process (a local Ray) at each number of honest peers and prints,
per run: the attacker's coverage (attacked / received), receive-to-score latency p50 /
p95, reconstructions per batch size in each tenth of the run, local steps per second
per peer, honest accuracy at the end, and the peak memory of every process the run
started (summed RSS of this process and its descendants, sampled every 0.5 s).

    .venv/bin/python benchmarks/live.py                     # the default demo
    .venv/bin/python benchmarks/live.py --peers 4,16,32     # and larger networks

Targets (issue 10): coverage >= 50% on the default demo, every tenth of the run has
reconstructions of every batch size, p95 latency <= 5 s, honest accuracy >= 0.85, and
32 honest peers + the attacker run to completion on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Self

import numpy as np

from gradleak.config import RunConfig, from_dict
from gradleak.runner import run


def tree_rss_bytes(root: int) -> int:
    """Summed resident memory of `root` and all its descendants, from /proc."""
    parent: dict[int, int] = {}
    rss: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            status = (proc / "status").read_text()
        except OSError:
            continue
        parent[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        line = next((x for x in status.splitlines() if x.startswith("VmRSS:")), None)
        rss[int(proc.name)] = int(line.split()[1]) * 1024 if line else 0
    children: dict[int, list[int]] = defaultdict(list)
    for pid, ppid in parent.items():
        children[ppid].append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


class PeakMemory:
    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, tree_rss_bytes(os.getpid()))

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def figures(run_dir: Path, peak: int) -> dict[str, Any]:
    """The benchmark's figures of one finished run directory."""
    summary = json.loads((run_dir / "summary.json").read_text())
    recs = _jsonl(run_dir / "reconstructions.jsonl")
    updates = _jsonl(run_dir / "updates.jsonl")
    a = summary.get("attacker", {})
    sent = [u["sent_at"] for u in updates]
    t0, t1 = (min(sent), max(sent)) if sent else (0.0, 1.0)
    tenths: dict[int, Counter[int]] = {k: Counter() for k in range(10)}
    for r in recs:
        at = r.get("received_at")
        if at is not None and t1 > t0:
            tenths[min(9, max(0, int(10 * (at - t0) / (t1 - t0))))][r["batch_size"]] += 1
    per_origin: dict[str, list[float]] = defaultdict(list)
    for u in updates:
        per_origin[u["origin"]].append(u["sent_at"])
    rates = [(len(set(v)) - 1) / (max(v) - min(v)) for v in per_origin.values() if max(v) > min(v)]
    latency = [r["scored_at"] - r["received_at"] for r in recs if r.get("scored_at") and r.get("received_at")]
    honest = [v for k, v in (summary.get("honest_accuracy") or {}).items()]
    sizes = sorted({r["batch_size"] for r in recs})
    return {
        "received": a.get("received"), "attacked": a.get("attacked"), "coverage": a.get("coverage"),
        "evicted": a.get("evicted"),
        "latency_p50_s": float(np.percentile(latency, 50)) if latency else None,
        "latency_p95_s": float(np.percentile(latency, 95)) if latency else None,
        "tenths": [{str(b): tenths[k][b] for b in sizes} for k in range(10)],
        "tenths_all_sizes": sum(all(tenths[k][b] > 0 for b in sizes) for k in range(10)),
        "steps_per_s_per_peer": float(np.mean(rates)) if rates else None,
        "honest_accuracy_min": min(honest) if honest else None,
        "honest_accuracy_mean": float(np.mean(honest)) if honest else None,
        "peak_memory_gib": peak / 2**30, "seconds": summary.get("seconds"),
        "steps": summary.get("steps"), "reconstructions": len(recs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", default="4", help="numbers of honest peers, e.g. 4,16,32")
    ap.add_argument("--rounds", type=int, default=None, help="local steps per peer (default: the demo's)")
    ap.add_argument("--period", type=float, default=None, help="seconds between steps (default: the demo's)")
    ap.add_argument("--max-age", type=float, default=None,
                    help="attack.max_age_s: queued updates older than this are evicted (default: the demo's)")
    ap.add_argument("--malicious", type=int, default=1,
                    help="attack.count: colluding malicious peers (default 1); coverage is the pool's")
    ap.add_argument("--out", default="runs/bench-live")
    args = ap.parse_args()
    rows = []
    for n in [int(x) for x in args.peers.split(",")]:
        gossip: dict[str, Any] = {}
        if args.rounds:
            gossip["rounds"] = args.rounds
        if args.period is not None:
            gossip["period_s"] = (args.period,)
        attack: dict[str, Any] = {} if args.max_age is None else {"max_age_s": args.max_age}
        if args.malicious != 1:
            attack["count"] = args.malicious
        cfg: RunConfig = from_dict({"out_dir": args.out, "peers": {"honest": n}, "gossip": gossip,
                                    "attack": attack, "telemetry": {"metrics_port": 0}}).validate()
        t0 = time.monotonic()
        with PeakMemory() as mem:
            result = run(cfg, progress=lambda s: print("  " + s, flush=True))
        fig = figures(result.run_dir, mem.peak)
        fig["wall_s"] = time.monotonic() - t0
        rows.append((n, fig))
        print(json.dumps({"honest_peers": n, **fig}, indent=1), flush=True)
    print("\n| honest peers | coverage | latency p50 / p95 s | tenths with every batch size | steps/s/peer "
          "| honest acc min / mean | peak memory GiB | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for n, f in rows:
        cov = "-" if f["coverage"] is None else f"{f['coverage']:.0%} ({f['attacked']}/{f['received']})"
        lat = "-" if f["latency_p50_s"] is None else f"{f['latency_p50_s']:.2f} / {f['latency_p95_s']:.2f}"
        acc = "-" if f["honest_accuracy_min"] is None else \
            f"{f['honest_accuracy_min']:.2f} / {f['honest_accuracy_mean']:.2f}"
        rate = "-" if f["steps_per_s_per_peer"] is None else f"{f['steps_per_s_per_peer']:.2f}"
        print(f"| {n} | {cov} | {lat} | {f['tenths_all_sizes']}/10 | {rate} | {acc} | "
              f"{f['peak_memory_gib']:.1f} | {f['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
