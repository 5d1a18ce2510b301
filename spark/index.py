"""Persistent string -> integer index for ALS, which needs integer user and item ids.

An id keeps its number across retrains, so factors, saved models and exports of different versions
speak about the same user with the same number. The index is a Parquet folder of (id, idx) rows;
new ids are APPENDED as new files (existing files are never rewritten), numbered after the current
maximum in sorted id order, so the same input always gives the same numbers. One writer at a time
(the training job) is assumed.

A training cycle numbers its new ids with `extend` (on the driver, nothing written) and stores
them with `Index.save` once its recommendations are out: until a model that uses the numbers is
saved, no stored thing refers to them, so a cycle that dies in between loses nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark import files

log = logging.getLogger(__name__)

INDEX_SCHEMA = T.StructType(
    [T.StructField("id", T.StringType(), False), T.StructField("idx", T.IntegerType(), False)]
)


def _exists(spark: SparkSession, path: str) -> bool:
    """True when the folder holds Parquet files (any Hadoop path, not only local).

    Not `_SUCCESS`: a cluster may be configured not to write it, and a missing index would be
    renumbered from zero, silently changing every id's number.
    """
    return files.has_files(spark, path, "*.parquet")


def load_index(spark: SparkSession, path: str | Path) -> DataFrame:
    """The stored index, or an empty one."""
    path = str(path)
    if not _exists(spark, path):
        return spark.createDataFrame([], INDEX_SCHEMA)
    return spark.read.schema(INDEX_SCHEMA).parquet(path)


@dataclass
class Index:
    """One index on the driver: every id's number, and the ids numbered since it was loaded."""

    path: str
    numbers: dict[str, int]
    added: list[tuple[str, int]] = field(default_factory=list)  # not stored yet
    _sent: DataFrame | None = field(default=None, repr=False, compare=False)  # `frame`'s

    def frame(self, spark: SparkSession) -> DataFrame:
        """The whole index as an (id, idx) DataFrame (independent of the folder), sent to the
        JVM once."""
        if self._sent is None:
            self._sent = _frame(spark, list(self.numbers.items()))
        return self._sent

    def names(self) -> np.ndarray:
        """The ids by number: `names()[n]` is the id numbered n (numbers are dense from 0)."""
        out = np.empty(max(self.numbers.values(), default=-1) + 1, dtype=object)
        out[np.fromiter(self.numbers.values(), dtype=np.int64, count=len(self.numbers))] = list(
            self.numbers
        )
        return out

    def extended(self, ids: Iterable[str]) -> Index:
        """This index plus the `ids` (repeats allowed) it lacks, numbered after its maximum in
        sorted id order; pure (no Spark, nothing written: `save` writes what was added)."""
        numbers = dict(self.numbers)
        new = sorted(set(ids) - numbers.keys())  # code point order = Spark's order
        start = max(numbers.values(), default=-1)
        if start + len(new) >= 2**31 - 1:
            raise OverflowError(f"index {self.path} is full: ALS ids are 32-bit integers")
        added = [(id_, start + i) for i, id_ in enumerate(new, 1)]
        numbers.update(added)
        return Index(self.path, numbers, self.added + added)

    def save(self, spark: SparkSession) -> None:
        """Append the ids numbered since loading as one new file."""
        if not self.added:
            return
        _frame(spark, self.added).coalesce(1).write.mode("append").parquet(self.path)
        log.info("index %s: %d new ids from %d", self.path, len(self.added), self.added[0][1])
        self.added = []


def _frame(spark: SparkSession, pairs: list[tuple[str, int]]) -> DataFrame:
    """(id, idx) pairs as a DataFrame, through Arrow (a list would start Python workers)."""
    ids = pd.DataFrame({
        "id": pd.Series([p[0] for p in pairs], dtype=object),
        "idx": np.fromiter((p[1] for p in pairs), dtype=np.int32, count=len(pairs)),
    })
    return spark.createDataFrame(ids, INDEX_SCHEMA)


def extend(spark: SparkSession, ids: DataFrame, path: str | Path) -> Index:
    """The stored index plus the ids of `ids` (first column, strings) it lacks, numbered after
    its maximum in sorted id order; nothing is written (`Index.save` does).

    The distinct ids and the stored index are compared on the driver (as MLlib's StringIndexer
    does with its labels): users and products number in the thousands to millions, and a set
    difference there costs one Spark job where a distributed anti-join cost five.
    """
    column = F.col(ids.columns[0]).cast("string")
    wanted = ids.select(column.alias("id")).where("id IS NOT NULL").distinct().toPandas()
    return extend_ids(spark, wanted["id"], path)


def extend_ids(spark: SparkSession, ids: Iterable[str], path: str | Path) -> Index:
    """`extend` for ids already on the driver (any iterable of strings, repeats allowed)."""
    return load(spark, path).extended(ids)


def load(spark: SparkSession, path: str | Path) -> Index:
    """The stored index on the driver (empty when there is none yet), nothing added."""
    path = str(path)
    numbers: dict[str, int] = {}
    if _exists(spark, path):
        stored = load_index(spark, path).toPandas()
        numbers = dict(zip(stored["id"], stored["idx"].astype(int).tolist(), strict=True))
    return Index(path, numbers)


def update_index(spark: SparkSession, ids: DataFrame, path: str | Path) -> DataFrame:
    """`extend` and save at once; returns the index as stored (read back from the folder)."""
    extend(spark, ids, path).save(spark)
    return load_index(spark, path)
