"""freshness: how soon after a sale its user's new list is on `recommendations`, with the broker,
the speed layer and a steady producer on this machine; Kafka's own end-to-end latency beside it.

Set-up: a scratch broker, the declared topics under a unique prefix, a model trained by Spark
(spark.pipeline.run_training, rank from the settings, few iterations: the speed layer's cost
depends on the catalogue and the rank, not on how well the model converged) on the whole bundled
file, so the catalogue is the bundled one, published on model-factors with
spark.publish.publish_factors (no offsets: every sale is newer than the model). `recsys speed`
runs as a subprocess (its own interpreter and core). This process produces sales paced at a
target rate: the bundled rows of the model's products (postage and fees make no list) in a seeded
shuffle (so the users spread as in a busy shop) with fresh event ids, each with an explicit Kafka
timestamp (the sale's produce time).

Freshness of a sale = the Kafka timestamp of the first fold-in record of its user whose
`sale_timestamp` is at or after the sale's, minus the sale's timestamp. `recommendations` is set
to LogAppendTime for the run, so that record's timestamp is its arrival at the broker. The
yardstick: a ping-pong on the same broker (produce one record, consume it; the speed layer's
producer and consumer settings), 50 pings/s from a thread during the same phase, and idle before.

Prints (never asserts):

    freshness@1000/s: p50 X ms p95 Y ms p99 Z ms (target p95 <= 250 ms) / kafka e2e p50 ... p95
        ... p99 ...; p95 ratio R
    freshness@5000/s: ... (target p95 <= 1000 ms)
    freshness_max_rate: ... the highest rate of the ramp (2k, 3k, 5k, 7.5k, 10k, 15k, ... sales/s,
        20 s each) at which the consumer lag did not grow; where it grew, the rate the layer
        processed (the rate minus the lag's growth)
    freshness_memory: the speed layer's RSS (VmRSS) with the bundled catalogue and >= 4,000 users

Lag "grows" in a step when, over its second half, it rises by more than 2% of the rate per second
(least squares) or ends more than 2 s of sales behind; the lag drains between steps.
`python -m bench freshness`, or `python -m bench.freshness [--seconds S] [--step-seconds S]
[--profile FILE]` (FILE: cProfile of the speed layer); BENCH_FRESHNESS_SECONDS and
BENCH_FRESHNESS_STEP_SECONDS shorten a quick run under `python -m bench` (defaults 60 and 20).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from recsys.settings import Settings, load

RATES = ((1000, 250.0), (5000, 1000.0))  # sales/s and the p95 target in ms
RAMP = (2000, 3000, 5000, 7500, 10_000, 15_000, 20_000, 30_000, 40_000)
PINGS_PER_SECOND = 50
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ms(ts: datetime) -> int:
    return (ts - EPOCH) // timedelta(milliseconds=1)


def percentiles(values: list[float] | np.ndarray) -> tuple[float, float, float]:
    if not len(values):
        return (float("nan"),) * 3
    p50, p95, p99 = np.percentile(np.asarray(values, dtype=np.float64), [50, 95, 99])
    return float(p50), float(p95), float(p99)


# --- set-up -------------------------------------------------------------------------------------


def train_and_publish(settings: Settings, topic: str) -> tuple[list[tuple[str, str, int]], int]:
    """Train on the bundled file, publish the factors; returns the bundled rows (user, product,
    quantity) of the products the model knows (no postage, fees...: they make no list) and the
    number of products of the model."""
    from pyspark.sql import functions as F

    from recsys import paths
    from spark import pipeline, publish
    from spark.csv_input import read_purchases_csv
    from spark.session import build

    spark = build(settings, "bench-freshness")
    try:
        sales = read_purchases_csv(spark, paths.BUNDLED_DATA).cache()
        result = pipeline.run_training(spark, sales, settings, 1,
                                       indexes=pipeline.load_indexes(spark, settings))
        result.recommendations.unpersist()
        publish.publish_factors(result, [], settings, topic)
        catalogue = set(publish.item_factors_local(result)[0])
        rows = sales.orderBy(F.col("event_id")).select("user_id", "product_id",
                                                       "quantity").toPandas()
        sales.unpersist()
        rows = rows[rows["product_id"].isin(catalogue)]
        return list(rows.itertuples(index=False, name=None)), len(catalogue)
    finally:
        spark.stop()


def log_append_time(settings: Settings, topic: str) -> None:
    """Set `topic` to LogAppendTime: its records' timestamps are their arrival at the broker."""
    from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

    from recsys.kafka import admin_config

    admin = AdminClient(admin_config(settings))
    res = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[
        ConfigEntry("message.timestamp.type", "LogAppendTime",
                    incremental_operation=AlterConfigOpType.SET)])
    for future in admin.incremental_alter_configs([res]).values():
        future.result(30)


class SpeedProcess:
    """`recsys speed` as a subprocess, logging to a file."""

    def __init__(self, settings: Settings, prefix: str, group: str, log_path: Path,
                 profile: Path | None = None) -> None:
        env = {**os.environ, "RECSYS_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
               "RECSYS_DATA_DIR": str(settings.data_dir), "RECSYS_LOG_LEVEL": "INFO"}
        prof = ["-m", "cProfile", "-o", str(profile)] if profile else []
        args = [sys.executable, *prof, "-m", "recsys.cli", "speed", "--topic-prefix", prefix,
                "--group", group]
        self.log_path = log_path
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)

    def rss_mb(self, field_name: str = "VmRSS") -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def users(self) -> int | None:
        """Users in the layer's state, from its last progress line."""
        last = None
        for line in self.log_path.read_text(errors="replace").splitlines():
            if "progress:" in line and line.rstrip().endswith(" users"):
                last = int(line.rsplit(",", 1)[1].split()[0])
        return last

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


# --- load ---------------------------------------------------------------------------------------


@dataclass
class Phase:
    rate: float
    seconds: float
    sales: list[tuple[str, int]] = field(default_factory=list)  # (user, timestamp ms)
    sent_seconds: float = 0.0
    lags: list[tuple[float, int]] = field(default_factory=list)  # (s since start, lag)
    rec_start: dict[int, int] = field(default_factory=dict)
    failed: int = 0

    @property
    def achieved(self) -> float:
        return len(self.sales) / self.sent_seconds if self.sent_seconds else 0.0

    def lag_grows(self) -> tuple[bool, float]:
        """(lag grew, its slope in sales/s over the second half of the phase)."""
        half = [(t, lag) for t, lag in self.lags if t >= self.seconds / 2]
        if len(half) < 3:
            return False, 0.0
        t, lag = np.array(half, dtype=np.float64).T
        slope = float(np.polyfit(t, lag, 1)[0])
        # The speed layer commits its offsets every RECSYS_SPEED_COMMIT_SECONDS, so the committed
        # lag is a sawtooth of that many seconds of sales: a slope under 5% of the rate is noise.
        return slope > 0.05 * self.rate or lag[-1] > 2 * self.rate, slope


class Load:
    """The paced producer of sales and the lag probe, in this process."""

    def __init__(self, settings: Settings, topics: Any, group: str,
                 rows: list[tuple[str, str, int]]) -> None:
        from confluent_kafka import Consumer, Producer

        from recsys.kafka import consumer_config, producer_config
        from schemas import codec

        self.settings, self.topics, self.group = settings, topics, group
        order = list(range(len(rows)))
        random.Random(42).shuffle(order)
        self.rows = [rows[i] for i in order]
        self.next = 0
        self.run_id = uuid.uuid4().hex[:6]
        self.encode = codec.Encoder("Sale")
        # A shop's producer of single sales: the speed layer's own settings (linger 1 ms).
        self.producer = Producer(producer_config(settings, **{"linger.ms": 1}))
        self.probe = Consumer(consumer_config(settings, group))  # never subscribes: reads only
        self.users_sent: set[str] = set()
        self._failed = 0
        parts = self.probe.list_topics(topics.sales, timeout=15).topics[topics.sales].partitions
        self.partitions = sorted(parts)

    def _on_delivery(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self._failed += 1

    def lag(self) -> int:
        from confluent_kafka import TopicPartition

        tps = [TopicPartition(self.topics.sales, p) for p in self.partitions]
        committed = {tp.partition: tp.offset for tp in self.probe.committed(tps, timeout=10)}
        total = 0
        for p in self.partitions:
            high = self.probe.get_watermark_offsets(TopicPartition(self.topics.sales, p),
                                                    timeout=10, cached=False)[1]
            total += high - max(committed.get(p, 0), 0)
        return total

    def send(self, rate: float, seconds: float) -> Phase:
        """Sales at `rate`/s for `seconds`: each tick sends what is due by the clock."""
        phase = Phase(rate, seconds, rec_start=end_offsets(self.settings,
                                                           self.topics.recommendations))
        n = int(rate * seconds)
        started = time.perf_counter()
        next_probe = 1.0
        sent = 0
        self._failed = 0
        while sent < n:
            elapsed = time.perf_counter() - started
            due = min(n, int(elapsed * rate) + 1)
            while sent < due:
                user, product, quantity = self.rows[self.next % len(self.rows)]
                self.next += 1
                now = time.time()
                ts = int(now * 1000)
                value = self.encode({
                    "event_id": f"fresh-{self.run_id}-{self.next}", "user_id": user,
                    "product_id": product, "quantity": int(quantity),
                    "event_time": datetime.fromtimestamp(now, UTC)})
                while True:
                    try:
                        self.producer.produce(self.topics.sales, value, user.encode(),
                                              timestamp=ts, on_delivery=self._on_delivery)
                        break
                    except BufferError:
                        self.producer.poll(0.01)
                phase.sales.append((user, ts))
                self.users_sent.add(user)
                sent += 1
            self.producer.poll(0)
            if elapsed >= next_probe:
                phase.lags.append((elapsed, self.lag()))
                next_probe += 1.0
            time.sleep(0.001)
        phase.sent_seconds = time.perf_counter() - started
        self.producer.flush(60)
        phase.failed = self._failed
        return phase

    def drain(self, timeout: float = 300.0) -> float:
        """Wait until the speed layer has committed every sale; the seconds it took."""
        started = time.monotonic()
        while self.lag() > 0:
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"the speed layer did not catch up in {timeout:.0f} s")
            time.sleep(0.2)
        return time.monotonic() - started

    def close(self) -> None:
        self.producer.flush(30)
        self.probe.close()
        self.producer = None  # freed now, not after the broker has gone


# --- reading the lists --------------------------------------------------------------------------


def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    from recsys.kafka import consumer_config

    c = Consumer(consumer_config(settings, f"bench-offsets-{uuid.uuid4().hex[:8]}"))
    try:
        parts = c.list_topics(topic, timeout=15).topics[topic].partitions
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=15,
                                           cached=False)[1] for p in parts}
    finally:
        c.close()


def fold_ins(settings: Settings, topic: str, start: dict[int, int]
             ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """user -> (sale_timestamp ms, record timestamp ms) of the fold-in records from `start` to
    the current end, in offset order."""
    from confluent_kafka import Consumer, TopicPartition

    from recsys.kafka import consumer_config
    from schemas import codec

    ends = end_offsets(settings, topic)
    out: dict[str, list[tuple[int, int]]] = defaultdict(list)
    c = Consumer(consumer_config(settings, f"bench-read-{uuid.uuid4().hex[:8]}"))
    try:
        left = {p for p, end in ends.items() if end > start.get(p, 0)}
        c.assign([TopicPartition(topic, p, start.get(p, 0)) for p in left])
        while left:
            for m in c.consume(num_messages=10_000, timeout=1.0):
                if m.error() is not None:
                    continue
                if m.offset() + 1 >= ends[m.partition()]:
                    left.discard(m.partition())
                rec = codec.decode(m.value(), expect="Recommendation")[1]
                if rec["source"] == "fold-in" and rec["sale_timestamp"] is not None:
                    out[rec["user_id"]].append((_ms(rec["sale_timestamp"]), m.timestamp()[1]))
    finally:
        c.close()
    return {u: (np.array([s for s, _ in v], np.int64), np.array([t for _, t in v], np.int64))
            for u, v in out.items()}


def freshness(phase: Phase, recs: dict[str, tuple[np.ndarray, np.ndarray]]
              ) -> tuple[np.ndarray, int]:
    """Per sale: the first fold-in of its user with sale_timestamp >= the sale's, minus the
    sale's timestamp (ms); and how many sales no such record answered."""
    by_user: dict[str, list[int]] = defaultdict(list)
    for user, ts in phase.sales:
        by_user[user].append(ts)
    out, unanswered = [], 0
    for user, stamps in by_user.items():
        sale_ts = np.array(stamps, np.int64)
        if user not in recs:
            unanswered += len(stamps)
            continue
        rec_sale_ts, rec_ts = recs[user]
        i = np.searchsorted(rec_sale_ts, sale_ts, side="left")
        ok = i < len(rec_ts)
        unanswered += int((~ok).sum())
        out.append(rec_ts[i[ok]] - sale_ts[ok])
    return (np.concatenate(out) if out else np.zeros(0, np.int64)), unanswered


# --- Kafka's own end-to-end latency -------------------------------------------------------------


class PingPong(threading.Thread):
    """Produce one record, consume it, again: the latency in ms of each (the speed layer's
    producer and consumer settings)."""

    def __init__(self, settings: Settings, topic: str, per_second: float) -> None:
        super().__init__(daemon=True)
        from confluent_kafka import Consumer, Producer, TopicPartition

        from recsys.kafka import consumer_config, producer_config

        self.producer = Producer(producer_config(settings, **{"linger.ms": 1}))
        self.consumer = Consumer(consumer_config(
            settings, f"bench-ping-{uuid.uuid4().hex[:8]}", **{"fetch.wait.max.ms": 10}))
        end = end_offsets(settings, topic)[0]
        self.consumer.assign([TopicPartition(topic, 0, end)])
        self.topic, self.interval = topic, 1.0 / per_second
        self.latencies: list[float] = []
        self.stop_event = threading.Event()

    def ping(self, timeout: float = 5.0) -> float | None:
        token = uuid.uuid4().bytes
        started = time.perf_counter()
        self.producer.produce(self.topic, token)
        self.producer.poll(0)
        while time.perf_counter() - started < timeout:
            m = self.consumer.poll(0.05)
            self.producer.poll(0)
            if m is not None and m.error() is None and m.value() == token:
                return (time.perf_counter() - started) * 1000
        return None

    def run(self) -> None:
        for _ in range(20):  # connections up, metadata known: not measured
            self.ping()
        while not self.stop_event.is_set():
            begin = time.perf_counter()
            latency = self.ping()
            if latency is not None:
                self.latencies.append(latency)
            self.stop_event.wait(max(0.0, self.interval - (time.perf_counter() - begin)))

    def measure(self, seconds: float) -> list[float]:
        self.start()
        time.sleep(seconds)
        return self.finish()

    def finish(self) -> list[float]:
        self.stop_event.set()
        self.join(30)
        self.producer.flush(10)
        self.consumer.close()
        return self.latencies


# --- the run --------------------------------------------------------------------------------------


def _fmt(p: tuple[float, float, float]) -> str:
    return f"p50 {p[0]:.0f} ms p95 {p[1]:.0f} ms p99 {p[2]:.0f} ms"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.freshness", description=__doc__)
    p.add_argument("--seconds", type=float,
                   default=float(os.environ.get("BENCH_FRESHNESS_SECONDS", 60)),
                   help="seconds at each measured rate")
    p.add_argument("--step-seconds", type=float,
                   default=float(os.environ.get("BENCH_FRESHNESS_STEP_SECONDS", 20)),
                   help="seconds of each step of the ramp")
    p.add_argument("--profile", type=Path, help="run the speed layer under cProfile, to here")
    p.add_argument("--keep", type=Path, help="copy the speed layer's log here")
    args = p.parse_args(argv or [])

    from bench._broker import scratch_broker
    from recsys import logs
    from recsys.topics import create_like, create_topics, renamed
    from schemas import topics as declared
    from speed.layer import Topics

    logs.setup(os.environ.get("RECSYS_LOG_LEVEL", "WARNING"))
    prefix = f"fresh{uuid.uuid4().hex[:6]}."
    group = f"bench-speed-{uuid.uuid4().hex[:6]}"
    with scratch_broker("freshness") as (broker, tmp):
        settings = load(kafka_bootstrap=broker.bootstrap, data_dir=str(tmp / "var"),
                        als_max_iter=5)
        topics = Topics.with_prefix(prefix)
        create_topics(settings, names=renamed(prefix))
        log_append_time(settings, topics.recommendations)
        e2e_topic = f"{prefix}e2e"
        create_like(settings, declared.SALES, e2e_topic, partitions=1)
        rows, products = train_and_publish(settings, topics.model_factors)

        idle = percentiles(PingPong(settings, e2e_topic, PINGS_PER_SECOND).measure(10))
        speed = SpeedProcess(settings, prefix, group, tmp / "speed.log", args.profile)
        load_ = Load(settings, topics, group, rows)
        lines: list[str] = []
        try:
            warm = load_.send(200, 5)  # the layer is up when these are folded in
            load_.drain(180)
            if not fold_ins(settings, topics.recommendations, warm.rec_start):
                raise RuntimeError(f"no fold-in list after the warm-up; see {tmp}/speed.log")
            for rate, target in RATES:
                ping = PingPong(settings, e2e_topic, PINGS_PER_SECOND)
                ping.start()
                phase = load_.send(rate, args.seconds)
                e2e = percentiles(ping.finish())
                catch_up = load_.drain()
                lat, unanswered = freshness(
                    phase, fold_ins(settings, topics.recommendations, phase.rec_start))
                f = percentiles(lat)
                grows, slope = phase.lag_grows()
                lines.append(
                    f"freshness@{rate}/s: {_fmt(f)} (target p95 <= {target:.0f} ms) / kafka e2e "
                    f"{_fmt(e2e)}; p95 ratio {f[1] / e2e[1]:.1f}  ({len(lat):,} sales over "
                    f"{phase.sent_seconds:.0f} s at {phase.achieved:,.0f}/s, {unanswered} without "
                    f"a list after them, {phase.failed} failed; max lag "
                    f"{max((lg for _, lg in phase.lags), default=0):,}, "
                    f"{'growing' if grows else 'steady'} ({slope:+.0f}/s), drained in "
                    f"{catch_up:.1f} s)")
                print(lines[-1], flush=True)
                if rate == RATES[-1][0]:
                    rss = speed.rss_mb()
                    memory = (f"freshness_memory: speed layer RSS {rss:,.0f} MB (peak "
                              f"{speed.rss_mb('VmHWM'):,.0f} MB) with {products:,} products, rank "
                              f"{settings.als_rank}, {speed.users() or 0:,} users in its state "
                              f"({len(load_.users_sent):,} distinct users sent, {load_.next:,} "
                              "sales applied)")
            sustained, steps = 0, []
            for rate in RAMP:
                phase = load_.send(rate, args.step_seconds)
                grows, slope = phase.lag_grows()
                short = phase.achieved < 0.95 * rate
                steps.append(f"{rate:,}/s: "
                             + (f"lag grows ({slope:+,.0f}/s: processed ~{rate - slope:,.0f}/s"
                                if grows else f"steady ({slope:+,.0f}/s")
                             + f", max lag {max((lg for _, lg in phase.lags), default=0):,})"
                             + (f", producer reached only {phase.achieved:,.0f}/s" if short
                                else ""))
                load_.drain(600)
                if grows or short:
                    break
                sustained = rate
            lines.append(f"freshness_max_rate: {sustained:,} sales/s sustained without the lag "
                         f"growing ({args.step_seconds:.0f} s steps: {'; '.join(steps)})")
            print(lines[-1], flush=True)
            lines.append(memory)
            print(memory, f"(after the ramp: RSS {speed.rss_mb():,.0f} MB, "
                  f"{speed.users() or 0:,} users, {load_.next:,} sales)", flush=True)
            print(f"freshness: idle kafka e2e (ping-pong, {PINGS_PER_SECOND}/s for 10 s) "
                  f"{_fmt(idle)}", flush=True)
        finally:
            load_.close()
            code = speed.stop()
            if args.keep:
                args.keep.write_bytes((tmp / "speed.log").read_bytes())
            if code not in (0, None):
                print(f"freshness: the speed layer exited with {code}; its log's end:\n"
                      + (tmp / "speed.log").read_text(errors="replace")[-3000:], file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
