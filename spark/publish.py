"""The Kafka sink of a trained model: `recommendations` (one record per user), `graph-edges` (one
record per user -> product edge), then `model-ready`.

Order matters: the recommendations and edges go first and are flushed, so a consumer that sees a
`model-ready` for version V can already read every user's list and every edge of version V. Every
record has a deterministic id (`V:user_id`, `V:user_id:product_id`, and the model id), so a cycle
re-run after a crash publishes the same ids again and consumers stay idempotent.

Recommendations and edges are encoded in Spark (`to_avro` + the single-object header as a literal) and written
with the Kafka batch sink; the one `model-ready` record goes through the Python codec and an
idempotent confluent-kafka producer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.avro.functions import to_avro

from recsys import kafka
from recsys.settings import Settings
from schemas import codec, topics
from schemas.millis import from_ms

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topics(topics.Names):
    """The topics the Spark job reads and writes; tests give each run its own names."""

    sales: str = topics.SALES
    dlq: str = topics.SALES_DLQ
    model_ready: str = topics.MODEL_READY
    recommendations: str = topics.RECOMMENDATIONS
    feedback: str = topics.FEEDBACK  # read: the aggregator's online feedback (early retrain)
    graph_edges: str = topics.GRAPH_EDGES
    model_factors: str = topics.MODEL_FACTORS  # what the speed layer folds sales in with
    shadow: str = topics.RECOMMENDATIONS_SHADOW  # a rejected challenger's lists


# recsys.kafka.PRODUCER_DEFAULTS that Kafka's Java producer takes under the same name (the rest
# are librdkafka's own, or the Java defaults already).
_JAVA_PRODUCER_KEYS = ("acks", "enable.idempotence", "compression.type")


def kafka_sink_options(settings: Settings) -> dict[str, str]:
    """Options of Spark's Kafka batch sink: the same safe producer defaults as ours, taken from
    recsys.kafka.PRODUCER_DEFAULTS (`kafka.` + the Java producer's name)."""
    safe = {k: kafka.PRODUCER_DEFAULTS[k] for k in _JAVA_PRODUCER_KEYS}
    return {
        "kafka.bootstrap.servers": settings.kafka_bootstrap,
        **kafka.java_security_options(settings),  # TLS, SASL
        **{f"kafka.{k}": str(v).lower() if isinstance(v, bool) else str(v)
           for k, v in safe.items()},
        "kafka.linger.ms": str(settings.producer_linger_ms),
    }


def write_kafka(rows: DataFrame, settings: Settings, topic: str) -> None:
    """Write (key, value) rows to `topic` with Spark's Kafka batch sink (flushed on return)."""
    rows.write.format("kafka").options(**kafka_sink_options(settings)).option(
        "topic", topic
    ).save()


def _write_counted(rows: DataFrame, settings: Settings, topic: str) -> int:
    """Write (key, value) rows to `topic`, counted on the way (cached, so computed once)."""
    rows = rows.cache()
    try:
        n = rows.count()
        write_kafka(rows, settings, topic)
    finally:
        rows.unpersist()
    return n


def recommendation_rows(
    recs: DataFrame, model_version: int, generated_at: datetime | None = None
) -> DataFrame:
    """(key, value) rows of framed `Recommendation`s from `user_id, items` (the pipeline's shape).

    to_avro wants non-nullable columns where the Avro field is not a union: users without an id
    and items without a product are dropped (there should be none), the rest is made
    non-nullable explicitly.
    """
    schema = codec.schema("Recommendation")
    at = generated_at or datetime.now(UTC)
    at_lit = F.lit(at.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ")).cast("timestamp")
    items = F.transform(
        F.filter(
            F.coalesce(F.col("items"), F.array()),
            lambda x: x["product_id"].isNotNull() & x["score"].isNotNull()
            & x["rank"].isNotNull(),
        ),
        lambda x: F.struct(
            F.coalesce(x["product_id"], F.lit("")).alias("product_id"),
            F.coalesce(x["score"].cast("double"), F.lit(0.0)).alias("score"),
            F.coalesce(x["rank"].cast("int"), F.lit(0)).alias("rank"),
        ),
    )
    user = F.coalesce(F.col("user_id").cast("string"), F.lit(""))
    record = F.struct(
        F.concat(F.lit(f"{model_version}:"), user).alias("id"),
        user.alias("user_id"),
        F.lit(model_version).cast("long").alias("model_version"),
        F.coalesce(at_lit, F.current_timestamp()).alias("generated_at"),
        items.alias("items"),
        F.lit(topics.RETRAIN).alias("source"),
        F.lit(None).cast("string").alias("sale_event_id"),
        F.lit(None).cast("timestamp").alias("sale_timestamp"),
    )
    return recs.where(F.col("user_id").isNotNull()).select(
        user.cast("binary").alias("key"),
        F.concat(F.lit(schema.header), to_avro(record, schema.json)).alias("value"),
    )


def publish_recommendations(
    recs: DataFrame, model_version: int, settings: Settings, topic: str
) -> int:
    """Write every user's list to `topic`; returns how many records were written."""
    n = _write_counted(recommendation_rows(recs, model_version), settings, topic)
    log.info("published %d recommendations of model %d to %s", n, model_version, topic)
    return n


def graph_edge_rows(edges: DataFrame) -> DataFrame:
    """(key, value) rows of framed `GraphEdge`s from `spark.graph.Graph.edges`; the key is the
    id `model_version:user_id:product_id`. Nulls are dropped or coalesced as in
    `recommendation_rows` (to_avro wants non-nullable columns)."""
    schema = codec.schema("GraphEdge")
    user = F.col("user_id").cast("string")
    product = F.col("product_id").cast("string")
    edge_id = F.concat_ws(":", F.col("model_version").cast("string"), user, product)
    because = F.transform(
        F.filter(F.coalesce(F.col("because"), F.array().cast("array<string>")),
                 lambda x: x.isNotNull()),
        lambda x: F.coalesce(x, F.lit("")),
    )
    record = F.struct(
        F.coalesce(edge_id, F.lit("")).alias("id"),
        F.coalesce(F.col("model_version").cast("long"), F.lit(0).cast("long")).alias(
            "model_version"),
        F.coalesce(user, F.lit("")).alias("user_id"),
        F.coalesce(product, F.lit("")).alias("product_id"),
        F.coalesce(F.col("score").cast("double"), F.lit(0.0)).alias("score"),
        F.coalesce(F.col("rank").cast("int"), F.lit(0)).alias("rank"),
        because.alias("because"),
    )
    return edges.where(user.isNotNull() & product.isNotNull()).select(
        F.coalesce(edge_id, F.lit("")).cast("binary").alias("key"),
        F.concat(F.lit(schema.header), to_avro(record, schema.json)).alias("value"),
    )


def publish_graph_edges(edges: DataFrame, model_version: int, settings: Settings, topic: str
                        ) -> int:
    """Write every edge of `model_version` to `topic`; returns how many records were written."""
    n = _write_counted(graph_edge_rows(edges), settings, topic)
    log.info("published %d graph edges of model %d to %s", n, model_version, topic)
    return n


def _ms(value: datetime | int | float | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return from_ms(float(value))


def finite(metrics: dict[str, float]) -> dict[str, float]:
    """NaN stays NaN (Avro doubles carry it); None and non-numbers are left out."""
    out = {}
    for k, v in metrics.items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def model_id(model_version: int, events: int, offsets: list[dict[str, Any]],
             event_time_min: datetime | None, event_time_max: datetime | None) -> str:
    """Deterministic: the version and a digest of the data lineage it was trained on."""
    lineage = json.dumps(
        {"events": events, "offsets": offsets,
         "t": [str(event_time_min), str(event_time_max)]},
        sort_keys=True,
    )
    return f"{model_version}:{hashlib.sha256(lineage.encode()).hexdigest()[:16]}"


def model_ready_record(result: Any, trigger: str, offsets: list[dict[str, Any]],
                       cycle_seconds: float, trained_at: datetime | None = None
                       ) -> dict[str, Any]:
    """The `ModelReady` record of a `spark.pipeline.TrainResult`."""
    lo, hi = _ms(result.event_time_min), _ms(result.event_time_max)
    return {
        "model_version": int(result.model_version),
        "model_id": model_id(result.model_version, result.events, offsets, lo, hi),
        "trained_at": trained_at or datetime.now(UTC),
        "trigger": trigger,
        "events": int(result.events),
        "event_time_min": lo,
        "event_time_max": hi,
        "offsets": offsets,
        "users": int(result.users),
        "products": int(result.products),
        "params": {str(k): str(v) for k, v in result.params.items()},
        "metrics": finite(result.metrics),
        "baseline_metrics": finite(result.baseline_metrics),
        "train_seconds": float(result.train_seconds),
        "cycle_seconds": float(cycle_seconds) if math.isfinite(cycle_seconds) else 0.0,
        "model_path": str(result.model_path),
    }


def publish_model_ready(record: dict[str, Any], settings: Settings, topic: str) -> None:
    """Send the one `model-ready` record, keyed by its version, and wait for the broker's ack."""
    _send(topic, settings, [(str(record["model_version"]).encode(),
                             codec.encode("ModelReady", record))])
    log.info("published model-ready %d (%s) to %s", record["model_version"], record["model_id"],
             topic)


def item_factors_local(result: Any) -> tuple[list[str], Any]:
    """(product ids, products x rank float32) of a `TrainResult`'s final model, on the driver
    (Arrow: the factors arrive as one flat float column, no object per row)."""
    import numpy as np

    table = result.model.itemFactors.select("id", "features").toArrow()
    numbers = table.column("id").to_numpy()
    flat = table.column("features").combine_chunks()
    rank = int(result.model.rank)
    values = flat.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    names = result.indexes[1].names()
    return [str(p) for p in names[numbers]], values.reshape(len(numbers), rank)


def publish_factors(result: Any, offsets: list[dict[str, Any]], settings: Settings, topic: str
                    ) -> int:
    """Put what a fold-in needs from the model on `topic` (schemas/factors.py: chunks, chunk 0
    with params, offsets and YᵀY) and wait for every ack; returns the number of chunks."""
    from schemas import factors

    ids, y = item_factors_local(result)
    params = {str(k): str(v) for k, v in result.params.items()}
    records = list(factors.chunks(result.model_version, ids, y, params, offsets))
    _send(topic, settings, [
        (factors.key(r["model_version"], r["chunk"]), codec.encode("ModelFactors", r))
        for r in records
    ])
    log.info("published the factors of model %d to %s: %d products, rank %d, %d chunk(s)",
             result.model_version, topic, len(ids), y.shape[1], len(records))
    return len(records)


def retire_factors(model_version: int, chunks: int, settings: Settings, topic: str) -> None:
    """Tombstone every chunk of `model_version` (a newer version is complete on the topic), so
    compaction removes it."""
    from schemas import factors

    _send(topic, settings, [(factors.key(model_version, c), None) for c in range(chunks)])
    log.info("retired the factors of model %d on %s (%d tombstones)", model_version, topic,
             chunks)


def _send(topic: str, settings: Settings, records: list[tuple[bytes, bytes | None]]) -> None:
    """Produce (key, value) records with the safe defaults and wait for every ack."""
    from confluent_kafka import KafkaException, Producer

    errors: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    producer = Producer(kafka.producer_config(settings, **{"linger.ms": 5}))
    for k, v in records:
        while True:
            try:
                producer.produce(topic, key=k, value=v, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.1)
    left = producer.flush(120)
    if left or errors:
        raise KafkaException(f"{topic}: {errors[0] if errors else f'{left} in flight after 120 s'}")
