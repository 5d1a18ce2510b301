"""`recsys aggregate` for real: a worker PROCESS on a real broker, asked through its HTTP API.

The module takes its own broker (Faust's consumer group and changelog topic names come from the
app id, so sharing the session broker with other tests would mix state). The test:

1. publishes a model (model-ready + one list per user) and, for some users, a fold-in list of the
   speed layer generated in the middle of the last minute, starts the worker, waits for /ready;
2. publishes sales with explicit arrival timestamps over 12 minutes (so minutes leave the
   2-minute feedback window and are folded into totals), duplicates, undecodable values and
   dead letters;
3. kills the worker with SIGKILL in the middle of the second half, restarts it;
4. compares /stats with a recomputation from the source topics read back from Kafka: totals,
   every product, per-minute counts, dead letters by reason, and the feedback of the window
   (also on the `feedback` topic) and per source of the lists (retrain, fold-in); nothing lost,
   nothing counted twice;
5. asks /recommendations for a user with a retrain list, one with a fold-in and an unknown user;
6. stops the worker with SIGTERM: the sales reader has committed every sale it read.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from recsys import paths
from recsys.broker import LocalBroker, free_port
from recsys.kafka import consumer_config, producer_config, read_to_end
from recsys.settings import Settings, load
from recsys.topics import create_topics
from schemas import codec
from schemas import topics as T
from schemas.dead_letters import reason_label
from streams.feedback import (
    BUCKET_MS,
    FOLD_IN,
    Listing,
    bucket_of,
    horizon_ms,
    recompute,
    recompute_by_source,
    recompute_shadow,
    window_bounds,
)
from tests.waiting import exited, wait_for

pytestmark = pytest.mark.integration

USERS, PRODUCTS, K = 40, 30, 5
HORIZON_S = 120
NOW = int(time.time() * 1000)
T0 = bucket_of(NOW - 40 * 60_000)  # arrivals from 40 minutes ago, within topic retention
WAIT = 180.0
FOLDED = [f"u{i}" for i in range(10, 20)]  # users with a fold-in list
FOLD_AT = T0 + 11 * BUCKET_MS + 5_000  # inside the last minute of sales (each minute's take ~10 s)


# --- the worker process -------------------------------------------------------------------------


class Worker:
    def __init__(self, settings: Settings, port: int, log_path: Path) -> None:
        self.settings, self.port, self.log_path = settings, port, log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> Worker:
        env = {**os.environ, "RECSYS_FEEDBACK_HORIZON_SECONDS": str(HORIZON_S),
               "RECSYS_FEEDBACK_INTERVAL_SECONDS": "1", "RECSYS_LOG_LEVEL": "INFO",
               "PYTHONUNBUFFERED": "1"}
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "recsys.cli", "--bootstrap", self.settings.kafka_bootstrap,
             "--data-dir", str(self.settings.data_dir), "aggregate", "--web-port", str(self.port)],
            cwd=paths.ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        return self

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def wait_for(self, what: str, check: Any, timeout: float = WAIT) -> Any:
        """`check()`'s first truthy value; a server not answering yet counts as not yet."""
        assert self.proc is not None
        return wait_for(what, check, timeout, 0.2, exited(self.proc, "worker"), self.tail,
                        (OSError,))

    def stats(self) -> dict[str, Any]:
        status, body = self.get("/stats")
        assert status == 200
        return body

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
                return -9
        return self.proc.returncode

    def tail(self, n: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


# --- Kafka helpers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kafka(broker_factory: Any) -> LocalBroker:
    return broker_factory.start()


@pytest.fixture
def settings(kafka: LocalBroker, tmp_path: Path) -> Settings:
    s = load(kafka_bootstrap=kafka.bootstrap, data_dir=tmp_path / "var")
    create_topics(s)
    return s


def produce(settings: Settings, records: list[tuple[str, bytes, bytes, int | None]]) -> None:
    """(topic, key, value, timestamp_ms) each, acknowledged."""
    producer = Producer(producer_config(settings))
    errors: list[str] = []
    for topic, key, value, ts in records:
        extra = {"timestamp": ts} if ts is not None else {}
        while True:
            try:
                producer.produce(topic, value, key, on_delivery=lambda e, _m: e and errors.append(
                    str(e)), **extra)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    assert producer.flush(60) == 0 and errors == []


# --- the data ------------------------------------------------------------------------------------


def model_records(rng: random.Random) -> tuple[list, dict[str, list[Listing]]]:
    """The model's records, and every user's lists (retrain, then fold-in for FOLDED)."""
    lists = {f"u{i}": [Listing(1, T0, tuple(rng.sample([f"p{j}" for j in range(PRODUCTS)], K)))]
             for i in range(USERS)}
    for user in FOLDED:
        lists[user].append(Listing(1, FOLD_AT, tuple(rng.sample([f"p{j}" for j in range(
            PRODUCTS)], K)), FOLD_IN, f"fold-{user}"))
    recs = []
    for user, listings in lists.items():
        for lst in listings:
            fold = lst.source == FOLD_IN
            value = codec.encode("Recommendation", {
                "id": f"1:{user}" + (f":{lst.sale_event_id}" if fold else ""), "user_id": user,
                "model_version": 1, "generated_at": lst.generated_at,
                "items": [{"product_id": p, "score": 1.0 / r, "rank": r}
                          for r, p in enumerate(lst.items, 1)],
                "source": lst.source, "sale_event_id": lst.sale_event_id,
                "sale_timestamp": lst.generated_at - 40 if fold else None})
            recs.append((T.RECOMMENDATIONS, user.encode(), value, lst.generated_at))
    ready = codec.encode("ModelReady", {
        "model_version": 1, "model_id": "m1", "trained_at": T0, "trigger": "manual",
        "events": 1000, "users": USERS, "products": PRODUCTS, "offsets": [],
        "params": {"rank": "8"}, "metrics": {"precision_at_k": 0.2, "rmse": 1.0},
        "baseline_metrics": {"precision_at_k": 0.05}, "train_seconds": 1.0,
        "cycle_seconds": 2.0, "model_path": "/m/1"})
    return recs + [(T.MODEL_READY, b"1", ready, T0)], lists


SHADOW_AT = T0 + 1000  # a rejected challenger (v2): its lists judge every sale in shadow


def shadow_records(rng: random.Random) -> tuple[list, dict[str, list[Listing]]]:
    """A rejected challenger's lists for half the users (on recommendations-shadow) and its
    model-ready (status rejected, v1 still serving)."""
    lists = {f"u{i}": [Listing(2, SHADOW_AT, tuple(rng.sample(
        [f"p{j}" for j in range(PRODUCTS)], K)))] for i in range(0, USERS, 2)}
    recs = [(T.RECOMMENDATIONS_SHADOW, user.encode(), codec.encode("Recommendation", {
        "id": f"2:{user}", "user_id": user, "model_version": 2, "generated_at": SHADOW_AT,
        "items": [{"product_id": p, "score": 1.0 / r, "rank": r}
                  for r, p in enumerate(ls[0].items, 1)]}), SHADOW_AT)
        for user, ls in lists.items()]
    return recs + [(T.MODEL_READY, b"2", model_ready(2, "rejected", 1), SHADOW_AT)], lists


def model_ready(mv: int, status: str, serving: int, trigger: str = "threshold") -> bytes:
    return codec.encode("ModelReady", {
        "model_version": mv, "model_id": f"m{mv}", "trained_at": T0, "trigger": trigger,
        "events": 1000, "users": USERS, "products": PRODUCTS, "offsets": [],
        "params": {"rank": "8"}, "metrics": {"precision_at_k": 0.1, "rmse": 1.0},
        "baseline_metrics": {"precision_at_k": 0.05}, "train_seconds": 1.0,
        "cycle_seconds": 2.0, "model_path": f"/m/{mv}", "status": status, "serving": serving,
        "status_reason": "test", "champion_version": 1 if mv > 1 else 0,
        "champion_metrics": {}})


def sales_records(rng: random.Random, first: int, minutes: range, per_minute: int) -> list:
    out = []
    i = first
    for m in minutes:
        for j in range(per_minute):
            user = f"u{rng.randrange(USERS + 10)}"  # u40..u49 have no list
            value = codec.encode("Sale", {
                "event_id": f"e{i}", "user_id": user, "product_id": f"p{rng.randrange(PRODUCTS)}",
                "quantity": rng.choice([1, 1, 2, 3, -1]), "event_time": 1293840000000 + i})
            ts = T0 + m * BUCKET_MS + 100 + j
            out.append((T.SALES, user.encode(), value, ts))
            if i % 97 == 0:  # the producer retried: the same record twice
                out.append((T.SALES, user.encode(), value, ts))
            i += 1
    return out


# --- the recomputation ---------------------------------------------------------------------------


def expected(settings: Settings, lists: dict[str, list[Listing]], clock_ms: int,
             shadow: dict[str, list[Listing]]) -> dict[str, Any]:
    seen: set[str] = set()
    rows = []
    for msg in read_to_end(settings, T.SALES):
        try:
            _, rec = codec.decode(msg.value(), "Sale")
        except codec.DecodeError:
            continue
        if rec["event_id"] in seen:
            continue
        seen.add(rec["event_id"])
        rows.append((msg.timestamp()[1], rec["user_id"], rec["product_id"], rec["quantity"]))
    products: dict[str, list[int]] = {}
    minutes: Counter[int] = Counter()
    for ts, _, product, qty in rows:
        p = products.setdefault(product, [0, 0, 0])
        p[0 if qty > 0 else 1] += 1
        p[2] += qty
        minutes[bucket_of(ts)] += 1
    start, _ = window_bounds(clock_ms, horizon_ms(HORIZON_S))
    window = [r for r in rows if r[0] >= start]
    feedback = recompute(window, lists, {1: K})[1]
    reasons: Counter[str] = Counter()
    for msg in read_to_end(settings, T.SALES_DLQ):
        _, rec = codec.decode(msg.value(), "DeadLetter")
        reasons[reason_label(rec["stage"], rec["reason"])] += 1
    return {
        "totals": {"events": len(rows), "sales": sum(1 for r in rows if r[3] > 0),
                   "returns": sum(1 for r in rows if r[3] <= 0),
                   "quantity": sum(r[3] for r in rows), "distinct_products": len(products)},
        "products": products, "minutes": sorted(minutes.items()), "feedback": feedback,
        "by_source": recompute_by_source(window, lists),
        "shadow": recompute_shadow(window, lists, shadow)[2],
        "dead_letters": dict(reasons), "window_start": start,
    }


def test_worker_tables_match_the_topics_across_a_sigkill(settings: Settings, tmp_path: Path):
    rng = random.Random(7)
    port = free_port()
    recs, lists = model_records(rng)
    shadow_recs, shadow = shadow_records(rng)
    produce(settings, recs + shadow_recs)
    worker = Worker(settings, port, tmp_path / "worker.log").start()
    try:
        worker.wait_for("/ready", lambda: worker.get("/ready")[0] == 200)
        worker.wait_for("every list", lambda: worker.stats()["users_by_source"]
                        == {"retrain": USERS - len(FOLDED), FOLD_IN: len(FOLDED)})

        # First half: 6 minutes of sales, bad values and dead letters.
        first = sales_records(rng, 0, range(0, 6), 150)
        bad = [(T.SALES, b"u1", b"not avro at all", T0 + 100), (T.SALES, b"u2", None, T0 + 101)]
        dead = [(T.SALES_DLQ, f"row {i}".encode(), codec.encode("DeadLetter", {
            "source": f"file:{i}", "stage": "produce", "reason": f"no customer id: row {i}"
            if i % 3 else "bad quantity: 'x'", "failed_at": NOW, "original_row": "x,y"}), None)
            for i in range(7)]
        produce(settings, first + bad + dead)
        distinct_first = len({r[2] for r in first})
        worker.wait_for("the first half", lambda: worker.stats()["sales"]["events"]
                        == distinct_first)

        # Second half, killed mid-way.
        # Large enough that the kill lands mid-ingest: the sales reader takes ~10,000/s or more.
        second = sales_records(rng, 10_000, range(6, 12), 10_000)
        produce(settings, second)
        worker.wait_for("part of the second half",
                        lambda: worker.stats()["sales"]["events"] > distinct_first + 1500,
                        timeout=WAIT)
        worker.kill()
        worker = Worker(settings, port, tmp_path / "worker.log").start()
        worker.wait_for("recovery", lambda: worker.get("/ready")[0] == 200)
        total = distinct_first + len({r[2] for r in second})
        recovered = int(re.findall(r"tables recovered .*?, (\d+) sales",
                                   worker.log_path.read_text())[-1])
        assert recovered < total, "killed after the last sale: the restart had nothing to read"
        worker.wait_for("every sale", lambda: worker.stats()["sales"]["events"] >= total)
        # The reader commits only what it counted: once its commits reach the end of `sales`,
        # every record was read after the restart, so a sale counted twice would show now.
        ends = sales_ends(settings)
        worker.wait_for("the reader's commits at the end of sales",
                        lambda: sales_committed(settings, "recsys-aggregate-sales") == ends)
        stats = worker.stats()
        want = expected(settings, lists, stats["ingest"]["stream_time"], shadow)

        got_totals = {k: stats["sales"][k] for k in want["totals"]}
        assert got_totals == want["totals"], f"recovered {recovered} at restart"
        top = {t["product_id"]: [t["sales"], t["returns"], t["quantity"]]
               for t in stats["top_products"]}
        assert top == {p: want["products"][p] for p in top}
        assert sorted(top.values(), reverse=True)[0][0] == max(v[0] for v in
                                                               want["products"].values())
        assert [tuple(m) for m in stats["ingest"]["per_minute"]] == want["minutes"]
        assert stats["feedback_window"]["start"] == want["window_start"]
        assert stats["serving"] == 1
        model, challenger = (next(m for m in stats["models"] if m["model_version"] == v)
                             for v in (1, 2))
        assert (model["status"], model["serving"]) == ("promoted", True)
        assert (challenger["status"], challenger["lists"]) == ("rejected", "shadow")
        # The challenger's shadow lists, judged on the same sales as v1's.
        got_shadow = stats["shadow"]
        assert got_shadow["model_version"] == 2 and got_shadow["champion_version"] == 1
        for role in ("challenger", "champion"):
            assert got_shadow[role] == pytest.approx(want["shadow"][role]), role
        assert got_shadow["sales"] > 0
        fb = model["feedback"]
        assert {k: fb[k] for k in want["feedback"]} == pytest.approx(want["feedback"])
        assert fb["offline_precision_at_k"] == 0.2 and fb["k"] == K
        by_source = stats["feedback_by_source"]
        for source, figures in want["by_source"].items():
            assert by_source[source] == pytest.approx(figures), source
        assert by_source[FOLD_IN]["sales"] > 0 and by_source["retrain"]["sales"] > 0
        assert by_source[FOLD_IN]["sales"] + by_source["retrain"]["sales"] == fb["sales"]
        dl = worker.wait_for("dead letters", lambda: (lambda d: d if d["total"] == sum(
            want["dead_letters"].values()) else None)(worker.stats()["dead_letters"]))
        assert dl["by_reason"] == want["dead_letters"]
        assert dl["by_reason"]["aggregate: bad marker 6e6f (want c301)"] >= 1  # the bad value
        assert dl["by_reason"]["produce: no customer id"] == 4
        # Degree distribution: each of the 40 users' newest list's 5 products, per product.
        degrees = Counter(Counter(p for ls in lists.values() for p in ls[-1].items).values())
        assert model["degree_distribution"] == [[d, n] for d, n in sorted(degrees.items())]

        # The published feedback for the final window equals the recomputation.
        def published() -> dict[str, Any] | None:
            recs_ = [codec.decode(m.value(), "Feedback")[1] for m in read_to_end(settings,
                                                                              T.FEEDBACK)]
            last = [r for r in recs_ if r["model_version"] == 1]
            return last[-1] if last and last[-1]["sales"] == want["feedback"]["sales"] else None

        fb_topic = worker.wait_for("feedback on the topic", published, timeout=30)
        assert fb_topic["hits"] == want["feedback"]["hits"]
        assert fb_topic["id"] == (f"1:{fb_topic['window_start'].timestamp() * 1000:.0f}:"
                                  f"{fb_topic['window_end'].timestamp() * 1000:.0f}:"
                                  f"{fb_topic['sales']}:{fb_topic['hits']}")

        # The read API for a user with a retrain list, one with a fold-in and an unknown user.
        status, known = worker.get("/recommendations/u3")
        assert status == 200 and known["source"] == "retrain" and known["model_version"] == 1
        assert [i["product_id"] for i in known["items"]] == list(lists["u3"][0].items)
        status, folded = worker.get("/recommendations/u12")
        assert status == 200 and (folded["source"], folded["sale_event_id"]) == (
            FOLD_IN, "fold-u12")
        assert [i["product_id"] for i in folded["items"]] == list(lists["u12"][1].items)
        status, unknown = worker.get("/recommendations/somebody-new")
        assert status == 200 and unknown["source"] == "popular" and len(unknown["items"]) == K
        best = max(want["products"].items(), key=lambda kv: (kv[1][0], -int(kv[0][1:])))
        assert unknown["items"][0]["product_id"] in {
            p for p, v in want["products"].items() if v[0] == best[1][0]}

        # v2 promoted by hand, then a rollback: v1's list republished for u3 (newly generated),
        # and a model-ready for v1 (trigger manual) after it. The API answers v1's list again.
        later = int(time.time() * 1000)
        v2_u3 = codec.encode("Recommendation", {
            "id": "2:u3", "user_id": "u3", "model_version": 2, "generated_at": later,
            "items": [{"product_id": "p1", "score": 1.0, "rank": 1}], "source": "retrain"})
        produce(settings, [(T.RECOMMENDATIONS, b"u3", v2_u3, later),
                           (T.MODEL_READY, b"2", model_ready(2, "promoted", 2, "manual"), later)])
        worker.wait_for("v2 in service", lambda: worker.get("/recommendations/u3")[1][
            "model_version"] == 2)
        republished = codec.encode("Recommendation", {
            "id": "1:u3", "user_id": "u3", "model_version": 1, "generated_at": later + 1,
            "items": [{"product_id": "p2", "score": 1.0, "rank": 1}], "source": "retrain"})
        produce(settings, [(T.RECOMMENDATIONS, b"u3", republished, later + 1),
                           (T.MODEL_READY, b"1", model_ready(1, "promoted", 1, "manual"),
                            later + 1)])
        back = worker.wait_for("the rollback", lambda: (lambda r: r if r["model_version"] == 1
                               else None)(worker.get("/recommendations/u3")[1]))
        assert [i["product_id"] for i in back["items"]] == ["p2"] and back["serving"] == 1
        assert worker.stats()["serving"] == 1 or worker.wait_for(
            "/stats serving v1", lambda: worker.stats()["serving"] == 1, timeout=5)

        assert worker.stop() == 0, worker.tail()
        # The sales reader committed everything it counted, under its own group.
        assert sales_committed(settings, "recsys-aggregate-sales") == sales_ends(settings)
    finally:
        worker.kill()


def sales_ends(settings: Settings) -> dict[int, int]:
    consumer = Consumer(consumer_config(settings, f"check-{os.urandom(4).hex()}"))
    try:
        md = consumer.list_topics(T.SALES, timeout=10).topics[T.SALES]
        return {p: consumer.get_watermark_offsets(TopicPartition(T.SALES, p), timeout=10)[1]
                for p in md.partitions}
    finally:
        consumer.close()


def sales_committed(settings: Settings, group: str) -> dict[int, int]:
    consumer = Consumer(consumer_config(settings, group))
    try:
        parts = [TopicPartition(T.SALES, p) for p in sales_ends(settings)]
        return {tp.partition: tp.offset for tp in consumer.committed(parts, timeout=10)}
    finally:
        consumer.close()
