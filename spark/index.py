"""Persistent string -> integer index for ALS, which needs integer user and item ids.

An id keeps its number across retrains, so factors, saved models and exports of different versions
speak about the same user with the same number. The index is a Parquet folder of (id, idx) rows;
new ids are APPENDED as new files (existing files are never rewritten), numbered after the current
maximum in sorted id order, so the same input always gives the same numbers. One writer at a time
(the training job) is assumed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

log = logging.getLogger(__name__)

INDEX_SCHEMA = T.StructType(
    [T.StructField("id", T.StringType(), False), T.StructField("idx", T.IntegerType(), False)]
)


def _exists(spark: SparkSession, path: str) -> bool:
    """True when the folder holds Parquet files (any Hadoop path, not only local).

    Not `_SUCCESS`: a cluster may be configured not to write it, and a missing index would be
    renumbered from zero, silently changing every id's number.
    """
    jvm = spark._jvm  # the Hadoop FileSystem API is only reachable through py4j
    hpath = jvm.org.apache.hadoop.fs.Path(path)
    fs = hpath.getFileSystem(spark._jsc.hadoopConfiguration())
    if not fs.exists(hpath):
        return False
    found = fs.globStatus(jvm.org.apache.hadoop.fs.Path(path, "*.parquet"))
    return found is not None and len(found) > 0


def load_index(spark: SparkSession, path: str | Path) -> DataFrame:
    """The stored index, or an empty one."""
    path = str(path)
    if not _exists(spark, path):
        return spark.createDataFrame([], INDEX_SCHEMA)
    return spark.read.schema(INDEX_SCHEMA).parquet(path)


def update_index(spark: SparkSession, ids: DataFrame, path: str | Path) -> DataFrame:
    """Add the ids of `ids` (first column, strings) that the index lacks; return the full index.

    The returned DataFrame is read back from the folder, so callers see exactly what is stored.
    """
    path = str(path)
    stored = _exists(spark, path)
    existing = load_index(spark, path)
    wanted = ids.select(F.col(ids.columns[0]).cast("string").alias("id")).where("id IS NOT NULL")
    new = wanted.distinct().join(existing.select("id"), "id", "left_anti")
    # Materialise before appending: the plan reads the folder it is about to write into.
    new = new.localCheckpoint(eager=True)
    added = new.count()
    if added:
        start = existing.agg(F.max("idx")).first()[0] if stored else None
        start = -1 if start is None else int(start)
        if start + added >= 2**31 - 1:
            raise OverflowError(f"index {path} is full: ALS ids are 32-bit integers")
        numbered = new.select(
            "id",
            # New ids are few per retrain: one sorted partition is fine (and says so, no warning).
            (F.row_number().over(Window.partitionBy(F.lit(0)).orderBy("id")) + F.lit(start))
            .cast("int")
            .alias("idx"),
        )
        numbered.coalesce(1).write.mode("append").parquet(path)
        log.info("index %s: %d new ids from %d", path, added, start + 1)
    return load_index(spark, path)
