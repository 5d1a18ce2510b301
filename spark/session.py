"""The one SparkSession builder, used by every entry point and by the test fixture."""

from __future__ import annotations

import logging
import os
import sys

from pyspark.sql import SparkSession

from recsys import paths
from recsys.settings import Settings
from spark import graphx

log = logging.getLogger(__name__)


def build(settings: Settings, app_name: str = "recsys", ui: bool = False) -> SparkSession:
    """A session with the project's jars on spark.jars (nothing is resolved at run time)."""
    jars = paths.spark_jars()
    if not jars:
        raise FileNotFoundError(f"no Spark connector jars in {paths.SPARK_JARS}: run `make setup`")
    # PySpark's launcher starts workers with PYSPARK_PYTHON; default it to this interpreter.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    builder = (
        SparkSession.builder.appName(app_name)
        .master(settings.spark_master)
        .config("spark.jars", ",".join(str(j) for j in jars))
        .config("spark.driver.memory", settings.spark_driver_memory)
        .config("spark.sql.shuffle.partitions", str(settings.spark_shuffle_partitions))
        .config("spark.default.parallelism", str(settings.spark_shuffle_partitions))
        .config("spark.ui.enabled", "true" if ui else "false")
        .config("spark.ui.showConsoleProgress", "false")  # progress bars garble the logs
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.adaptive.enabled", "true")
        # Arrow for what crosses between the JVM and the driver's Python (toPandas,
        # createDataFrame of pandas): the driver-side steps of a cycle move whole columns.
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.streaming.stopGracefullyOnShutdown", "true")
        # Kryo for what RDDs shuffle (GraphX's vertices and messages, ALS's blocks): with Java
        # serialisation the GraphX bridge's indexing took 2.5x as long (42 s against 17 s).
        .config("spark.serializer", "org.apache.spark.serializer.KryoSerializer")
        .config("spark.driver.extraJavaOptions", "-Dlog4j2.level=warn")
    )
    if settings.spark_master.startswith("local"):
        # Local mode: keep the driver on loopback. On a cluster the workers must reach it.
        builder = builder.config("spark.driver.host", "127.0.0.1").config(
            "spark.driver.bindAddress", "127.0.0.1"
        )
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    spark.sparkContext.setCheckpointDir(str(settings.data_dir.absolute() / "spark-checkpoints"))
    # py4j answers a missing class with a JavaPackage, which fails much later and obscurely:
    # check our GraphX bridge now and name its jar if it is not there.
    graphx.check(spark)
    log.info("spark %s on %s with %d jars", spark.version, settings.spark_master, len(jars))
    return spark
