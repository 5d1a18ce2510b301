"""Top-N products per user from an ALS model or from popularity, optionally without the products
the user already bought, in one long shape (user, item, score, rank) that both evaluation and
publishing read; `with_ids` turns it into the published shape.

Excluding bought products exactly needs more than N candidates for a user who bought many (at most
N + b for b bought). Two ways, as the cycle's path says (`spark.train_path`):
- driver: the factors come to the driver in one Arrow transfer each, users are scored in blocks,
  each block one matrix product against all items, bought items get -inf, and a partial sort
  keeps the top N. On the bundled data this takes about a second, where ALS's own
  `recommendForUserSubset` took longer than the ALS fit itself (it emits and regroups every
  candidate row through a shuffle, and the bought lists then need the deep candidates);
- distributed: users are grouped by b into a few buckets (b <= 16, 64, 256, ...) and each bucket
  asks ALS's blocked `recommendForUserSubset` for N + its bound, so the whole catalogue is scored
  for everybody but shipped only for the users who need it.

`published` is the cycle's step (every user's list in the published shape); `top_items` the long
shape evaluation and `recsys models promote` read.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pyarrow as pa
from implicit.cpu.topk import topk
from pyspark.ml.recommendation import ALSModel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from scipy import sparse

from spark.index import Index
from spark.train_path import TrainPath

log = logging.getLogger(__name__)

# On the driver, users are scored in blocks of up to this many scores (32 MB of float32).
_BLOCK_FLOATS = 8_000_000
_MASKED = np.finfo(np.float32).min  # implicit's top-k score of a filtered item
_FIRST_BUCKET = 16
_BUCKET_GROWTH = 4


def bought_lists(matrix: DataFrame) -> DataFrame:
    """(user, bought array<int>) from the interaction matrix: what to leave out per user."""
    return matrix.groupBy("user").agg(F.collect_list("item").alias("bought"))


def _bucket_bound(size: F.Column, limit: int) -> F.Column:
    """The smallest 16 * 4^j >= size, capped at `limit` (the catalogue size)."""
    bound, bounds = _FIRST_BUCKET, []
    while bound < limit:
        bounds.append(bound)
        bound *= _BUCKET_GROWTH
    if not bounds:
        return F.lit(limit)
    # One flat CASE (a nested one would repeat `size` in every branch).
    case = F.when(size <= F.lit(bounds[0]), F.lit(bounds[0]))
    for b in bounds[1:]:
        case = case.when(size <= F.lit(b), F.lit(b))
    return case.otherwise(F.lit(limit))


def top_items(
    model: ALSModel,
    users: DataFrame,
    n: int,
    bought: DataFrame | None,
    path: TrainPath,
) -> DataFrame:
    """(user, item, score, rank) for the `users` (column `user`) the model knows; rank 1 is best.

    With `bought` (user, bought array), those items never appear and every user still gets up
    to n items (fewer only when the catalogue runs out).
    """
    users = users.select("user").distinct()
    if path.driver:
        return _top_items_driver(model, users, n, bought)
    return _top_items_spark(model, users, n, bought)


def published(
    spark: SparkSession,
    model: ALSModel,
    full: DataFrame,
    n: int,
    filter_bought: bool,
    indexes: tuple[Index, Index],
    path: TrainPath,
    local: tuple[np.ndarray, dict[int, np.ndarray]] | None = None,
) -> tuple[DataFrame, int]:
    """Every user of `full` (the matrix the model was fitted on) with their top n, in the
    published shape of `with_ids` (cached), and how many users got a non-empty list.

    Driver path: scored and named on the driver; `local` (the users and their bought items
    already there, when the cycle prepared on the driver) saves collecting them again.
    Distributed: ALS's blocked scoring, ids joined back in Spark."""
    bought = bought_lists(full) if filter_bought else None  # lazy
    if not path.driver:
        long_recs = _top_items_spark(model, full.select("user").distinct(), n, bought)
        recs = with_ids(long_recs, *(ix.frame(spark) for ix in indexes)).cache()
        return recs, recs.count()
    if local is not None:
        users, bought_local = local
        lists = top_lists_local(model, users, n, bought_local if filter_bought else None)
    else:
        lists = top_lists_driver(model, full.select("user"), n, bought)
    recs = named_lists(spark, lists, *(ix.names() for ix in indexes)).cache()
    return recs, int((lists["items"].map(len) > 0).sum())


def _stack(vectors: pd.Series) -> np.ndarray:
    """A column of equal-length arrays (from toPandas) as one float32 matrix, a row each."""
    if len(vectors) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack(vectors.to_numpy()).astype(np.float32, copy=False)


class Factors:
    """ALS factors (`model.itemFactors` or `userFactors`) on the driver, a row per id."""

    def __init__(self, factors: DataFrame) -> None:
        rows = factors.select("id", "features").toPandas()
        self.ids = rows["id"].to_numpy(dtype=np.int64)
        self.matrix = _stack(rows["features"])
        # position[item id] = its row in `matrix`, -1 for ids the model does not know.
        self.position = np.full(int(self.ids.max()) + 1 if len(rows) else 1, -1, dtype=np.int64)
        self.position[self.ids] = np.arange(len(rows))

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """The rows of `ids` in `matrix`; -1 for ids the model does not know."""
        ids = np.asarray(ids, dtype=np.int64)
        known = (ids >= 0) & (ids < len(self.position))
        return np.where(known, self.position[np.where(known, ids, 0)], -1)

    def best(
        self, users: np.ndarray, bought: list, n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """For item factors: the best n items of each row of `users` (user factors) and their
        scores, best first, as two (rows, n) arrays; the items of `bought[i]` (a list, an array
        or None) are left out for user i, and a row short of n items is padded with item -1 and
        score -inf. Scored in blocks by `implicit`'s top-k (a matrix product per block and a
        heap select in C++ on every core): at 100 K items 217 s per million users, against
        ~1,500 s for numpy's matrix product and `argpartition` (docs/benchmarks.md)."""
        keep = max(min(n, len(self.ids)), 0)
        out_items = np.full((len(users), keep), -1, dtype=np.int64)
        out_scores = np.full((len(users), keep), -np.inf, dtype=np.float64)
        if keep == 0 or len(users) == 0:
            return out_items, out_scores
        users = np.ascontiguousarray(users, dtype=np.float32).reshape(len(users), -1)
        block = max(1, _BLOCK_FLOATS // max(len(self.ids), 1))
        for lo in range(0, len(users), block):
            part = users[lo:lo + block]
            rows, scores = topk(self.matrix, part, keep, num_threads=0,
                                filter_query_items=self._bought_rows(bought[lo:lo + block]))
            # implicit scores a masked item -FLT_MAX: a row that ran out of items ends in them.
            finite = np.isfinite(scores) & (scores > _MASKED)
            out_items[lo:lo + len(part)] = np.where(finite, self.ids[np.where(finite, rows, 0)],
                                                     -1)
            out_scores[lo:lo + len(part)] = np.where(finite, scores, -np.inf)
        return out_items, out_scores

    def _bought_rows(self, bought: list) -> sparse.csr_matrix | None:
        """The users' bought items as a sparse (users x matrix rows) mask for the top-k filter;
        ids the model does not know are dropped. None when nobody bought anything."""
        lists = [np.empty(0, np.int64) if b is None else self.rows_of(np.asarray(b, np.int64))
                 for b in bought]
        lists = [r[r >= 0] for r in lists]
        sizes = np.fromiter((len(r) for r in lists), np.int64, count=len(lists))
        if not sizes.sum():
            return None
        indptr = np.r_[0, np.cumsum(sizes)]
        columns = np.concatenate(lists).astype(np.int32)
        return sparse.csr_matrix((np.ones(len(columns), np.float32), columns, indptr),
                                 shape=(len(lists), len(self.ids)))

    def top(
        self, users: np.ndarray | list, bought: list, n: int
    ) -> list[tuple[list[int], list[float]]]:
        """`best` as a (items, scores) pair of lists per user, without the padding."""
        items, scores = self.best(np.asarray(users), bought, n)
        return [(i[i >= 0].tolist(), sc[i >= 0].tolist()) for i, sc in zip(items, scores,
                                                                         strict=True)]


def top_lists_driver(
    model: ALSModel, users: DataFrame, n: int, bought: DataFrame | None
) -> pd.DataFrame:
    """(user, items, scores) of the `users` the model knows, best first, on the driver: users are
    scored in blocks against all items with one matrix product each."""
    items = Factors(model.itemFactors)
    users = users.select(F.col("user").alias("id")).distinct()
    rows = model.userFactors.join(users, "id")
    if bought is not None:
        rows = rows.join(bought.withColumnRenamed("user", "id"), "id", "left")
    else:
        rows = rows.withColumn("bought", F.lit(None).cast("array<int>"))
    # One Arrow transfer: the driver path is only taken while users and items fit the driver.
    rows = rows.select("id", "features", "bought").toPandas()
    bought_lists = [None if b is None else b.tolist() for b in rows["bought"]]
    return _lists(items, rows["id"].to_numpy(), _stack(rows["features"]), bought_lists, n)


def top_lists_local(
    model: ALSModel, users: np.ndarray, n: int, bought: dict[int, np.ndarray] | None
) -> pd.DataFrame:
    """`top_lists_driver` for users (distinct numbers) and bought items already on the driver."""
    items, known = Factors(model.itemFactors), Factors(model.userFactors)
    rows = known.rows_of(users)
    users = np.asarray(users)[rows >= 0]
    picked = [None if bought is None else bought.get(int(u)) for u in users]
    bought_lists = [None if b is None else b.tolist() for b in picked]
    return _lists(items, users, known.matrix[rows[rows >= 0]], bought_lists, n)


def _lists(
    items: Factors, users: np.ndarray, features: np.ndarray, bought: list, n: int
) -> pd.DataFrame:
    """(user, items, scores) of each user (a row of `features`), scored against all items."""
    best, scores = items.best(features, bought, n)
    counts = (best >= 0).sum(axis=1)
    return pd.DataFrame({
        "user": np.asarray(users).astype(np.int32),
        "items": [row[:c] for row, c in zip(best.astype(np.int32), counts.tolist(), strict=True)],
        "scores": [row[:c] for row, c in zip(scores, counts.tolist(), strict=True)],
    })


def named_lists(
    spark: SparkSession, lists: pd.DataFrame, user_ids: np.ndarray, product_ids: np.ndarray
) -> DataFrame:
    """`top_lists_driver`'s lists in the published shape of `with_ids`, the ids mapped on the
    driver (`user_ids[n]` is the id numbered n; see `spark.index.Index.names`)."""
    lists = lists[lists["items"].map(len) > 0]
    # Straight to Arrow as offsets and flat values (a pandas column of arrays converts per row).
    sizes = lists["items"].map(len).to_numpy(np.int32)
    offsets = pa.array(np.r_[0, np.cumsum(sizes)].astype(np.int32))
    flat = (np.concatenate(lists["items"].to_list()) if len(lists) else np.empty(0, np.int64))
    scores = (np.concatenate(lists["scores"].to_list()) if len(lists) else np.empty(0))
    named = pa.table({
        "user_id": pa.array(user_ids[lists["user"].to_numpy()], pa.string()),
        "product_ids": pa.ListArray.from_arrays(
            offsets, pa.array(product_ids[flat.astype(np.int64)], pa.string())),
        "scores": pa.ListArray.from_arrays(offsets, pa.array(scores, pa.float64())),
    })
    df = spark.createDataFrame(named)
    ranked = F.transform(
        F.arrays_zip("product_ids", "scores"),
        lambda x, i: F.struct(
            x["product_ids"].alias("product_id"),
            x["scores"].alias("score"),
            (i + 1).cast("int").alias("rank"),
        ),
    )
    return df.select("user_id", ranked.alias("items"))


def _top_items_driver(
    model: ALSModel, users: DataFrame, n: int, bought: DataFrame | None
) -> DataFrame:
    """`top_lists_driver` in the long shape."""
    out = top_lists_driver(model, users, n, bought)
    recs = users.sparkSession.createDataFrame(
        out, "user int, items array<int>, scores array<double>"
    )
    return recs.select(
        "user", F.posexplode(F.arrays_zip("items", "scores")).alias("pos", "rec")
    ).select(
        "user",
        F.col("rec.items").alias("item"),
        F.col("rec.scores").alias("score"),
        (F.col("pos") + 1).cast("int").alias("rank"),
    )


def _top_items_spark(
    model: ALSModel, users: DataFrame, n: int, bought: DataFrame | None
) -> DataFrame:
    """ALS's blocked `recommendForUserSubset`, one call per bucket of bought-list sizes."""
    if bought is None:
        recs = model.recommendForUserSubset(users, n)
        return _explode(recs.select("user", F.col("recommendations").alias("recs")))
    n_items = model.itemFactors.count()
    with_bought = users.join(bought, "user", "left").select(
        "user", F.coalesce("bought", F.array().cast("array<int>")).alias("bought")
    )
    with_bought = with_bought.withColumn(
        "need", F.least(F.lit(n) + _bucket_bound(F.size("bought"), n_items), F.lit(n_items))
    ).cache()
    needs = sorted(r["need"] for r in with_bought.select("need").distinct().collect())
    parts = [
        model.recommendForUserSubset(with_bought.where(F.col("need") == need), need)
        for need in needs
    ]
    if not parts:
        return _explode(users.select("user", F.array().alias("recs")).limit(0))
    recs = parts[0]
    for part in parts[1:]:
        recs = recs.unionByName(part)
    # recommendations arrive sorted by score; drop bought items in place, keep the first n.
    kept = recs.join(with_bought.select("user", "bought"), "user").select(
        "user",
        F.slice(
            F.filter("recommendations", lambda r: ~F.array_contains(F.col("bought"), r["item"])),
            1,
            n,
        ).alias("recs"),
    )
    return _explode(kept)


def _explode(recs: DataFrame) -> DataFrame:
    """(user, recs array<struct<item, rating>>) sorted best first -> long rows with rank."""
    return recs.select("user", F.posexplode("recs").alias("pos", "rec")).select(
        "user",
        F.col("rec.item").alias("item"),
        F.col("rec.rating").cast("double").alias("score"),
        (F.col("pos") + 1).cast("int").alias("rank"),
    )


def popularity(matrix: DataFrame) -> DataFrame:
    """(item, buyers, pop_rank): products by number of distinct buyers, ties by item number."""
    counts = matrix.groupBy("item").agg(F.countDistinct("user").alias("buyers"))
    order = Window.partitionBy(F.lit(0)).orderBy(F.desc("buyers"), F.asc("item"))
    return counts.withColumn("pop_rank", F.row_number().over(order))


def top_popular(
    popular: DataFrame, users: DataFrame, n: int, bought: DataFrame | None = None
) -> DataFrame:
    """The popularity baseline in the shape of `top_items`: the n most bought products each user
    has not bought; the score is the number of distinct buyers."""
    users = users.select("user").distinct()
    if bought is None:
        sized = users.withColumn("b", F.lit(0))
    else:
        sized = users.join(bought, "user", "left").select(
            "user", F.coalesce(F.size("bought"), F.lit(0)).alias("b")
        )
    # A user who bought b products needs at most the n + b most popular ones.
    candidates = sized.join(
        F.broadcast(popular), F.col("pop_rank") <= F.col("b") + F.lit(n)
    ).select("user", "item", "buyers", "pop_rank")
    if bought is not None:
        pairs = bought.select("user", F.explode("bought").alias("item"))
        candidates = candidates.join(pairs, ["user", "item"], "left_anti")
    ranked = candidates.withColumn(
        "rank", F.row_number().over(Window.partitionBy("user").orderBy("pop_rank"))
    ).where(F.col("rank") <= n)
    return ranked.select(
        "user", "item", F.col("buyers").cast("double").alias("score"),
        F.col("rank").cast("int").alias("rank"),
    )


def with_ids(recs: DataFrame, users: DataFrame, products: DataFrame) -> DataFrame:
    """Long (user, item, score, rank) -> published (user_id, items array<struct<product_id,
    score, rank>>), items in rank order, ids mapped back through the persistent index."""
    named = recs.join(
        users.select(F.col("idx").alias("user"), F.col("id").alias("user_id")), "user"
    ).join(products.select(F.col("idx").alias("item"), F.col("id").alias("product_id")), "item")
    grouped = named.groupBy("user_id").agg(
        F.sort_array(F.collect_list(F.struct("rank", "product_id", "score"))).alias("ranked")
    )
    return grouped.select(
        "user_id",
        F.transform(
            "ranked",
            lambda x: F.struct(
                x["product_id"].alias("product_id"),
                x["score"].alias("score"),
                x["rank"].alias("rank"),
            ),
        ).alias("items"),
    )
