"""The multi-hop passive gossip attack, in-process: PSNR by hop, share reconstructed by degree, loss.

Simulates the exact gossip protocol (gradleak.gossip_sim, float32 messages as on the wire) with
the DLG LeNet on scikit-learn digits at batch 1; the attackers solve their knowledge system
(attacker.gossip_algebra) and invert every determined step-1 gradient with the analytic attack.
Scoring against the truth happens here, never in the attacker code.

    PYTHONPATH=$PWD python benchmarks/gossip_attack.py [--quick] [--seeds 2] [--decattack] [--async-loss]
        [--shares]

(a) PSNR against hop distance on line graphs; (b) share of honest nodes determined and
reconstructed (>= 30 dB) against the expected degree of er:D graphs; (c) 10% message loss
(the sender's message is lost, the attackers unaware of losses between others).
Writes docs/gossip_attack.png. --decattack: (b) on decAttack's graphs G(n, D / n) (their
exp_erdos_renyi.py) instead of er:D. --async-loss: (c) also in async mode (own clocks, 10% loss;
the informed attacker, see attacker/gossip_async.py). --shares: then the algebraic shares of
benchmarks/gossip_share.py (decAttack's setting with 20 seeds, async, precision by hop).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from attacker.api import AttackConfig
from attacker.gossip_algebra import build_knowledge, solve
from attacker.gossip_async import build_async_knowledge
from attacker.gossip_attack import invert_gradients, node_status
from attacker.metrics import psnr
from gradleak.core.graphs import build_graph, mixing_matrix
from gradleak.core.models import create_model, init_dlg_uniform
from gradleak.data import load_dataset
from gradleak.gossip_sim import (
    decattack_graph,
    decattack_iterations,
    flat_parameters,
    sgd_update,
    simulate,
    simulate_async,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is no package
import gossip_share
from gossip_share import save_figure

TARGET_DB = 30.0
# Gradients whose expected relative error (from public quantities) is above this are not
# inverted: at ~0.2 the analytic attack is already below 20 dB, and a hopeless inversion
# costs its whole time budget.
MAX_EXPECTED_ERROR = 0.3
ATTACK = AttackConfig(time_budget_s=0.5)  # a clean gradient inverts in ~0.05 s


@dataclass(frozen=True)
class Case:
    topology: str
    n: int
    attackers: tuple[int, ...]  # member indices
    rounds: int
    model: str = "exact"  # unknown model; "constant" runs decAttack's setting
    steps: int = 1
    lr: float = 0.1
    drop_rate: float = 0.0
    seed: int = 0
    wire: str = "float32"  # message dtype; decAttack's own code computes in float64
    graphs: str = "gradleak"  # "decattack": er:D drawn as G(n, D / n) (gossip_sim.decattack_graph)
    mode: str = "lockstep"  # "async": own clocks (gossip_sim.simulate_async), informed attacker


@dataclass(frozen=True)
class NodeResult:
    hops: int
    determined: bool
    psnr: float | None  # None: not inverted (undetermined or expected error too large)


class Bench:
    """The shared victim: digits, the DLG LeNet and its initial weights."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        data = load_dataset("digits", seed=0)
        self.images, self.labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)
        self.net = init_dlg_uniform(create_model("lenet", in_channels=1, num_classes=10,
                                                 image_size=16), torch.Generator().manual_seed(1234))
        self.x0 = flat_parameters(self.net)

    def run(self, case: Case) -> dict[str, NodeResult]:
        members = [f"p{i}" for i in range(case.n)]
        if case.graphs == "decattack":
            graph = decattack_graph(members, float(case.topology.split(":")[1]), case.seed)
        else:
            graph = build_graph(case.topology, members, case.seed)
        w = mixing_matrix(graph, members)
        attackers = [members[i] for i in case.attackers]
        fixed = case.model == "constant"  # decAttack: one private sample per node, kept

        def sample(node: str, step: int) -> int:
            k = members.index(node)
            return (7919 * case.seed + k * (1 if fixed else case.steps) + (0 if fixed else step - 1)
                    ) % len(self.labels)

        def batch(node: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
            i = sample(node, step)
            return self.images[i:i + 1], self.labels[i:i + 1]

        run = simulate_async if case.mode == "async" else simulate
        view, truth = run(graph, members, w, attackers, self.x0, steps=case.steps,
                          rounds=case.rounds, local_update=sgd_update(self.net, batch, case.lr),
                          drop_rate=case.drop_rate, seed=case.seed, dtype=np.dtype(case.wire).type)
        if case.mode == "async":  # the informed attacker: every node's mixing record (an upper bound)
            knowledge = build_async_knowledge(graph, members, w, attackers, steps=case.steps,
                                              rounds=case.rounds, events=truth.events,
                                              received=view.received)
        else:
            knowledge = build_knowledge(graph, members, w, attackers, steps=case.steps,
                                        rounds=case.rounds, model=case.model, drops=view.drops)
        sol = solve(knowledge, view.observations, view.known)
        targets = [(p, 1) for p in members if p not in attackers]
        leaks = invert_gradients(sol, self.net, lr=case.lr, batch_size=1, input_shape=(1, 16, 16),
                                 num_classes=10, own_weights=view.own_weights, attack="analytic",
                                 config=ATTACK, targets=targets, max_expected_error=MAX_EXPECTED_ERROR)
        status = node_status(sol, graph)
        out = {}
        for node, st in status.items():
            leak = leaks.get((node, 1))
            score = None
            if leak is not None:
                score = psnr(leak.reconstruction.images.detach().numpy()[0], batch(node, 1)[0].numpy()[0])
            out[node] = NodeResult(st.hops, 1 in st.determined, score)
        del truth  # scored from the batches above; only the async oracle read its events
        return out


def share(results: Sequence[dict[str, NodeResult]]) -> tuple[float, float]:
    """(determined share, reconstructed >= 30 dB share) over all honest nodes of the runs."""
    nodes = [r for res in results for r in res.values()]
    det = sum(r.determined for r in nodes) / len(nodes)
    rec = sum(r.determined and (r.psnr or 0.0) >= TARGET_DB for r in nodes) / len(nodes)
    return det, rec


def by_hop(res: dict[str, NodeResult]) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for r in res.values():
        out.setdefault(r.hops, []).append(r.psnr if r.psnr is not None else 0.0)
    return dict(sorted(out.items()))


def line_cases(sizes: Sequence[int]) -> list[tuple[str, Case]]:
    cases = []
    for n in sizes:
        cases.append((f"line n={n}, end", Case("line", n, (0,), rounds=n - 1)))
        mid = n // 2
        cases.append((f"line n={n}, middle", Case("line", n, (mid,), rounds=n - 1 - mid)))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--constant-seeds", type=int, default=1, help="seeds of decAttack's setting")
    parser.add_argument("--quick", action="store_true", help="n = 20 only, degrees 3, 5, 8")
    parser.add_argument("--out", default="docs/gossip_attack.png")
    parser.add_argument("--settings", nargs="*", default=[],
                        help="(b) only: settings whose name starts so (e.g. 'exact R=D')")
    parser.add_argument("--only-b", action="store_true", help="skip (a) and (c)")
    parser.add_argument("--decattack", action="store_true", help="(b) on decAttack's G(n, D / n) graphs")
    parser.add_argument("--async-loss", action="store_true", help="(c) also in async mode")
    parser.add_argument("--shares", action="store_true", help="then benchmarks/gossip_share.py's sections")
    args = parser.parse_args()
    start, load0 = time.perf_counter(), os.getloadavg()
    bench = Bench()
    sizes = (20,) if args.quick else (20, 35)
    print(f"# gossip attack, load average at start {load0[0]:.2f} on {os.cpu_count()} cores")

    print("\n## (a) PSNR (dB, 0 = not inverted) by hop distance, line graphs, S = 1, lr = 0.1")
    lines = {}
    for label, case in ([] if args.only_b else line_cases(sizes)):
        res = bench.run(case)
        lines[label] = by_hop(res)
        det, rec = share([res])
        cells = " ".join(f"{h}:{np.mean(v):.0f}" for h, v in lines[label].items())
        print(f"{label:20s} R={case.rounds:2d} determined {det:4.0%} >=30dB {rec:4.0%} | {cells}",
              flush=True)

    graphs = "G(n, D / n), decAttack's draw" if args.decattack else "er:D"
    print(f"\n## (b) share of honest nodes determined / reconstructed >= 30 dB, {graphs}")
    degrees = (3, 5, 8) if args.quick else (3, 4, 5, 6, 7, 8)
    # rounds 0: decAttack's consensus experiment, T = int(min(n D / 20 / |A|, n / 2)) (exp_erdos_renyi)
    settings = [x for x in (("exact R=1", "exact", 1, 1, 0.1), ("exact R=3", "exact", 3, 1, 0.1),
                            ("exact R=T (decAttack)", "exact", 0, 1, 0.1),
                            ("constant R=1 (decAttack)", "constant", 1, 10, 1e-4))
                if not args.settings or any(x[0].startswith(w) for w in args.settings)]
    table: dict[tuple[str, int, int], list[tuple[float, float]]] = {}
    print(f"{'setting':26s} {'n':>3s} {'att':>3s} " + " ".join(f"{'D=' + str(d):>9s}" for d in degrees))
    for name, model, rounds, steps, lr in settings:
        for n in ((20,) if args.quick else (20, 50)):
            for natt in (1, 3):
                row = []
                for d in degrees:
                    seeds = args.seeds if model == "exact" else args.constant_seeds
                    r = rounds or decattack_iterations(n, d, natt)
                    runs = [bench.run(Case(f"er:{d}", n, tuple(range(natt)), r, model, steps, lr, seed=s,
                                           graphs="decattack" if args.decattack else "gradleak"))
                            for s in range(seeds)]
                    row.append(share(runs))
                table[(name, n, natt)] = row
                print(f"{name:26s} {n:3d} {natt:3d} " + " ".join(f"{a:4.0%}/{b:4.0%}" for a, b in row),
                      flush=True)

    print("\n## (c) 10% message loss, attackers unaware of losses between others")
    loss_cases = [("line n=20, end, R=19", Case("line", 20, (0,), rounds=19)),
                  ("er:4 n=20, 1 att, R=3", Case("er:4", 20, (0,), rounds=3))]
    if args.async_loss:  # async, own clocks, 10% loss: what the informed attacker inverts
        loss_cases += [("async " + label, Case(**{**case.__dict__, "mode": "async"})) for label, case in loss_cases]
    lossy = {}
    for label, case in ([] if args.only_b else loss_cases):
        for rate in ((0.1,) if case.mode == "async" else (0.0, 0.1)):
            runs = [bench.run(Case(**{**case.__dict__, "drop_rate": rate, "seed": s}))
                    for s in range(args.seeds)]
            det, rec = share(runs)
            lossy[(label, rate)] = by_hop(runs[0])
            cells = " ".join(f"{h}:{np.mean(v):.0f}" for h, v in lossy[(label, rate)].items())
            print(f"{label:30s} loss {rate:3.0%}: determined {det:4.0%} >=30dB {rec:4.0%} | {cells}")

    seconds, load1 = time.perf_counter() - start, os.getloadavg()
    print(f"\n{seconds:.0f} s; load average at end {load1[0]:.2f}")
    figure(Path(args.out), lines, table, degrees, lossy)
    if args.shares:
        sys.argv = [sys.argv[0]]
        gossip_share.main()


def figure(out: Path, lines: dict, table: dict, degrees: Sequence[int], lossy: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.4))
    for label, hop in lines.items():
        axes[0].plot(list(hop), [np.mean(v) for v in hop.values()], marker="o", ms=3, label=label)
    axes[0].axhline(TARGET_DB, color="grey", ls=":")
    axes[0].set(xlabel="hops to the attacker", ylabel="PSNR (dB)", title="(a) line graphs, batch 1")
    for (name, n, natt), row in table.items():
        ax = axes[1] if natt == 1 else axes[2]
        ax.plot(degrees, [b for _, b in row], marker="o", ms=3, ls="-" if n == 20 else "--",
                label=f"{name}, n={n}")
    for ax, natt in ((axes[1], 1), (axes[2], 3)):
        ax.set(xlabel="expected degree D (er:D)", ylabel="share reconstructed >= 30 dB",
               title=f"(b) Erdős–Rényi, {natt} attacker{'s' if natt > 1 else ''}", ylim=(0, 1.05))
    for (label, rate), hop in lossy.items():
        axes[3].plot(list(hop), [np.mean(v) for v in hop.values()], marker="o", ms=3,
                     ls="-" if rate == 0 else "--", label=f"{label}, loss {rate:.0%}")
    axes[3].set(xlabel="hops to the attacker", ylabel="PSNR (dB)", title="(c) 10% message loss")
    save_figure(fig, axes, out)


if __name__ == "__main__":
    main()
