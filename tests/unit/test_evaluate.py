"""Offline metrics on tiny hand-built data with hand-computed answers, cross-checked against
Spark's own RankingMetrics."""

from __future__ import annotations

import math

import pytest
from pyspark.mllib.evaluation import RankingMetrics

from spark import evaluate

pytestmark = pytest.mark.unit

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


def test_ranking_metrics_match_the_hand_computed_values(spark) -> None:
    recs = spark.createDataFrame(RECS, "user int, item int, rank int")
    relevant = spark.createDataFrame(RELEVANT, "user int, item int")
    got = evaluate.ranking_metrics(recs, relevant, k=3, catalog_size=10)
    expected = _hand_computed()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value), name
    assert got["coverage"] == pytest.approx(6 / 10)  # A B C X Y Z of 10
    assert got["eval_users"] == 3


@pytest.mark.filterwarnings("ignore:Deprecated in 3.0.0:FutureWarning")  # mllib's own SQLContext
def test_ranking_metrics_agree_with_spark_ranking_metrics(spark) -> None:
    recs = spark.createDataFrame(RECS, "user int, item int, rank int")
    relevant = spark.createDataFrame(RELEVANT, "user int, item int")
    got = evaluate.ranking_metrics(recs, relevant, k=2, catalog_size=10)
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


def test_perfect_recommendations_score_one(spark) -> None:
    recs = spark.createDataFrame([(1, 7, 1), (1, 8, 2)], "user int, item int, rank int")
    relevant = spark.createDataFrame([(1, 7), (1, 8)], "user int, item int")
    got = evaluate.ranking_metrics(recs, relevant, k=2, catalog_size=2)
    for name in ("precision_at_k", "recall_at_k", "ndcg_at_k", "map_at_k", "coverage"):
        assert got[name] == pytest.approx(1.0), name


def test_no_evaluated_user_gives_nan_not_an_error(spark) -> None:
    recs = spark.createDataFrame([(1, 7, 1)], "user int, item int, rank int")
    relevant = spark.createDataFrame([], "user int, item int")
    got = evaluate.ranking_metrics(recs, relevant, k=2, catalog_size=5)
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
