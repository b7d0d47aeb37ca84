"""The gossip-algebra attack on a LIVE run: a line of honest peers + the attacker over real gRPC (Ray).

    PYTHONPATH=$PWD python benchmarks/gossip_leak_live.py [--honest 20] [--rounds 20] [--steps 1]

One `--gossip models --sync rounds` testbed run (batch 1, SGD, lr 0.3, digits 16x16; mallory
sorts first, so it sits at one end of the line); the attack runs at the end of the run as
it always does (RUN_DIR/gossip_attack.json, PSNRs scored by the evaluator). Then, apart
from the run, an in-process float64 replay of the protocol on the run's own specs gives
every true lr * g_k(s), and the values the attacker determined from its transcript are
compared with them: relative error |est - true| / |true| by hop, next to the solver's own
expected error (computed from public quantities only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacker.gossip_algebra import build_knowledge, solve
from gradleak.config import (
    AttackSettings,
    DataConfig,
    GossipConfig,
    PeerConfig,
    RunConfig,
    TelemetryConfig,
)
from gradleak.core.graphs import build_graph, mixing_matrix
from gradleak.data import load_dataset, split
from gradleak.runner import run
from gradleak.runtime.gossip_leak import GossipPublic, shared_model, transcript_inputs
from gradleak.runtime.transcript import TranscriptReader
from gradleak.specs import peer_spec


def true_updates(cfg: RunConfig) -> dict[tuple[str, int], np.ndarray]:
    """lr * g_k(s) of every member, replaying the protocol in float64 on the run's specs."""
    data = load_dataset(cfg.data.dataset, image_size=cfg.data.image_size, limit=cfg.data.limit, seed=cfg.seed)
    shards, test = split(data, cfg.peers.honest + 1, test_fraction=cfg.data.test_fraction, seed=cfg.seed)
    ids = [f"peer-{i}" for i in range(cfg.peers.honest)] + ["mallory"]
    specs = {ids[i]: peer_spec(cfg, i, ids[i], role="malicious" if i == cfg.peers.honest else "honest",
                               shard=shard, test=test, data=data, members=tuple(ids), host="127.0.0.1")
             for i, shard in enumerate(shards)}
    public = GossipPublic.from_config(cfg)
    order = list(public.members)
    w = mixing_matrix(build_graph(cfg.gossip.topology, order, cfg.seed), order, cfg.gossip.mixing)
    model, x0, _names = shared_model(public, data.input_shape, data.num_classes)
    x = np.tile(x0.astype(np.float64), (len(order), 1))
    rngs = {p: np.random.default_rng(specs[p].seed) for p in order}
    out = {}
    for s in range(1, cfg.gossip.rounds + 1):
        z = np.empty_like(x)
        for i, p in enumerate(order):
            sp = specs[p]
            torch.nn.utils.vector_to_parameters(torch.from_numpy(x[i]).float(), model.parameters())
            idx = rngs[p].choice(len(sp.shard_labels), size=sp.batch_size, replace=False)
            loss = F.cross_entropy(model(torch.from_numpy(sp.shard_images[idx])), torch.from_numpy(sp.shard_labels[idx]))
            g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])
            u = np.float32(sp.lr) * g.detach().numpy().astype(np.float32)  # as the peer's float32 step
            out[(p, s)] = u.astype(np.float64)
            z[i] = (x[i].astype(np.float32) - u).astype(np.float64)
        wide = cfg.gossip.model_dtype == "float64"
        for _ in range(cfg.gossip.mix_rounds):  # float32 models: rounded after every round
            z = w @ z if wide else (w @ z).astype(np.float32).astype(np.float64)
        x = z.astype(np.float32).astype(np.float64)  # the peer's model is float32 either way
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--honest", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=20, help="R, averaging rounds per step")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--budget", type=float, default=60.0)
    parser.add_argument("--model-dtype", default="float32", choices=("float32", "float64"),
                        help="gossip.model_dtype: what models are averaged and sent in")
    parser.add_argument("--out", default="/tmp/gradleak-leak-live")
    args = parser.parse_args()
    load0 = os.getloadavg()[0]
    cfg = RunConfig(
        seed=3, out_dir=args.out, data=DataConfig(limit=1500),
        peers=PeerConfig(honest=args.honest, batch_sizes=(1,), optimizer="sgd", lr=0.3),
        gossip=GossipConfig(sync="rounds", rounds=args.steps, exchange="models", topology="line",
                            mix_rounds=args.rounds, period_s=(0.0,), model_dtype=args.model_dtype),
        attack=AttackSettings(attacks=("idlg",), drain_timeout_s=2, transcript_bytes=256 << 20,
                              gossip_budget_s=args.budget),
        telemetry=TelemetryConfig(metrics_port=0),
    ).validate()
    t0 = time.perf_counter()
    result = run(cfg, progress=lambda _s: None)
    wall = time.perf_counter() - t0
    report = json.loads((result.run_dir / "gossip_attack.json").read_text())
    truth = true_updates(cfg)
    # The attacker's determined values, solved again from its transcript (no truth involved).
    public = GossipPublic.from_config(cfg)
    reader = TranscriptReader(result.run_dir)
    _m, x0, names = shared_model(public, reader.input_shape, reader.num_classes)
    inputs = transcript_inputs(reader, public, x0, names)
    graph = build_graph(public.topology, public.members, public.seed)
    w = mixing_matrix(graph, public.members, public.mixing)
    sol = solve(build_knowledge(graph, public.members, w, ["mallory"], steps=inputs.steps, rounds=args.rounds,
                                drops=inputs.drops), inputs.observations, inputs.known)
    print(f"# live line of {args.honest} honest + mallory, R={args.rounds}, S={args.steps}, batch 1; "
          f"run {wall:.0f} s (attack {report.get('seconds')} s), load {load0:.1f} -> {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores; run dir {result.run_dir}")
    print(f"determined {report['determined_share']:.0%}, reconstructed >= 30 dB {report['reconstructed_share']:.0%}"
          f" (summary: {result.extra['gossip_attack']['reconstructed_share']:.0%})")
    print("| hop | node | step | determined | rel. error vs replay | expected error | PSNR (dB) |")
    print("|---|---|---|---|---|---|---|")
    for node, info in sorted(report["nodes"].items(), key=lambda kv: kv[1]["hops"]):
        for s, row in info["steps"].items():
            key = (node, int(s))
            err = "-"
            if key in sol.estimates:
                err = f"{np.linalg.norm(sol.estimates[key] - truth[key]) / np.linalg.norm(truth[key]):.1e}"
            exp = "-" if row["expected_error"] is None else f"{row['expected_error']:.1e}"
            p = "-" if row["psnr"] is None else f"{row['psnr']:.1f}"
            print(f"| {info['hops']} | {node} | {s} | {row['determined']} | {err} | {exp} | {p} |")


if __name__ == "__main__":
    main()
