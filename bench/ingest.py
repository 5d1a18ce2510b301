"""ingest: the bundled file from `sales` into the Parquet store by the Spark job (decode, split,
dedupe, write), next to a plain confluent-kafka consumer draining the same topic.

Prints `ingest: spark N rows/s / plain consumer M rows/s = R` (target R >= 0.5) for the first run
of a fresh JVM (its first Spark job and first Kafka read cost seconds of class loading and JIT),
and `ingest_warm:` for the same file again, from another topic into another store, in the same
JVM -- what a running `recsys stream` does when a backlog arrives. The plain consumer drains the
topic three times and its median counts (one drain varies by a second: 2.5-3.6 s). Never asserts.
Starts its own broker on free ports in a temporary folder; `python -m bench.ingest [--limit N]`.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import threading
import time
import uuid

from recsys.settings import Settings, load, override

log = logging.getLogger("bench.ingest")


def produce(settings: Settings, topic: str, dlq: str, limit: int | None) -> int:
    """Replay the bundled file into `topic`; returns the Sale records acknowledged."""
    from recsys.paths import BUNDLED_DATA
    from streams.csv_source import CsvSource
    from streams.producer import SalesProducer

    producer = SalesProducer(settings, topic=topic, dlq_topic=dlq)
    summary = producer.run(CsvSource(BUNDLED_DATA, limit=limit))
    log.info("produced: %s", summary.line())
    return summary.published


def drain(settings: Settings, topic: str, expected: int, timeout: float = 300.0) -> float:
    """Seconds a plain consumer (batch consume, no decoding) takes to read `expected` records."""
    from confluent_kafka import Consumer, TopicPartition

    from recsys.kafka import consumer_config

    consumer = Consumer(consumer_config(settings, f"bench-{uuid.uuid4().hex[:8]}"))
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])  # 0: from the beginning
        seen, started = 0, time.perf_counter()
        deadline = started + timeout
        while seen < expected and time.perf_counter() < deadline:
            for msg in consumer.consume(num_messages=10_000, timeout=1.0):
                if msg.error() is None:
                    seen += 1
        seconds = time.perf_counter() - started
    finally:
        consumer.close()
    if seen < expected:
        log.warning("plain consumer read %d of %d records", seen, expected)
    return seconds


def spark_ingest(settings: Settings, prefixes: list[str]) -> list[tuple[float, int]]:
    """Per topic prefix, in one JVM one after the other: (seconds from query start to the last
    batch committed, events in the store). Each run has its own store and checkpoint."""
    from spark import session
    from spark.job import StreamJob
    from spark.publish import Topics

    spark = session.build(settings, "bench-ingest")
    out = []
    try:
        for prefix in prefixes:
            own = override(settings, data_dir=str(settings.data_dir / prefix.strip(".")))
            job = StreamJob(spark, own, Topics.with_prefix(prefix))
            started = time.perf_counter()
            job.start(available_now=True)
            job.run(threading.Event())
            out.append((time.perf_counter() - started, job.store.count()))
    finally:
        spark.stop()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__)
    p.add_argument("--limit", type=int, help="replay only the first N rows of the bundled file")
    args = p.parse_args(argv or [])
    from bench._broker import scratch_broker
    from recsys import logs
    from recsys import topics as topic_admin

    logs.setup(os.environ.get("RECSYS_LOG_LEVEL", "WARNING"))
    with scratch_broker("ingest") as (broker, tmp):
        settings = load(kafka_bootstrap=broker.bootstrap, data_dir=str(tmp),
                        train_threshold=10**12)
        prefixes = ["bench.", "again."]  # the second: the same file once the JVM is warm
        for prefix in prefixes:
            topic_admin.create_topics(settings, names=topic_admin.renamed(prefix))
            n = produce(settings, prefix + "sales", prefix + "sales.dlq", args.limit)
        plain_s = statistics.median(drain(settings, prefixes[0] + "sales", n) for _ in range(3))
        plain_rate = n / plain_s
        runs = spark_ingest(settings, prefixes)
        labels = [("ingest", "the first run of the JVM"),
                  ("ingest_warm", "the same file from another topic into another store, next "
                   "in the same JVM: a running job")]
        for (name, what), (spark_s, stored) in zip(labels, runs, strict=True):
            if stored != n:
                print(f"{name}: WARNING the store holds {stored:,} events of {n:,} produced",
                      file=sys.stderr)
            rate = n / spark_s
            print(f"{name}: spark {rate:,.0f} rows/s / plain consumer {plain_rate:,.0f} rows/s "
                  f"= {rate / plain_rate:.2f}  ({n:,} records; spark {spark_s:.1f} s incl. query "
                  f"start, plain {plain_s:.1f} s; {what}; target >= 0.5)")


if __name__ == "__main__":
    main(sys.argv[1:])
