"""Communication graphs and gossip mixing matrices, shared by the peers and the attacker.

A topology is public in decentralised learning: every peer knows who talks to whom and
with what weight (that is what makes the gossip algebra of El Mrini et al. an attack).
So the graph is a pure function of (name, the members in a fixed order, the run's seed),
which the peers (p2p.topology) and the attacker (attacker.gossip_algebra) compute alike.

Names: `complete`, `ring`, `line` (the members in order), `torus` (2-D, the most square
rows x cols grid with both sides >= 3; a ring where there is none), `regular:K` (a random
connected K-regular graph), `er:D` (Erdős–Rényi with expected degree D, redrawn until
connected). Random graphs are drawn from the seed, so every peer draws the same one.

Mixing matrices W (row i: the weights node i averages with, W[i, i] its own):
`metropolis` (Metropolis-Hastings, W_ij = 1 / (1 + max(d_i, d_j)); symmetric and doubly
stochastic, so gossip averaging converges to the exact mean) and `uniform` (W_ij =
1 / (1 + d_i): each node averages itself and its neighbours equally; rows sum to one,
columns need not, so the consensus is a degree-weighted mean).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache

import numpy as np

PLAIN = ("complete", "ring", "line", "torus")
PARAMETRIC = ("regular", "er")  # regular:K, er:D
MIXINGS = ("metropolis", "uniform")
MAX_DRAWS = 1000  # connected random graphs redrawn at most this often


def topology_names() -> tuple[str, ...]:
    """The names as help text shows them."""
    return (*PLAIN, "regular:K", "er:D")


def parse_topology(name: str) -> tuple[str, float | None]:
    """(kind, parameter) of a topology name; ValueError naming the known ones."""
    kind, _, arg = name.partition(":")
    if kind in PLAIN and not arg:
        return kind, None
    if kind in PARAMETRIC and arg:
        try:
            value = float(arg)
        except ValueError:
            value = math.nan
        if kind == "regular" and (not value.is_integer() or value < 1):
            raise ValueError(f"topology '{name}': K must be an integer >= 1")
        if kind == "er" and not value > 0:
            raise ValueError(f"topology '{name}': the expected degree D must be > 0")
        return kind, value
    raise ValueError(f"unknown topology '{name}' (known: {', '.join(topology_names())})")


def build_graph(name: str, members: Sequence[str], seed: int = 0) -> dict[str, tuple[str, ...]]:
    """Undirected adjacency: member -> its neighbours in member order. Deterministic in its inputs."""
    return dict(_build(name, tuple(members), seed))


@lru_cache(maxsize=64)
def _build(name: str, members: tuple[str, ...], seed: int) -> tuple[tuple[str, tuple[str, ...]], ...]:
    kind, arg = parse_topology(name)
    n = len(members)
    if len(set(members)) != n:
        raise ValueError("members must be distinct")
    edges = _edges(kind, arg, n, seed)
    adj: list[set[int]] = [set() for _ in range(n)]
    for i, j in edges:
        if i != j:
            adj[i].add(j)
            adj[j].add(i)
    return tuple((members[i], tuple(members[j] for j in sorted(adj[i]))) for i in range(n))


def _edges(kind: str, arg: float | None, n: int, seed: int) -> list[tuple[int, int]]:
    if kind == "complete":
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    if kind == "line":
        return [(i, i + 1) for i in range(n - 1)]
    if kind == "ring":
        return [(i, (i + 1) % n) for i in range(n)] if n > 2 else _edges("line", None, n, seed)
    if kind == "torus":
        rows = max((r for r in range(3, math.isqrt(n) + 1) if n % r == 0 and n // r >= 3), default=1)
        if rows == 1:
            return _edges("ring", None, n, seed)
        cols = n // rows
        return [e for r in range(rows) for c in range(cols)
                for e in ((r * cols + c, r * cols + (c + 1) % cols), (r * cols + c, ((r + 1) % rows) * cols + c))]
    rng = random.Random(f"{kind}:{arg}:{n}:{seed}")
    for _ in range(MAX_DRAWS):
        edges = _regular(int(arg or 0), n, rng) if kind == "regular" else _erdos_renyi(float(arg or 0), n, rng)
        if edges is not None and _connected(n, edges):
            return edges
    raise ValueError(f"no connected {kind}:{arg:g} graph on {n} members in {MAX_DRAWS} draws "
                     f"({'raise the degree' if kind == 'er' else 'n x K must be even and K < n'})")


def _erdos_renyi(degree: float, n: int, rng: random.Random) -> list[tuple[int, int]]:
    p = min(1.0, degree / max(1, n - 1))
    return [(i, j) for i in range(n) for j in range(i + 1, n) if rng.random() < p]


def _regular(k: int, n: int, rng: random.Random) -> list[tuple[int, int]] | None:
    """A K-regular simple graph by the pairing model (one draw; None where it failed)."""
    if k >= n or (n * k) % 2:
        return None
    stubs = [i for i in range(n) for _ in range(k)]
    rng.shuffle(stubs)
    edges = set()
    for a, b in zip(stubs[::2], stubs[1::2]):
        if a == b or (min(a, b), max(a, b)) in edges:
            return None
        edges.add((min(a, b), max(a, b)))
    return sorted(edges)


def _connected(n: int, edges: list[tuple[int, int]]) -> bool:
    if n <= 1:
        return True
    adj: list[list[int]] = [[] for _ in range(n)]
    for i, j in edges:
        adj[i].append(j)
        adj[j].append(i)
    seen, todo = {0}, [0]
    while todo:
        for j in adj[todo.pop()]:
            if j not in seen:
                seen.add(j)
                todo.append(j)
    return len(seen) == n


def _mixing_index(graph: dict[str, tuple[str, ...]], order: Sequence[str], rule: str) -> dict[str, int]:
    if rule not in MIXINGS:
        raise ValueError(f"unknown mixing rule '{rule}' (known: {', '.join(MIXINGS)})")
    index = {p: i for i, p in enumerate(order)}
    if set(index) != set(graph):
        raise ValueError("order must list exactly the graph's members")
    return index


def mixing_matrix(graph: dict[str, tuple[str, ...]], order: Sequence[str], rule: str = "metropolis") -> np.ndarray:
    """W in `order`'s index (float64); every row sums to one."""
    index = _mixing_index(graph, order, rule)
    n = len(order)
    w = np.zeros((n, n))
    deg = {p: len(graph[p]) for p in graph}
    for p, nbrs in graph.items():
        i = index[p]
        for q in nbrs:
            w[i, index[q]] = 1.0 / (1 + max(deg[p], deg[q])) if rule == "metropolis" else 1.0 / (1 + deg[p])
        w[i, i] = 1.0 - w[i].sum()
    return w


def mixing_fractions(graph: dict[str, tuple[str, ...]], order: Sequence[str],
                     rule: str = "metropolis") -> list[list[Fraction]]:
    """W exactly, in rationals (the same rule as mixing_matrix, whose floats round these)."""
    index = _mixing_index(graph, order, rule)
    n = len(order)
    w = [[Fraction(0)] * n for _ in range(n)]
    deg = {p: len(graph[p]) for p in graph}
    for p, nbrs in graph.items():
        i = index[p]
        for q in nbrs:
            w[i][index[q]] = Fraction(1, 1 + (max(deg[p], deg[q]) if rule == "metropolis" else deg[p]))
        w[i][i] = 1 - sum(w[i], Fraction(0))
    return w


def mixing_weights(graph: dict[str, tuple[str, ...]], me: str, rule: str = "metropolis") -> dict[str, float]:
    """Row `me` of W: neighbour (and me) -> weight."""
    order = sorted(graph)
    row = mixing_matrix(graph, order, rule)[order.index(me)]
    return {p: float(row[i]) for i, p in enumerate(order) if row[i] != 0.0 or p == me}


def hops(graph: dict[str, tuple[str, ...]], sources: Sequence[str]) -> dict[str, int]:
    """Hop distance of every member to the nearest of `sources` (breadth first); absent if unreachable."""
    dist = {s: 0 for s in sources}
    frontier = list(sources)
    while frontier:
        nxt = []
        for p in frontier:
            for q in graph[p]:
                if q not in dist:
                    dist[q] = dist[p] + 1
                    nxt.append(q)
        frontier = nxt
    return dist
