"""The GraphX bridge (jvm/src, through spark.graphx) against networkx on small graphs: PageRank
within 1e-6 relative on a symmetrised graph, components and degrees exactly, planted cliques
come back as the communities; and a clear error naming the jar when the class is missing."""

from __future__ import annotations

import networkx as nx
import pytest

from spark import graphx

pytestmark = pytest.mark.spark

EDGES = "src string, dst string"


def _name(v: int) -> str:
    return f"v{v:03d}"


def _frame(spark, edges):
    return spark.createDataFrame([(_name(a), _name(b)) for a, b in edges], EDGES)


def _ids(spark, names):
    return spark.createDataFrame([(n,) for n in names], "id string")


def _by_id(df, column):
    return {r["id"]: r[column] for r in df.collect()}


@pytest.fixture(scope="module")
def mixing():
    """An undirected random graph with odd cycles (no bipartite oscillation), without isolated
    vertices: GraphX's PageRank equals networkx's times N there."""
    g = nx.gnm_random_graph(30, 110, seed=7)
    g.remove_nodes_from([v for v in list(g) if g.degree(v) == 0])
    return g


def test_pagerank_until_convergence_equals_networkx_times_n(spark, mixing) -> None:
    expected = nx.pagerank(mixing, alpha=0.85, tol=1e-13, max_iter=1000)
    got = _by_id(graphx.page_rank(_frame(spark, mixing.edges()), iterations=None, tol=1e-10),
                 "pagerank")
    n = mixing.number_of_nodes()
    assert len(got) == n
    assert sum(got.values()) == pytest.approx(n, rel=1e-9)  # GraphX: ranks sum to N
    for v, rank in expected.items():
        assert got[_name(v)] == pytest.approx(rank * n, rel=1e-6)


def test_pagerank_fixed_iterations_and_analyse_agree_with_networkx(spark, mixing) -> None:
    edges = _frame(spark, mixing.edges())
    expected = nx.pagerank(mixing, alpha=0.85, tol=1e-13, max_iter=1000)
    n = mixing.number_of_nodes()
    fixed = _by_id(graphx.page_rank(edges, iterations=60), "pagerank")
    both = graphx.analyse(edges, iterations=60, steps=3).collect()
    for rows in (fixed, {r["id"]: r["pagerank"] for r in both}):
        for v, rank in expected.items():
            assert rows[_name(v)] == pytest.approx(rank * n, rel=1e-6)


def test_components_and_degrees_exactly(spark) -> None:
    g = nx.DiGraph()
    g.add_edges_from([(1, 2), (2, 3), (3, 1), (4, 5), (6, 5), (7, 8), (9, 7), (2, 10)])
    g.add_node(11)  # no edge: only through the vertex table
    edges = spark.createDataFrame(
        [(_name(a), _name(b)) for a, b in [*g.edges(), (1, 2)]], EDGES)  # a duplicate edge
    ids = _ids(spark, [_name(11), _name(1)])
    components = _by_id(graphx.connected_components(edges, ids), "component")
    expected = {_name(v): min(_name(u) for u in part)
                for part in nx.weakly_connected_components(g) for v in part}
    assert components == expected
    deg = {r["id"]: (r["in_degree"], r["out_degree"], r["degree"])
           for r in graphx.degrees(edges, ids).collect()}
    assert deg == {_name(v): (g.in_degree(v), g.out_degree(v), g.degree(v)) for v in g}


def test_planted_cliques_come_back_as_communities(spark) -> None:
    sizes = (5, 6, 7, 8)
    g = nx.Graph()
    cliques, start = [], 0
    for size in sizes:
        members = list(range(start, start + size))
        g.add_edges_from((a, b) for i, a in enumerate(members) for b in members[i + 1:])
        cliques.append({_name(v) for v in members})
        start += size
    firsts = [min(c) for c in cliques]
    for i in range(len(sizes)):  # a ring of single edges between the cliques
        a = int(firsts[i][1:])
        b = int(firsts[(i + 1) % len(sizes)][1:]) + 1
        g.add_edge(a, b)
    edges = _frame(spark, g.edges())
    for label in (_by_id(graphx.communities(edges, steps=5), "community"),
                  _by_id(graphx.analyse(edges, iterations=5, steps=5), "community")):
        found: dict[str, set[str]] = {}
        for v, c in label.items():
            found.setdefault(c, set()).add(v)
        assert sorted(map(sorted, found.values())) == sorted(map(sorted, cliques))


def test_missing_bridge_names_the_jar(spark, monkeypatch) -> None:
    monkeypatch.setattr(graphx, "BRIDGE_CLASS", "io.recsys.graphx.NoSuchBridge")
    with pytest.raises(graphx.BridgeMissing, match="recsys-graphx-bridge.jar"):
        graphx.check(spark)
