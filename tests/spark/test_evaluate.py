"""Offline metrics on tiny hand-built data with hand-computed answers, cross-checked against
Spark's own RankingMetrics."""

from __future__ import annotations

import math

import pytest
from pyspark.mllib.evaluation import RankingMetrics

from recsys.settings import load
from spark import evaluate, train, train_path

pytestmark = pytest.mark.spark

# Items are numbers: A=1, B=2, C=3, D=4, X=24, Y=25, Z=26.
RECS = [  # (user, item, rank)
    (1, 1, 1), (1, 2, 2), (1, 3, 3),  # user 1: A B C
    (2, 24, 1), (2, 25, 2), (2, 26, 3),  # user 2: X Y Z
    (9, 5, 1),  # user 9 has nothing relevant: not evaluated, not counted in coverage
]
RELEVANT = [(1, 1), (1, 3), (1, 4), (2, 26), (3, 1)]  # user 3: relevant, no recommendation


def _hand_computed() -> dict[str, float]:
    l2 = math.log2
    user1 = {
        "precision": 2 / 3, "recall": 2 / 3,
        "ndcg": (1 + 1 / l2(4)) / (1 + 1 / l2(3) + 1 / l2(4)),
        "map": (1 / 1 + 2 / 3) / 3,
    }
    user2 = {"precision": 1 / 3, "recall": 1.0, "ndcg": (1 / l2(4)) / 1.0, "map": (1 / 3) / 1}
    user3 = dict.fromkeys(user1, 0.0)
    return {f"{m}_at_k": (user1[m] + user2[m] + user3[m]) / 3 for m in user1}


def _ranking_metrics(spark, recs, relevant, k, catalog_size, on_driver):
    """`evaluate.ranking_metrics` (Spark) or `ranking_metrics_local` (driver) on the same rows."""
    if on_driver:
        lists: dict[int, list[int]] = {}
        for user, item, _ in sorted(recs, key=lambda r: r[2]):
            lists.setdefault(user, []).append(item)
        sets: dict[int, set[int]] = {}
        for user, item in relevant:
            sets.setdefault(user, set()).add(item)
        return evaluate.ranking_metrics_local(lists, sets, k, catalog_size)
    return evaluate.ranking_metrics(
        spark.createDataFrame(recs, "user int, item int, rank int"),
        spark.createDataFrame(relevant, "user int, item int"),
        k,
        catalog_size,
    )


both_paths = pytest.mark.parametrize("on_driver", [False, True], ids=["spark", "driver"])


@both_paths
def test_ranking_metrics_match_the_hand_computed_values(spark, on_driver) -> None:
    got = _ranking_metrics(spark, RECS, RELEVANT, 3, 10, on_driver)
    expected = _hand_computed()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value), name
    assert got["coverage"] == pytest.approx(6 / 10)  # A B C X Y Z of 10
    assert got["eval_users"] == 3


@both_paths
@pytest.mark.filterwarnings("ignore:Deprecated in 3.0.0:FutureWarning")  # mllib's own SQLContext
def test_ranking_metrics_agree_with_spark_ranking_metrics(spark, on_driver) -> None:
    got = _ranking_metrics(spark, RECS, RELEVANT, 2, 10, on_driver)
    pairs = [
        ([i for u2, i, _ in sorted(RECS, key=lambda r: r[2]) if u2 == u],
         [i for u2, i in RELEVANT if u2 == u])
        for u in (1, 2, 3)
    ]
    reference = RankingMetrics(spark.sparkContext.parallelize(pairs, 1))
    assert got["precision_at_k"] == pytest.approx(reference.precisionAt(2))
    assert got["recall_at_k"] == pytest.approx(reference.recallAt(2))
    assert got["ndcg_at_k"] == pytest.approx(reference.ndcgAt(2))
    assert got["map_at_k"] == pytest.approx(reference.meanAveragePrecisionAt(2))


@both_paths
def test_perfect_recommendations_score_one(spark, on_driver) -> None:
    got = _ranking_metrics(spark, [(1, 7, 1), (1, 8, 2)], [(1, 7), (1, 8)], 2, 2, on_driver)
    for name in ("precision_at_k", "recall_at_k", "ndcg_at_k", "map_at_k", "coverage"):
        assert got[name] == pytest.approx(1.0), name


@both_paths
def test_no_evaluated_user_gives_nan_not_an_error(spark, on_driver) -> None:
    got = _ranking_metrics(spark, [(1, 7, 1)], [], 2, 5, on_driver)
    assert math.isnan(got["precision_at_k"]) and got["eval_users"] == 0


def test_identical_predictions_give_rmse_zero(spark) -> None:
    scored = spark.createDataFrame([(1.0, 1.0), (2.5, 2.5), (0.0, 0.0)], "label double, prediction double")
    assert evaluate.rmse(scored) == pytest.approx(0.0)


def test_rmse_hand_computed(spark) -> None:
    scored = spark.createDataFrame([(1.0, 2.0), (3.0, 1.0)], "label double, prediction double")
    assert evaluate.rmse(scored) == pytest.approx(math.sqrt((1 + 4) / 2))


def test_relevant_items_are_new_purchases_of_known_users(spark) -> None:
    schema = "user int, item int, rating float"
    train = spark.createDataFrame([(1, 1, 1.0), (1, 2, 1.0), (2, 1, 1.0)], schema)
    test = spark.createDataFrame(
        [(1, 1, 1.0), (1, 3, 1.0), (2, 1, 1.0), (5, 3, 1.0)], schema
    )  # user 1 rebuys 1 (not relevant) and buys 3; user 2 only rebuys; user 5 is new
    got = sorted(tuple(r) for r in evaluate.relevant_items(train, test).collect())
    assert got == [(1, 3)]


def test_popularity_rmse_uses_the_buyer_share_as_preference(spark) -> None:
    schema = "user int, item int, rating float"
    train = spark.createDataFrame([(1, 1, 1.0), (2, 1, 1.0), (1, 2, 1.0), (3, 3, 1.0)], schema)
    test = spark.createDataFrame([(3, 1, 1.0), (9, 1, 1.0), (3, 7, 1.0)], schema)
    # Only (3, 1) has a known user and item: predicted share 2/3 against preference 1.
    assert evaluate.popularity_rmse(train, test, implicit=True) == pytest.approx(1 / 3)


def _matrices(spark):
    """A train and a test matrix: 12 users, 20 products; test has rebuys, new purchases, a new
    user (99) and a new product (50). Every product's train ratings differ a little (+ i / 100):
    two products with the same buyers and ratings get equal scores, and the two top-N ways
    order equal scores differently."""
    schema = "user int, item int, rating float"
    train_rows = [(u, i, 1 + (u + i) % 3 + i / 100) for u in range(12) for i in range(20)
                  if (u * 7 + i * 3) % 5 < 2]
    test_rows = [(u, i, float(1 + u % 2)) for u in range(12) for i in range(20)
                 if (u * 5 + i) % 7 == 0] + [(99, 1, 1.0), (3, 50, 2.0)]
    return spark.createDataFrame(train_rows, schema), spark.createDataFrame(test_rows, schema)


@pytest.mark.parametrize("mode", ["implicit", "explicit"])
def test_driver_and_spark_evaluations_agree(spark, mode) -> None:
    train_m, test_m = _matrices(spark)
    model, _ = train.fit(train_m.cache(), load(als_rank=4, als_max_iter=3, seed=1, als_mode=mode))
    implicit = mode == "implicit"
    in_spark = evaluate.model_and_baseline(model, train_m, test_m, 3, implicit, train_path.DISTRIBUTED)
    on_driver = evaluate.model_and_baseline(model, train_m, test_m, 3, implicit, train_path.DRIVER)
    for spark_side, driver_side in zip(in_spark, on_driver, strict=True):
        assert spark_side["eval_users"] > 0
        assert spark_side.keys() == driver_side.keys()
        for name, value in spark_side.items():
            assert driver_side[name] == pytest.approx(value, rel=1e-5), name
