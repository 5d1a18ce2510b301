"""The speed layer on the real broker and Spark: a fold-in equals Spark's own user vector and list;
`recsys speed` folds new sales into known and new users' lists, and a SIGKILL and restart loses no
history and counts nothing twice."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Producer
from test_stream import decoded, job_settings, make_topics, produce_csv, wait_for

from recsys.kafka import producer_config, read_to_end
from recsys.paths import BUNDLED_DATA, ROOT
from recsys.settings import Settings
from schemas import codec, factors
from schemas import topics as declared
from spark.job import StreamJob, train_and_publish
from spark.store import Store
from speed import foldin
from speed.state import UserState

pytestmark = pytest.mark.integration


def test_fold_in_reproduces_sparks_user_vectors_and_lists(settings, spark):
    """Every user of a model trained on the first 60,000 bundled rows, folded in from their own
    purchases against the model's item factors: Spark's vector and Spark's top-N."""
    from recsys.csv_mapping import CsvMapping
    from spark import pipeline, publish
    from spark.csv_input import read_purchases_csv

    s = job_settings(settings, als_rank=8, als_max_iter=5, top_n=10)
    sales = read_purchases_csv(spark, str(BUNDLED_DATA), CsvMapping()).limit(60_000).cache()
    result = pipeline.run_training(spark, sales, s, 1, indexes=pipeline.load_indexes(spark, s))
    ids, y = publish.item_factors_local(result)
    model = foldin.Model(factors.assemble(1, list(factors.chunks(1, ids, y, result.params, []))))

    events = sales.select("user_id", "product_id", "quantity").toPandas()
    sales.unpersist()
    net = events.groupby(["user_id", "product_id"])["quantity"].sum()
    quantities: dict[str, dict[str, int]] = defaultdict(dict)
    for (user, product), q in net.items():
        quantities[user][product] = int(q)
    names = result.indexes[0].names()
    spark_vectors = {names[r["id"]]: np.asarray(r["features"], np.float32)
                     for r in result.model.userFactors.collect()}
    spark_lists = {r["user_id"]: [i["product_id"] for i in r["items"]]
                   for r in result.recommendations.collect()}
    result.recommendations.unpersist()
    assert len(spark_lists) > 1000

    worst, same_list = 0.0, 0
    for user, want in spark_lists.items():
        folded = foldin.fold_in(model, user, quantities[user], s.top_n)
        x = spark_vectors[user]
        worst = max(worst, float(np.abs(folded.vector - x).max() / np.abs(x).max()))
        same_list += [p for p, _ in folded.items] == want
    assert worst < 1e-4, f"largest relative difference to Spark's vectors: {worst}"
    # Ties in float32 scores may swap two neighbours; all but a handful are identical.
    assert same_list >= 0.99 * len(spark_lists), f"{same_list} of {len(spark_lists)} lists"


class SpeedProcess:
    """`recsys speed` in a subprocess, logging to a file; killed for real."""

    def __init__(self, settings: Settings, prefix: str, group: str, log_path: Path) -> None:
        self.log_path = log_path
        self.env = {**os.environ, "RECSYS_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
                    "RECSYS_DATA_DIR": str(settings.data_dir), "RECSYS_TOP_N": str(settings.top_n)}
        self.args = [sys.executable, "-m", "recsys.cli", "speed", "--topic-prefix", prefix,
                     "--group", group]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SpeedProcess:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.args, env=self.env, cwd=ROOT, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def _send(settings: Settings, topic: str, sales: list[dict[str, Any]]) -> None:
    producer = Producer(producer_config(settings))
    for sale in sales:
        producer.produce(topic, key=sale["user_id"].encode(), value=codec.encode("Sale", sale))
    assert producer.flush(30) == 0


def _sale(event_id: str, user: str, product: str, quantity: int = 1) -> dict[str, Any]:
    return {"event_id": event_id, "user_id": user, "product_id": product, "quantity": quantity,
            "event_time": datetime(2011, 12, 10, tzinfo=UTC)}


def _fold_ins(settings: Settings, topic: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for m in read_to_end(settings, topic):
        rec = codec.decode(m.value())[1]
        if rec["source"] == "fold-in":
            out[rec["user_id"]].append(rec)
    return out


def _states(settings: Settings, topic: str) -> dict[str, UserState]:
    latest = {}
    for m in read_to_end(settings, topic):
        state = UserState.of(codec.decode(m.value(), expect="SpeedState")[1])
        latest[state.user_id] = state
    return latest


def test_speed_layer_folds_new_sales_in_and_survives_a_sigkill(settings, unique, spark, tmp_path):
    topics = make_topics(settings, unique)
    prefix = f"t{unique}."
    from recsys.topics import create_topics, renamed
    state_topic = [declared.topic(declared.SPEED_STATE)]
    create_topics(settings, topics=state_topic, names=renamed(prefix, topics=state_topic))
    s = job_settings(settings, train_threshold=8_000)
    history = produce_csv(s, topics, limit=12_000)
    job = StreamJob(spark, s, topics)
    job.start(available_now=True)
    assert job.run(threading.Event()) == 0
    ready = decoded(s, topics.model_ready)
    assert [r["model_version"] for r in ready] == [1]
    chunks = decoded(s, topics.model_factors)
    assert chunks and {c["model_version"] for c in chunks} == {1}
    assert sum(len(c["product_ids"]) for c in chunks) == ready[0]["products"]

    known = history[0]["user_id"]
    catalogue = sorted({sale["product_id"] for sale in history})
    new_user = f"new-{unique}"
    first = [_sale(f"x{unique}:1", known, catalogue[5]),
             _sale(f"x{unique}:2", new_user, catalogue[7], 3)]
    speed = SpeedProcess(s, prefix, f"speed-{unique}", tmp_path / "speed.log").start()
    try:
        _send(s, topics.sales, first)
        lists = wait_for("fold-in lists of both users", lambda: (
            got := _fold_ins(s, topics.recommendations)) and {known, new_user} <= set(got)
            and got, 90)
        for user, sale in ((known, first[0]), (new_user, first[1])):
            (rec,) = lists[user]
            assert rec["model_version"] == 1 and rec["sale_event_id"] == sale["event_id"]
            items = [i["product_id"] for i in rec["items"]]
            assert len(items) == s.top_n and sale["product_id"] not in items
        # The history before the model's offsets was applied to the state but folded in no one.
        assert set(lists) == {known, new_user}, speed.log()

        speed.kill()  # SIGKILL: whatever was not committed runs again
        again = [_sale(f"x{unique}:3", new_user, catalogue[9]),
                 _sale(f"x{unique}:4", new_user, catalogue[7], -3),  # a return
                 _sale(f"x{unique}:5", new_user, "NOT-IN-THE-MODEL"),
                 first[0]]  # produced twice: the same event id
        _send(s, topics.sales, again)
        speed = SpeedProcess(s, prefix, f"speed-{unique}", tmp_path / "speed.log").start()
        wait_for("the new user's list after the restart", lambda: len(
            _fold_ins(s, topics.recommendations).get(new_user, [])) >= 2, 90)

        # A new model mid-stream: the store takes the new sales in, model 2 is trained on it and
        # its factors published; the speed layer switches, and the next sale folds in under it.
        job = StreamJob(spark, s, topics)
        job.start(available_now=True)
        assert job.run(threading.Event()) == 0
        train_and_publish(spark, s, topics, Store(spark, s.store).read(), "manual")
        wait_for("the switch to model 2", lambda: "switched to model 2" in speed.log(), 60)
        later = [_sale(f"x{unique}:6", new_user, catalogue[11])]
        _send(s, topics.sales, later)
        wait_for("a fold-in under model 2", lambda: _fold_ins(s, topics.recommendations)[
            new_user][-1]["model_version"] == 2, 60)
        assert speed.terminate() == 0, speed.log()
    finally:
        if speed.proc is not None and speed.proc.poll() is None:
            speed.kill()

    # Nothing lost, nothing twice: the changelog equals the sales netted once per event id.
    want: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    seen = set()
    not_product = re.compile(s.non_product_pattern)  # postage, fees: never part of a state
    for sale in history + first + again + later:
        if sale["event_id"] not in seen and not not_product.match(sale["product_id"]):
            seen.add(sale["event_id"])
            want[sale["user_id"]][sale["product_id"]] += sale["quantity"]
    states = _states(s, prefix + declared.SPEED_STATE)
    assert set(states) == set(want)
    for user, q in want.items():
        assert states[user].quantities == {p: n for p, n in q.items() if n}, user
    assert states[new_user].quantities == {catalogue[9]: 1, catalogue[11]: 1,
                                           "NOT-IN-THE-MODEL": 1}
    newest = _fold_ins(s, topics.recommendations)[new_user][-1]
    items = [i["product_id"] for i in newest["items"]]
    assert catalogue[9] not in items and "NOT-IN-THE-MODEL" not in items
    # Model 1's chunks were retired once model 2 was out: compaction will drop them.
    retired = [m for m in read_to_end(s, topics.model_factors) if m.value() is None]
    assert retired and {m.key().decode().split(":")[0] for m in retired} == {"1"}
    unknown = re.findall(r"(\d+) sales of products the model does not know", speed.log())
    assert unknown and int(unknown[-1]) >= 1, speed.log()
