"""Top-N from ALS and from popularity: bought products left out, ranks in order, the published
shape; and one tiny end-to-end `run_training` (Spark local)."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import functions as F

from recsys.settings import load
from spark import pipeline, recommend, train, train_path
from spark.pipeline import index_path, run_training, save

pytestmark = pytest.mark.spark

MATRIX = "user int, item int, rating float"


def _matrix(spark):
    """40 products; user 0 bought 30 of them (more than the first bucket of 16), users 1..9 a few
    each, product 0 most of all."""
    rows = [(0, i, 1.0) for i in range(30)]
    for u in range(1, 10):
        rows += [(u, 0, 1.0), (u, u, 1.0), (u, 30 + u, 1.0)]
    return spark.createDataFrame(rows, MATRIX)


@pytest.fixture(scope="module")
def model(spark):
    conf = load(als_rank=4, als_max_iter=3, seed=1)
    fitted, seconds = train.fit(_matrix(spark).cache(), conf)
    assert seconds > 0
    return fitted


def _lists(long_recs) -> dict[int, list[tuple[int, float, int]]]:
    out: dict[int, list] = {}
    for r in long_recs.orderBy("user", "rank").collect():
        out.setdefault(r["user"], []).append((r["item"], r["score"], r["rank"]))
    return out


def test_bucket_bounds_grow_by_four_and_stop_at_the_catalogue(spark) -> None:
    sizes = spark.createDataFrame([(0,), (16,), (17,), (64,), (65,), (5000,)], "b int")
    got = [r[0] for r in sizes.select(recommend._bucket_bound(F.col("b"), 1000)).collect()]
    assert got == [16, 16, 64, 64, 256, 1000]


@pytest.mark.parametrize("path", [train_path.DRIVER, train_path.DISTRIBUTED],
                         ids=["driver", "distributed"])
def test_als_top_items_leave_out_bought_and_rank_by_score(spark, model, path) -> None:
    matrix = _matrix(spark)
    bought = recommend.bought_lists(matrix)
    got = _lists(recommend.top_items(model, matrix.select("user"), 5, bought, path))
    owned = {u: {r["item"] for r in matrix.where(F.col("user") == u).collect()} for u in range(10)}
    assert set(got) == set(range(10))
    for user, items in got.items():
        assert [rank for _, _, rank in items] == [1, 2, 3, 4, 5]  # every user gets n
        scores = [score for _, score, _ in items]
        assert scores == sorted(scores, reverse=True)
        assert not {item for item, _, _ in items} & owned[user], user
    assert {item for item, _, _ in got[0]} <= set(range(30, 40))  # only 10 left for user 0


def test_driver_and_spark_paths_agree(spark, model) -> None:
    matrix = _matrix(spark)
    bought = recommend.bought_lists(matrix)
    on_driver = _lists(recommend.top_items(model, matrix.select("user"), 4, bought, train_path.DRIVER))
    in_spark = _lists(recommend.top_items(model, matrix.select("user"), 4, bought,
                                          train_path.DISTRIBUTED))
    assert on_driver.keys() == in_spark.keys()
    for user, items in on_driver.items():
        assert [s for _, s, _ in items] == pytest.approx([s for _, s, _ in in_spark[user]], 1e-5)


@pytest.mark.parametrize("path", [train_path.DRIVER, train_path.DISTRIBUTED],
                         ids=["driver", "distributed"])
def test_als_top_items_without_filter_may_repeat_bought(spark, model, path) -> None:
    matrix = _matrix(spark)
    users = matrix.select("user").where("user = 0")
    got = _lists(recommend.top_items(model, users, 3, None, path))
    assert len(got[0]) == 3 and {i for i, _, _ in got[0]} <= set(range(30))  # its own products


def test_popular_top_leaves_out_bought_and_breaks_ties_by_item(spark) -> None:
    matrix = spark.createDataFrame(
        [(1, 10, 1.0), (2, 10, 1.0), (3, 10, 1.0), (1, 11, 1.0), (2, 11, 1.0), (3, 12, 1.0),
         (4, 13, 1.0)],
        MATRIX,
    )  # buyers: 10 -> 3, 11 -> 2, 12 -> 1, 13 -> 1
    popular = recommend.popularity(matrix)
    bought = recommend.bought_lists(matrix)
    users = spark.createDataFrame([(1,), (4,), (7,)], "user int")
    got = _lists(recommend.top_popular(popular, users, 2, bought))
    assert got[1] == [(12, 1.0, 1), (13, 1.0, 2)]  # 10, 11 bought; tie 12/13 by item
    assert got[4] == [(10, 3.0, 1), (11, 2.0, 2)]
    assert got[7] == [(10, 3.0, 1), (11, 2.0, 2)]  # unknown user: plain popularity


def test_with_ids_gives_the_published_shape(spark) -> None:
    recs = spark.createDataFrame(
        [(0, 1, 0.5, 2), (0, 0, 0.9, 1)], "user int, item int, score double, rank int"
    )
    users = spark.createDataFrame([("17850", 0)], "id string, idx int")
    products = spark.createDataFrame([("85123A", 0), ("71053", 1)], "id string, idx int")
    out = recommend.with_ids(recs, users, products)
    assert out.schema.simpleString() == (
        "struct<user_id:string,items:array<struct<product_id:string,score:double,rank:int>>>"
    )
    row = out.first()
    assert row["user_id"] == "17850"
    assert [(i["product_id"], i["rank"]) for i in row["items"]] == [("85123A", 1), ("71053", 2)]


def test_named_lists_on_the_driver_equal_with_ids(spark, model) -> None:
    matrix = _matrix(spark)
    bought = recommend.bought_lists(matrix)
    user_ids = np.array([f"U{u}" for u in range(10)], dtype=object)
    product_ids = np.array([f"P{p}" for p in range(40)], dtype=object)
    users = spark.createDataFrame([(n, i) for i, n in enumerate(user_ids)], "id string, idx int")
    products = spark.createDataFrame(
        [(n, i) for i, n in enumerate(product_ids)], "id string, idx int"
    )
    lists = recommend.top_lists_driver(model, matrix.select("user"), 4, bought)
    on_driver = recommend.named_lists(spark, lists, user_ids, product_ids)
    joined = recommend.with_ids(
        recommend.top_items(model, matrix.select("user"), 4, bought, train_path.DRIVER), users, products
    )
    assert on_driver.schema.simpleString() == joined.schema.simpleString()

    def rows(df):
        return {r["user_id"]: [(i["product_id"], round(i["score"], 6), i["rank"])
                               for i in r["items"]] for r in df.collect()}

    assert rows(on_driver) == rows(joined) and on_driver.count() == joined.count() == 10


def test_lists_from_driver_side_pairs_equal_the_collected_ones(spark, model) -> None:
    matrix = _matrix(spark)
    pairs = matrix.toPandas()
    bought = {u: np.sort(g["item"].to_numpy()) for u, g in pairs.groupby("user")}
    want = recommend.top_lists_driver(model, matrix.select("user"), 4,
                                      recommend.bought_lists(matrix))
    got = recommend.top_lists_local(model, np.unique(pairs["user"]), 4, bought)
    by_user = {int(u): (list(i), list(s)) for u, i, s in want.itertuples(index=False)}
    assert {int(u): (list(i), list(s)) for u, i, s in got.itertuples(index=False)} == by_user
    unknown = recommend.top_lists_local(model, np.array([0, 999]), 4, None)
    assert unknown["user"].tolist() == [0]  # a user the model does not know gets no list


@pytest.mark.parametrize("driver", [True, False], ids=["prepared-on-driver", "on-cluster"])
def test_run_training_end_to_end_on_tiny_data(spark, tmp_path: Path, driver) -> None:
    t0 = datetime(2011, 1, 1)
    rows = []
    for u in range(12):
        for j, p in enumerate((u % 4, 4 + u % 3, 8 + u % 2, 10 + u % 5)):
            rows.append((f"e{u}-{j}", f"U{u}", f"P{p}", 1 + j, t0 + timedelta(days=10 * j + u)))
    rows.append(("ret", "U0", "P0", -1, t0 + timedelta(days=1)))  # returns its first purchase
    sales = spark.createDataFrame(
        rows, "event_id string, user_id string, product_id string, quantity int, "
        "event_time timestamp",
    )
    conf = load(
        data_dir=tmp_path, als_rank=4, als_max_iter=3, top_n=3, eval_k=3,
        split_cutoff=t0 + timedelta(days=30),
    )
    path = train_path.DRIVER if driver else train_path.DISTRIBUTED
    result = run_training(spark, sales, conf, model_version=7,
                          indexes=pipeline.load_indexes(spark, conf), path=path)
    assert result.model_version == 7 and result.events == len(rows)
    assert result.users == 12 and result.products == 14
    assert result.event_time_min == t0 and result.train_seconds > 0
    assert set(result.metrics) == set(result.baseline_metrics) >= {"precision_at_k", "rmse"}
    assert int(result.params["eval_users"]) > 0
    assert Path(result.model_path) == Path(conf.models) / "7"
    save(spark, result)
    assert (Path(result.model_path) / "metadata").exists()
    rows = result.recommendations.collect()
    recs = {r["user_id"]: r["items"] for r in rows}
    assert len(recs) == len(rows) == 12  # one list per user
    assert all([i["rank"] for i in items] == [1, 2, 3] for items in recs.values())
    assert not {i["product_id"] for i in recs["U1"]} & {"P1", "P5", "P9", "P11"}  # U1 bought these
    assert Path(index_path(conf, "users")).exists()
    assert result.user_factors.count() == 12
