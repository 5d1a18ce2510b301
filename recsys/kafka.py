"""Safe Kafka client defaults, in one place (librdkafka leaves idempotence off unless told).

Producers: idempotent, acks=all, so a retry never duplicates or reorders within a partition.
Consumers: offsets committed only after the work is done (auto commit off where we process).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from recsys.settings import Settings

PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "compression.type": "lz4",
    "max.in.flight.requests.per.connection": 5,
    "delivery.timeout.ms": 120_000,
    "queue.buffering.max.messages": 500_000,
    "queue.buffering.max.kbytes": 512 * 1024,
}

CONSUMER_DEFAULTS: dict[str, Any] = {
    "enable.auto.commit": False,
    "auto.offset.reset": "earliest",
    "enable.partition.eof": False,
}


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    conf = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "linger.ms": settings.producer_linger_ms,
        "batch.size": settings.producer_batch_kb * 1024,
        **PRODUCER_DEFAULTS,
    }
    conf.update(overrides)
    return conf


def consumer_config(settings: Settings, group: str, **overrides: Any) -> dict[str, Any]:
    conf = {"bootstrap.servers": settings.kafka_bootstrap, "group.id": group, **CONSUMER_DEFAULTS}
    conf.update(overrides)
    return conf


def admin_config(settings: Settings) -> dict[str, Any]:
    return {"bootstrap.servers": settings.kafka_bootstrap}


def iter_to_end(consumer: Any, topic: str, partitions: list[int] | None = None,
                last: int | None = None, timeout: float = 60.0) -> Iterator[Any]:
    """The messages of `topic` (its `partitions`, default all) now, up to each partition's high
    watermark (or only the `last` of each), as `consumer` fetches them; the consumer stays
    assigned past them, so it can go on reading what comes next. LookupError for a topic the
    cluster lacks; TimeoutError when the partitions are not read to their end in `timeout` s."""
    import time

    from confluent_kafka import TopicPartition

    if partitions is None:
        meta = consumer.list_topics(topic, timeout=15).topics[topic]
        if meta.error is not None:
            raise LookupError(f"topic {topic!r}: {meta.error}")
        partitions = sorted(meta.partitions)
    ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15)
            for p in partitions}
    start = {p: lo if last is None else max(lo, hi - last) for p, (lo, hi) in ends.items()}
    consumer.assign([TopicPartition(topic, p, start[p]) for p in ends])
    left = {p for p, (_, hi) in ends.items() if hi > start[p]}
    deadline = time.monotonic() + timeout
    while left:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{topic}: partitions {sorted(left)} not read to their end in "
                               f"{timeout:.0f} s")
        for m in consumer.consume(num_messages=5000, timeout=0.5):
            if m.error() is not None:
                continue
            yield m
            if m.offset() + 1 >= ends[m.partition()][1]:
                left.discard(m.partition())


def read_to_end(settings: Settings, topic: str, last: int | None = None, timeout: float = 60.0
                ) -> list[Any]:
    """`iter_to_end` with a throwaway consumer (nothing committed), in (partition, offset)
    order."""
    import os
    import time

    from confluent_kafka import Consumer

    consumer = Consumer(consumer_config(settings, f"read-{os.getpid()}-{time.time_ns()}"))
    try:
        out = list(iter_to_end(consumer, topic, last=last, timeout=timeout))
        return sorted(out, key=lambda m: (m.partition(), m.offset()))
    finally:
        consumer.close()
