"""`recsys consume TOPIC`: print a topic's records as JSON lines, decoded from Avro.

One line per record: where it is (topic, partition, offset, broker timestamp), its key, the
schema that wrote it and the record (datetimes ISO-8601, bytes base64). A record that does not
decode prints a line with "error" and "source" = topic[partition]@offset instead; the tool goes on.

It reads as a throwaway consumer: a unique group id, partitions assigned directly (no group
join wait), no offsets committed, so it never disturbs the processes that really consume.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import signal
import sys
import time
import uuid
from datetime import datetime
from typing import IO, Any

from recsys.kafka import consumer_config
from recsys.settings import Settings
from recsys.topics import TopicError, topic_partitions
from schemas import codec
from schemas.millis import from_ms
from schemas.topics import BY_NAME

log = logging.getLogger(__name__)

BATCH = 500


def _json_default(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(v)).decode("ascii")
    raise TypeError(f"{type(v).__name__} is not JSON serializable")


def _key(key: bytes | None) -> dict[str, Any]:
    if key is None:
        return {"key": None}
    try:
        return {"key": key.decode("utf-8")}
    except UnicodeDecodeError:
        return {"key_base64": base64.b64encode(key).decode("ascii")}


def render(msg: Any, expect: str | None) -> str:
    """The JSON line of one Kafka message (a confluent_kafka.Message)."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    head: dict[str, Any] = {"topic": topic, "partition": partition, "offset": offset}
    ts_type, ts = msg.timestamp()
    if ts_type != 0 and ts is not None and ts >= 0:  # 0: TIMESTAMP_NOT_AVAILABLE
        head["timestamp"] = from_ms(ts).isoformat()
    head.update(_key(msg.key()))
    value = msg.value()
    try:
        name, record = codec.decode(value, expect=expect)
    except codec.DecodeError as exc:
        head["source"] = f"{topic}[{partition}]@{offset}"
        head["error"] = str(exc)
        if value is not None:
            head["value_base64"] = base64.b64encode(value).decode("ascii")
        return json.dumps(head, default=_json_default, ensure_ascii=False)
    head["schema"] = name
    head["value"] = record
    return json.dumps(head, default=_json_default, ensure_ascii=False)


def consume(
    settings: Settings,
    topic: str,
    out: IO[str],
    *,
    from_beginning: bool = False,
    max_records: int | None = None,
    timeout: float | None = None,
    stop: list[bool] | None = None,
) -> int:
    """Write records of `topic` as JSON lines to `out`; returns how many were written.

    Ends after `max_records`, after `timeout` seconds without a record, or when `stop[0]`
    becomes true. A topic missing on the broker raises LookupError.
    """
    from confluent_kafka import (
        OFFSET_BEGINNING,
        OFFSET_END,
        Consumer,
        KafkaException,
        TopicPartition,
    )

    group = f"recsys-consume-{uuid.uuid4().hex[:12]}"
    conf = consumer_config(settings, group, **{"enable.auto.commit": False,
                                               "enable.auto.offset.store": False,
                                               "logger": logging.getLogger(__name__ + ".rdkafka")})
    consumer = Consumer(conf)
    stop = stop if stop is not None else [False]
    written = 0
    try:
        try:
            partitions = topic_partitions(settings, [topic])[topic]
        except TopicError as exc:
            raise LookupError(str(exc)) from None
        start = OFFSET_BEGINNING if from_beginning else OFFSET_END
        consumer.assign([TopicPartition(topic, p, start) for p in partitions])
        known = BY_NAME.get(topic)
        expect = known.value_schema if known is not None else None
        last = time.monotonic()
        while not stop[0]:
            want = BATCH if max_records is None else min(BATCH, max_records - written)
            if want <= 0:
                break
            msgs = consumer.consume(num_messages=want, timeout=0.5)
            if not msgs:
                if timeout is not None and time.monotonic() - last >= timeout:
                    break
                continue
            last = time.monotonic()
            for msg in msgs:
                err = msg.error()
                if err is not None:
                    log.warning("%s[%s]: %s", msg.topic(), msg.partition(), err)
                    if err.fatal():
                        raise KafkaException(err)
                    continue
                out.write(render(msg, expect) + "\n")
                written += 1
            out.flush()
    finally:
        consumer.close()  # no commits: auto commit is off and nothing was stored
    return written


def cli(settings: Settings, args: argparse.Namespace) -> int:
    """`recsys consume`: 0 when it ends by --max, --timeout or a signal; 2 when the topic is
    missing."""
    if args.max is not None and args.max < 0:
        print("recsys consume: --max must be >= 0", file=sys.stderr)
        return 2
    stop = [False]

    def on_signal(*_: Any) -> None:
        stop[0] = True

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        n = consume(
            settings, args.topic, sys.stdout, from_beginning=args.from_beginning,
            max_records=args.max, timeout=args.timeout, stop=stop,
        )
    except LookupError as exc:
        print(f"recsys consume: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `recsys consume sales | head`: the reader left, fine
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    log.info("%d records from %s", n, args.topic)
    return 0
