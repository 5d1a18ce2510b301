"""Epoch milliseconds, the unit of every time in the contracts (Avro `timestamp-millis`, Kafka
record timestamps): one conversion each way, so every process rounds the same.

fastavro reads `timestamp-millis` as an aware UTC datetime and writes a datetime or an int; Spark
hands naive datetimes that mean UTC. `to_ms` takes any of them (naive = UTC) and floors to the
millisecond exactly (integer arithmetic: no float rounding on large epochs).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MS = timedelta(milliseconds=1)


def to_ms(value: int | float | datetime) -> int:
    """Milliseconds since the epoch of a datetime (naive means UTC) or of a number of ms."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return (value - EPOCH) // MS
    return int(value)


def from_ms(ms: int | float) -> datetime:
    """The aware UTC datetime of epoch milliseconds."""
    return datetime.fromtimestamp(ms / 1000, UTC)


def now_ms() -> int:
    """The wall clock in epoch milliseconds."""
    return int(time.time() * 1000)
