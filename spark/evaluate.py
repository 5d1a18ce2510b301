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

Two ways to compute all this, with the same definitions, as the cycle's path says
(`spark.train_path`):
- driver: a few collects (both matrices grouped by user, the factors) and numpy/Python. On the
  bundled data this takes about a second, where the Spark way runs some thirty small jobs (~10 s
  on two cores);
- distributed: joins and aggregations, nothing big on the driver.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
from pyspark.ml.recommendation import ALSModel
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from spark import recommend, train_path
from spark.train_path import TrainPath

log = logging.getLogger(__name__)


def model_and_baseline(
    model: ALSModel,
    train: DataFrame | pd.DataFrame,
    test: DataFrame | pd.DataFrame,
    k: int,
    implicit: bool,
    path: TrainPath,
) -> tuple[dict[str, float], dict[str, float]]:
    """The metrics of `model` (fitted on `train`) and of the popularity baseline on `test`; each
    dict has `schemas.metrics.METRIC_NAMES` and "eval_users". On the driver path the matrices may be Spark's or
    already on the driver (pandas: user, item, rating); the distributed path reads Spark's."""
    if path.driver:
        return _model_and_baseline_driver(model, train, test, k, implicit)
    if isinstance(train, pd.DataFrame) or isinstance(test, pd.DataFrame):
        raise TypeError("the distributed path evaluates Spark DataFrames, not pandas")
    return _model_and_baseline_spark(model, train, test, k, implicit)


# --- Spark ----------------------------------------------------------------------------------------


def _model_and_baseline_spark(
    model: ALSModel, train: DataFrame, test: DataFrame, k: int, implicit: bool
) -> tuple[dict[str, float], dict[str, float]]:
    relevant = relevant_items(train, test).cache()
    eval_users = relevant.select("user").distinct().cache()
    bought = recommend.bought_lists(train).cache()
    popular = recommend.popularity(train).cache()
    catalog = popular.count()  # the train catalogue, as coverage counts it
    recs = recommend.top_items(model, eval_users, k, bought, train_path.DISTRIBUTED).cache()
    metrics = ranking_metrics(recs, relevant, k, catalog)
    metrics["rmse"] = model_rmse(model, test, implicit)
    popular_recs = recommend.top_popular(popular, eval_users, k, bought)
    baseline = ranking_metrics(popular_recs, relevant, k, catalog)
    baseline["rmse"] = popularity_rmse(train, test, implicit)
    for df in (recs, popular, bought, relevant, eval_users):
        df.unpersist()
    return metrics, baseline


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


# --- driver ---------------------------------------------------------------------------------------


def by_user(pairs: DataFrame | pd.DataFrame) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """user -> (items, ratings) of a matrix's rows (columns user, item, rating), items in
    ascending order; a Spark matrix comes over in one Arrow transfer."""
    if not isinstance(pairs, pd.DataFrame):
        pairs = pairs.select("user", "item", "rating").toPandas()
    pairs = pairs.sort_values(["user", "item"], kind="stable")
    users = pairs["user"].to_numpy(np.int64)
    items = pairs["item"].to_numpy(np.int64)
    ratings = pairs["rating"].to_numpy(np.float64)
    if not len(users):
        return {}
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    return {int(users[a]): (items[a:b], ratings[a:b]) for a, b in zip(starts, ends, strict=True)}


def ranking_metrics_local(
    recs: dict[int, list[int]], relevant: dict[int, set[int]], k: int, catalog_size: int
) -> dict[str, float]:
    """`ranking_metrics` on the driver: `recs` user -> items best first, `relevant` user -> items
    (its keys are the evaluated users); the same definitions, the same result."""
    sums = {"precision": 0.0, "recall": 0.0, "ndcg": 0.0, "map": 0.0}
    covered: set[int] = set()
    for user, rel in relevant.items():
        top = recs.get(user, [])[:k]
        covered.update(top)
        hits, dcg, ap = 0, 0.0, 0.0
        for rank, item in enumerate(top, start=1):
            if item in rel:
                hits += 1
                dcg += 1.0 / math.log2(rank + 1)
                ap += hits / rank
        n_rel = len(rel)
        sums["precision"] += hits / k
        sums["recall"] += hits / n_rel
        sums["ndcg"] += dcg / sum(1.0 / math.log2(i + 1) for i in range(1, min(n_rel, k) + 1))
        sums["map"] += ap / min(n_rel, k)
    users = len(relevant)
    nan = float("nan")
    return {
        **{f"{name}_at_k": total / users if users else nan for name, total in sums.items()},
        "coverage": len(covered) / catalog_size if catalog_size else nan,
        "eval_users": float(users),
    }


def rmse_local(prediction: np.ndarray, label: np.ndarray) -> float:
    """`rmse` of two arrays; NaN when empty."""
    if len(prediction) == 0:
        return float("nan")
    diff = np.asarray(prediction, dtype=np.float64) - np.asarray(label, dtype=np.float64)
    return float(np.sqrt(np.mean(diff**2)))


def _model_and_baseline_driver(
    model: ALSModel,
    train: DataFrame | pd.DataFrame,
    test: DataFrame | pd.DataFrame,
    k: int,
    implicit: bool,
) -> tuple[dict[str, float], dict[str, float]]:
    train_by_user, test_by_user = by_user(train), by_user(test)
    bought = {user: set(items.tolist()) for user, (items, _) in train_by_user.items()}
    relevant = {}  # new purchases of known users, as in `relevant_items`
    for user, (items, _) in test_by_user.items():
        new = set(items.tolist()) - bought[user] if user in bought else set()
        if new:
            relevant[user] = new
    # Distinct train buyers per item id (as in `recommend.popularity`); the catalogue has > 0.
    buyers = np.bincount(np.fromiter((i for b in bought.values() for i in b), np.int64))
    catalog = int(np.count_nonzero(buyers))
    item_factors = recommend.Factors(model.itemFactors)
    user_factors = recommend.Factors(model.userFactors)

    model_recs = _model_top(user_factors, item_factors, bought, list(relevant), k)
    metrics = ranking_metrics_local(model_recs, relevant, k, catalog)
    popular_recs = _popular_top(buyers, bought, list(relevant), k)
    baseline = ranking_metrics_local(popular_recs, relevant, k, catalog)

    # RMSE on the test rows of users known to train; the model also needs the item known to it,
    # popularity an item with train buyers (the same items: ALS knows exactly the train items).
    users, items, labels = [], [], []
    for user, (test_items, ratings) in test_by_user.items():
        if user in bought:
            users += [user] * len(test_items)
            items += test_items.tolist()
            labels += [1.0] * len(test_items) if implicit else ratings.tolist()
    users_a, items_a, labels_a = np.array(users, int), np.array(items, int), np.array(labels)
    u_rows, i_rows = user_factors.rows_of(users_a), item_factors.rows_of(items_a)
    known = (u_rows >= 0) & (i_rows >= 0)
    predicted = np.einsum(
        "ij,ij->i", user_factors.matrix[u_rows[known]], item_factors.matrix[i_rows[known]]
    )
    metrics["rmse"] = rmse_local(predicted, labels_a[known])
    in_train = items_a < len(buyers)
    in_train[in_train] = buyers[items_a[in_train]] > 0
    if implicit:  # the share of train users who bought the product
        item_pred = buyers / max(len(bought), 1)
    else:  # the product's mean train rating
        rated = np.concatenate([i for i, _ in train_by_user.values()])
        ratings = np.concatenate([r for _, r in train_by_user.values()])
        item_pred = np.bincount(rated, weights=ratings) / np.maximum(np.bincount(rated), 1)
    baseline["rmse"] = rmse_local(item_pred[items_a[in_train]], labels_a[in_train])
    return metrics, baseline


def _model_top(
    user_factors: recommend.Factors,
    item_factors: recommend.Factors,
    bought: dict[int, set[int]],
    users: list[int],
    k: int,
) -> dict[int, list[int]]:
    """The model's top k of `users`, bought items left out, as `recommend.top_items`."""
    rows = user_factors.rows_of(np.array(users, dtype=np.int64))
    users = [u for u, row in zip(users, rows.tolist(), strict=True) if row >= 0]
    best, _ = item_factors.best(user_factors.matrix[rows[rows >= 0]],
                                [list(bought[u]) for u in users], k)
    return {user: items[items >= 0].tolist() for user, items in zip(users, best, strict=True)}


def _popular_top(
    buyers: np.ndarray, bought: dict[int, set[int]], users: list[int], k: int
) -> dict[int, list[int]]:
    """The k most bought items each user has not bought (ties by item), as
    `recommend.top_popular`."""
    catalog = int(np.count_nonzero(buyers))
    by_popularity = np.lexsort((np.arange(len(buyers)), -buyers))[:catalog].tolist()
    out = {}
    for user in users:
        mine, top = bought.get(user, set()), []
        for item in by_popularity:
            if len(top) == k:
                break
            if item not in mine:
                top.append(item)
        out[user] = top
    return out
