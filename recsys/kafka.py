"""Safe Kafka client defaults, in one place (librdkafka leaves idempotence off unless told).

Producers: idempotent, acks=all, so a retry never duplicates or reorders within a partition.
Consumers: offsets committed only after the work is done (auto commit off where we process).
"""

from __future__ import annotations

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
