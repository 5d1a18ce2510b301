"""The recommendation graph on a hand-built case with known degrees, distribution, coverage and Gini;
`because` where the answer is obvious (driver and Spark paths agree); the export round-trips
through pandas and Spark and writing twice gives the same bytes."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta
from types import SimpleNamespace

import pandas as pd
import pytest

from spark import graph, graph_export

pytestmark = pytest.mark.unit

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
        item_factors=spark.createDataFrame(factors, FACTORS),
    )


@pytest.fixture(scope="module")
def built(spark):
    g = graph.build(spark, _result(spark), _sales(spark))
    yield g
    g.unpersist()


def test_gini_and_coverage_of_known_distributions() -> None:
    assert graph.gini([(0, 1), (1, 3), (3, 1)]) == pytest.approx(0.4)  # [0, 1, 1, 1, 3]
    assert graph.gini([(2, 4)]) == pytest.approx(0.0)
    assert graph.gini([(0, 3), (5, 1)]) == pytest.approx(3 / 4)  # one of four holds all
    assert math.isnan(graph.gini([(0, 2)]))
    assert graph.coverage([(0, 2), (1, 1), (2, 2)]) == pytest.approx(0.6)


def test_degrees_distribution_coverage_and_gini(built) -> None:
    s = built.summary
    assert s["model_version"] == 7 and "GraphFrames" in s["pagerank"]
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


def test_edges_carry_the_closest_bought_products(built) -> None:
    edges = {(r["user_id"], r["product_id"]): r for r in built.edges.collect()}
    assert set(edges) == {("u1", "C"), ("u1", "D"), ("u2", "C"), ("u2", "B"), ("u3", "B")}
    assert edges[("u1", "C")]["because"] == ["A", "B"]  # C ~ A
    assert edges[("u1", "D")]["because"] == ["B", "A"]  # D ~ B
    assert edges[("u3", "B")]["because"] == ["C", "A"]  # neither is close; C a little less far
    assert edges[("u2", "B")]["rank"] == 2 and edges[("u2", "B")]["model_version"] == 7


@pytest.mark.parametrize("on_driver", [True, False])
def test_because_picks_the_parallel_product_not_the_longest(spark, on_driver) -> None:
    """B is nearly parallel to A; X is longer (a larger dot product) but points elsewhere."""
    factors = spark.createDataFrame(
        [("A", [1.0, 0.0, 0.0]), ("B", [0.99, 0.1, 0.0]), ("X", [3.0, 100.0, 0.0]),
         ("Y", [0.0, 0.0, 1.0]), ("W", [-1.0, 0.0, 0.0])], FACTORS)
    bought = spark.createDataFrame(
        [("u", p) for p in ("W", "Y", "A", "X")], "user_id string, product_id string")
    edges = spark.createDataFrame([("u", "B"), ("v", "B")], "user_id string, product_id string")
    got = {(r["user_id"], r["product_id"]): r["because"]
           for r in graph.because(spark, edges, bought, factors, on_driver).collect()}
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
    assert len(verts) == 8 and verts.set_index("id").loc["p:B", "description"] == "banana, ripe"
    assert verts.set_index("id").loc["p:A", "description"] == "apple"
    summary = json.loads((where / "summary.json").read_text())
    assert summary["recommendations"]["edges"] == 5
    assert pd.read_csv(where / "degree_distribution.csv")["products"].sum() == 10
    assert len(pd.read_csv(where / "top_products.csv")) == 7

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
    titles = [child.title.text for child in layout.children]
    assert len(titles) == 3
    assert titles[0].startswith("Recommendation network: the 3 most recommended products and 3")
    assert titles[1].startswith("Degree distribution") and titles[2].startswith("Most recommended")
    html = report.render(tmp_path / "7")
    assert "cdn.bokeh.org" not in html and "Bokeh" in html
    for title in titles:
        assert json.dumps(title)[1:-1] in html
