"""Where the project's files are: the repo root, the Maven jar folders, the bundled data."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JVM_LIB = ROOT / "jvm" / "lib"
KAFKA_JARS = JVM_LIB / "kafka"  # the broker and its tools (kafka_2.13, kafka-tools)
SPARK_JARS = JVM_LIB / "spark"  # connectors pyspark does not ship
BUNDLED_DATA = ROOT / "data" / "online_retail.csv.gz"


def spark_jars() -> list[Path]:
    """The jars Spark gets on `spark.jars`; empty list means `make setup` has not run."""
    return sorted(SPARK_JARS.glob("*.jar"))


def kafka_classpath() -> str:
    jars = sorted(KAFKA_JARS.glob("*.jar"))
    if not jars:
        raise FileNotFoundError(f"no Kafka jars in {KAFKA_JARS}: run `make setup`")
    return ":".join(str(j) for j in jars)
