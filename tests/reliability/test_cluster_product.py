"""The product on the loopback cluster gives what it gives on the embedded default.

The same input (the first rows of the bundled file, produced by `recsys produce`) goes through
`recsys stream --once` (ingest, threshold, training, evaluation, graph, export, publish) twice:

- embedded: one broker, Spark local[2] (the default a laptop runs);
- cluster: three brokers (replication 3, min ISR 2), Spark standalone with two one-core workers,
  so decoding, ALS and GraphX run in executors in other JVMs and their Python workers; once with
  the driver path forced (`RECSYS_TRAIN_PATH=driver`) and once with the distributed path.

Every run is a real `recsys` subprocess, so a setting, a path or a closure that only works in
one process would fail here. Then the speed layer and the aggregator run against the cluster on
the cluster model and fold in new sales; the speed layer's lists equal the embedded speed layer's.
ALS is seeded; lists are compared item by item, where only float near-ties may swap neighbours.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from recsys.broker import LocalBroker, free_port
from recsys.kafka import consumer_config, producer_config
from recsys.paths import BUNDLED_DATA, ROOT
from recsys.settings import ENV_PREFIX, Settings, load
from recsys.topics import create_topics, renamed
from schemas import codec
from tests import waiting

pytestmark = pytest.mark.reliability

ROWS = 12_000  # of the bundled file (five days): ~8,000 sales, some buyers in both split sides
SMALL = {"als_rank": 6, "als_max_iter": 6, "top_n": 5, "eval_k": 5, "promote_gate": False,
         "spark_shuffle_partitions": 2, "warm_up": False, "trigger_seconds": 0.5,
         "train_threshold": 1, "spark_driver_memory": "2g", "seed": 42, "log_level": "INFO"}
PASSED = ("kafka_bootstrap", "spark_master", "topic_replication", "data_dir", "store_path",
          "checkpoint_path", "models_path", "export_dir", "train_path", *SMALL)
RUN_TIMEOUT = 1200.0  # one `recsys stream --once` (cold JVM, executors, two ALS fits, GraphX): 2-4 min
# quiet, over 8 min on a loaded shared machine; a ceiling, not a pace
WAIT = 120.0


# --- running the product -------------------------------------------------------------------------


def environment(settings: Settings) -> dict[str, str]:
    """This process's environment without its RECSYS_* variables, plus `settings` as variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env["PYTHONUNBUFFERED"] = "1"
    values = settings.model_dump()
    for name in PASSED:
        value = values[name]
        env[ENV_PREFIX + name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def run(settings: Settings, log_path: Path, *args: str, timeout: float = RUN_TIMEOUT) -> None:
    """`recsys ARGS` to completion; fails the test with the log's tail when it does not exit 0."""
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "recsys.cli", *args], cwd=ROOT,
                                env=environment(settings), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            rc = None
    if rc != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        pytest.fail(f"`recsys {' '.join(args)}` ended with {rc}:\n{tail}", pytrace=False)


class Role:
    """A long-running `recsys` role (speed, aggregate) in its own process group."""

    def __init__(self, settings: Settings, log_path: Path, *args: str) -> None:
        self.log_path = log_path
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "recsys.cli", *args], cwd=ROOT,
                                         env=environment(settings), stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        return self.proc.returncode


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT,
             roles: tuple[Role, ...] = ()) -> Any:
    """`tests.waiting.wait_for`, given up as soon as one of `roles` exits; their logs' tails in
    the message."""
    def dead() -> str | None:
        gone = [r for r in roles if r.proc.poll() is not None]
        return gone and f"{gone[0].proc.args[3:]} exited ({gone[0].proc.returncode})" or None

    return waiting.wait_for(what, check, timeout, 0.3, dead,
                            lambda: "\n".join(r.tail() for r in roles), (OSError,))


# --- reading the results -------------------------------------------------------------------------


def decoded(settings: Settings, topic: str, timeout: float = 60) -> list[dict[str, Any]]:
    """Every record on `topic` now (up to each partition's end), decoded, in offset order."""
    consumer = Consumer(consumer_config(settings, f"test-read-{uuid.uuid4().hex}"))
    try:
        parts = consumer.list_topics(topic, timeout=15).topics[topic].partitions
        tps = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(parts)]
        ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=15)[1] for tp in tps}
        consumer.assign(tps)
        left = {p for p, end in ends.items() if end > 0}
        out: list[tuple[int, int, dict[str, Any]]] = []
        deadline = time.monotonic() + timeout
        while left and time.monotonic() < deadline:
            for m in consumer.consume(num_messages=5000, timeout=0.5):
                if m.error() is not None:
                    continue
                out.append((m.partition(), m.offset(), codec.decode(m.value())[1]))
                if m.offset() + 1 >= ends[m.partition()]:
                    left.discard(m.partition())
        assert not left, f"{topic}: partitions {sorted(left)} not read to their end"
        return [rec for _, _, rec in sorted(out, key=lambda t: (t[0], t[1]))]
    finally:
        consumer.close()


Lists = dict[str, list[tuple[str, float]]]


def retrain_lists(records: list[dict[str, Any]], version: int = 1) -> Lists:
    return {r["user_id"]: [(i["product_id"], i["score"]) for i in r["items"]]
            for r in records if r["source"] == "retrain" and r["model_version"] == version}


def differences(want: Lists, got: Lists, tol: float = 2e-3) -> list[str]:
    """Where `got` differs from `want` more than float noise: another user set, a score off by
    more than `tol` (relative to the list's best), or two products swapped whose scores are not
    within `tol` of each other (a near-tie may fall either way)."""
    out = []
    if set(want) != set(got):
        out.append(f"users only embedded: {sorted(set(want) - set(got))[:5]}, only cluster: "
                   f"{sorted(set(got) - set(want))[:5]}")
    for user in sorted(set(want) & set(got)):
        a, b = want[user], got[user]
        scale = max(abs(a[0][1]), 1e-6) if a else 1.0
        if len(a) != len(b):
            out.append(f"{user}: {len(a)} items, cluster {len(b)}")
            continue
        for (pa, sa), (pb, sb) in zip(a, b, strict=True):
            if abs(sa - sb) > tol * scale:
                out.append(f"{user}: scores {a} vs {b}")
                break
            if pa != pb and pb not in {p for p, s in a if abs(s - sb) <= tol * scale}:
                out.append(f"{user}: lists {a} vs {b}")
                break
    return out


def fold_ins(settings: Settings, topic: str) -> Lists:
    return {r["user_id"]: [(i["product_id"], i["score"]) for i in r["items"]]
            for r in decoded(settings, topic) if r["source"] == "fold-in"}


def send(settings: Settings, topic: str, sales: list[dict[str, Any]]) -> None:
    producer = Producer(producer_config(settings))
    for sale in sales:
        producer.produce(topic, key=sale["user_id"].encode(), value=codec.encode("Sale", sale))
    assert producer.flush(30) == 0


# --- one run of the product ------------------------------------------------------------------------


class Run:
    """Topics under `prefix` on the run's Kafka, the input produced, `recsys stream --once`."""

    def __init__(self, name: str, settings: Settings, folder: Path) -> None:
        self.name, self.settings, self.folder = name, settings, folder
        self.prefix = f"{name}{uuid.uuid4().hex[:6]}."
        self.topics = renamed(self.prefix)
        create_topics(settings, names=self.topics)
        self.ready: list[dict[str, Any]] | None = None

    def log(self, role: str) -> Path:
        return self.folder / f"{self.name}-{role}.log"

    def stream(self) -> Run:
        """Once: a second call returns the results of the first."""
        if self.ready is not None:
            return self
        started = time.monotonic()
        run(self.settings, self.log("produce"), "produce", "--file", str(BUNDLED_DATA),
            "--limit", str(ROWS), "--no-progress", "--topic-prefix", self.prefix)
        run(self.settings, self.log("stream"), "stream", "--once", "--topic-prefix", self.prefix)
        self.seconds = time.monotonic() - started
        summary = re.search(r"published ([\d,]+) \+ dead-lettered ([\d,]+)",
                            self.log("produce").read_text())
        assert summary, self.log("produce").read_text()[-2000:]
        self.published, self.dead_lettered = (int(g.replace(",", "")) for g in summary.groups())
        self.ready = decoded(self.settings, self.topics["model-ready"])
        self.lists = retrain_lists(decoded(self.settings, self.topics["recommendations"]))
        self.edges = decoded(self.settings, self.topics["graph-edges"])
        self.dead = decoded(self.settings, self.topics["sales.dlq"])
        return self


def folder_settings(base: Settings, folder: Path, **changes: Any) -> Settings:
    """`base` with the state of one run in `folder` (on the cluster: under its shared folder)."""
    return load(**{**base.model_dump(), **SMALL, "data_dir": folder,
                   "store_path": str(folder / "store"), "checkpoint_path": str(folder / "ckpt"),
                   "models_path": str(folder / "models"), "export_dir": folder / "exports",
                   **changes})


@pytest.fixture(scope="module")
def runs(cluster: Any, broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory
         ) -> dict[str, Run]:
    """The same input through the embedded default and through the cluster on each path.

    The embedded run and the cluster's driver-path run go side by side (each JVM spends much
    of a small cycle waiting on scheduling, not computing); the distributed-path run streams when
    its test asks (`runs[path].stream()`), as a second application would get no executor while
    the first holds both worker cores."""
    folder = tmp_path_factory.mktemp("embedded")
    local = folder_settings(load(kafka_bootstrap=broker.bootstrap), folder,
                            spark_master="local[2]", topic_replication=1)
    made = {"embedded": Run("e", local, folder)}
    for path in ("driver", "distributed"):
        folder = cluster.shared_dir / f"{path}-{uuid.uuid4().hex[:6]}"
        folder.mkdir(parents=True)
        settings = folder_settings(cluster.settings(), folder, train_path=path)
        made[path] = Run(f"c{path[:4]}", settings, folder)
    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(made[name].stream) for name in ("embedded", "driver")]:
            future.result()
    return made


def test_cluster_status_from_another_process(cluster, tmp_path):
    """`recsys cluster status` (another process, only the folder in common) sees every part
    running and answering; the topics carry three replicas with min ISR 2."""
    from confluent_kafka.admin import AdminClient, ConfigResource

    proc = subprocess.run([sys.executable, "-m", "recsys.cli", "--data-dir",
                           str(cluster.base.parent), "cluster", "status"], cwd=ROOT,
                          env=environment(cluster.settings()), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = proc.stdout.splitlines()
    assert len(rows) == 6 and all(" running " in r and "NOT" not in r for r in rows), rows
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap})
    sales = admin.list_topics("sales", timeout=15).topics["sales"]
    assert all(len(p.replicas) == 3 and len(p.isrs) == 3 for p in sales.partitions.values())
    resource = ConfigResource(ConfigResource.Type.TOPIC, "sales")
    config = admin.describe_configs([resource])[resource].result(timeout=15)
    assert config["min.insync.replicas"].value == "2"


def test_the_train_path_setting_exists():
    """The cluster runs force the path with RECSYS_TRAIN_PATH; without the setting they would
    silently both take the default."""
    assert "train_path" in Settings.model_fields, "RECSYS_TRAIN_PATH (train_path) has not landed"


@pytest.mark.parametrize("path", ["driver", "distributed"])
def test_stream_train_graph_on_the_cluster_equal_the_embedded_default(runs, path):
    assert "train_path" in Settings.model_fields, "RECSYS_TRAIN_PATH (train_path) has not landed"
    embedded, ran = runs["embedded"], runs[path].stream()
    assert ran.settings.topic_replication == 3 and ran.settings.spark_master.startswith("spark:")
    assert f"{path} path (RECSYS_TRAIN_PATH={path})" in ran.log("stream").read_text()
    # Ingest: the same events stored, the same rows dead-lettered with the same reasons.
    assert [(r["model_version"], r["events"]) for r in ran.ready] == [
        (r["model_version"], r["events"]) for r in embedded.ready]
    assert sorted((d["source"], d["reason"]) for d in ran.dead) == sorted(
        (d["source"], d["reason"]) for d in embedded.dead)
    assert len(embedded.dead) > 0 and len(embedded.lists) > 50
    # Nothing lost on the replicated topics: every row published or dead-lettered, once.
    assert ran.published + ran.dead_lettered == ROWS and len(ran.dead) == ran.dead_lettered
    assert math.isfinite(embedded.ready[0]["metrics"]["precision_at_k"])  # users were evaluated
    # Training and evaluation: the same users, lists and metrics (seeded ALS; float noise only).
    assert differences(embedded.lists, ran.lists) == []
    for key, value in embedded.ready[0]["metrics"].items():
        assert ran.ready[0]["metrics"][key] == pytest.approx(value, rel=1e-3, abs=1e-4, nan_ok=True), key
    # The graph step (GraphX in the executors): the same edges, figures and export.
    assert sorted((e["user_id"], e["product_id"]) for e in ran.edges) == sorted(
        (e["user_id"], e["product_id"]) for e in embedded.edges)
    version = str(ran.ready[0]["model_version"])
    summary = json.loads((ran.settings.export_dir / version / "summary.json").read_text())
    want = json.loads((embedded.settings.export_dir / version / "summary.json").read_text())
    assert summary.keys() == want.keys()
    print(f"{path}: stream --once on the cluster {ran.seconds:.0f}s, embedded "
          f"{embedded.seconds:.0f}s (shared machine: noisy)")


def test_speed_layer_and_aggregator_on_the_cluster(runs):
    """The speed layer folds new sales in on the cluster exactly as on the embedded broker, and
    the aggregator counts what the topics hold."""
    embedded, ran = runs["embedded"], runs["driver"]
    known = sorted(ran.lists)[0]
    bought = {p for p, _ in ran.lists[known]}
    catalogue = sorted({e["product_id"] for e in ran.edges} - bought)
    now = datetime.now(UTC)
    new = [{"event_id": f"x:{i}", "user_id": user, "product_id": catalogue[i], "quantity": 2,
            "event_time": now} for i, user in enumerate([known, "new-user-1", known])]
    port = free_port()
    results: dict[str, Lists] = {}
    for run_ in (embedded, ran):
        roles = [Role(run_.settings, run_.log("speed"), "speed", "--topic-prefix", run_.prefix,
                      "--group", f"speed-{run_.prefix}")]
        if run_ is ran:
            roles.append(Role(run_.settings, run_.log("aggregate"), "aggregate", "--topic-prefix",
                              run_.prefix, "--web-port", str(port)))
        try:
            send(run_.settings, run_.topics["sales"], new)
            results[run_.name] = wait_for(
                f"{run_.name}: fold-in lists of both users",
                lambda r=run_: (got := fold_ins(r.settings, r.topics["recommendations"]))
                and {known, "new-user-1"} <= set(got) and got, roles=tuple(roles))
            if run_ is ran:
                stats = wait_for("the aggregator's stats of every sale", lambda: (
                    s := _stats(port)) and s["sales"]["events"] >= ran.published + len(new)
                    and s, roles=tuple(roles))
                on_topic = len(decoded(ran.settings, ran.topics["sales"]))
                assert stats["sales"]["events"] == on_topic == ran.published + len(new)
                assert stats["serving"] == 1
                assert stats["users_with_recommendations"] >= len(ran.lists)
        finally:
            for role in roles:
                role.stop()
    assert differences(results[embedded.name], results[ran.name]) == []


def _stats(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


