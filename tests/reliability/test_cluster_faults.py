"""The fault matrix's cluster cases (issue 19): R2, a Kafka broker SIGKILLed, and R4, a Spark
worker SIGKILLed, on the loopback cluster (the session's `cluster` fixture: three KRaft brokers
with replication 3 and min ISR 2, a Spark standalone master and two one-core workers).

`recsys stream` runs on the Spark cluster (executors in the workers' JVMs), started by the
product's supervisor under a topic prefix of its own, so it shares the cluster with other tests;
each case ends with the ledger (tests/reliability/ledger.py). The cases run in file order on one
stack.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ledger import settle
from stack import Stack, wait_for

from recsys.kafka import read_to_end
from recsys.topics import create_topics, renamed
from schemas import codec
from schemas import topics as T

pytestmark = pytest.mark.reliability
log = logging.getLogger(__name__)

THRESHOLD = 4_000
SETTLE = 600.0


@pytest.fixture(scope="module")
def stack(cluster: Any) -> Iterator[Stack]:
    prefix = f"r{uuid.uuid4().hex[:6]}."
    shared = cluster.settings()
    store = Path(shared.store) / prefix  # state on the folder every node sees
    s = Stack(cluster.bootstrap, cluster.shared_dir / f"{prefix}var", prefix=prefix,
              store_path=str(store), spark_master=cluster.spark_master,
              topic_replication=shared.topic_replication,
              checkpoint_path=f"{shared.checkpoints}/{prefix}",
              models_path=f"{shared.models}/{prefix}", export_dir=shared.export_dir / prefix,
              train_threshold=THRESHOLD, max_offsets_per_trigger=2_000)
    s.cluster = cluster  # type: ignore[attr-defined]
    create_topics(s.settings, names=renamed(prefix))
    s.start("stream")
    try:
        yield s
    finally:
        s.stop_all()


def _models(stack: Stack) -> list[dict[str, Any]]:
    return [codec.decode(m.value(), "ModelReady")[1]
            for m in read_to_end(stack.settings, stack.prefix + T.MODEL_READY)]


def _settled(stack: Stack) -> Any:
    ledger = settle(stack.settings, SETTLE, prefix=stack.prefix)
    log.info("%s", ledger.line())
    ledger.check()
    assert stack.exited("stream") is None, stack.exited("stream")
    return ledger


def _log_size(stack: Stack) -> int:
    path = stack.log_path("stream")
    return path.stat().st_size if path.exists() else 0


def _log_since(stack: Stack, offset: int) -> str:
    with open(stack.log_path("stream"), "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def test_r2_broker_killed_during_a_replay_and_a_retrain_loses_no_acknowledged_event(
        stack: Stack):
    """SIGKILL of one broker while the producer replays (acks=all, min ISR 2: every
    acknowledged sale is on two brokers), restarted; then of another while a model trains.
    Every acknowledged sale is stored or dead-lettered, the model is published, the job never
    restarts."""
    cluster = stack.cluster  # type: ignore[attr-defined]
    pid = stack.pid("stream")
    done: dict[str, Any] = {}
    feeder = threading.Thread(target=lambda: done.update(summary=stack.feed(6_000, 1_500)))
    offset = _log_size(stack)
    feeder.start()
    try:
        wait_for("the job storing the replay", lambda: re.search(
            r"batch \d+: \d+ read", _log_since(stack, offset)), 300, every=0.2,
            dead=lambda: stack.exited("stream"))
        victim = cluster.brokers[0]
        victim.kill()
        feeder.join(300)
        assert "summary" in done and done["summary"].ok, "the producer lost a sale"
        victim.restart()
        offset = _log_size(stack)
        stack.feed(1_000)  # past the threshold, if the replay was not
        wait_for("a model in training", lambda: re.search(
            r"training model \d+", _log_since(stack, offset)), 900, every=0.2,
            dead=lambda: stack.exited("stream"))
        victim = cluster.brokers[1]
        victim.kill()
        wait_for("model-ready with a broker down", lambda: _models(stack), 900, every=2,
                 dead=lambda: stack.exited("stream"))
        victim.restart()
    finally:
        feeder.join(300)
    ledger = _settled(stack)
    assert ledger.model_version >= 1 and ledger.trained_users > 0, ledger.line()
    assert stack.pid("stream") == pid, "the job was restarted"


def test_r4_worker_killed_mid_batch_the_batch_completes_on_the_other(stack: Stack):
    """SIGKILL of a Spark worker (and its executor) while a batch is in its staging folder: the
    batch completes on the other worker, the job goes on (no restart), the ledger balances;
    the worker then rejoins."""
    cluster = stack.cluster  # type: ignore[attr-defined]
    pid = stack.pid("stream")
    staging = Path(stack.settings.store, "_staging")
    feeder = threading.Thread(target=stack.feed, args=(6_000, 1_500))
    feeder.start()
    try:
        wait_for("a batch in its staging folder", lambda: any(staging.rglob("batch_id=*")),
                 300, every=0.05, dead=lambda: stack.exited("stream"))
        worker = cluster.workers[0]
        os.killpg(worker.pid, signal.SIGKILL)  # the worker and its executor: a host gone
        worker.kill()  # (forgets the dead pid)
        feeder.join(300)
        _settled(stack)
        assert stack.pid("stream") == pid, "the job was restarted"
    finally:
        feeder.join(300)
        cluster.workers[0].restart()
