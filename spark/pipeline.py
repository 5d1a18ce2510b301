"""One training cycle: sales -> index -> split -> ALS -> metrics (next to popularity) -> ALS on
all events -> top-N recommendations. No Kafka here; the streaming job calls `run_training` and
publishes what it returns.

Two ALS fits per cycle, on purpose. The metrics come from a model fitted on the train split only
(otherwise they would measure memory, not prediction). The published recommendations come from a
second model fitted on ALL events: with a chronological split the held-out part is the most recent
activity, and leaving it out would recommend from stale tastes and give no recommendation at all to
the users who only appeared lately. The metrics therefore describe the procedure and its settings,
as usual when refitting on all data; the second fit costs about as much as the first (measured in
`fit_seconds`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
from pyspark import StorageLevel
from pyspark.ml.recommendation import ALSModel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from recsys.settings import Settings
from spark import evaluate, index, prepare, recommend, train

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What one cycle produced; `recommendations` is cached (computed once, at its first use)."""

    model_version: int
    metrics: dict[str, float]
    baseline_metrics: dict[str, float]
    train_seconds: float  # all time in ALS.fit (both fits)
    cycle_seconds: float
    users: int
    products: int
    events: int
    event_time_min: datetime | None
    event_time_max: datetime | None
    params: dict[str, str]
    model_path: str  # where `save` stores `model`
    recommendations: DataFrame  # user_id, items array<struct<product_id, score, rank>>
    model: ALSModel
    indexes: tuple[index.Index, index.Index]  # users, products; `save` stores their new ids
    user_factors: DataFrame  # user_id, features array<float>
    item_factors: DataFrame  # product_id, features array<float>
    fit_seconds: dict[str, float] = field(default_factory=dict)  # "evaluation", "final"
    champion_metrics: dict[str, float] | None = None  # the model in service, same test window


class _Steps:
    """The seconds of each step of a cycle, logged in one line: where a cycle's time goes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.last = time.perf_counter()
        self.done: list[tuple[str, float]] = []

    def __call__(self, what: str) -> None:
        now = time.perf_counter()
        self.done.append((what, now - self.last))
        self.last = now

    def log(self) -> None:
        log.info("%s: time by step: %s", self.name,
                 ", ".join(f"{what} {s:.1f} s" for what, s in self.done))


def index_path(settings: Settings, kind: str) -> str:
    """Where the persistent index of `kind` (users or products) lives."""
    return str((settings.data_dir / "index" / kind).absolute())


def _nan_metrics() -> dict[str, float]:
    return {name: float("nan") for name in evaluate.METRIC_NAMES}


def _evaluate(
    train_m: DataFrame,
    test_m: DataFrame,
    pairs: int,
    settings: Settings,
    local: tuple[pd.DataFrame, pd.DataFrame] | None = None,
    champion: ALSModel | None = None,
) -> tuple[dict[str, float], dict[str, float], float, int, dict[str, float] | None]:
    """Fit on train, score the model and popularity on test; (model, baseline, fit s, users,
    champion's). `local`: the same train and test matrices already on the driver. `champion`:
    the model in service, scored on the same window with the same protocol (for the gate)."""
    model, seconds = train.fit(train_m, settings)
    started = time.perf_counter()
    driver = evaluate.on_driver(pairs, settings.als_rank)
    train_e, test_e = local if local is not None and driver else (train_m, test_m)
    implicit = settings.als_mode == "implicit"
    metrics, baseline = evaluate.model_and_baseline(
        model, train_e, test_e, settings.eval_k, implicit, driver
    )
    theirs = None
    if champion is not None:
        theirs = evaluate.model_and_baseline(
            champion, train_e, test_e, settings.eval_k, implicit, driver)[0]
        theirs.pop("eval_users")
    log.info("metrics of the model%s and popularity: %.1f s (on the %s)",
             "" if champion is None else ", the champion", time.perf_counter() - started,
             "driver" if driver else "cluster")
    users = int(metrics.pop("eval_users"))
    baseline.pop("eval_users")
    return metrics, baseline, seconds, users, theirs


# Up to this many sales, a cycle prepares its matrices on the driver (`_prepare_on_driver`):
# ~50 MB of columns there, and several Spark jobs less than on the cluster.
DRIVER_MAX_EVENTS = 2_000_000

MATRIX_SCHEMA = T.StructType(
    [T.StructField(c, T.IntegerType()) for c in ("user", "item")]
    + [T.StructField(c, T.LongType()) for c in ("train", "test", "all")]
)


@dataclass
class Prepared:
    """The events made ALS input: the three matrices side by side (`prepare.matrices`' shape,
    cached), their sizes, the time cut and the indexes with the cycle's new ids."""

    matrix: DataFrame
    counts: dict[str, int]  # positive pairs of train, test, all; users and products of all
    cutoff: datetime | None
    indexes: tuple[index.Index, index.Index]  # users, products
    events: int
    first: datetime  # event time, naive UTC
    last: datetime
    pairs: pd.DataFrame | None = None  # `matrix` on the driver, when it was prepared there


def _micros_time(micros: int) -> datetime:
    return prepare.EPOCH + timedelta(microseconds=int(micros))


def _prepare_on_cluster(
    spark: SparkSession, sales: DataFrame, settings: Settings, step: _Steps
) -> Prepared:
    """Index, split and net with Spark jobs (for stores too big for the driver)."""
    events = prepare.valid_events(sales).persist(StorageLevel.MEMORY_AND_DISK)
    users = products = None
    try:
        micros = F.unix_micros("event_time")
        stats = events.agg(
            F.count(F.lit(1)).alias("n"), F.min(micros).alias("lo"), F.max(micros).alias("hi")
        ).first()
        if not stats["n"]:
            raise ValueError("no valid events to train on")
        indexes = (
            index.extend(spark, events.select("user_id"), index_path(settings, "users")),
            index.extend(spark, events.select("product_id"), index_path(settings, "products")),
        )
        users, products = (ix.frame(spark).cache() for ix in indexes)
        step("events, index")
        split = prepare.split_events(events, settings)
        matrix = prepare.matrices(split, users, products, settings).persist(
            StorageLevel.MEMORY_AND_DISK
        )
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
    spark: SparkSession, sales: DataFrame, settings: Settings, step: _Steps
) -> Prepared:
    """The same as `_prepare_on_cluster` with one Spark job: the events' columns are collected
    (Arrow), indexed, split and netted with numpy, and the netted pairs go back as one cached
    DataFrame. The random split's side is decided in Spark (its hash is Spark's xxhash64)."""
    events = prepare.valid_events(sales)
    columns = [
        "user_id", "product_id", "quantity", F.unix_micros("event_time").alias("micros")
    ]
    if settings.split == "random":
        columns.append(prepare.split_events(events, settings).is_test.alias("is_test"))
    frame = events.select(*columns).toPandas()
    if frame.empty:
        raise ValueError("no valid events to train on")
    user_code, user_ids = pd.factorize(frame["user_id"])
    item_code, product_ids = pd.factorize(frame["product_id"])
    indexes = (
        index.extend_ids(spark, user_ids, index_path(settings, "users")),
        index.extend_ids(spark, product_ids, index_path(settings, "products")),
    )
    step("events, index")

    micros = frame["micros"].to_numpy(np.int64)
    if settings.split == "random":
        is_test, cutoff = frame["is_test"].to_numpy(bool), None
    else:
        is_test, cutoff = prepare.time_split_local(micros, settings)
    numbers = [np.array([ix.numbers[i] for i in ids], dtype=np.int32)
               for ix, ids in zip(indexes, (user_ids, product_ids), strict=True)]
    net = prepare.matrices_local(
        numbers[0][user_code], numbers[1][item_code], frame["quantity"].to_numpy(), is_test
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
    return Prepared(matrix, counts, cutoff, indexes, len(frame), _micros_time(micros.min()),
                    _micros_time(micros.max()), net)


def run_training(
    spark: SparkSession, sales: DataFrame, settings: Settings, model_version: int,
    champion: ALSModel | None = None,
) -> TrainResult:
    """Train, evaluate and recommend from `sales` (the `Sale` shape). The final model and the new
    index entries are stored by `save` (after the recommendations are out). `champion` (the
    model in service) is scored on the same test window (`TrainResult.champion_metrics`). Raises
    ValueError when there is nothing to train on."""
    started = time.perf_counter()
    step = _Steps(f"model {model_version}")
    small = sales.count() <= DRIVER_MAX_EVENTS  # a Parquet store counts from its footers
    prep = (_prepare_on_driver if small else _prepare_on_cluster)(spark, sales, settings, step)
    matrix, counts, indexes = prep.matrix, prep.counts, prep.indexes
    users, products = (ix.frame(spark) for ix in indexes)
    train_pairs, test_pairs, n_pairs = counts["train"], counts["test"], counts["all"]
    train_m, test_m, full = (prepare.side(matrix, w, settings) for w in ("train", "test", "all"))
    # Prepared on the driver: the same matrices are there too, for evaluation and recommending.
    local = None if prep.pairs is None else {
        w: prepare.side_local(prep.pairs, w, settings) for w in ("train", "test", "all")
    }
    step("split, matrices")
    champion_metrics = None
    if train_pairs and test_pairs:
        metrics, baseline, eval_seconds, eval_users, champion_metrics = _evaluate(
            train_m, test_m, train_pairs + test_pairs, settings,
            None if local is None else (local["train"], local["test"]), champion,
        )
    else:
        log.warning("train (%d pairs) or test (%d pairs) is empty: no metrics", train_pairs,
                    test_pairs)
        metrics, baseline, eval_seconds, eval_users = _nan_metrics(), _nan_metrics(), 0.0, 0
    step("evaluation (fit included)")

    if not n_pairs:
        matrix.unpersist()
        raise ValueError("no user-product pair with a positive net quantity")
    model, final_seconds = train.fit(full, settings)
    step("final fit")
    factors = (counts["products"] + counts["users"]) * settings.als_rank
    on_driver = factors <= recommend.DRIVER_MAX_FLOATS
    bought = recommend.bought_lists(full) if settings.filter_bought else None  # lazy
    if on_driver and local is not None:
        bought_local = None
        if settings.filter_bought:
            bought_local = {u: items for u, (items, _) in evaluate.by_user(local["all"]).items()}
        users_all = np.unique(local["all"]["user"].to_numpy())
        lists = recommend.top_lists_local(model, users_all, settings.top_n, bought_local)
    elif on_driver:
        lists = recommend.top_lists_driver(model, full.select("user"), settings.top_n, bought)
    if on_driver:  # scored, and the ids mapped back, on the driver: counted there
        recs = recommend.named_lists(spark, lists, *(ix.names() for ix in indexes)).cache()
        n_recs = int((lists["items"].map(len) > 0).sum())
    else:
        long_recs = recommend.top_items(model, full.select("user"), settings.top_n, bought, False)
        recs = recommend.with_ids(long_recs, users, products).cache()
        n_recs = recs.count()
    step("recommendations")
    step.log()

    matrix.unpersist()
    # The factor tables below stay lazy (on the indexes' driver-side rows).

    params = train.als_params(settings) | {
        "split": settings.split,
        "split_cutoff": prep.cutoff.isoformat() if prep.cutoff else "",
        "test_fraction": str(settings.test_fraction),
        "eval_k": str(settings.eval_k),
        "eval_users": str(eval_users),
        "train_pairs": str(train_pairs),
        "test_pairs": str(test_pairs),
        "pairs": str(n_pairs),
        "top_n": str(settings.top_n),
        "filter_bought": str(settings.filter_bought).lower(),
    }
    user_factors = model.userFactors.join(
        users.select(F.col("idx").alias("id"), F.col("id").alias("user_id")), "id"
    ).select("user_id", "features")
    item_factors = model.itemFactors.join(
        products.select(F.col("idx").alias("id"), F.col("id").alias("product_id")), "id"
    ).select("product_id", "features")
    cycle = time.perf_counter() - started
    result = TrainResult(
        model_version=model_version,
        metrics=metrics,
        baseline_metrics=baseline,
        train_seconds=eval_seconds + final_seconds,
        cycle_seconds=cycle,
        users=int(counts["users"]),
        products=int(counts["products"]),
        events=prep.events,
        event_time_min=prep.first,
        event_time_max=prep.last,
        params=params,
        model_path=f"{settings.models.rstrip('/')}/{model_version}",
        recommendations=recs,
        model=model,
        indexes=indexes,
        user_factors=user_factors,
        item_factors=item_factors,
        fit_seconds={"evaluation": eval_seconds, "final": final_seconds},
        champion_metrics=champion_metrics,
    )
    log_result(result, n_recs)
    return result


def save(spark: SparkSession, result: TrainResult) -> None:
    """Store what model-ready points to: the ids the indexes gained, then the final model under
    `result.model_path` (replacing what a failed cycle left)."""
    started = time.perf_counter()
    for ix in result.indexes:
        ix.save(spark)
    result.model.write().overwrite().save(result.model_path)
    log.info("model %d and its index saved to %s in %.1f s", result.model_version,
             result.model_path, time.perf_counter() - started)


def log_result(result: TrainResult, n_recs: int) -> None:
    """The metrics next to the baseline, one line each, and the time split."""
    log.info(
        "model %d: %d events, %d users, %d products, %d evaluated users, %d users recommended",
        result.model_version, result.events, result.users, result.products,
        int(result.params.get("eval_users", "0")), n_recs,
    )
    k = result.params.get("eval_k", "k")
    for name in evaluate.METRIC_NAMES:
        shown = name.replace("_at_k", f"@{k}")
        log.info(
            "  %-13s model %.4f  popularity %.4f", shown, result.metrics.get(name, float("nan")),
            result.baseline_metrics.get(name, float("nan")),
        )
    log.info(
        "  time: cycle %.1f s, ALS.fit %.1f s (evaluation %.1f + final %.1f) = %.0f%%",
        result.cycle_seconds, result.train_seconds, result.fit_seconds.get("evaluation", 0.0),
        result.fit_seconds.get("final", 0.0),
        100.0 * result.train_seconds / result.cycle_seconds if result.cycle_seconds else 0.0,
    )
