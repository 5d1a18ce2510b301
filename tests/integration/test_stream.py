"""`recsys stream` on the real broker and Spark local: threshold retrains, dead letters, a crash and
restart on the checkpoint (no duplicate, no gap), a clean SIGTERM.

Each test has its own topics (`t<unique>.sales`, ...), its own data folder and small ALS
settings. The crash and SIGTERM tests run `recsys stream` as a subprocess (its own JVM) so the
kill is a real one; the others run the job in this process on the session's Spark.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fastavro
import pandas as pd
import pytest
from confluent_kafka import Producer

from recsys.kafka import producer_config, read_to_end
from recsys.paths import BUNDLED_DATA, ROOT
from recsys.settings import Settings, load
from recsys.topics import create_topics, renamed
from schemas import codec
from schemas import topics as declared
from spark.job import StreamJob
from spark.publish import Topics
from spark.store import Store
from streams.csv_source import CsvSource
from streams.producer import SalesProducer
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

SMALL_ALS = {"als_rank": 4, "als_max_iter": 3, "top_n": 5, "eval_k": 5, "promote_gate": False,
             "spark_shuffle_partitions": 2}


# --- helpers --------------------------------------------------------------------------------------
def make_topics(settings: Settings, unique: str) -> Topics:
    prefix = f"t{unique}."
    used = [declared.topic(n) for n in (declared.SALES, declared.SALES_DLQ, declared.MODEL_READY,
                                        declared.RECOMMENDATIONS, declared.FEEDBACK,
                                        declared.GRAPH_EDGES, declared.MODEL_FACTORS,
                                        declared.RECOMMENDATIONS_SHADOW, declared.SPEED_STATE)]
    create_topics(settings, topics=used, names=renamed(prefix, topics=used))
    return Topics.with_prefix(prefix)


def job_settings(settings: Settings, **changes: Any) -> Settings:
    return load(**{**settings.model_dump(), **SMALL_ALS, "trigger_seconds": 0.5, **changes})


def decoded(settings: Settings, topic: str) -> list[dict[str, Any]]:
    return [codec.decode(m.value())[1] for m in read_to_end(settings, topic)]


def produce_csv(settings: Settings, topics: Topics, limit: int, skip: int = 0) -> list[dict]:
    """Replay bundled rows with the producer; returns the sales the broker acknowledged."""
    acked: list[dict] = []
    source = CsvSource(BUNDLED_DATA, skip=skip, limit=limit)
    items = list(source)
    producer = SalesProducer(settings, topic=topics.sales, dlq_topic=topics.dlq)
    summary = producer.run(iter(items))
    assert summary.ok, summary.line()
    acked = [sale for sale, _ in items if sale is not None]
    assert len(acked) == summary.published
    return acked


def batch_folders(settings: Settings) -> list[Path]:
    return sorted(Path(settings.store, "sales").glob("query_id=*/batch_id=*"))


class StreamProcess:
    """`recsys stream` in a subprocess of its own session, logging to a file."""

    def __init__(self, settings: Settings, topics_prefix: str, log_path: Path, **env: Any
                 ) -> None:
        self.log_path = log_path
        self.env = {
            **os.environ,
            "RECSYS_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "RECSYS_DATA_DIR": str(settings.data_dir),
            "RECSYS_EXPORT_DIR": str(settings.export_dir),
            "RECSYS_SPARK_DRIVER_MEMORY": "1g",
            "RECSYS_LOG_LEVEL": "INFO",
            **{f"RECSYS_{k.upper()}": str(v) for k, v in {**SMALL_ALS, **env}.items()},
        }
        self.args = [sys.executable, "-m", "recsys.cli", "stream", "--topic-prefix", topics_prefix]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StreamProcess:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.args, env=self.env, cwd=ROOT, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def log(self, tail: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(ln[:300] for ln in lines if not ln.startswith("\tat "))[-12000:] \
            if tail else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group (Python and its Spark JVM), as a crash would."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout: float = 90) -> int:
        """SIGTERM to the Python process only (as `docker stop` does); its exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"no exit {timeout} s after SIGTERM:\n{self.log()}") from None

    def ensure_dead(self) -> None:
        if self.alive():
            self.kill()


def _state(settings: Settings) -> dict[str, Any]:
    path = Path(settings.store, "_state.json")
    return json.loads(path.read_text()) if path.exists() else {}


# --- tests ----------------------------------------------------------------------------------------
def test_replay_crosses_the_threshold_twice(settings, unique, spark):
    """Dec 2010 - Feb 2011 of the bundled file: two models, every user's newest list."""
    topics = make_topics(settings, unique)
    s = job_settings(settings, train_threshold=12_000, max_offsets_per_trigger=7_000)
    sales = produce_csv(s, topics, limit=60_000)
    assert len(sales) > 2 * s.train_threshold

    job = StreamJob(spark, s, topics)
    job.start(available_now=True)
    assert job.run(threading.Event()) == 0

    ready = decoded(s, topics.model_ready)
    assert [r["model_version"] for r in ready] == [1, 2]
    assert {r["trigger"] for r in ready} == {"threshold"}
    assert ready[0]["events"] < ready[1]["events"] <= len(sales)
    assert len({r["model_id"] for r in ready}) == 2
    newest = ready[1]
    to_offset = {o["partition"]: o["to_offset"] for o in newest["offsets"]}
    assert {o["topic"] for o in newest["offsets"]} == {topics.sales}
    assert {o["from_offset"] for o in newest["offsets"]} == {0}
    assert set(newest["metrics"]) >= {"precision_at_k", "rmse"}

    # The events model 2 was trained on, from its recorded offsets: the users it must cover.
    store = Store(spark, s.store).read().collect()
    assert len(store) == len(sales) == len({r["event_id"] for r in store})
    product = re.compile(s.non_product_pattern)  # postage, fees: never in a list
    seen = [r for r in store if r["source_offset"] <= to_offset.get(r["source_partition"], -1)
            and not product.match(r["product_id"])]
    net: dict[tuple[str, str], int] = Counter()
    for r in seen:
        net[(r["user_id"], r["product_id"])] += r["quantity"]
    bought: dict[str, set[str]] = defaultdict(set)
    for (user, product), q in net.items():
        if q > 0:
            bought[user].add(product)

    latest: dict[str, dict[str, Any]] = {}
    for m in read_to_end(s, topics.recommendations):
        rec = codec.decode(m.value())[1]
        assert m.key().decode() == rec["user_id"]
        latest[rec["user_id"]] = rec  # offset order: the last one per key is the current one
    missing = [u for u in bought if u not in latest or latest[u]["model_version"] != 2]
    assert not missing, f"{len(missing)} users without a model-2 list, e.g. {missing[:5]}"
    v2 = {u: r for u, r in latest.items() if r["model_version"] == 2}
    assert set(v2) == set(bought)
    for user, rec in v2.items():
        assert rec["id"] == f"2:{user}"
        items = [i["product_id"] for i in rec["items"]]
        assert items and len(items) <= s.top_n and len(set(items)) == len(items)
        assert [i["rank"] for i in rec["items"]] == list(range(1, len(items) + 1))
        assert not set(items) & bought[user], f"{user} is recommended what they bought"

    # The recommendation graph of each model: its export folder agrees with its lists, and
    # graph-edges holds each of its edges exactly once.
    edges_by_version: dict[int, Counter[str]] = defaultdict(Counter)
    for m in read_to_end(s, topics.graph_edges):
        edge = codec.decode(m.value())[1]
        assert m.key().decode() == edge["id"] == (
            f"{edge['model_version']}:{edge['user_id']}:{edge['product_id']}")
        assert len(edge["because"]) <= 3
        edges_by_version[edge["model_version"]][edge["id"]] += 1
    assert set(edges_by_version) == {1, 2}
    for version in (1, 2):
        folder = Path(s.export_dir, str(version))
        edges = pd.read_csv(folder / "edges.csv", dtype=str, keep_default_na=False)
        summary = json.loads((folder / "summary.json").read_text())
        users = pd.read_csv(folder / "vertices.csv", dtype={"original_id": str}).query(
            "type == 'user'")
        assert len(edges) == summary["recommendations"]["edges"] == int(users["degree"].sum())
        assert edges.groupby("user_id").size().max() <= s.top_n
        on_topic = edges_by_version[version]
        assert set(on_topic.values()) == {1}, "an edge published twice"
        assert set(on_topic) == {f"{version}:{u}:{p}" for u, p in
                                 zip(edges["user_id"], edges["product_id"], strict=True)}
    v2_edges = pd.read_csv(Path(s.export_dir, "2", "edges.csv"), dtype=str)
    assert len(v2_edges) == sum(len(r["items"]) for r in v2.values())


def _older_producer_null_user() -> bytes:
    """A Sale from a producer whose schema let user_id be null, framed with the current
    fingerprint: the union's null branch reads as an empty string."""
    schema = json.loads(codec.schema("Sale").json)
    for f in schema["fields"]:
        if f["name"] == "user_id":
            f["type"] = ["null", "string"]
    parsed = fastavro.parse_schema(schema)
    buf = io.BytesIO()
    buf.write(codec.schema("Sale").header)
    fastavro.schemaless_writer(buf, parsed, {
        "event_id": "bad-null-user", "user_id": None, "product_id": "p1", "quantity": 1,
        "event_time": 1_300_000_000_000})
    return buf.getvalue()


def _sale(i: int) -> bytes:
    return codec.encode("Sale", {
        "event_id": f"e{i}", "user_id": f"u{i % 7}", "product_id": f"p{i % 11}", "quantity": 1,
        "event_time": 1_300_000_000_000 + i})


def test_bad_records_go_to_the_dlq_and_the_query_keeps_running(settings, unique, spark):
    topics = make_topics(settings, unique)
    s = job_settings(settings, train_threshold=1_000_000)
    good = _sale(1)
    edge = codec.encode("GraphEdge", {"id": "1:u:p", "model_version": 1, "user_id": "u",
                                      "product_id": "p", "score": 1.0, "rank": 1, "because": []})
    bad = {
        b"\x00\x01" + good[2:]: "bad marker 0001 (want c301)",
        good[:2] + bytes.fromhex("0102030405060708") + good[10:]:
            "unknown schema fingerprint 0102030405060708",
        good[:16]: "body does not decode as Sale",
        _older_producer_null_user(): "required field user_id is empty",
        edge: "schema GraphEdge where Sale was expected",
    }
    producer = Producer(producer_config(s))
    for i in range(20):
        producer.produce(topics.sales, _sale(i), f"u{i % 7}")
    for value in bad:
        producer.produce(topics.sales, value, b"bad")
    producer.produce(topics.sales, None, b"tombstone")
    assert producer.flush(30) == 0

    job = StreamJob(spark, s, topics)
    job.start()
    try:
        dlq = wait_for("6 dead letters", lambda: (d := decoded(s, topics.dlq)) and len(d) >= 6
                       and d, timeout=120)
        wait_for("20 stored events", lambda: job.state.events >= 20, timeout=60)
        # The query is alive after the bad records: 10 more good ones arrive in the store.
        for i in range(20, 30):
            producer.produce(topics.sales, _sale(i), f"u{i % 7}")
        producer.produce(topics.sales, good, b"again")  # a duplicate of e1: stored once
        assert producer.flush(30) == 0
        wait_for("30 stored events", lambda: job.state.events >= 30, timeout=90)
        assert job.query.isActive and job.query.exception() is None
    finally:
        job.stop()

    assert len(dlq) == 6
    by_bytes = {d["original_bytes"]: d for d in dlq}
    assert by_bytes[None]["reason"] == "null value"
    for value, reason in bad.items():
        d = by_bytes[value]
        assert d["reason"] == reason
        assert d["stage"] == "stream"
        assert d["source_topic"] == topics.sales
        assert d["source"] == f"{topics.sales}[{d['source_partition']}]@{d['source_offset']}"
    ids = [r["event_id"] for r in Store(spark, s.store).read().collect()]
    assert sorted(ids) == sorted(f"e{i}" for i in range(30))
    assert job.state.events == 30


def test_killed_job_restarts_on_its_checkpoint_without_duplicates_or_gaps(
    settings, unique, tmp_path, spark
):
    """SIGKILL mid-stream, restart: every valid event stored exactly once, and the model
    trained after the restart counts them all. The rows are produced twice (a retrying
    producer), so dedupe across batches is exercised too."""
    topics = make_topics(settings, unique)
    sales = produce_csv(settings, topics, limit=8_000)
    produce_csv(settings, topics, limit=8_000)  # the same events again
    expected = {s["event_id"] for s in sales}
    product = re.compile(settings.non_product_pattern)  # postage, fees: not trained on
    trainable = sum(1 for s in sales if s["quantity"] != 0 and not product.match(s["product_id"]))
    env = {"train_threshold": len(expected), "max_offsets_per_trigger": 1_500,
           "trigger_seconds": 0.5}
    log_path = tmp_path / "stream.log"
    first = StreamProcess(settings, f"t{unique}.", log_path, **env).start()
    try:
        wait_for("two committed batch folders", lambda: len(batch_folders(settings)) >= 2
                 or not first.alive(), timeout=180)
        assert first.alive(), first.log()
        first.kill()
    finally:
        first.ensure_dead()
    before = _state(settings).get("events", 0)
    assert before < len(expected), "the first run finished everything before the kill"

    second = StreamProcess(settings, f"t{unique}.", log_path, **env).start()
    try:
        ready = wait_for(
            "model-ready after the restart",
            lambda: (not second.alive() and pytest.fail(second.log()))
            or decoded(settings, topics.model_ready),
            timeout=240, every=2,
        )
        assert second.terminate() == 0, second.log()
    finally:
        second.ensure_dead()

    rows = Store(spark, settings.store).read().select("event_id").collect()
    counts = Counter(r["event_id"] for r in rows)
    duplicates = {k: n for k, n in counts.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} duplicated events, e.g. {list(duplicates)[:5]}"
    assert set(counts) == expected, f"missing {len(expected - set(counts))} events"
    assert _state(settings)["events"] == len(expected)
    assert len(ready) == 1
    assert ready[0]["model_version"] == 1 and ready[0]["trigger"] == "threshold"
    assert ready[0]["events"] == trainable
    assert [d for d in decoded(settings, topics.dlq) if d["stage"] == "stream"] == []


def test_sigterm_stops_cleanly_after_the_batch_in_progress(settings, unique, tmp_path, spark):
    topics = make_topics(settings, unique)
    produce_csv(settings, topics, limit=3_000)
    log_path = tmp_path / "stream.log"
    proc = StreamProcess(settings, f"t{unique}.", log_path, train_threshold=1_000_000,
                         max_offsets_per_trigger=500).start()
    more = threading.Thread(target=produce_csv, args=(settings, topics, 3_000, 3_000))
    try:
        wait_for("a committed batch", lambda: batch_folders(settings) or not proc.alive(),
                 timeout=180)
        assert proc.alive(), proc.log()
        more.start()  # batches keep coming while the signal arrives
        time.sleep(1.0)
        assert proc.terminate() == 0, proc.log()
    finally:
        proc.ensure_dead()
        if more.is_alive() or more.ident is not None:
            more.join(60)
    text = log_path.read_text()
    assert "SIGTERM: stopping after the batch in progress" in text
    assert "stopped;" in text
    assert "query failed" not in text and "training failed" not in text, proc.log()
    # The counters agree with the store: nothing half-counted.
    stored = Store(spark, settings.store).count()
    assert _state(settings)["events"] == stored > 0


def produce_sales(settings: Settings, topic: str, ids: range) -> Producer:
    producer = Producer(producer_config(settings))
    for i in ids:
        producer.produce(topic, _sale(i), f"u{i % 7}")
    assert producer.flush(30) == 0
    return producer


@contextmanager
def running(job: StreamJob) -> Iterator[StreamJob]:
    """The job started, with its main loop (which checks max-wait and feedback) in a thread."""
    job.start()
    stop = threading.Event()
    runner = threading.Thread(target=job.run, args=(stop,))
    runner.start()
    try:
        yield job
    finally:
        stop.set()
        runner.join(120)


def test_max_wait_trains_below_the_threshold(settings, unique, spark):
    """A trickle that never reaches the threshold still gets a model after max-wait."""
    topics = make_topics(settings, unique)
    s = job_settings(settings, train_threshold=1_000_000, train_max_wait_seconds=2)
    produce_sales(s, topics.sales, range(300))
    with running(StreamJob(spark, s, topics)) as job:
        ready = wait_for("a max_wait model", lambda: decoded(s, topics.model_ready),
                         timeout=150, every=2)
    assert [(r["model_version"], r["trigger"], r["events"]) for r in ready] == [
        (1, "max_wait", 300)]
    assert job.state.since_model == 0


def test_low_online_precision_retrains_early(settings, unique, spark):
    """Feedback below the share of the offline precision trains the next model before the
    threshold; model-ready says why."""
    topics = make_topics(settings, unique)
    s = job_settings(settings, train_threshold=300, feedback_retrain_share=0.5)
    producer = produce_sales(s, topics.sales, range(300))
    with running(StreamJob(spark, s, topics)):
        wait_for("model 1", lambda: decoded(s, topics.model_ready), timeout=150, every=2)
        now = datetime.now(UTC)
        producer.produce(topics.feedback, codec.encode("Feedback", {
            "id": "1:a:b:200:1", "model_version": 1, "window_start": now, "window_end": now,
            "sales": 200, "users": 40, "hits": 1, "hit_pairs": 1, "hit_rate": 0.005,
            "precision_at_k": 0.0025, "k": 5, "offline_precision_at_k": 0.2,
            "published_at": now}), b"1")
        for i in range(300, 310):  # below the threshold: only the feedback can trigger
            producer.produce(topics.sales, _sale(i), f"u{i % 7}")
        assert producer.flush(30) == 0
        ready = wait_for("a feedback model", lambda: (r := decoded(s, topics.model_ready))
                         and len(r) >= 2 and r, timeout=150, every=2)
    assert [(r["model_version"], r["trigger"], r["events"]) for r in ready] == [
        (1, "threshold", 300), (2, "feedback", 310)]
    assert "online precision@5 0.0025 < 0.5 x offline 0.2000" in ready[1]["params"][
        "trigger_reason"]
