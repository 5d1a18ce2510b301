"""Offline metrics on the test split, after Microsoft Recommenders' `spark_evaluation.py`.

Protocol (the same for the model and for the popularity baseline):
- a test user's relevant products are those with a positive net quantity in the test period and
  none in the train period (buying again what one already has is not a discovery);
- users with no such product, or unknown to the train matrix, are not evaluated;
- recommendations leave out what the user bought in the train period.

Ranking metrics follow Spark's `RankingMetrics` definitions: precision@k = hits in the top k / k,
recall@k = hits / relevant, NDCG@k with binary gains and 1/log2(rank + 1) discounts, MAP@k = the
sum of precision at each hit / min(relevant, k); each is averaged over evaluated users. Coverage
is the share of the train catalogue that appears in someone's top k.

RMSE is on test pairs whose user and product both appear in training. In implicit mode ALS fits a
preference p = 1 for every bought pair (the quantity only weighs the confidence), so the RMSE
compares the predicted preference with 1; comparing it with log1p(quantity) would mix two scales.
In explicit mode it compares the predicted rating with the test rating.
"""

from __future__ import annotations

import logging
import math

from pyspark.ml.recommendation import ALSModel
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

log = logging.getLogger(__name__)

METRIC_NAMES = ("rmse", "precision_at_k", "recall_at_k", "ndcg_at_k", "map_at_k", "coverage")


def relevant_items(train: DataFrame, test: DataFrame) -> DataFrame:
    """(user, item) bought in the test period, not in the train period, by users known to train."""
    known = train.select("user").distinct()
    return (
        test.select("user", "item")
        .join(train.select("user", "item"), ["user", "item"], "left_anti")
        .join(known, "user")
        .distinct()
    )


def _ideal_dcg(n_relevant: Column, k: int) -> Column:
    """IDCG@k for n relevant items: sum of 1/log2(i + 1) for i = 1..min(n, k), by table lookup."""
    cumulative, total = [], 0.0
    for i in range(1, k + 1):
        total += 1.0 / math.log2(i + 1)
        cumulative.append(F.lit(total))
    return F.element_at(F.array(*cumulative), F.least(n_relevant, F.lit(k)).cast("int"))


def ranking_metrics(
    recs: DataFrame, relevant: DataFrame, k: int, catalog_size: int
) -> dict[str, float]:
    """precision/recall/NDCG/MAP@k and coverage of long `recs` (user, item, rank) against
    `relevant` (user, item); the evaluated users are exactly those in `relevant`.

    A user with relevant items but no recommendation counts as all misses. One Spark job: per
    user, the top k as a rank-sorted array of hit flags, folded into hits, DCG and the sum of
    precisions at the hits.
    """
    rel = relevant.select("user", "item").distinct()
    counts = rel.groupBy("user").agg(F.count(F.lit(1)).alias("n_rel"))
    top = recs.where(F.col("rank") <= k).select("user", "item", "rank")
    marked = top.join(rel.withColumn("hit", F.lit(1)), ["user", "item"], "left").select(
        "user", "item", "rank", F.coalesce("hit", F.lit(0)).alias("hit")
    )
    per_user = marked.groupBy("user").agg(
        F.sort_array(F.collect_list(F.struct("rank", "hit"))).alias("ranked"),
        F.collect_list("item").alias("items"),
    )
    # Fold in rank order: h = hits so far, dcg, ap = sum of precision@rank at each hit.
    start = F.struct(F.lit(0).alias("h"), F.lit(0.0).alias("dcg"), F.lit(0.0).alias("ap"))
    folded = F.aggregate(
        F.coalesce("ranked", F.array().cast("array<struct<rank:int,hit:int>>")),
        start,
        lambda acc, x: F.struct(
            (acc["h"] + x["hit"]).alias("h"),
            (acc["dcg"] + x["hit"] / F.log2(x["rank"] + 1)).alias("dcg"),
            (acc["ap"] + x["hit"] * (acc["h"] + 1) / x["rank"]).alias("ap"),
        ),
    )
    scored = counts.join(per_user, "user", "left").select(
        "n_rel", "items", folded.alias("f")
    )
    row = scored.agg(
        F.count(F.lit(1)).alias("users"),
        F.avg(F.col("f.h") / k).alias("precision"),
        F.avg(F.col("f.h") / F.col("n_rel")).alias("recall"),
        F.avg(F.col("f.dcg") / _ideal_dcg(F.col("n_rel"), k)).alias("ndcg"),
        F.avg(F.col("f.ap") / F.least(F.col("n_rel"), F.lit(k))).alias("map"),
        F.size(F.array_distinct(F.flatten(F.collect_list("items")))).alias("covered"),
    ).first()
    nan = float("nan")

    def value(name: str) -> float:
        return nan if row[name] is None else float(row[name])

    covered = max(int(row["covered"] or 0), 0)
    return {
        "precision_at_k": value("precision"),
        "recall_at_k": value("recall"),
        "ndcg_at_k": value("ndcg"),
        "map_at_k": value("map"),
        "coverage": covered / catalog_size if catalog_size else nan,
        "eval_users": float(row["users"]),
    }


def rmse(scored: DataFrame, label: str = "label", prediction: str = "prediction") -> float:
    """Root mean squared error over the rows; NaN when there are none."""
    value = scored.agg(F.sqrt(F.avg((F.col(prediction) - F.col(label)) ** 2))).first()[0]
    return float("nan") if value is None else float(value)


def _label(test: DataFrame, implicit: bool) -> Column:
    return F.lit(1.0) if implicit else F.col("rating").cast("double")


def model_rmse(model: ALSModel, test: DataFrame, implicit: bool) -> float:
    """RMSE of the model on test pairs of known users and products (cold start dropped)."""
    scored = model.transform(test.select("user", "item", "rating")).select(
        F.col("prediction").cast("double").alias("prediction"), _label(test, implicit).alias("label")
    )
    return rmse(scored)


def popularity_rmse(train: DataFrame, test: DataFrame, implicit: bool) -> float:
    """RMSE of the popularity baseline on the same pairs as `model_rmse`.

    Implicit: the predicted preference is the share of train users who bought the product.
    Explicit: the product's mean train rating.
    """
    users = train.select("user").distinct()
    if implicit:
        n_users = users.count()
        item_pred = train.groupBy("item").agg(
            (F.countDistinct("user") / F.lit(max(n_users, 1))).alias("prediction")
        )
    else:
        item_pred = train.groupBy("item").agg(F.avg("rating").alias("prediction"))
    scored = (
        test.select("user", "item", "rating")
        .join(users, "user")
        .join(item_pred, "item")
        .select(F.col("prediction").cast("double"), _label(test, implicit).alias("label"))
    )
    return rmse(scored)
