"""Graphs and mixing matrices: shapes, connectivity, determinism, and consensus under gossip."""

from __future__ import annotations

import numpy as np
import pytest

from gradleak.core.graphs import build_graph, hops, mixing_matrix, mixing_weights, parse_topology

IDS = [f"p{i:02d}" for i in range(20)]


def degrees(g: dict[str, tuple[str, ...]]) -> list[int]:
    return [len(v) for v in g.values()]


def test_line_ring_torus_complete_shapes() -> None:
    line = build_graph("line", IDS)
    assert line["p00"] == ("p01",) and line["p05"] == ("p04", "p06") and line["p19"] == ("p18",)
    assert degrees(build_graph("ring", IDS)) == [2] * 20
    torus = build_graph("torus", IDS)  # 4 x 5
    assert degrees(torus) == [4] * 20 and set(torus["p00"]) == {"p01", "p04", "p05", "p15"}
    assert degrees(build_graph("complete", IDS[:6])) == [5] * 6
    assert degrees(build_graph("torus", IDS[:7])) == [2] * 7  # prime: no grid, a ring


@pytest.mark.parametrize("name", ["regular:3", "regular:4", "er:3", "er:6"])
def test_random_graphs_are_connected_seeded_and_symmetric(name: str) -> None:
    g = build_graph(name, IDS, seed=3)
    assert g == build_graph(name, IDS, seed=3)
    assert g != build_graph(name, IDS, seed=4)
    assert all(p in g[q] for p in g for q in g[p])  # undirected
    assert len(hops(g, ["p00"])) == 20  # connected
    if name.startswith("regular"):
        assert set(degrees(g)) == {int(name.split(":")[1])}


def test_er_expected_degree() -> None:
    means = [np.mean(degrees(build_graph("er:4", [f"n{i}" for i in range(60)], seed=s))) for s in range(10)]
    assert 3.3 < float(np.mean(means)) < 4.7


def test_bad_names() -> None:
    for bad, msg in [("star", "unknown topology"), ("regular:2.5", "integer"), ("er:0", "> 0"),
                     ("line:3", "unknown topology"), ("er", "unknown topology")]:
        with pytest.raises(ValueError, match=msg):
            parse_topology(bad)
    with pytest.raises(ValueError, match="even"):
        build_graph("regular:3", IDS[:5])


@pytest.mark.parametrize("rule", ["metropolis", "uniform"])
@pytest.mark.parametrize("name", ["line", "torus", "er:3", "regular:3"])
def test_mixing_rows_sum_to_one_and_gossip_reaches_consensus(name: str, rule: str) -> None:
    g = build_graph(name, IDS, seed=1)
    w = mixing_matrix(g, IDS, rule)
    assert np.allclose(w.sum(axis=1), 1.0) and (w >= 0).all()
    assert all((w[i, j] > 0) == (IDS[j] in g[IDS[i]]) for i in range(20) for j in range(20) if i != j)
    x = np.random.default_rng(0).normal(size=(20, 3))
    y = x.copy()
    for _ in range(3000):
        y = w @ y
    assert np.abs(y - y.mean(axis=0)).max() < 1e-6  # every node holds the same value
    if rule == "metropolis":  # doubly stochastic: that value is the exact mean
        assert np.allclose(w, w.T) and np.allclose(y[0], x.mean(axis=0), atol=1e-9)


def test_mixing_weights_row() -> None:
    g = build_graph("line", IDS[:3])
    assert mixing_weights(g, "p01") == pytest.approx({"p00": 1 / 3, "p01": 1 / 3, "p02": 1 / 3})
    assert mixing_weights(g, "p00") == pytest.approx({"p00": 2 / 3, "p01": 1 / 3})
    with pytest.raises(ValueError, match="unknown mixing"):
        mixing_matrix(g, IDS[:3], "max")
