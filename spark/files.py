"""Small files and folders on any Hadoop file system (local, HDFS, S3A...): what the store, the
model registry, the index and the warm-up keep beside their Parquet data. Spark's Python API has no
file system calls, so these go through py4j to Hadoop's `FileSystem`, in this one module.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlparse

from pyspark.sql import SparkSession


def _jvm_path(spark: SparkSession, path: str) -> tuple[Any, Any]:
    jvm = spark.sparkContext._jvm
    p = jvm.org.apache.hadoop.fs.Path(path)
    fs = p.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    return fs, p


def exists(spark: SparkSession, path: str) -> bool:
    fs, p = _jvm_path(spark, path)
    return bool(fs.exists(p))


def read_text(spark: SparkSession, path: str) -> str | None:
    """The file's text, or None when it does not exist."""
    fs, p = _jvm_path(spark, path)
    if not fs.exists(p):
        return None
    stream = fs.open(p)
    try:
        return spark.sparkContext._jvm.org.apache.commons.io.IOUtils.toString(stream, "UTF-8")
    finally:
        stream.close()


def write_text(spark: SparkSession, path: str, text: str) -> None:
    """Replace the file atomically: write a temp file beside it, then rename over it."""
    fs, p = _jvm_path(spark, path)
    jvm = spark.sparkContext._jvm
    tmp = jvm.org.apache.hadoop.fs.Path(f"{path}.tmp-{time.time_ns()}")
    out = fs.create(tmp, True)
    try:
        out.write(bytearray(text.encode()))
    finally:
        out.close()
    if not fs.rename(tmp, p):  # HDFS does not rename over an existing file
        fs.delete(p, False)
        if not fs.rename(tmp, p):
            raise OSError(f"cannot rename {tmp} to {path}")


def delete(spark: SparkSession, path: str) -> None:
    """Delete the file or folder (recursively) if it exists."""
    fs, p = _jvm_path(spark, path)
    fs.delete(p, True)


def move(spark: SparkSession, source: str, target: str) -> None:
    """Move folder `source` to `target`, replacing what `target` held."""
    fs, src = _jvm_path(spark, source)
    _, dst = _jvm_path(spark, target)
    fs.delete(dst, True)
    fs.mkdirs(dst.getParent())
    if not fs.rename(src, dst):
        raise OSError(f"cannot rename {source} to {target}")


def local_path(path: str) -> str | None:
    """The local file system path of `path` (a plain path or file: URI), else None."""
    parsed = urlparse(path)
    if parsed.scheme in ("", "file"):
        return parsed.path
    return None


def list_names(spark: SparkSession, path: str) -> list[str]:
    """Names of the entries of a folder (empty when it does not exist)."""
    fs, p = _jvm_path(spark, path)
    if not fs.exists(p):
        return []
    return [s.getPath().getName() for s in fs.listStatus(p)]


def has_files(spark: SparkSession, path: str, pattern: str) -> bool:
    """True when the folder exists and holds an entry matching the glob `pattern`."""
    fs, p = _jvm_path(spark, path)
    if not fs.exists(p):
        return False
    found = fs.globStatus(spark.sparkContext._jvm.org.apache.hadoop.fs.Path(path, pattern))
    return found is not None and len(found) > 0
