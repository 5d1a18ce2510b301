"""The `sales` Kafka source, decoded in Spark, split into good rows and dead letters.

The single-object framing is checked with column expressions and the body read with Spark's
`from_avro` (PERMISSIVE), so no Python runs per record. A record is bad, with a reason the
dead-letter topic keeps next to its original bytes, when it is:

- null, or shorter than the 10-byte header;
- not marked `C3 01`;
- framed with a fingerprint of another known record (a `GraphEdge` on `sales`), or an unknown one;
- a body that does not decode (PERMISSIVE gives a struct of NULLs, not a NULL struct: the test is a
  required field being NULL);
- a record with an empty id (`event_id`, `user_id`, `product_id`).

The reasons read like `schemas.codec.DecodeError`'s, so a dead letter says the same whether the
producer, Spark or Faust rejected it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.avro.functions import from_avro, to_avro

from recsys.kafka import java_security_options
from recsys.settings import Settings
from schemas import codec

log = logging.getLogger(__name__)

STAGE = "stream"
# Columns of the good rows besides the `Sale` fields: where each event was read (lineage).
SOURCE_COLUMNS = ("source_topic", "source_partition", "source_offset")


# Spark 4.1.1's DataSource V2 Kafka stream (KafkaMicroBatchStream) fails the query with a
# NullPointerException in its progress metrics when the first batch after a restart is the re-run
# of an uncommitted one (a known 4.1.1 bug, SPARK-55271) -- exactly the crash recovery this job
# relies on. The V1 source reads the same offsets and checkpoint format without that code path;
# the lag we log comes from the progress report's end and latest offsets instead.
_V1_KAFKA = "org.apache.spark.sql.kafka010.KafkaSourceProvider"


def kafka_source(spark: SparkSession, settings: Settings, topic: str) -> DataFrame:
    """The streaming Kafka source on `topic`, from the earliest offset on a fresh checkpoint.

    failOnDataLoss is off: offsets deleted by retention before the job read them are logged by
    Spark and skipped, rather than stopping ingestion for good.
    """
    disabled = spark.conf.get("spark.sql.streaming.disabledV2MicroBatchReaders", "") or ""
    if _V1_KAFKA not in disabled.split(","):
        spark.conf.set("spark.sql.streaming.disabledV2MicroBatchReaders",
                       ",".join(x for x in (disabled, _V1_KAFKA) if x))
    return (
        spark.readStream.format("kafka")
        .option("kafka.bootstrap.servers", settings.kafka_bootstrap)
        .options(**java_security_options(settings))  # TLS, SASL: recsys/kafka.py
        .option("subscribe", topic)
        .option("startingOffsets", "earliest")
        .option("maxOffsetsPerTrigger", str(settings.max_offsets_per_trigger))
        .option("failOnDataLoss", "false")
        # Bigger fetches than the consumer defaults (500 records a poll): reading 200,000 records
        # takes about half the time on a local broker.
        .option("kafka.max.poll.records", "20000")
        .option("kafka.max.partition.fetch.bytes", str(16 << 20))
        .option("kafka.fetch.max.bytes", str(64 << 20))
        .load()
    )


def writers(name: str = "Sale") -> list[codec.Schema]:
    """The schemas a record `name` may have been written with: current first, then history
    (a history file equal to the current schema has the same fingerprint and is left out)."""
    out: dict[bytes, codec.Schema] = {}
    for s in (codec.schema(name), *reversed(codec.history(name))):
        out.setdefault(s.fingerprint, s)
    return list(out.values())


def _foreign(expect: str) -> dict[bytes, str]:
    """Fingerprints of every other known record: "X where Sale was expected", not "unknown"."""
    out = {}
    for name in codec.schemas():
        if name != expect:
            for s in (*codec.history(name), codec.schema(name)):
                out[s.fingerprint] = name
    return out


def _required(schema: codec.Schema) -> list[tuple[str, bool]]:
    """(field, is a string) of each field that may not be NULL, in schema order."""
    out = []
    for f in schema.parsed["fields"]:
        t = f["type"]
        if isinstance(t, list) and "null" in t:
            continue
        out.append((f["name"], t == "string"))
    return out


def decode(
    raw: DataFrame, expect: str = "Sale", known: Sequence[codec.Schema] | None = None
) -> DataFrame:
    """`raw` (Kafka columns: value, topic, partition, offset) plus `record` (the decoded struct
    in the current schema of `expect`) and `reason` (NULL when the record is good).

    `known` are the writer schemas accepted (default: current and history); an older writer is
    read into the current schema by Avro resolution (from_avro's `avroSchema` option).
    """
    current = codec.schema(expect)
    known = list(known) if known is not None else writers(expect)
    value = F.col("value")
    fp = F.substring(value, 3, 8)
    framed = (F.length(value) >= codec.HEADER_LEN) & (
        F.substring(value, 1, 2) == F.lit(codec.MARKER)
    )
    body = F.expr(f"substring(value, {codec.HEADER_LEN + 1})")
    record: Column | None = None
    for w in known:
        options = {"mode": "PERMISSIVE"}
        if w.fingerprint != current.fingerprint:
            options["avroSchema"] = current.json
        branch = from_avro(body, w.json, options)
        cond = framed & (fp == F.lit(w.fingerprint))
        record = F.when(cond, branch) if record is None else record.when(cond, branch)
    assert record is not None
    # Two projections: `record` is computed once, then the reason reads its fields.
    decoded = raw.withColumn("record", record)
    return decoded.withColumn("reason", _reason(expect, known, current))


def _reason(expect: str, known: Sequence[codec.Schema], current: codec.Schema) -> Column:
    value = F.col("value")
    n = F.length(value)
    marker = F.substring(value, 1, 2)
    fp = F.substring(value, 3, 8)
    rec = F.col("record")
    reason = (
        F.when(value.isNull(), F.lit("null value"))
        .when(
            n < codec.HEADER_LEN,
            F.concat(
                F.lit("too short for single-object framing ("), n.cast("string"), F.lit(" bytes)")
            ),
        )
        .when(
            marker != F.lit(codec.MARKER),
            F.concat(F.lit("bad marker "), F.lower(F.hex(marker)), F.lit(" (want c301)")),
        )
    )
    for fingerprint, name in _foreign(expect).items():
        reason = reason.when(
            fp == F.lit(fingerprint), F.lit(f"schema {name} where {expect} was expected")
        )
    reason = reason.when(
        ~fp.isin([F.lit(w.fingerprint) for w in known]),
        F.concat(F.lit("unknown schema fingerprint "), F.lower(F.hex(fp))),
    )
    required = _required(current)
    first = required[0][0]
    # PERMISSIVE from_avro: a body that does not decode gives every field NULL.
    reason = reason.when(rec[first].isNull(), F.lit(f"body does not decode as {expect}"))
    for name, is_string in required:
        reason = reason.when(rec[name].isNull(), F.lit(f"required field {name} is missing"))
        if is_string and name.endswith("_id"):
            reason = reason.when(rec[name] == "", F.lit(f"required field {name} is empty"))
    return reason


def split(decoded: DataFrame) -> tuple[DataFrame, DataFrame]:
    """(good, bad): good rows are the record's fields plus the source columns; bad rows keep the
    Kafka columns and the reason.

    Put an `observe` (the job does: it counts there) or a persist between `decode` and this:
    otherwise Spark pushes a filter on `reason` below the projection that decodes, inlining
    from_avro once per field the reason reads. Neither is pushed through.
    """
    good = decoded.where(F.col("reason").isNull()).select(
        "record.*",
        F.col("topic").alias("source_topic"),
        F.col("partition").alias("source_partition"),
        F.col("offset").alias("source_offset"),
    )
    bad = decoded.where(F.col("reason").isNotNull()).select(
        "value", "topic", "partition", "offset", "reason"
    )
    return good, bad


def source_label(topic: Column, partition: Column, offset: Column) -> Column:
    """`topic[partition]@offset`, the name every error line and dead letter uses."""
    return F.concat(
        F.coalesce(topic, F.lit("?")),
        F.lit("["),
        F.coalesce(partition.cast("string"), F.lit("?")),
        F.lit("]@"),
        F.coalesce(offset.cast("string"), F.lit("?")),
    )


def dead_letters(bad: DataFrame, stage: str = STAGE) -> DataFrame:
    """Kafka sink rows (key, value) of framed `DeadLetter`s for `bad` rows from `split`.

    Keyed by the source label, so a batch written twice after a crash is recognisable as the same
    dead letters. Every non-null Avro field gets a non-nullable column, as to_avro requires.
    """
    dl = codec.schema("DeadLetter")
    source = source_label(F.col("topic"), F.col("partition"), F.col("offset"))
    record = F.struct(
        source.alias("source"),
        F.lit(stage).alias("stage"),
        F.coalesce(F.col("reason"), F.lit("unknown")).alias("reason"),
        F.current_timestamp().alias("failed_at"),
        F.col("value").alias("original_bytes"),
        F.lit(None).cast("string").alias("original_row"),
        F.col("topic").alias("source_topic"),
        F.col("partition").alias("source_partition"),
        F.col("offset").alias("source_offset"),
        F.lit(None).cast("long").alias("row_number"),
    )
    return bad.select(
        source.cast("binary").alias("key"),
        F.concat(F.lit(dl.header), to_avro(record, dl.json)).alias("value"),
    )
