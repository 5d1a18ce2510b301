"""The recommendation graph on a hand-built case with known degrees, distribution, coverage and Gini;
`because` where the answer is obvious (driver and Spark paths agree); the export round-trips
through pandas and Spark and writing twice gives the same bytes."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from types import SimpleNamespace

import pandas as pd
import pytest

from spark import graph, graph_export, train_path

pytestmark = pytest.mark.spark

SALE = ("event_id string, user_id string, product_id string, quantity int, "
        "event_time timestamp, description string")
RECS = "user_id string, items array<struct<product_id: string, score: double, rank: int>>"
FACTORS = "product_id string, features array<float>"
T0 = datetime(2011, 1, 1)


def _sales(spark):
    """Catalogue A-E. Net purchases: u1 {A, B}, u2 {A, D}, u3 {A, C}; E bought and returned."""
    rows = [
        ("u1", "A", 1, "apple"), ("u1", "B", 2, "banana, ripe"), ("u2", "A", 1, "apple"),
        ("u2", "D", 1, None), ("u3", "A", 1, 'APPLE "big"'), ("u3", "C", 1, 'cherry "red"'),
        ("u3", "E", 1, "egg"), ("u3", "E", -1, "egg"),
    ]
    data = [(f"e{i}", u, p, q, T0 + timedelta(hours=i), d) for i, (u, p, q, d) in enumerate(rows)]
    return spark.createDataFrame(data, SALE)


def _result(spark):
    recs = [
        ("u1", [("C", 0.9, 1), ("D", 0.8, 2)]),
        ("u2", [("C", 0.7, 1), ("B", 0.5, 2)]),
        ("u3", [("B", 0.6, 1)]),
    ]
    factors = [("A", [1.0, 0.0]), ("B", [0.0, 1.0]), ("C", [1.0, 0.1]), ("D", [0.1, 1.0]),
               ("E", [1.0, 1.0])]
    return SimpleNamespace(
        model_version=7, recommendations=spark.createDataFrame(recs, RECS),
        item_factors=spark.createDataFrame(factors, FACTORS), path=train_path.DRIVER,
    )


@pytest.fixture(scope="module")
def built(spark):
    g = graph.build(spark, _result(spark), _sales(spark))
    yield g
    g.unpersist()


def test_degrees_distribution_coverage_and_gini(built) -> None:
    s = built.summary
    assert s["model_version"] == 7
    assert s["graphx"]["pagerank_iterations"] == graph.PAGERANK_ITERATIONS
    rec, buy = s["recommendations"], s["purchases"]
    # recommended: A 0, B 2, C 2, D 1, E 0 -> [0, 0, 1, 2, 2]
    assert (rec["edges"], rec["users"], rec["products"], rec["catalogue"]) == (5, 3, 3, 5)
    assert rec["coverage"] == pytest.approx(0.6)
    assert rec["gini_in_degree"] == pytest.approx(0.48)
    assert (rec["max_in_degree"], rec["max_out_degree"]) == (2, 2)
    assert rec["mean_out_degree"] == pytest.approx(5 / 3)
    # bought: A 3, B 1, C 1, D 1, E 0 (returned) -> [0, 1, 1, 1, 3]
    assert (buy["edges"], buy["users"], buy["products"], buy["catalogue"]) == (6, 3, 4, 5)
    assert buy["coverage"] == pytest.approx(0.8)
    assert buy["gini_in_degree"] == pytest.approx(0.4)
    assert s["vertices"] == 3 + 5

    dist = {(r["graph"], r["degree"]): r["products"] for r in built.degree_distribution}
    assert dist == {("recommendations", 0): 2, ("recommendations", 1): 1,
                    ("recommendations", 2): 2, ("purchases", 0): 1, ("purchases", 1): 3,
                    ("purchases", 3): 1}
    tops = [(r["graph"], r["rank"], r["product_id"], r["users"]) for r in built.top_products]
    assert tops == [("recommendations", 1, "B", 2), ("recommendations", 2, "C", 2),
                    ("recommendations", 3, "D", 1), ("purchases", 1, "A", 3),
                    ("purchases", 2, "B", 1), ("purchases", 3, "C", 1), ("purchases", 4, "D", 1)]
    assert built.top_products[3]["description"] == "apple"  # most frequent of apple/APPLE

    verts = {r["id"]: r for r in built.vertices.collect()}
    assert verts["u:u1"]["type"] == "user" and verts["u:u1"]["degree"] == 2
    assert verts["p:B"]["description"] == "banana, ripe" and verts["p:B"]["degree"] == 2
    assert verts["p:E"]["degree"] == 0 and verts["p:D"]["description"] is None


def test_graphx_measures_and_figures(built) -> None:
    """Recommendations: u1-C, u1-D, u2-C, u2-B, u3-B (one component of 6; A, E alone);
    purchases: u1-A, u1-B, u2-A, u2-D, u3-A, u3-C (one component of 7; E alone)."""
    verts = {r["id"]: r for r in built.vertices.collect()}
    assert set(verts["p:A"].asDict()) >= set(graph.MEASURE_COLUMNS)
    assert sum(v["pagerank"] for v in verts.values()) == pytest.approx(8)  # ranks sum to N
    assert verts["p:C"]["pagerank"] > verts["p:D"]["pagerank"] > verts["p:A"]["pagerank"]
    assert verts["p:A"]["pagerank"] == pytest.approx(verts["p:E"]["pagerank"])
    linked = [v for v in verts if v not in ("p:A", "p:E")]
    assert {verts[v]["component"] for v in linked} == {1}
    assert verts["p:A"]["component"] == verts["p:E"]["component"] == 0  # no edge: no number
    assert verts["p:A"]["community"] == 0 and verts["p:B"]["community"] >= 1
    bought = {v: verts[v]["purchase_pagerank"] for v in ("p:A", "p:B", "p:C", "p:D", "p:E")}
    assert max(bought, key=bought.get) == "p:A"  # the hub everybody bought
    assert verts["p:E"]["purchase_component"] == 0 and verts["p:A"]["purchase_component"] == 1

    rec, buy = built.summary["recommendations"], built.summary["purchases"]
    assert (rec["components"], rec["largest_component"], rec["isolated_vertices"]) == (1, 6, 2)
    assert (buy["components"], buy["largest_component"], buy["isolated_vertices"]) == (1, 7, 1)
    assert sum(rec["community_sizes"]) == 6 and rec["communities"] == len(rec["community_sizes"])
    assert buy["pagerank_top_products"][0] == "A"
    # one product is the top 1 % of a catalogue of 5
    products = {p: verts[f"p:{p}"]["purchase_pagerank"] for p in "ABCDE"}
    assert buy["pagerank_top_share"] == pytest.approx(products["A"] / sum(products.values()))
    assert 0 < rec["pagerank_top_share"] < 1
    head = built.headline()
    assert head["graph_pagerank_top1pct_share"] == pytest.approx(rec["pagerank_top_share"])
    assert head["graph_purchase_pagerank_top1pct_share"] == pytest.approx(
        buy["pagerank_top_share"])
    assert head["graph_components"] == 1.0 and all(k.startswith("graph_") for k in head)
    tops = {(r["graph"], r["product_id"]): r["pagerank"] for r in built.top_products}
    assert tops[("purchases", "A")] == pytest.approx(verts["p:A"]["purchase_pagerank"])


def test_edges_carry_the_closest_bought_products(built) -> None:
    edges = {(r["user_id"], r["product_id"]): r for r in built.edges.collect()}
    assert set(edges) == {("u1", "C"), ("u1", "D"), ("u2", "C"), ("u2", "B"), ("u3", "B")}
    assert edges[("u1", "C")]["because"] == ["A", "B"]  # C ~ A
    assert edges[("u1", "D")]["because"] == ["B", "A"]  # D ~ B
    assert edges[("u3", "B")]["because"] == ["C", "A"]  # neither is close; C a little less far
    assert edges[("u2", "B")]["rank"] == 2 and edges[("u2", "B")]["model_version"] == 7


@pytest.mark.parametrize("path", [train_path.DRIVER, train_path.DISTRIBUTED],
                         ids=["driver", "distributed"])
def test_because_picks_the_parallel_product_not_the_longest(spark, path) -> None:
    """B is nearly parallel to A; X is longer (a larger dot product) but points elsewhere."""
    factors = spark.createDataFrame(
        [("A", [1.0, 0.0, 0.0]), ("B", [0.99, 0.1, 0.0]), ("X", [3.0, 100.0, 0.0]),
         ("Y", [0.0, 0.0, 1.0]), ("W", [-1.0, 0.0, 0.0])], FACTORS)
    bought = spark.createDataFrame(
        [("u", p) for p in ("W", "Y", "A", "X")], "user_id string, product_id string")
    edges = spark.createDataFrame([("u", "B"), ("v", "B")], "user_id string, product_id string")
    got = {(r["user_id"], r["product_id"]): r["because"]
           for r in graph.because(spark, edges, bought, factors, path).collect()}
    assert got[("u", "B")] == ["A", "X", "Y"]
    assert got.get(("v", "B"), []) == []  # no history


def test_export_round_trips_and_is_deterministic(spark, built, tmp_path) -> None:
    where = graph_export.export(built, tmp_path / "a")
    again = graph_export.export(built, tmp_path / "b")
    graph_export.export(built, tmp_path / "b")  # over an existing folder
    names = ["vertices.csv", "edges.csv", "degree_distribution.csv", "top_products.csv",
             "summary.json"]
    assert sorted(p.name for p in where.iterdir()) == sorted(names)
    for name in names:
        assert (where / name).read_bytes() == (again / name).read_bytes(), name

    edges = pd.read_csv(where / "edges.csv", keep_default_na=False)
    assert len(edges) == 5 and list(edges.columns) == list(graph_export.EDGE_COLUMNS)
    assert edges.set_index(["user_id", "product_id"]).loc[("u1", "C"), "because"] == "A|B"
    assert edges.groupby("user_id").size().to_dict() == {"u1": 2, "u2": 2, "u3": 1}
    verts = pd.read_csv(where / "vertices.csv")
    assert list(verts.columns) == list(graph_export.VERTEX_COLUMNS)
    assert verts.set_index("id").loc["p:B", "component"] == 1
    assert len(verts) == 8 and verts.set_index("id").loc["p:B", "description"] == "banana, ripe"
    assert verts.set_index("id").loc["p:A", "description"] == "apple"
    summary = json.loads((where / "summary.json").read_text())
    assert summary["recommendations"]["edges"] == 5
    assert pd.read_csv(where / "degree_distribution.csv")["products"].sum() == 10
    assert len(pd.read_csv(where / "top_products.csv")) == 7
    assert summary["purchases"]["pagerank_top_products"][0] == "A"

    read = spark.read.csv(str(where / "vertices.csv"), header=True, escape='"')
    assert read.count() == 8
    texts = {r["id"]: r["description"] for r in read.collect()}
    assert texts["p:B"] == "banana, ripe" and texts["p:C"] == 'cherry "red"'


def test_report_renders_the_three_views_offline(built, tmp_path, monkeypatch) -> None:
    from recsys.cli import main
    from visualizer import report

    monkeypatch.setenv("RECSYS_EXPORT_DIR", str(tmp_path))
    assert main(["report"]) == 1  # nothing exported yet
    graph_export.export(built, tmp_path)
    output = tmp_path / "page.html"
    assert main(["report", "--output", str(output)]) == 0
    assert "Recommendation network" in output.read_text(encoding="utf-8")

    layout = report.build_layout(tmp_path / "7")
    net, degrees, tops = layout.children
    pick, fig = net.children
    assert fig.title.text.startswith("Recommendation network: the 3 most recommended products and 3")
    assert "products by PageRank" in fig.title.text
    assert pick.options[0] == report.ALL and len(pick.options) >= 2  # "all" + the communities
    products = next(r.data_source.data for r in fig.renderers if "pagerank" in r.data_source.data)
    biggest = max(range(len(products["size"])), key=products["size"].__getitem__)
    assert products["pagerank"][biggest] == max(products["pagerank"])  # sized by PageRank
    assert all(c >= 1 for c in products["community"])  # every shown product has an edge
    assert products["colour"] == [report.community_colour(c) for c in products["community"]]
    assert [t.title for t in tops.tabs] == ["by recommendations", "by PageRank"]
    titles = [fig.title.text, degrees.title.text, tops.tabs[0].child.title.text,
              tops.tabs[1].child.title.text]
    assert titles[1].startswith("Degree distribution") and titles[2].startswith("Most recommended")
    assert titles[3].startswith("Products of highest PageRank")
    html = report.render(tmp_path / "7")
    assert "cdn.bokeh.org" not in html and "Bokeh" in html
    for title in titles:
        assert json.dumps(title)[1:-1] in html
