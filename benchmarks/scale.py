"""How gradleak scales on one machine: memory per peer, and the live run against the number of peers.

Two parts, each printing the machine's load average beside its figures (the cores may be
shared):

    .venv/bin/python benchmarks/scale.py memory --peers 1,8,32
        One fresh process per count hosts that many LeNet peers the way a PeerHost does
        (own gRPC server, model, optimiser, weight history each; one interpreter and torch),
        gossips `--steps` lock-step rounds among them over loopback gRPC, and reports its
        resident memory and CPU seconds per local step. Memory per additional peer is the
        slope between the smallest and the largest count (target: <= 50 MB).

    .venv/bin/python benchmarks/scale.py live --peers 8,16,32,64 --rounds 150
        `gradleak run` (default workload: digits, LeNet, async gossip, the attacker) at each
        number of honest peers, via benchmarks/live.py's figures; prints local steps per
        second per peer, the fewest local steps any peer made, attacker coverage and peak
        memory, and draws them against the number of peers into docs/scale.png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def host_peers(n: int, steps: int) -> dict[str, Any]:
    """In this process: n LeNet peers as a PeerHost builds them, `steps` gossip rounds, then measure."""
    import torch

    from gradleak.config import from_dict
    from gradleak.data import load_dataset, split
    from gradleak.runtime.peer_node import PeerNode
    from gradleak.specs import peer_spec

    torch.set_num_threads(1)
    cfg = from_dict({"peers": {"honest": max(2, n)}, "gossip": {"sync": "rounds", "rounds": steps}}).validate()
    data = load_dataset("digits", limit=cfg.data.limit, seed=cfg.seed)
    shards, test = split(data, max(2, n), test_fraction=cfg.data.test_fraction, seed=cfg.seed)
    ids = [f"peer-{i}" for i in range(len(shards))]
    base = _rss_bytes()  # interpreter, torch, grpc and the data: what every host process pays once
    nodes = [PeerNode(peer_spec(cfg, i, ids[i], role="honest", shard=shards[i], test=test, data=data,
                                members=tuple(ids), host="127.0.0.1"))
             for i in range(n)]
    book = {x["peer_id"]: x["gossip"] for x in (nd.addresses() for nd in nodes)}
    book.update({p: book[ids[0]] for p in ids if p not in book})  # n = 1: its one neighbour is itself
    for nd in nodes:
        nd.set_members(book)
    cpu0, t0 = time.process_time(), time.monotonic()
    for r in range(1, steps + 1):
        for nd in nodes:
            nd.step(r)
        for nd in nodes:
            nd.apply()
    cpu = time.process_time() - cpu0
    wall = time.monotonic() - t0
    out = {"peers": n, "steps": steps, "rss_mb": _rss_bytes() / 2**20, "base_rss_mb": base / 2**20,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "cpu_ms_per_step": 1000 * cpu / (n * steps), "wall_s": wall,
           "sent_bytes": sum(nd.sent_bytes for nd in nodes), "sent": sum(nd.sent for nd in nodes)}
    for nd in nodes:
        nd.stop()
    return out


def memory(args: argparse.Namespace) -> None:
    rows = []
    for n in [int(x) for x in args.peers.split(",")]:
        load = os.getloadavg()[0]
        cmd = [sys.executable, str(Path(__file__).resolve()), "_host", str(n), str(args.steps)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            sys.exit(f"the {n}-peer host failed:\n{res.stderr[-2000:]}")
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["load_before"] = load
        rows.append(row)
        print(json.dumps(row), flush=True)
    lo, hi = rows[0], rows[-1]
    per_peer = (hi["rss_mb"] - lo["rss_mb"]) / max(1, hi["peers"] - lo["peers"])
    print("\n| peers in one process | RSS MB | RSS before the peers MB | CPU ms per local step | "
          "bytes per message | load average before |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        per_msg = r["sent_bytes"] / r["sent"] if r["sent"] else 0
        print(f"| {r['peers']} | {r['rss_mb']:.0f} | {r['base_rss_mb']:.0f} | {r['cpu_ms_per_step']:.1f} | "
              f"{per_msg:.0f} | {r['load_before']:.2f} |")
    print(f"\nmemory per additional LeNet peer: {per_peer:.1f} MB (target <= 50 MB: "
          f"{'met' if per_peer <= 50 else 'NOT met'})")


def live(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(HERE))
    from live import PeakMemory, figures  # the same figures as benchmarks/live.py

    from gradleak.config import from_dict
    from gradleak.runner import run

    # --append: add to the rows of an earlier invocation (points measured one at a time).
    rows = json.loads(Path(args.json).read_text()) if args.append and Path(args.json).exists() else []
    for n in [int(x) for x in args.peers.split(",")]:
        load = os.getloadavg()[0]
        cfg = from_dict({"out_dir": args.out, "peers": {"honest": n}, "gossip": {"rounds": args.rounds},
                         "telemetry": {"metrics_port": 0}}).validate()
        t0 = time.monotonic()
        with PeakMemory() as mem:
            result = run(cfg, progress=lambda s: print("  " + s, flush=True))
        fig = figures(result.run_dir, mem.peak)
        steps = {k: v for k, v in (fig.get("steps") or {}).items() if k != "mallory"}
        row = {"honest_peers": n, "rounds": args.rounds, "load_before": load, "wall_s": time.monotonic() - t0,
               "completed": not result.interrupted and len(steps) == n,
               "min_steps": min(steps.values()) if steps else 0,
               **{k: fig[k] for k in ("steps_per_s_per_peer", "coverage", "attacked", "received",
                                      "peak_memory_gib", "honest_accuracy_min", "reconstructions")}}
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print("\n| honest peers | completed | min local steps | steps/s/peer | coverage | peak memory GiB "
          "| honest acc min | wall s | load before |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cov = "-" if r["coverage"] is None else f"{r['coverage']:.0%} ({r['attacked']}/{r['received']})"
        rate = "-" if r["steps_per_s_per_peer"] is None else f"{r['steps_per_s_per_peer']:.2f}"
        acc = "-" if r["honest_accuracy_min"] is None else f"{r['honest_accuracy_min']:.2f}"
        print(f"| {r['honest_peers']} | {'yes' if r['completed'] else 'no'} | {r['min_steps']}/{r['rounds']} | "
              f"{rate} | {cov} | {r['peak_memory_gib']:.1f} | {acc} | {r['wall_s']:.0f} | {r['load_before']:.2f} |")
    plot(rows, Path(args.png))


def plot(rows: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["honest_peers"])
    n = [r["honest_peers"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    series = [("local steps / s / peer", [r["steps_per_s_per_peer"] or 0 for r in rows]),
              ("attacker coverage", [r["coverage"] or 0 for r in rows]),
              ("peak memory, GiB (all processes)", [r["peak_memory_gib"] for r in rows])]
    for ax, (title, ys) in zip(axes, series, strict=True):
        ax.plot(n, ys, marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xticks(n, [str(x) for x in n])
        ax.set_xlabel("honest peers")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for r, y in zip(rows, series[0][1], strict=True):  # the cores are shared: say how busy they were
        axes[0].annotate(f"load {r['load_before']:.0f}", (r["honest_peers"], y), fontsize=7,
                         textcoords="offset points", xytext=(4, 4))
    steps = "/".join(str(x) for x in sorted({r["rounds"] for r in rows}))
    fig.suptitle(f"gradleak run, digits/LeNet, async, {steps} steps per peer, 2 shared CPU cores", fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"figure: {png}")


def replot(args: argparse.Namespace) -> None:
    plot(json.loads(Path(args.json).read_text()), Path(args.png))


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "_host":  # the child of `memory`
        print(json.dumps(host_peers(int(sys.argv[2]), int(sys.argv[3]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory", help="memory and CPU per peer in one process")
    m.add_argument("--peers", default="1,8,32")
    m.add_argument("--steps", type=int, default=30, help="lock-step gossip rounds before measuring")
    lv = sub.add_parser("live", help="gradleak run at several numbers of honest peers")
    lv.add_argument("--peers", default="8,16,32,64")
    lv.add_argument("--rounds", type=int, default=150, help="local steps per peer")
    lv.add_argument("--out", default="runs/bench-scale")
    lv.add_argument("--json", default="runs/bench-scale/scale.json")
    lv.add_argument("--append", action="store_true", help="add to the rows already in --json")
    lv.add_argument("--png", default=str(HERE.parent / "docs" / "scale.png"))
    rp = sub.add_parser("plot", help="draw the figure again from --json")
    rp.add_argument("--json", default="runs/bench-scale/scale.json")
    rp.add_argument("--png", default=str(HERE.parent / "docs" / "scale.png"))
    args = ap.parse_args()
    {"memory": memory, "live": live, "plot": replot}[args.what](args)


if __name__ == "__main__":
    main()
