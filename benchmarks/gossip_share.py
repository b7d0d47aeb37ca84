"""The gossip algebra without images: shares determined (decAttack's setting, async + loss) and precision.

Three measurements on planted values (no model, no inversion), run from
benchmarks/gossip_attack.py (`--decattack`, `--async-loss`, `--precision`) or alone:

    PYTHONPATH=$PWD python benchmarks/gossip_share.py [--seeds 20] [--sizes 20 50 100]

(d) decAttack's Erdős–Rényi experiment (scripts/exp_erdos_renyi.py of AbdellahElmrini/decAttack,
    re-implemented here): gossip averaging for T = int(min(n D / 20 / |A|, n / 2)) iterations
    on G(n, D / n) redrawn until connected, Metropolis-Hastings W (their HamiltonGossipMatrix),
    attackers nodes 0..|A|-1, share = nodes whose value is determined over all n (attackers
    included), mean and std over the seeds; beside it the honest-only share and variants.
(e) async gossip with 10% message loss (gradleak.gossip_sim.simulate_async): the informed
    attacker (every node's mixing record) against an attacker that assumes lock-step.
(f) relative error of the recovered values against hop distance on a line, float32 messages,
    by solver (SVD, QR with column pivoting, exact rationals) and with float64 messages.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import scipy.linalg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacker.gossip_algebra import build_knowledge, determined_unknowns, solve
from attacker.gossip_async import build_async_knowledge
from attacker.gossip_exact import exact_determined
from gradleak.core.graphs import build_graph, hops, mixing_fractions, mixing_matrix
from gradleak.gossip_sim import (
    decattack_graph,
    decattack_iterations,
    simulate,
    simulate_async,
)

DEGREES = (3, 4, 5, 6)  # decAttack's n x p = 3, 4, 5, 6


def _planted(d: int, seed: int, scale: float = 0.1):
    rng = np.random.default_rng(seed)
    table: dict = {}

    def update(node: str, step: int, _x: np.ndarray) -> np.ndarray:
        return table.setdefault((node, step), rng.standard_normal(d) * scale)

    return update, rng.standard_normal(d)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def decattack_cell(n: int, degree: int, natt: int, seeds: int, variant: str) -> dict[str, np.ndarray]:
    """Per seed: 'all' (their count: determined over all n, attackers included, exact
    arithmetic), 'honest' (over the n - |A| others, exact) and 'float' ('all' by our float64
    rank cut). variant: 'theirs' (their graph and T), 'our T' (their graph, T = D // |A| as
    our earlier image table), 'our graph' (er:D, p = D / (n - 1), their T)."""
    members = [f"p{i}" for i in range(n)]
    attackers = members[:natt]
    out: dict[str, list[float]] = {"all": [], "honest": [], "float": [], "rref": []}
    for seed in range(seeds):
        graph = build_graph(f"er:{degree}", members, seed) if variant == "our graph" else \
            decattack_graph(members, degree, seed)
        rounds = _rounds(variant, n, degree, natt)
        w = mixing_matrix(graph, members)
        det = exact_determined(graph, members, mixing_fractions(graph, members), attackers, steps=1,
                               rounds=rounds)
        num = determined_unknowns(build_knowledge(graph, members, w, attackers, steps=1, rounds=rounds))
        out["all"].append((natt + sum(det.values())) / n)
        out["honest"].append(sum(det.values()) / (n - natt))
        out["float"].append((natt + sum(num.values())) / n)
        out["rref"].append(their_float_count(graph, members, natt, rounds) if variant == "theirs" else np.nan)
    return {k: np.array(v) for k, v in out.items()}


def their_float_count(graph: dict, members: Sequence[str], natt: int, rounds: int) -> float:
    """decAttack's own count, as their code computes it (our re-implementation): K over all n
    columns (e_a, e_j, then W^t[j] for t < T, j over the attackers' neighbourhoods with
    themselves), a Gauss-Jordan without partial pivoting taking the first entry above 1e-8,
    entries below 1e-6 zeroed, a node counted when a reduced row has it as its only entry."""
    w = mixing_matrix(graph, members)
    index = {p: i for i, p in enumerate(members)}
    seen = sorted({index[a] for a in members[:natt]} | {index[j] for a in members[:natt] for j in graph[a]})
    power = np.eye(len(members))
    rows = [power[i] for i in range(natt)]
    for _ in range(rounds):
        rows += [power[j] for j in seen]
        power = w @ power
    q = np.array(rows)
    r = 0
    for c in range(q.shape[1]):
        hits = np.flatnonzero(np.abs(q[r:, c]) > 1e-8)
        if hits.size == 0:
            continue
        q[[r, r + hits[0]]] = q[[r + hits[0], r]]
        q[r] /= q[r, c]
        for k in np.flatnonzero(np.abs(q[:, c]) > 1e-8):
            if k != r:
                q[k] -= q[k, c] * q[r]
        r += 1
        if r == q.shape[0]:
            break
    q[np.abs(q) < 1e-6] = 0
    single = {int(np.flatnonzero(np.abs(row) > 1e-8)[0]) for row in q if np.count_nonzero(np.abs(row) > 1e-8) == 1}
    return len(single) / len(members)


def _rounds(variant: str, n: int, degree: int, natt: int) -> int:
    return max(1, min(degree // natt, n // 2)) if variant == "our T" else decattack_iterations(n, degree, natt)


def run_decattack(sizes: Sequence[int], seeds: int) -> dict:
    print(f"\n## (d) decAttack's ER setting: share determined, mean +- std over {seeds} connected graphs")
    print("cell = all +- std / honest / float: all = exact, over all n nodes, attackers included (their count);"
          " honest = exact, over the n - |A| others; float = 'all' by solve's float64 rank cut")
    print(f"{'variant':10s} {'n':>3s} {'att':>3s} {'T':>12s} " + " ".join(f"{'D=' + str(d):>22s}" for d in DEGREES))
    table = {}
    for variant in ("theirs", "our T", "our graph"):
        for n in sizes:
            for natt in (1, 2, 3):
                cells = []
                for d in DEGREES:
                    cell = decattack_cell(n, d, natt, seeds, variant)
                    table[(variant, n, natt, d)] = cell
                    cells.append(f"{cell['all'].mean():4.0%}+-{cell['all'].std():3.0%}/{cell['honest'].mean():4.0%}"
                                 f"/{cell['float'].mean():4.0%}")
                ts = ",".join(str(_rounds(variant, n, d, natt)) for d in DEGREES)
                print(f"{variant:10s} {n:3d} {natt:3d} {ts:>12s} " + " ".join(f"{c:>22s}" for c in cells), flush=True)
    print("\ntheirs, all-nodes share: exact / by their own float RREF (1e-8 pivots, 1e-6 zeroing)")
    for n in sizes:
        for natt in (1, 2, 3):
            cells = [f"{table[('theirs', n, natt, d)]['all'].mean():4.0%}/{table[('theirs', n, natt, d)]['rref'].mean():4.0%}"
                     for d in DEGREES]
            print(f"{'theirs':10s} {n:3d} {natt:3d} " + " ".join(f"{c:>10s}" for c in cells), flush=True)
    return table


def run_async(sizes: Sequence[int], seeds: int, drop_rate: float = 0.1) -> dict:
    print(f"\n## (e) async gossip, {drop_rate:.0%} loss, S = 1, R = decAttack's T, G(n, D/n); share of honest "
          f"nodes, mean over {seeds} seeds")
    print("lock-step = no loss, same graph and R; informed = async system from every node's mixing "
          "record (lock and informed: exact determination); assumed = async values solved as if lock-step (value counted only if rel. err <= 1e-6)")
    print(f"{'n':>3s} {'att':>3s} " + " ".join(f"{'D=' + str(d) + ' lock/inf/assumed':>24s}" for d in DEGREES))
    table = {}
    for n in sizes:
        members = [f"p{i}" for i in range(n)]
        for natt in (1, 3):
            attackers = members[:natt]
            cells = []
            for d in DEGREES:
                lock, informed, assumed, exact = [], [], [], []
                for seed in range(seeds):
                    graph = decattack_graph(members, d, seed)
                    w = mixing_matrix(graph, members)
                    rounds = decattack_iterations(n, d, natt)
                    update, x0 = _planted(4, seed)
                    lk = build_knowledge(graph, members, w, attackers, steps=1, rounds=rounds)
                    exact_w = mixing_fractions(graph, members)
                    lock.append(np.mean(list(exact_determined(graph, members, exact_w, attackers, steps=1,
                                                              rounds=rounds).values())))
                    view, truth = simulate_async(graph, members, w, attackers, x0, steps=1, rounds=rounds,
                                                 local_update=update, drop_rate=drop_rate, seed=seed,
                                                 dtype=np.float64)
                    kn = build_async_knowledge(graph, members, w, attackers, steps=1, rounds=rounds,
                                               events=truth.events, received=view.received)
                    sol = solve(kn, view.observations, view.known)
                    informed.append(np.mean(list(exact_determined(
                        graph, members, exact_w, attackers, steps=1, rounds=rounds, observed=kn.observed,
                        events=truth.events).values())))
                    exact.extend(_rel(v, truth.updates[key]) for key, v in sol.estimates.items())
                    # The realistic attacker: lock-step rows for what it received, its own losses known.
                    seen = {(j, s, r) for j, _, s, r in view.received} | {(a, s, r) for a in attackers
                                                                          for s in (1,) for r in range(rounds)}
                    naive = solve_subset(lk, seen, view)
                    good = [key for key, v in naive.estimates.items() if _rel(v, truth.updates[key]) <= 1e-6]
                    assumed.append(len(good) / (n - natt))
                table[(n, natt, d)] = (np.array(lock), np.array(informed), np.array(assumed), max(exact, default=0.0))
                cells.append(f"{np.mean(lock):4.0%}/{np.mean(informed):4.0%}/{np.mean(assumed):4.0%}")
            print(f"{n:3d} {natt:3d} " + " ".join(f"{c:>24s}" for c in cells), flush=True)
    worst = max(v[3] for v in table.values())
    print(f"informed: worst relative error of a determined value {worst:.1e} (float64 values)")
    return table


def solve_subset(knowledge, seen: set, view):
    """Solve a lock-step system on the rows of the messages actually received."""
    keep = [i for i, o in enumerate(knowledge.observed) if o in seen]
    sub = type(knowledge)(knowledge.order, knowledge.attackers, knowledge.steps, knowledge.rounds,
                          knowledge.model, knowledge.unknowns, knowledge.knowns,
                          tuple(knowledge.observed[i] for i in keep), knowledge.rows[keep],
                          knowledge.known_rows[keep], knowledge.states)
    return solve(sub, view.observations, view.known)


def _exact_lstsq(b: np.ndarray, w_exact: list[list[Fraction]], observed, order) -> np.ndarray:
    """Least squares in exact rationals: K rebuilt from W's exact entries, b taken exactly."""
    n = len(order)
    index = {p: i for i, p in enumerate(order)}
    # K's exact rows: the coefficient of every node's u in z_node(1, r) is -(W^r)[node, :].
    rows: dict[tuple[str, int], list[Fraction]] = {}
    for node in {o[0] for o in observed}:
        vec = [Fraction(int(j == index[node])) for j in range(n)]
        for r in range(max(o[2] for o in observed) + 1):
            rows[(node, r)] = vec
            vec = [sum((vec[m] * w_exact[m][j] for m in range(n) if vec[m] and w_exact[m][j]), Fraction(0))
                   for j in range(n)]
    cols = [j for j in range(n) if j != index[order[0]]]  # the honest nodes (the attacker is p0)
    kx = [[-rows[(node, r)][j] for j in cols] for node, _, r in observed]
    bx = [[Fraction(float(v)) for v in row] for row in b]
    # Normal equations, exact: (K^T K) u = K^T b, then Gauss-Jordan.
    p_, d = len(cols), len(bx[0])
    a = [[sum((kx[m][i] * kx[m][j] for m in range(len(kx))), Fraction(0)) for j in range(p_)] +
         [sum((kx[m][i] * bx[m][c] for m in range(len(kx))), Fraction(0)) for c in range(d)] for i in range(p_)]
    for c in range(p_):
        piv = next(r for r in range(c, p_) if a[r][c] != 0)
        a[c], a[piv] = a[piv], a[c]
        inv = 1 / a[c][c]
        a[c] = [v * inv for v in a[c]]
        for r in range(p_):
            if r != c and a[r][c] != 0:
                f = a[r][c]
                a[r] = [x - f * y for x, y in zip(a[r], a[c])]
    return np.array([[float(v) for v in a[i][p_:]] for i in range(p_)])


def run_precision(n: int = 16, d: int = 8) -> dict:
    print(f"\n## (f) relative error of lr*g against hop, line n={n}, attacker at the end, S = 1, planted "
          f"|u| = 0.1 |x0| per coordinate, d = {d}")
    members = [f"p{i}" for i in range(n)]
    graph = build_graph("line", members)
    w = mixing_matrix(graph, members)
    w_exact = [[Fraction(1, 1 + max(len(graph[members[i]]), len(graph[members[j]])))
                if members[j] in graph[members[i]] else Fraction(0) for j in range(n)] for i in range(n)]
    for i in range(n):
        w_exact[i][i] = 1 - sum(w_exact[i])
    dist = hops(graph, ["p0"])
    update, x0 = _planted(d, 0)
    out: dict[str, list[float]] = {}
    for label, rounds, dtype in (("float32, R=n-1", n - 1, np.float32), ("float32, R=2(n-1)", 2 * (n - 1), np.float32),
                                 ("float64, R=n-1", n - 1, np.float64)):
        view, truth = simulate(graph, members, w, ["p0"], x0, steps=1, rounds=rounds, local_update=update,
                               dtype=dtype)
        kn = build_knowledge(graph, members, w, ["p0"], steps=1, rounds=rounds)
        y = np.stack([np.asarray(view.observations[o], np.float64) for o in kn.observed])
        v = np.stack([np.asarray(view.known[k], np.float64) for k in kn.knowns])
        b = y - kn.known_rows @ v
        truth_u = np.stack([truth.updates[key].astype(np.float64) for key in kn.unknowns])
        sol = solve(kn, view.observations, view.known)
        svd = np.stack([sol._solved[i] for i in range(len(kn.unknowns))])
        qr = scipy.linalg.lstsq(kn.rows, b, lapack_driver="gelsy")[0]  # QR with column pivoting
        solvers = {"SVD (solve)": svd, "QR pivoted": qr}
        if rounds == n - 1:
            solvers["exact rationals"] = _exact_lstsq(b, w_exact, kn.observed, members)
        for name, est in solvers.items():
            errs = [_rel(est[i], truth_u[i]) for i in range(len(kn.unknowns))]
            out[f"{label}, {name}"] = errs
    print(f"{'messages, rounds, solver':38s} " + " ".join(f"{'h' + str(dist[p]):>7s}" for p, _ in kn.unknowns))
    for label, errs in out.items():
        print(f"{label:38s} " + " ".join(f"{e:7.1e}" for e in errs))
    return {"hops": [dist[p] for p, _ in kn.unknowns], **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--async-seeds", type=int, default=10)
    parser.add_argument("--sizes", type=int, nargs="*", default=[20, 50, 100])
    parser.add_argument("--only", nargs="*", default=["decattack", "async", "precision"],
                        choices=["decattack", "async", "precision"])
    parser.add_argument("--out", default="docs/gossip_share.png", help="figure (when all three run)")
    args = parser.parse_args()
    start, load0 = time.perf_counter(), os.getloadavg()
    print(f"# gossip shares, load average at start {load0[0]:.2f} on {os.cpu_count()} cores")
    dec, asy, prec = {}, {}, {}
    if "decattack" in args.only:
        dec = run_decattack(args.sizes, args.seeds)
    if "async" in args.only:
        asy = run_async(args.sizes, args.async_seeds)
    if "precision" in args.only:
        prec = run_precision()
    print(f"\n{time.perf_counter() - start:.1f} s; load average at end {os.getloadavg()[0]:.2f}")
    if len(args.only) == 3:
        figure(Path(args.out), dec, asy, prec, args.sizes)


def figure(out: Path, dec: dict, asy: dict, prec: dict, sizes: Sequence[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(24, 4.4))
    for ax, natt in zip(axes[:3], (1, 2, 3)):
        for i, n in enumerate(sizes):
            color = f"C{i}"
            cells = [dec[("theirs", n, natt, d)]["all"] for d in DEGREES]
            ax.errorbar(np.array(DEGREES) + 0.08 * (i - 1), [c.mean() for c in cells], yerr=[c.std() for c in cells],
                        marker="s", ms=4, capsize=3, color=color, label=f"n={n}, decAttack's T")
            if n > 20:
                ax.plot(DEGREES, [dec[("our T", n, natt, d)]["all"].mean() for d in DEGREES], ls=":",
                        color=color, label=f"n={n}, T = D // |A|")
        ax.set(xlabel="n x p (expected degree D)", ylabel="share determined (all n nodes)", ylim=(0, 1.05),
               title=f"(d) G(n, D/n), {natt} attacker{'s' if natt > 1 else ''}, gossip averaging")
    for i, (n, natt) in enumerate(sorted({(n, a) for n, a, _ in asy})):
        rows = [asy[(n, natt, d)] for d in DEGREES]
        axes[3].plot(DEGREES, [r[1].mean() for r in rows], marker="o", ms=3, color=f"C{i}",
                     label=f"n={n}, {natt} att: async, informed (dashed: lock-step)")
        axes[3].plot(DEGREES, [r[0].mean() for r in rows], ls="--", color=f"C{i}")
    assumed = [np.mean([asy[(n, a, d)][2].mean() for n, a, _ in asy]) for d in DEGREES]
    axes[3].plot(DEGREES, assumed, ls=":", color="grey", label="async, assuming lock-step (mean of all)")
    axes[3].set(xlabel="n x p (expected degree D)", ylabel="share of honest nodes determined", ylim=(0, 1.05),
                title="(e) async gossip, 10% message loss")
    hop = prec["hops"]
    for label, errs in prec.items():
        if label != "hops":
            axes[4].semilogy(hop, errs, marker="o", ms=3, ls="-" if "SVD" in label else ":", label=label)
    axes[4].axhline(1e-6, color="grey", ls=":")
    axes[4].set(xlabel="hops to the attacker (line)", ylabel="relative error of lr * g",
                title="(f) precision by wire dtype and solver")
    save_figure(fig, axes, out)


def save_figure(fig, axes, out: Path) -> None:
    """Legends, layout, and the PNG at `out` (shared with benchmarks/gossip_attack.py)."""
    for ax in axes:
        ax.legend(fontsize=6)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"figure: {out}")


if __name__ == "__main__":
    main()
