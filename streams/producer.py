"""`recsys produce`: replay a purchases CSV (or a synthetic stream) into `sales`, keyed by user.

Every input row ends in exactly one place: a `Sale` on the sales topic, or a `DeadLetter` on the
DLQ topic. Counts come from the broker's delivery reports only, so the closing summary
"read = published + dead-lettered" is a statement about what Kafka acknowledged; a failed delivery
is counted apart and makes the exit code non-zero.

The client is confluent-kafka (librdkafka), chosen by measurement (`python -m bench`): it moves the
batching, compression and retries to C threads, leaving Python only the parse-encode-enqueue loop.
Record timestamps are left to the producer's clock (not the 2010 event time): the broker's
time-based retention would otherwise delete a replay of old data at once.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys.kafka import producer_config
from recsys.paths import BUNDLED_DATA
from recsys.settings import Settings
from schemas.flat_encoder import encoder
from schemas.millis import to_ms
from schemas.topics import SALES, SALES_DLQ
from streams.csv_source import CsvSource, Item, Record

log = logging.getLogger(__name__)
_RDKAFKA_LOG = logging.getLogger("streams.producer.rdkafka")  # librdkafka's lines, our format

BUNDLED_ROWS = 541_909  # data/README.md; only used to size the progress bar
LOG_EVERY_S = 5.0
POLL_EVERY = 1024  # serve delivery reports once per this many produce() calls

# --- the run ----------------------------------------------------------------------------------


@dataclass
class Summary:
    """What one run read and what the broker acknowledged."""

    read: int = 0
    published: int = 0  # acknowledged on the sales topic
    dead_lettered: int = 0  # acknowledged on the DLQ topic
    failed: int = 0  # delivery reported an error
    unconfirmed: int = 0  # no delivery report before the flush timeout
    seconds: float = 0.0
    interrupted: bool = False
    errors: list[str] = field(default_factory=list)  # the first few delivery errors

    @property
    def ok(self) -> bool:
        return (
            self.failed == 0
            and self.unconfirmed == 0
            and self.read == self.published + self.dead_lettered
        )

    @property
    def rate(self) -> float:
        return self.read / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        sign = "=" if self.read == self.published + self.dead_lettered else "!="
        text = (
            f"read {self.read:,} {sign} published {self.published:,} + dead-lettered "
            f"{self.dead_lettered:,} in {self.seconds:.1f} s ({self.rate:,.0f} events/s)"
        )
        if self.failed or self.unconfirmed:
            text += f"; FAILED deliveries {self.failed:,}, unconfirmed {self.unconfirmed:,}"
        if self.interrupted:
            text += " (interrupted)"
        return text


class _Pacer:
    """Holds the loop back to `--rate` events/s or `--speedup` x the recorded pace."""

    def __init__(self, rate: float | None, speedup: float | None, poll: Callable) -> None:
        self.check(rate, speedup)
        self.rate, self.speedup, self._poll = rate, speedup, poll
        self._t0 = time.monotonic()
        self._first_ms: int | None = None

    @staticmethod
    def check(rate: float | None, speedup: float | None) -> None:
        if rate is not None and not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"--rate must be a positive number, not {rate}")
        if speedup is not None and not (speedup > 0 and math.isfinite(speedup)):
            raise ValueError(f"--speedup must be a positive number, not {speedup}")

    def _wait_until(self, target: float) -> None:
        # poll() sleeps and serves delivery reports meanwhile (a replay may wait hours at 1x).
        while (left := target - time.monotonic()) > 0.0005:
            self._poll(min(left, 0.5))

    def sent(self, count: int) -> None:
        """--rate: wait until `count` events are due."""
        if self.rate is not None:
            self._wait_until(self._t0 + count / self.rate)

    def event(self, sale: Record) -> None:
        """--speedup: wait until this event is due (its time since the first event / X)."""
        if self.speedup is not None:
            t = to_ms(sale["event_time"])
            if self._first_ms is None:
                self._first_ms = t
            self._wait_until(self._t0 + (t - self._first_ms) / 1000.0 / self.speedup)


class SalesProducer:
    """Publishes items (sale, dead letter) to the sales and DLQ topics and counts the acks.

    `on_delivery(err, msg)`, when given, sees every delivery report too (tests keep a ledger
    of what was acknowledged with it).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        topic: str = SALES,
        dlq_topic: str = SALES_DLQ,
        on_delivery: Callable[[Any, Any], None] | None = None,
        **client_overrides: Any,
    ) -> None:
        from confluent_kafka import Producer

        self.settings = settings
        self.topic, self.dlq_topic = topic, dlq_topic
        self.conf = producer_config(settings, **client_overrides)
        # Sales take the client-wide delivery callback (cheaper than one per produce() call);
        # dead letters name theirs.
        self._producer: Any = Producer(
            {**self.conf, "on_delivery": self._sale_delivered, "logger": _RDKAFKA_LOG}
        )
        self._hook = on_delivery
        self._encode_sale = encoder("Sale", unique=("event_id",))
        self._encode_dead = encoder(
            "DeadLetter",
            unique=("source", "original_row", "original_bytes", "row_number"),
        )
        self._stop = False
        self.summary = Summary()

    # Delivery reports run inside poll()/flush() on this thread: plain counters are safe.
    def _sale_delivered(self, err: Any, msg: Any) -> None:
        if err is None:
            self.summary.published += 1
        else:
            self._failed(err, msg)
        if self._hook is not None:
            self._hook(err, msg)

    def _dead_delivered(self, err: Any, msg: Any) -> None:
        if err is None:
            self.summary.dead_lettered += 1
        else:
            self._failed(err, msg)
        if self._hook is not None:
            self._hook(err, msg)

    def _failed(self, err: Any, msg: Any) -> None:
        s = self.summary
        s.failed += 1
        if len(s.errors) < 10:
            key = msg.key().decode(errors="replace") if msg.key() else None
            s.errors.append(f"{msg.topic()} key={key}: {err}")
            log.error("delivery failed: %s key=%s: %s", msg.topic(), key, err)

    def _produce_when_room(
        self, topic: str, value: bytes, key: str, on_delivery: Callable | None = None
    ) -> None:
        extra = {} if on_delivery is None else {"on_delivery": on_delivery}
        while True:
            self._producer.poll(0.05)
            try:
                self._producer.produce(topic, value, key, **extra)
                return
            except BufferError:
                continue

    def close(self) -> None:
        """Release the client (its threads and sockets); flushes what is still queued."""
        if self._producer is not None:
            self._producer.close()
            self._producer = None

    def __enter__(self) -> SalesProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stop(self) -> None:
        """Ask the loop to finish (signal-safe): stop reading, flush, summarize."""
        self._stop = True

    def check_topics(self, timeout: float = 15.0) -> None:
        """Fail fast, with a useful line, when the broker or a topic is missing."""
        from recsys.topics import TopicError, topic_partitions

        try:
            topic_partitions(self.settings, [self.topic, self.dlq_topic], timeout)
        except TopicError as exc:
            raise RuntimeError(str(exc)) from None

    def run(
        self,
        items: Iterable[Item],
        *,
        rate: float | None = None,
        speedup: float | None = None,
        progress: bool = False,
        total: int | None = None,
    ) -> Summary:
        """Publish every item, then wait for every delivery report; returns the summary.

        A source with `encoded()` (CsvSource) hands over ready (to_dlq, key, value) triples,
        mapped and encoded in one step; others yield (sale, dead letter) records.
        """
        s = self.summary
        produce, poll = self._producer.produce, self._producer.poll
        pacer = None if rate is None and speedup is None else _Pacer(rate, speedup, poll)
        poll_every = POLL_EVERY if rate is None else max(1, min(POLL_EVERY, int(rate / 50)))
        encoded = getattr(items, "encoded", None)
        if encoded is not None and speedup is None:
            stream = encoded(self._encode_sale, self._encode_dead)
        else:
            stream = self._encode(items, pacer if speedup else None)
        topic, dlq, on_dead = self.topic, self.dlq_topic, self._dead_delivered
        start = last_log = time.monotonic()
        last_read = shown = read = 0
        with ExitStack() as stack:
            bar = _progress_bar(stack, progress, total)
            try:
                # Sales use the client-wide delivery callback; dead letters name theirs.
                for to_dlq, key, value in stream:
                    read += 1
                    try:
                        if to_dlq:
                            produce(dlq, value, key, on_delivery=on_dead)
                        else:
                            produce(topic, value, key)
                    except BufferError:  # local queue full: let librdkafka drain it
                        self._produce_when_room(dlq if to_dlq else topic, value, key,
                                                on_dead if to_dlq else None)
                    if read % poll_every == 0:
                        poll(0)
                        if pacer is not None:
                            pacer.sent(read)
                        if self._stop:
                            s.interrupted = True
                            break
                        if bar is not None:
                            bar.update(read - shown)
                            shown = read
                        now = time.monotonic()
                        if now - last_log >= LOG_EVERY_S:
                            log.info(
                                "read %d (%.0f ev/s), acked %d + dlq %d, failed %d, in flight %d",
                                read, (read - last_read) / (now - last_log), s.published,
                                s.dead_lettered, s.failed, len(self._producer),
                            )
                            last_log, last_read = now, read
            except KeyboardInterrupt:
                s.interrupted = True
            finally:
                s.read = read
            if bar is not None:
                bar.update(read - shown)
            self._flush()
        s.seconds = time.monotonic() - start
        return s

    def _encode(
        self, items: Iterable[Item], pacer: _Pacer | None
    ) -> Iterator[tuple[bool, str, bytes]]:
        enc_sale, enc_dead = self._encode_sale, self._encode_dead
        for sale, dead in items:
            if sale is not None:
                if pacer is not None:
                    pacer.event(sale)
                yield False, sale["user_id"], enc_sale(sale)
            else:
                yield True, dead["source"], enc_dead(dead)

    def _flush(self) -> None:
        """Wait for every delivery report; librdkafka gives one within delivery.timeout.ms."""
        deadline = time.monotonic() + self.conf.get("delivery.timeout.ms", 120_000) / 1000 + 10
        left = len(self._producer)
        while left and time.monotonic() < deadline:
            left = self._producer.flush(min(5.0, max(0.0, deadline - time.monotonic())))
            if left:
                log.info("waiting for %d delivery reports", left)
        self.summary.unconfirmed = left


def _progress_bar(stack: ExitStack, enabled: bool, total: int | None) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    stack.enter_context(logging_redirect_tqdm())
    return stack.enter_context(
        tqdm(total=total, unit="ev", unit_scale=True, file=sys.stderr, mininterval=0.5)
    )


# --- CLI ------------------------------------------------------------------------------------------


def cli(settings: Settings, args: argparse.Namespace) -> int:
    """`recsys produce`: exit 0 only when every row is acknowledged in one of the two topics."""
    try:
        if args.limit is not None and args.limit < 0:
            raise ValueError("--limit must be >= 0")
        if args.skip < 0:
            raise ValueError("--skip must be >= 0")
        _Pacer.check(args.rate, args.speedup)
    except ValueError as exc:
        print(f"recsys produce: {exc}", file=sys.stderr)
        return 2
    if args.synthetic:
        from recsys.synthetic import SyntheticSales

        seed = settings.seed if args.seed is None else args.seed
        items: Iterable[Item] = SyntheticSales(
            users=args.users, products=args.products, events=args.events, seed=seed
        )
        total = args.events if args.limit is None else min(args.events, args.limit)
        if args.limit is not None:
            items = _take(items, args.limit)
        what = f"synthetic stream (seed {seed}, {total:,} events)"
    else:
        path = Path(args.file) if args.file else BUNDLED_DATA
        from recsys.csv_mapping import resolve_for

        # every mapping mistake is one line here, before the broker is asked anything
        resolved = resolve_for("produce", path, args)
        if resolved is None:
            return 2
        try:
            items = CsvSource(path, resolved.mapping, skip=args.skip, limit=args.limit)
        except ValueError as exc:
            print(f"recsys produce: {exc}", file=sys.stderr)
            return 2
        total = args.limit
        if total is None and path == BUNDLED_DATA:
            total = max(0, BUNDLED_ROWS - args.skip)
        what = str(path)
    prefix = getattr(args, "topic_prefix", None) or ""
    topic = getattr(args, "topic", SALES) or SALES
    dlq_topic = getattr(args, "dlq_topic", SALES_DLQ) or SALES_DLQ
    producer = SalesProducer(settings, topic=prefix + topic, dlq_topic=prefix + dlq_topic)
    try:
        producer.check_topics()
    except RuntimeError as exc:
        producer.close()
        print(f"recsys produce: {exc}", file=sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, lambda *_: producer.stop())
    show = not args.no_progress and sys.stderr.isatty()
    log.info("producing %s to %s (DLQ %s) at %s", what, producer.topic, producer.dlq_topic,
             settings.kafka_bootstrap)
    try:
        with producer:
            summary = producer.run(
                items, rate=args.rate, speedup=args.speedup, progress=show, total=total
            )
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(summary.line())
    for err in summary.errors:
        print(f"  delivery error: {err}", file=sys.stderr)
    if summary.interrupted:
        return 130
    return 0 if summary.ok else 1


def _take(items: Iterable[Item], n: int) -> Iterable[Item]:
    for i, item in enumerate(items):
        if i >= n:
            return
        yield item
