"""The graph step of a training cycle (`spark.job.publish_graph`) on a model trained from the
bundled data: GraphX's columns in vertices.csv, its figures in summary.json, and the headline
ones in model-ready's metrics (the ModelReady schema unchanged: they are `graph_*` doubles)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from recsys.paths import BUNDLED_DATA
from recsys.settings import load
from recsys.topics import create_topics, renamed
from schemas import codec
from schemas import topics as declared
from spark import graph, graph_export, job, pipeline, publish
from spark.csv_input import read_purchases_csv
from spark.publish import Topics

pytestmark = pytest.mark.integration


def test_graph_step_exports_graphx_figures_and_model_ready_carries_them(settings, unique, spark):
    s = load(**{**settings.model_dump(), "als_rank": 4, "als_max_iter": 3, "top_n": 5,
                "eval_k": 5, "promote_gate": False, "spark_shuffle_partitions": 2})
    used = [declared.topic(declared.GRAPH_EDGES)]
    create_topics(s, topics=used, names=renamed(f"t{unique}.", topics=used))
    topics = Topics.with_prefix(f"t{unique}.")
    sales = read_purchases_csv(spark, BUNDLED_DATA).limit(30_000).cache()
    result = pipeline.run_training(spark, sales, s, model_version=1,
                                   indexes=pipeline.load_indexes(spark, s))
    try:
        n, where = job.publish_graph(spark, s, topics, result, sales)
    finally:
        result.recommendations.unpersist()
        sales.unpersist()

    verts = pd.read_csv(where / "vertices.csv", dtype={"original_id": str})
    assert list(verts.columns) == list(graph_export.VERTEX_COLUMNS)
    summary = json.loads((where / "summary.json").read_text())
    rec, buy = summary["recommendations"], summary["purchases"]
    assert n == rec["edges"] == int(verts.query("type == 'user'")["degree"].sum())
    # PageRank for every vertex of the recommendation graph, summing to their number
    assert verts["pagerank"].notna().all()
    assert verts["pagerank"].sum() == pytest.approx(len(verts), rel=1e-6)
    linked = verts["degree"] > 0
    assert (verts.loc[linked, "component"] >= 1).all()
    assert (verts.loc[~linked, "component"] == 0).all()
    assert (verts.loc[linked, "community"] >= 1).all()
    assert verts["community"].max() == rec["communities"]
    sizes = verts.loc[linked, "community"].value_counts()
    assert sizes.max() == rec["largest_community"] == rec["community_sizes"][0]
    assert rec["community_sizes"] == sorted(rec["community_sizes"], reverse=True)
    assert rec["components"] == verts.loc[linked, "component"].nunique()
    products = verts[verts["type"] == "product"]
    assert products["purchase_pagerank"].notna().all()
    for figures, column in ((rec, "pagerank"), (buy, "purchase_pagerank")):
        k = math.ceil(len(products) * graph.TOP_SHARE)
        ranks = products[column].sort_values(ascending=False)
        assert figures["pagerank_top_share"] == pytest.approx(ranks.iloc[:k].sum() / ranks.sum(),
                                                              rel=1e-6)
        assert 0 < figures["pagerank_top_share"] < 1
    # recommendations concentrate on fewer products than purchases do
    assert rec["pagerank_top_share"] > buy["pagerank_top_share"]

    record = publish.model_ready_record(result, "threshold", [], 1.0)
    metrics = codec.decode(codec.encode("ModelReady", record))[1]["metrics"]
    assert {"precision_at_k", "rmse"} <= set(metrics)
    assert metrics["graph_pagerank_top1pct_share"] == pytest.approx(rec["pagerank_top_share"])
    assert metrics["graph_purchase_pagerank_top1pct_share"] == pytest.approx(
        buy["pagerank_top_share"])
    assert metrics["graph_communities"] == rec["communities"]
    assert metrics["graph_components"] == rec["components"]
