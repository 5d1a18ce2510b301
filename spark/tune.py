"""Choose ALS's rank, reg and alpha on the user's data: a grid search on the TRAIN side only.

The cycle's own split (`prepare.split_events`) holds out the test events; they are never seen
here. The train events are split once more the same way — chronologically (the latest
`test_fraction` of train validates) or, for a random split, with another seed — which is what
Spark ML's `TrainValidationSplit` does, but time-ordered and scored with `spark.evaluate`'s own
metrics: RMSE in explicit mode (lower is better), precision@k in implicit mode (higher is
better). Each grid point is one ALS fit on the inner train side; ties keep the earlier point, and
the grid starts with the current settings, so a grid that cannot tell them apart changes nothing.

Ids get numbers for this search only (the persistent index is left alone).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from recsys.settings import Settings
from spark import evaluate, prepare, train, train_path
from spark.train_path import TrainPath

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Point:
    """One grid point and how it scored on the validation side."""

    rank: int
    reg_param: float
    alpha: float
    metrics: dict[str, float]
    seconds: float

    def params(self) -> dict[str, Any]:
        return {"als_rank": self.rank, "als_reg_param": self.reg_param, "als_alpha": self.alpha}


@dataclass(frozen=True)
class Tuned:
    metric: str  # "rmse" or "precision_at_k"
    points: list[Point]  # in grid order
    best: Point
    fit_pairs: int
    validation_pairs: int

    def settings(self, settings: Settings) -> Settings:
        """`settings` with the chosen rank, reg and alpha."""
        return settings.model_copy(update=self.best.params())


def metric_of(settings: Settings) -> str:
    return "rmse" if settings.als_mode == "explicit" else "precision_at_k"


def grid(settings: Settings) -> list[tuple[int, float, float]]:
    """(rank, reg, alpha) points: the current settings first, then the product of the tune_*
    lists (explicit mode has no alpha: it stays as set)."""
    alphas = settings.tune_alphas if settings.als_mode == "implicit" else [settings.als_alpha]
    current = (settings.als_rank, settings.als_reg_param, settings.als_alpha)
    points = [current]
    for p in itertools.product(settings.tune_ranks, settings.tune_reg_params, alphas):
        if p not in points:
            points.append(p)
    return points


def better(metric: str, score: float, best: float | None) -> bool:
    """Whether `score` beats `best` (NaN never does; ties keep the earlier point)."""
    if math.isnan(score):
        return False
    if best is None or math.isnan(best):
        return True
    return score < best if metric == "rmse" else score > best


def _numbered(events: DataFrame, column: str) -> DataFrame:
    """(id, idx) for the distinct values of `column`, numbered from 0 for this search."""
    ids = events.select(F.col(column).alias("id")).distinct()
    return ids.withColumn("idx", (F.row_number().over(Window.orderBy("id")) - 1).cast("int"))


def validation_matrices(
    sales: DataFrame, settings: Settings
) -> tuple[DataFrame, DataFrame, DataFrame]:
    """(cached matrix, inner train side, validation side) from the train side of the cycle's
    split; the test side is dropped before anything else."""
    events = prepare.valid_events(sales)
    outer = prepare.split_events(events, settings)
    train_events = outer.train.cache()
    # The same kind of split inside train: a random one needs another seed, or no train event
    # would fall on the held-out side (they all hashed outside it already).
    inner_settings = settings.model_copy(update={"split_cutoff": None, "seed": settings.seed + 1})
    inner = prepare.split_events(train_events, inner_settings)
    users, products = _numbered(train_events, "user_id"), _numbered(train_events, "product_id")
    matrix = prepare.matrices(inner, users, products, settings).cache()
    train_events.unpersist()
    return matrix, prepare.side(matrix, "train", settings), prepare.side(matrix, "test", settings)


def search(sales: DataFrame, settings: Settings, path: TrainPath | None = None) -> Tuned:
    """Fit every grid point on the inner train side and score it on validation; one log line
    per fit. Scored on the training cycle's path (`spark.train_path`: decided here from the
    events when not given). ValueError when either side is empty (too few events to tune on)."""
    metric = metric_of(settings)
    if path is None:
        path = train_path.decide(sales.count(), settings)
    matrix, fit_m, val_m = validation_matrices(sales, settings)
    try:
        fit_m = fit_m.cache()
        if path.driver:  # both sides collected once, scored with numpy for every point
            fit_e, val_e = fit_m.toPandas(), val_m.toPandas()
            n_fit, n_val = len(fit_e), len(val_e)
        else:
            fit_e, val_e = fit_m, val_m.cache()
            n_fit, n_val = fit_m.count(), val_m.count()
        if not n_fit or not n_val:
            raise ValueError(
                f"too few events to tune: {n_fit} train and {n_val} "
                "validation pairs inside the train split"
            )
        points = grid(settings)
        scored: list[Point] = []
        best: Point | None = None
        implicit = settings.als_mode == "implicit"
        for i, (rank, reg, alpha) in enumerate(points, start=1):
            s = settings.model_copy(update={"als_rank": rank, "als_reg_param": reg,
                                            "als_alpha": alpha})
            model, seconds = train.fit(fit_m, s)
            metrics, _ = evaluate.model_and_baseline(
                model, fit_e, val_e, settings.eval_k, implicit, path
            )
            metrics.pop("eval_users", None)
            point = Point(rank, reg, alpha, metrics, seconds)
            scored.append(point)
            if better(metric, metrics[metric], None if best is None else best.metrics[metric]):
                best = point
            log.info("tune %d/%d: rank %d, reg %g, alpha %g: %s %.4f (%.1f s)%s", i,
                     len(points), rank, reg, alpha, metric, metrics[metric], seconds,
                     " best so far" if best is point else "")
    finally:
        fit_m.unpersist()
        if not path.driver:
            val_m.unpersist()
        matrix.unpersist()
    if best is None:
        raise ValueError(f"no grid point gave a {metric} on the validation side")
    return Tuned(metric, scored, best, n_fit, n_val)


def table(tuned: Tuned, k: int) -> list[str]:
    """The grid's scores, one line per point, the chosen one marked."""
    shown = {"rmse": "RMSE", "precision_at_k": f"precision@{k}"}
    other = "precision_at_k" if tuned.metric == "rmse" else "rmse"
    lines = [f"  {'rank':>5} {'reg':>8} {'alpha':>7} {shown[tuned.metric]:>13} "
             f"{shown[other]:>13} {'fit s':>6}"]
    for p in tuned.points:
        mark = "  <- chosen" if p is tuned.best else ""
        lines.append(f"  {p.rank:>5} {p.reg_param:>8g} {p.alpha:>7g} {p.metrics[tuned.metric]:>13.4f} "
                     f"{p.metrics[other]:>13.4f} {p.seconds:>6.1f}{mark}")
    return lines


def tuned_settings(spark: SparkSession, sales: DataFrame, settings: Settings) -> Settings:
    """`settings` with rank, reg and alpha chosen by `search` (what a job calls before a
    model when `settings.tune_before_train`)."""
    tuned = search(sales, settings)
    b = tuned.best
    log.info("tuned on %d train / %d validation pairs: rank %d, reg %g, alpha %g (%s %.4f)",
             tuned.fit_pairs, tuned.validation_pairs, b.rank, b.reg_param, b.alpha,
             tuned.metric, b.metrics[tuned.metric])
    return tuned.settings(settings)


# --- CLI --------------------------------------------------------------------------------------------
def _sales(spark: SparkSession, settings: Settings, args: argparse.Namespace) -> DataFrame | None:
    if args.file:
        from spark.csv_input import CsvMapping, read_purchases_csv

        return read_purchases_csv(spark, args.file, CsvMapping.from_args(args))
    from spark.store import Store

    store = Store(spark, settings.store)
    return store.read() if store.has_data() else None


def tune_cli(settings: Settings, args: argparse.Namespace) -> int:
    """`recsys tune`: the grid's scores on the store's (or a file's) train side, and the chosen
    parameters as the settings that pin them."""
    from spark import session
    from spark.csv_input import resolve_file

    code = resolve_file("tune", args)
    if code:
        return code
    spark = session.build(settings, "recsys-tune")
    started = time.perf_counter()
    try:
        sales = _sales(spark, settings, args)
        if sales is None:
            print(f"recsys tune: the store {settings.store} is empty: run `recsys stream` "
                  "first, or tune on a file with --file", file=sys.stderr)
            return 1
        tuned = search(sales, settings)
    except ValueError as exc:
        print(f"recsys tune: {exc}", file=sys.stderr)
        return 1
    finally:
        spark.stop()
    b = tuned.best
    source = args.file or settings.store
    print(f"{source}: {len(tuned.points)} fits ({settings.als_mode}, {settings.split} split, "
          f"{tuned.fit_pairs:,} train / {tuned.validation_pairs:,} validation pairs, all inside "
          f"the train side) in {time.perf_counter() - started:.0f} s")
    for line in table(tuned, settings.eval_k):
        print(line)
    print(f"chosen by {tuned.metric}: RECSYS_ALS_RANK={b.rank} RECSYS_ALS_REG_PARAM={b.reg_param:g}"
          f" RECSYS_ALS_ALPHA={b.alpha:g} (or RECSYS_TUNE_BEFORE_TRAIN=true to tune before each "
          "`recsys train`)")
    return 0
