"""From sale events to ALS input: valid events, the train/test split, the interaction matrices.

Pure DataFrame -> DataFrame steps (the persistent id index lives in `spark.index`; this module
only extends one it is given) and `prepare`, the cycle's step that chains them, in two variants
(`spark.train_path`): Spark jobs, or the events collected once and netted with numpy. The split cuts
the EVENTS, and each side's matrix is netted on its own events: a purchase in the train period and
its return in the test period leave the pair in train (it was bought then) and out of test. One
aggregation nets all three matrices (train, test, all events) side by side (`matrices`); `side`
takes one of them out in the shape ALS reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow.compute as pc
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys.settings import Settings
from spark.index import Index
from spark.train_path import TrainPath

log = logging.getLogger(__name__)

EVENT_COLUMNS = ("event_id", "user_id", "product_id", "quantity", "event_time")
EPOCH = datetime(1970, 1, 1)  # of Spark's unix_micros, naive UTC
# Hash buckets of the seeded random split: fine enough for any test fraction a setting allows.
_BUCKETS = 1_000_000


@dataclass(frozen=True)
class Split:
    """Which of `events` are held out for testing (`is_test`, a column over them); `cutoff` is
    None for a random split."""

    events: DataFrame
    is_test: Column
    cutoff: datetime | None

    @property
    def train(self) -> DataFrame:
        return self.events.where(~self.is_test)

    @property
    def test(self) -> DataFrame:
        return self.events.where(self.is_test)


def valid_events(sales: DataFrame) -> DataFrame:
    """The columns training needs, rows with a user, product, time and non-zero quantity.

    Cancellations and returns stay: their negative quantity nets out the purchase.
    """
    return sales.select(*EVENT_COLUMNS).where(
        F.col("user_id").isNotNull()
        & (F.col("user_id") != "")
        & F.col("product_id").isNotNull()
        & F.col("event_time").isNotNull()
        & F.col("quantity").isNotNull()
        & (F.col("quantity") != 0)
    )


def products_only(sales: DataFrame, non_product_pattern: str) -> DataFrame:
    """`sales` without the codes that are not products (settings.non_product_pattern: postage,
    fees, discounts...): they stay in the store but never reach training, lists or the graph."""
    if not non_product_pattern:
        return sales
    return sales.where(~F.coalesce(F.col("product_id").rlike(non_product_pattern), F.lit(False)))


def naive_utc(value: datetime) -> datetime:
    """`value` as a naive UTC time (a naive one is taken as UTC already)."""
    if value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    return value


def _timestamp(value: datetime) -> Column:
    """A timestamp literal independent of the driver's local zone (naive means UTC)."""
    return F.lit(naive_utc(value).isoformat(sep=" ")).cast("timestamp")


def time_cutoff(events: DataFrame, test_fraction: float) -> datetime | None:
    """The cut that holds out about the latest `test_fraction` of events: just after the
    (1 - test_fraction) quantile of event time (approximate), so events after the quantile are
    test. None when there are no events, or none after the quantile (all share a time). One job."""
    micros = F.unix_micros("event_time")
    row = events.agg(
        F.percentile_approx(micros, 1.0 - test_fraction, 10_000).alias("q"),
        F.max(micros).alias("last"),
    ).first()
    if row["q"] is None or row["q"] >= row["last"]:
        return None
    return EPOCH + timedelta(microseconds=int(row["q"]) + 1)


def split_events(events: DataFrame, settings: Settings) -> Split:
    """Train/test events by `settings.split`: chronological (default) or seeded random.

    Random assignment hashes the event id with the seed, so it does not depend on partitioning
    and a replayed event lands on the same side.
    """
    if settings.split == "random":
        bucket = F.pmod(F.xxhash64("event_id", F.lit(settings.seed)), F.lit(_BUCKETS))
        is_test = bucket < F.lit(int(settings.test_fraction * _BUCKETS))
        return Split(events, is_test, None)
    cutoff = settings.split_cutoff or time_cutoff(events, settings.test_fraction)
    if cutoff is None:  # no events, or no later time to hold out
        return Split(events, F.lit(False), None)
    cutoff = naive_utc(cutoff)
    return Split(events, F.col("event_time") >= _timestamp(cutoff), cutoff)


def strength(quantity: Column, confidence: str) -> Column:
    """Interaction strength of a positive net quantity (log1p damps wholesale-sized orders)."""
    if confidence == "raw":
        return quantity.cast("float")
    if confidence == "binary":
        return F.lit(1.0).cast("float")
    return F.log1p(quantity).cast("float")


def matrices(
    split: Split, users: DataFrame, products: DataFrame, settings: Settings
) -> DataFrame:
    """The train, test and full interaction matrices in one pass over the events: per pair,
    (user int, item int) and the net quantity of its train events, its test events and all its
    events (columns `train`, `test`, `all`; returns subtract). Pairs that are positive on no side
    are left out. `side` takes one matrix out.
    """
    q = F.col("quantity")
    net = (
        split.events.groupBy("user_id", "product_id")
        .agg(
            F.sum(F.when(~split.is_test, q).otherwise(0)).alias("train"),
            F.sum(F.when(split.is_test, q).otherwise(0)).alias("test"),
            F.sum(q).alias("all"),
        )
        .where((F.col("train") > 0) | (F.col("test") > 0) | (F.col("all") > 0))
    )
    # No broadcast hint: the indexes may outgrow memory; Spark broadcasts them while small.
    user_index = users.select(F.col("id").alias("user_id"), F.col("idx").alias("user"))
    item_index = products.select(F.col("id").alias("product_id"), F.col("idx").alias("item"))
    return net.join(user_index, "user_id").join(item_index, "product_id").select(
        "user", "item", "train", "test", "all"
    )


def side(matrix: DataFrame, which: str, settings: Settings) -> DataFrame:
    """ALS input from `matrices`: (user, item, quantity long, rating float),
    one row per pair whose net quantity on `which` side ("train", "test" or "all") is positive.

    In implicit mode `rating` is the confidence strength (`settings.confidence`); in explicit mode
    the net quantity IS the rating and is used as it is.
    """
    quantity = F.col(which)
    rating = (
        strength(quantity, settings.confidence)
        if settings.als_mode == "implicit"
        else quantity.cast("float")
    )
    return matrix.where(quantity > 0).select(
        "user", "item", quantity.alias("quantity"), rating.alias("rating")
    )


def interactions(
    events: DataFrame,
    users: DataFrame,
    products: DataFrame,
    settings: Settings,
) -> DataFrame:
    """The interaction matrix of all of `events` (the `side` shape)."""
    return side(matrices(Split(events, F.lit(False), None), users, products, settings), "all",
                settings)


# --- the same on the driver -------------------------------------------------------------------------
# On the driver path (`spark.train_path`), a cycle collects the events once (one Spark job,
# columns through Arrow) and splits and nets them with numpy: a handful of Spark jobs less than
# the steps above, with the same answers (tests/spark/test_prepare.py compares them).


def cutoff_local(micros: np.ndarray, test_fraction: float) -> int | None:
    """`time_cutoff` on event times in epoch microseconds: just after the (1 - test_fraction)
    quantile (the exact one; Spark's is approximate), as epoch microseconds; None when no event
    is later than the quantile."""
    if not len(micros):
        return None
    q = int(np.quantile(micros, 1.0 - test_fraction, method="inverted_cdf"))
    return q + 1 if q < int(micros.max()) else None


def time_split_local(micros: np.ndarray, settings: Settings) -> tuple[np.ndarray, datetime | None]:
    """`split_events`' time split on event times in epoch microseconds: (held out or not per
    event, the cut as a naive UTC time or None)."""
    if settings.split_cutoff is not None:
        cut: int | None = (naive_utc(settings.split_cutoff) - EPOCH) // timedelta(microseconds=1)
    else:
        cut = cutoff_local(micros, settings.test_fraction)
    if cut is None:
        return np.zeros(len(micros), dtype=bool), None
    return micros >= cut, EPOCH + timedelta(microseconds=cut)


def matrices_local(
    user: np.ndarray, item: np.ndarray, quantity: np.ndarray, is_test: np.ndarray
) -> pd.DataFrame:
    """`matrices` on arrays (one row per event: user and item numbers, quantity, held out or
    not): per pair the net quantity of its train events, its test events and all its events
    (columns user, item, train, test, all), pairs positive on no side left out; sorted by pair.

    One sort of a 64-bit pair key and two bincounts: three arrays of the events' length, where a
    pandas groupby built a frame of five int64 columns and its group index."""
    key = (np.asarray(user, np.int64) << 32) | np.asarray(item, np.int64)
    pairs, which = np.unique(key, return_inverse=True)
    q = np.asarray(quantity, np.int64)
    del key
    # Sums of integers in float64 are exact below 2**53; quantities are 32-bit.
    every = np.rint(np.bincount(which, weights=q, minlength=len(pairs))).astype(np.int64)
    test = np.rint(np.bincount(which, weights=np.where(is_test, q, 0),
                               minlength=len(pairs))).astype(np.int64)
    del which
    train = every - test
    keep = (train > 0) | (test > 0) | (every > 0)
    pairs = pairs[keep]
    return pd.DataFrame({
        "user": (pairs >> 32).astype(np.int32), "item": (pairs & 0xFFFFFFFF).astype(np.int32),
        "train": train[keep], "test": test[keep], "all": every[keep],
    })


def strength_local(quantity: np.ndarray, confidence: str) -> np.ndarray:
    """`strength` on an array of positive net quantities (float32, as Spark casts it)."""
    if confidence == "raw":
        return quantity.astype(np.float32)
    if confidence == "binary":
        return np.ones(len(quantity), dtype=np.float32)
    return np.log1p(quantity.astype(np.float64)).astype(np.float32)


def side_local(net: pd.DataFrame, which: str, settings: Settings) -> pd.DataFrame:
    """`side` of `matrices_local`'s pairs: (user, item, quantity, rating) of the pairs whose net
    quantity on `which` side is positive."""
    rows = net[net[which] > 0]
    quantity = rows[which].to_numpy(np.int64)
    rating = (
        strength_local(quantity, settings.confidence)
        if settings.als_mode == "implicit"
        else quantity.astype(np.float32)
    )
    return pd.DataFrame({
        "user": rows["user"].to_numpy(), "item": rows["item"].to_numpy(),
        "quantity": quantity, "rating": rating,
    })


# --- the cycle's step: both variants -----------------------------------------------------------------
MATRIX_SCHEMA = T.StructType(
    [T.StructField(c, T.IntegerType()) for c in ("user", "item")]
    + [T.StructField(c, T.LongType()) for c in ("train", "test", "all")]
)


@dataclass
class Prepared:
    """The events made ALS input: the three matrices side by side (`matrices`' shape, cached),
    their sizes, the time cut and the indexes extended with the cycle's new ids."""

    matrix: DataFrame
    counts: dict[str, int]  # positive pairs of train, test, all; users and products of all
    cutoff: datetime | None
    indexes: tuple[Index, Index]  # users, products
    events: int
    first: datetime  # event time, naive UTC
    last: datetime
    pairs: pd.DataFrame | None = None  # `matrix` on the driver (the driver path)


def prepare(
    spark: SparkSession, sales: DataFrame, settings: Settings, indexes: tuple[Index, Index],
    path: TrainPath, step: Callable[[str], None] = lambda what: None,
) -> Prepared:
    """Valid events -> index -> split -> the three matrices, on `path`; the `indexes` (users,
    products: as stored) are extended, not written. `step(name)` marks the end of a sub-step.
    ValueError when there is no valid event."""
    variant = _prepare_on_driver if path.driver else _prepare_distributed
    return variant(spark, sales, settings, indexes, step)


def _micros_time(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=int(micros))


def _prepare_distributed(
    spark: SparkSession, sales: DataFrame, settings: Settings, indexes: tuple[Index, Index],
    step: Callable[[str], None],
) -> Prepared:
    """Index, split and net with Spark jobs; only the distinct ids come to the driver."""
    events = valid_events(sales).persist(StorageLevel.MEMORY_AND_DISK)
    users = products = None
    try:
        micros = F.unix_micros("event_time")
        stats = events.agg(
            F.count(F.lit(1)).alias("n"), F.min(micros).alias("lo"), F.max(micros).alias("hi")
        ).first()
        if not stats["n"]:
            raise ValueError("no valid events to train on")
        indexes = tuple(  # type: ignore[assignment]
            ix.extended(events.select(column).distinct().toPandas()[column])
            for ix, column in zip(indexes, ("user_id", "product_id"), strict=True)
        )
        users, products = (ix.frame(spark).cache() for ix in indexes)
        step("events, index")
        split = split_events(events, settings)
        matrix = matrices(split, users, products, settings).persist(StorageLevel.MEMORY_AND_DISK)
        positive = {which: F.col(which) > 0 for which in ("train", "test", "all")}
        row = matrix.agg(  # one job: it caches `matrix` too
            *(F.count_if(is_positive).alias(which) for which, is_positive in positive.items()),
            F.count_distinct(F.when(positive["all"], F.col("user"))).alias("users"),
            F.count_distinct(F.when(positive["all"], F.col("item"))).alias("products"),
        ).first()
    finally:
        events.unpersist()
        for frame in (users, products):
            if frame is not None:
                frame.unpersist()
    counts = {k: int(row[k]) for k in ("train", "test", "all", "users", "products")}
    return Prepared(matrix, counts, split.cutoff, indexes, int(stats["n"]),
                    _micros_time(stats["lo"]), _micros_time(stats["hi"]))


def _prepare_on_driver(
    spark: SparkSession, sales: DataFrame, settings: Settings, indexes: tuple[Index, Index],
    step: Callable[[str], None],
) -> Prepared:
    """The same as `_prepare_distributed` with one Spark job: the events' columns are collected
    (Arrow), indexed, split and netted with numpy, and the netted pairs go back as one cached
    DataFrame. The random split's side is decided in Spark (its hash is Spark's xxhash64)."""
    events = valid_events(sales)
    columns = [
        "user_id", "product_id", "quantity", F.unix_micros("event_time").alias("micros")
    ]
    if settings.split == "random":
        columns.append(split_events(events, settings).is_test.alias("is_test"))
    # Arrow all the way: the ids stay Arrow strings and only the distinct ones become Python
    # objects (a pandas frame of 20 M events held two Python strings per event).
    table = events.select(*columns).toArrow()
    if not table.num_rows:
        raise ValueError("no valid events to train on")
    user_ids, product_ids = (pc.unique(table[c]) for c in ("user_id", "product_id"))
    user_code, item_code = (
        pc.index_in(table[c], value_set=ids).to_numpy()
        for c, ids in (("user_id", user_ids), ("product_id", product_ids))
    )
    user_ids, product_ids = user_ids.to_pylist(), product_ids.to_pylist()
    indexes = (indexes[0].extended(user_ids), indexes[1].extended(product_ids))
    step("events, index")

    frame = {c: table[c].to_numpy() for c in table.column_names[2:]}
    del table
    micros = frame["micros"].astype(np.int64)
    if settings.split == "random":
        is_test, cutoff = frame["is_test"].astype(bool), None
    else:
        is_test, cutoff = time_split_local(micros, settings)
    numbers = [np.array([ix.numbers[i] for i in ids], dtype=np.int32)
               for ix, ids in zip(indexes, (user_ids, product_ids), strict=True)]
    net = matrices_local(
        numbers[0][user_code], numbers[1][item_code], frame["quantity"], is_test
    )
    matrix = spark.createDataFrame(net, MATRIX_SCHEMA).persist(StorageLevel.MEMORY_AND_DISK)
    matrix.count()  # cached now, so ALS.fit's seconds count ALS only
    bought = net[net["all"] > 0]
    counts = {
        "train": int((net["train"] > 0).sum()),
        "test": int((net["test"] > 0).sum()),
        "all": len(bought),
        "users": int(bought["user"].nunique()),
        "products": int(bought["item"].nunique()),
    }
    return Prepared(matrix, counts, cutoff, indexes, len(micros), _micros_time(micros.min()),
                    _micros_time(micros.max()), net)
