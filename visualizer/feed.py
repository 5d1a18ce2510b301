"""Kafka -> state: the one consumer of a dashboard server, in a thread.

It assigns every partition of the dashboard's topics at the earliest offset (no consumer group
join, nothing committed: a restart reads the retained history again, which is what a new page
needs), decodes each value with the topic's schema and hands batches to `DashboardState`.
Topics that do not exist yet (say `feedback` before the aggregator first runs) are picked up by a
metadata refresh every few seconds.

While the result topics (model-ready, recommendations, recommendations-shadow, graph-edges,
feedback, sales.dlq) are
replayed, `sales` is paused, so the first page shows the current model within seconds even when
`sales` holds millions of records; `sales` follows once they caught up (or after
`SALES_PAUSE_MAX_S`).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from recsys.kafka import consumer_config
from recsys.settings import Settings
from schemas import codec, topics
from schemas.millis import now_ms
from visualizer.state import DashboardState, Meta

log = logging.getLogger(__name__)

TOPICS = (
    topics.MODEL_READY,
    topics.RECOMMENDATIONS,
    topics.RECOMMENDATIONS_SHADOW,
    topics.GRAPH_EDGES,
    topics.FEEDBACK,
    topics.SALES_DLQ,
    topics.SALES,
)
REFRESH_S = 5.0
SALES_PAUSE_MAX_S = 30.0
BATCH = 1000
PROGRESS_LOG_S = 30.0


def expected_schema(topic: str) -> str | None:
    """The record name a topic's values must have; None where the topic list has none yet."""
    declared = topics.BY_NAME.get(topic)
    if declared is not None:
        return declared.value_schema
    return "Feedback" if topic == topics.FEEDBACK and "Feedback" in codec.schemas() else None


class Feed:
    """Reads the dashboard's topics into `state` until `stop()`."""

    def __init__(self, settings: Settings, state: DashboardState) -> None:
        self.settings = settings
        self.state = state
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._assigned: set[tuple[str, int]] = set()
        self._pending: dict[tuple[str, int], int] = {}  # replay targets: high watermark at start
        self._sales_paused: list[TopicPartition] = []
        self._started = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dashboard-feed", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        conf = consumer_config(
            self.settings,
            group=f"recsys-dashboard-{uuid.uuid4().hex[:8]}",  # assign() only: never joins
            **{"client.id": "recsys-dashboard", "fetch.wait.max.ms": 100,
               "topic.metadata.refresh.interval.ms": 5000,
               # bound the prefetch queue (per partition; librdkafka's default is 64 MiB)
               "queued.max.messages.kbytes": 8192},
        )
        consumer = Consumer(conf, logger=log)
        self._started = time.monotonic()
        next_refresh = 0.0
        next_log = time.monotonic() + PROGRESS_LOG_S
        read_since_log = 0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_refresh:
                    self._refresh(consumer)
                    next_refresh = now + REFRESH_S
                msgs = consumer.consume(BATCH, timeout=0.1)
                items = []
                for msg in msgs:
                    err = msg.error()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF:
                            log.warning("%s[%s]: %s", msg.topic(), msg.partition(), err)
                        continue
                    item = self._decode(msg)
                    if item is not None:
                        items.append(item)
                if items:
                    self.state.apply_many(items)
                    read_since_log += len(items)
                if self._pending:
                    self._check_caught_up(consumer)
                if now >= next_log:
                    log.info("dashboard feed: %d records in %.0f s, %s", read_since_log,
                             PROGRESS_LOG_S, "live" if not self._pending else "replaying")
                    read_since_log = 0
                    next_log = now + PROGRESS_LOG_S
        except Exception:
            log.exception("dashboard feed stopped")
            raise
        finally:
            consumer.close()

    def _decode(self, msg: Any) -> tuple[dict[str, Any] | None, Meta] | None:
        topic = msg.topic()
        ts_type, ts = msg.timestamp()
        meta = Meta(topic, msg.partition(), msg.offset(), ts if ts > 0 else now_ms())
        value = msg.value()
        if value is None and topic in (topics.RECOMMENDATIONS, topics.RECOMMENDATIONS_SHADOW):
            return None  # a tombstone on the compacted topic: nothing to draw
        try:
            _, record = codec.decode(value, expect=expected_schema(topic))
        except codec.DecodeError as exc:
            log.warning("%s[%d]@%d: %s", topic, meta.partition, meta.offset, exc)
            return None, meta
        return record, meta

    def _refresh(self, consumer: Consumer) -> None:
        """Assign partitions that appeared since the last look, from the beginning."""
        try:
            md = consumer.list_topics(timeout=5)
        except Exception as exc:  # broker not up yet: try again at the next refresh
            log.warning("dashboard feed: no metadata from %s: %s",
                        self.settings.kafka_bootstrap, exc)
            return
        new: list[TopicPartition] = []
        for name in TOPICS:
            t = md.topics.get(name)
            if t is None or t.error is not None:
                continue
            for p in t.partitions:
                if (name, p) not in self._assigned:
                    new.append(TopicPartition(name, p, OFFSET_BEGINNING))
        if not new:
            if not self._assigned:
                self.state.mark_caught_up()  # no topic yet: nothing to replay
            return
        consumer.incremental_assign(new)
        first = not self._assigned
        for tp in new:
            self._assigned.add((tp.topic, tp.partition))
            if first:
                try:
                    low, high = consumer.get_watermark_offsets(tp, timeout=5, cached=False)
                except Exception:
                    continue
                if high > low:
                    self._pending[(tp.topic, tp.partition)] = high
        log.info("dashboard feed: reading %d new partitions of %s from the beginning",
                 len(new), sorted({tp.topic for tp in new}))
        if first:
            sales = [tp for tp in new if tp.topic == topics.SALES]
            if sales and any(k[0] != topics.SALES for k in self._pending):
                consumer.pause(sales)
                self._sales_paused = sales
            if not self._pending:
                self.state.mark_caught_up()

    def _check_caught_up(self, consumer: Consumer) -> None:
        """Drop replay targets whose position reached the start-time high watermark."""
        tps = [TopicPartition(t, p) for t, p in self._pending]
        for tp in consumer.position(tps):
            if tp.offset >= 0 and tp.offset >= self._pending.get((tp.topic, tp.partition), 0):
                del self._pending[(tp.topic, tp.partition)]
        results_done = not any(t != topics.SALES for t, _ in self._pending)
        waited = time.monotonic() - self._started
        if self._sales_paused and (results_done or waited > SALES_PAUSE_MAX_S):
            consumer.resume(self._sales_paused)
            self._sales_paused = []
            log.info("dashboard feed: result topics read in %.1f s; reading sales", waited)
        if not self._pending:
            self.state.mark_caught_up()
            log.info("dashboard feed: caught up in %.1f s", waited)


# --- one feed per server process ------------------------------------------------------------
_lock = threading.Lock()
_settings: Settings | None = None
_state: DashboardState | None = None
_feed: Feed | None = None


def configure(settings: Settings) -> None:
    """Set by `recsys dashboard` before the server starts (`bokeh serve` falls back to env)."""
    global _settings
    _settings = settings


def settings() -> Settings:
    global _settings
    if _settings is None:
        from recsys.settings import load

        _settings = load()
    return _settings


def shared_state() -> DashboardState:
    global _state
    with _lock:
        if _state is None:
            s = settings()
            _state = DashboardState(s.train_threshold, s.eval_k)
        return _state


def start() -> Feed:
    """Start the process's feed once (app_hooks.on_server_loaded)."""
    global _feed
    state = shared_state()
    with _lock:
        if _feed is None or not _feed.alive:
            _feed = Feed(settings(), state)
            _feed.start()
        return _feed


def stop() -> None:
    global _feed
    with _lock:
        if _feed is not None:
            _feed.stop()
            _feed = None
