"""One training cycle: sales -> index -> split -> ALS -> metrics (next to popularity) -> ALS on
all events -> top-N recommendations. No Kafka and no stored state here: the caller (the job's
`train_and_publish`) loads the indexes (`load_indexes`), calls `run_training` and stores what it
returns (`save`) once the recommendations are out.

Every step follows one decision made once per cycle (`spark.train_path`): on the driver or
distributed, from the number of events and `settings.train_path`.

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
import resource
import time
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pandas as pd
from pyspark.ml.recommendation import ALSModel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from recsys.settings import Settings
from schemas.metrics import METRIC_NAMES
from spark import evaluate, index, prepare, recommend, train, train_path
from spark.train_path import TrainPath

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
    path: TrainPath = train_path.DRIVER  # where the cycle ran; the graph follows it


class _Steps:
    """The seconds of each step of a cycle and the driver's Python memory peak after it, logged
    in one line: where a cycle's time and memory go."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.last = time.perf_counter()
        self.done: list[tuple[str, float, float]] = []

    def __call__(self, what: str) -> None:
        now = time.perf_counter()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        self.done.append((what, now - self.last, peak))
        self.last = now

    def log(self) -> None:
        log.info("%s: time by step (python peak after it): %s", self.name,
                 ", ".join(f"{what} {s:.1f} s ({gib:.2f} GiB)" for what, s, gib in self.done))


def index_path(settings: Settings, kind: str) -> str:
    """Where the persistent index of `kind` (users or products) lives."""
    return str((settings.data_dir / "index" / kind).absolute())


def load_indexes(spark: SparkSession, settings: Settings) -> tuple[index.Index, index.Index]:
    """The stored user and product indexes (empty ones the first time), for `run_training`."""
    return tuple(index.load(spark, index_path(settings, kind))  # type: ignore[return-value]
                 for kind in ("users", "products"))


def _nan_metrics() -> dict[str, float]:
    return {name: float("nan") for name in METRIC_NAMES}


def _evaluate(
    train_m: DataFrame,
    test_m: DataFrame,
    settings: Settings,
    path: TrainPath,
    local: tuple[pd.DataFrame, pd.DataFrame] | None = None,
    champion: ALSModel | None = None,
) -> tuple[dict[str, float], dict[str, float], float, int, dict[str, float] | None]:
    """Fit on train, score the model and popularity on test; (model, baseline, fit s, users,
    champion's). `local`: the same train and test matrices already on the driver. `champion`:
    the model in service, scored on the same window with the same protocol (for the gate)."""
    model, seconds = train.fit(train_m, settings)
    started = time.perf_counter()
    train_e, test_e = local if local is not None and path.driver else (train_m, test_m)
    implicit = settings.als_mode == "implicit"
    metrics, baseline = evaluate.model_and_baseline(
        model, train_e, test_e, settings.eval_k, implicit, path
    )
    theirs = None
    if champion is not None:
        theirs = evaluate.model_and_baseline(
            champion, train_e, test_e, settings.eval_k, implicit, path)[0]
        theirs.pop("eval_users")
    log.info("metrics of the model%s and popularity: %.1f s (%s path)",
             "" if champion is None else ", the champion", time.perf_counter() - started,
             path.where)
    users = int(metrics.pop("eval_users"))
    baseline.pop("eval_users")
    return metrics, baseline, seconds, users, theirs


def run_training(
    spark: SparkSession, sales: DataFrame, settings: Settings, model_version: int,
    champion: ALSModel | None = None, *, indexes: tuple[index.Index, index.Index],
    path: TrainPath | None = None,
) -> TrainResult:
    """Train, evaluate and recommend from `sales` (the `Sale` shape). `indexes` (users,
    products; `load_indexes`) are extended with the cycle's new ids, not written: `save` stores
    them and the final model after the recommendations are out. `champion` (the model in
    service) is scored on the same test window (`TrainResult.champion_metrics`). `path`: where
    the steps run; by default decided here, once, from the number of events and the settings.
    Raises ValueError when there is nothing to train on."""
    started = time.perf_counter()
    step = _Steps(f"model {model_version}")
    if path is None:
        path = train_path.decide(sales.count(), settings)  # a Parquet store counts from footers
    log.info("model %d: %s path (%s)", model_version, path.where, path.reason)
    prep = prepare.prepare(spark, sales, settings, indexes, path, step)
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
            train_m, test_m, settings, path,
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
    on_driver = None
    if local is not None:  # the users and what they bought, already on the driver
        bought_local = {u: items for u, (items, _) in evaluate.by_user(local["all"]).items()}
        on_driver = (np.unique(local["all"]["user"].to_numpy()), bought_local)
    recs, n_recs = recommend.published(spark, model, full, settings.top_n, settings.filter_bought,
                                       indexes, path, on_driver)
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
        "train_path": path.where,
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
        path=path,
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
    for name in METRIC_NAMES:
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
