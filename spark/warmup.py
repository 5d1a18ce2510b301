"""Warm the JVM for the first model: one training cycle on a tiny synthetic store, thrown away.

A fresh JVM runs its first cycle much slower than the next ones (measured by `bench retrain`:
1.55x the ALS fit against 1.47x; split + matrices 6.8 s against 3.8 s, the evaluation fit 15-21 s
against 13 s): Spark compiles each query's generated code once per plan shape, MLlib's classes
load, the JIT has compiled nothing yet. All of that depends on the shape of the work, not on its
size, so the streaming job runs the same steps -- Parquet store write and read, index, split,
matrices, both ALS fits, evaluation, recommendations -- on a few thousand synthetic events
before its first threshold comes near, and the real cycle finds them compiled.

Nothing of the warm-up is kept: its store is a `_warmup` folder beside the real one (deleted
after), its index lives in a temporary folder and is never saved, nothing is published.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import pandas as pd
from pyspark.sql import SparkSession

from recsys.settings import Settings
from spark.files import delete
from spark.store import SALES_SCHEMA, Store

log = logging.getLogger(__name__)

# Enough events for every step to take its normal path (both splits non-empty, returns netting
# out, bought products filtered), few enough to train in a few seconds.
USERS, PRODUCTS, EVENTS = 300, 150, 4_000
_CHATTY = ("pipeline", "train", "evaluate", "recommend", "index")


def synthetic_frame(seed: int) -> pd.DataFrame:
    """`EVENTS` seeded synthetic sales in the store's columns (as pandas)."""
    from recsys.synthetic import SyntheticSales

    rows = [sale for sale, _ in SyntheticSales(USERS, PRODUCTS, EVENTS, seed=seed)]
    frame = pd.DataFrame(rows)
    frame["event_time"] = pd.to_datetime(frame["event_time"], unit="ms")
    frame["source_topic"] = "warmup"
    frame["source_partition"] = 0
    frame["source_offset"] = range(len(frame))
    return frame


def warm_up(spark: SparkSession, settings: Settings) -> float:
    """Run one throw-away training cycle on synthetic events; returns its seconds.

    The job's settings are used (so the same ALS rank, iterations, evaluation and recommendation
    paths are compiled), with the index in a temporary folder.
    """
    from spark import pipeline

    started = time.perf_counter()
    quiet = [logging.getLogger(f"spark.{m}") for m in _CHATTY]
    levels = [q.level for q in quiet]
    for q in quiet:  # the throw-away model's metrics would read like a real one's
        q.setLevel(logging.WARNING)
    store = Store(spark, f"{settings.store.rstrip('/')}/_warmup")
    try:
        with tempfile.TemporaryDirectory(prefix="recsys-warmup-") as tmp:
            sales = spark.createDataFrame(synthetic_frame(settings.seed), SALES_SCHEMA)
            store.append_batch(sales, "warmup", 0)
            local = settings.model_copy(update={"data_dir": Path(tmp)})
            result = pipeline.run_training(spark, store.read(), local, 0,
                                           indexes=pipeline.load_indexes(spark, local))
            result.recommendations.unpersist()
    finally:
        delete(spark, store.root)
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
    seconds = time.perf_counter() - started
    log.info("warmed up for the first model: a training cycle on %d synthetic events in %.1f s",
             EVENTS, seconds)
    return seconds


def try_warm_up(spark: SparkSession, settings: Settings) -> bool:
    """`warm_up`, but a failure is logged and swallowed: only speed is lost, and the streaming
    job's ingest must go on. True when it ran."""
    try:
        warm_up(spark, settings)
    except Exception:
        log.exception("warm-up failed; the first model will train on a cold JVM")
        return False
    return True
