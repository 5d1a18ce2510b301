"""The fault matrix on one broker (issue 19): the whole stack as real processes (`recsys stream`,
`recsys speed`, `recsys aggregate`, started by the product's supervisor), faults injected with
real signals and a full disk, and every case ending with the ledger (tests/reliability/ledger.py).

The cases share one stack (its own broker, the declared topics, a store on a size-limited tmpfs)
and run in file order, each on top of what the ones before left: the ledger covers everything on
`sales` so far, so a later case also proves that an earlier fault left nothing behind. Starting
the stack once keeps the tier within minutes (a Spark driver JVM takes tens of seconds to start
on a busy 2-core machine).

R2 (a broker killed) and R4 (a Spark worker killed) need the three-broker cluster and the
standalone Spark workers: test_cluster_faults.py.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastavro
import pytest
from confluent_kafka import KafkaError, Producer
from fastavro.schema import parse_schema, to_parsing_canonical_form
from ledger import settle, speed_state_diff
from stack import Stack, wait_for

from recsys.kafka import producer_config, read_to_end
from recsys.topics import create_topics
from schemas import codec
from schemas import topics as T

pytestmark = pytest.mark.reliability
log = logging.getLogger(__name__)

ROLES = ("stream", "speed", "aggregate")
THRESHOLD = 4_000  # valid events per model: a few retrains over the module
STORE_MB = 64  # the store's tmpfs (R8 fills it)
SETTLE = 600.0  # upper bound for the outputs to catch up with the input (a loaded machine)


# --- the stack ----------------------------------------------------------------------------------
def _mount_tmpfs(folder: Path, size_mb: int) -> None:
    """A size-limited file system for the store, so R8 can fill it for real. Needs root (CI and
    this machine run as root); anywhere else the tier fails here, saying so, rather than pretend."""
    if os.geteuid() != 0:
        pytest.fail("the reliability tier mounts a size-limited tmpfs for the store (R8): run it "
                    "as root (as CI does)", pytrace=False)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs",
                    str(folder)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def stack(broker_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    broker = broker_factory.start()
    base = tmp_path_factory.mktemp("faults")
    store = base / "store"
    store.mkdir()
    _mount_tmpfs(store, STORE_MB)
    s = Stack(broker.bootstrap, base / "var", store_path=str(store), train_threshold=THRESHOLD,
              max_offsets_per_trigger=2_000)
    s.broker = broker  # type: ignore[attr-defined]
    create_topics(s.settings)
    s.start(*ROLES)
    try:
        yield s
    finally:
        s.stop_all()
        os.kill(broker.pid, signal.SIGCONT) if broker.pid else None  # never left paused
        subprocess.run(["umount", "-l", str(store)], check=False)


def _settled(stack: Stack, timeout: float = SETTLE) -> Any:
    ledger = settle(stack.settings, timeout, aggregator=stack.stats)
    log.info("%s", ledger.line())
    ledger.check()
    assert stack.exited(*ROLES) is None, stack.exited(*ROLES)
    return ledger


def _models(stack: Stack) -> list[dict[str, Any]]:
    return [codec.decode(m.value(), "ModelReady")[1]
            for m in read_to_end(stack.settings, T.MODEL_READY)]


def _wait_model(stack: Stack, version: int, timeout: float = 900.0) -> dict[str, Any]:
    return wait_for(f"model {version} on model-ready",
                    lambda: next((r for r in _models(stack) if r["model_version"] == version),
                                 None),
                    timeout, every=2, dead=lambda: stack.exited("stream"))


def _log_size(stack: Stack, role: str) -> int:
    path = stack.log_path(role)
    return path.stat().st_size if path.exists() else 0


def _log_since(stack: Stack, role: str, offset: int) -> str:
    with open(stack.log_path(role), "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def _produce(stack: Stack, records: list[tuple[bytes | None, bytes | None]], **conf: Any
             ) -> list[str | None]:
    """(key, value) to `sales` with the project's producer settings; each delivery's error
    name (None: acknowledged)."""
    producer = Producer(producer_config(stack.settings, **conf))
    results: list[str | None] = [None] * len(records)

    def done(i: int):
        return lambda err, _msg: results.__setitem__(i, err.name() if err else None)

    for i, (key, value) in enumerate(records):
        producer.produce(T.SALES, value, key, on_delivery=done(i))
    assert producer.flush(60) == 0
    return results


def _sale(event_id: str, **changes: Any) -> dict[str, Any]:
    return {"event_id": event_id, "user_id": "17850", "product_id": "85123A", "quantity": 2,
            "event_time": 1_291_000_000_000, **changes}


# --- R1 -----------------------------------------------------------------------------------------
def test_r1_poison_on_sales_is_dead_lettered_while_streaming(stack: Stack):
    """Random bytes, another schema's fingerprint, a truncated body, a required field missing,
    a key with no value: each in sales.dlq with its reason, the good records around them stored,
    every process alive. A record over the size limit is refused by the broker (never
    acknowledged, so never read)."""
    stack.feed(6_000)
    good = codec.encode("Sale", _sale("r1:good"))
    empty_user = _without_user()
    poison = {
        os.urandom(64): "bad marker",
        codec.encode("GraphEdge", {"id": "1:u:p", "model_version": 1, "user_id": "u",
                                   "product_id": "p", "score": 1.0, "rank": 1, "because": []}):
            "schema GraphEdge where Sale was expected",
        good[:2] + bytes.fromhex("0102030405060708") + good[10:]:
            "unknown schema fingerprint 0102030405060708",
        good[:14]: "body does not decode as Sale",
        empty_user: "required field user_id is empty",
        None: "null value",
    }
    acked = _produce(stack, [(b"poison", v) for v in poison] + [(b"17850", good)])
    assert acked == [None] * (len(poison) + 1)
    # Over the broker's message.max.bytes (1 MB): refused at the broker, never on the topic.
    too_big = _produce(stack, [(b"big", os.urandom(2_000_000))], **{"message.max.bytes": 3_000_000})
    assert too_big == [KafkaError(KafkaError.MSG_SIZE_TOO_LARGE).name()]
    stack.feed(2_000)  # the stream goes on past them
    _wait_model(stack, 1)
    ledger = _settled(stack)
    for reason in poison.values():
        assert any(r.startswith(reason) for r in ledger.reasons), (reason, ledger.reasons)
    assert ledger.model_version >= 1 and ledger.trained_users > 100, ledger.line()


def _without_user() -> bytes:
    """A Sale from a producer whose schema let user_id be null, framed with the current
    fingerprint: the null branch reads as an empty user."""
    schema = json.loads(codec.schema("Sale").json)
    for f in schema["fields"]:
        if f["name"] == "user_id":
            f["type"] = ["null", "string"]
    buf = io.BytesIO()
    buf.write(codec.schema("Sale").header)
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), _sale("r1:no-user",
                                                                         user_id=None))
    return buf.getvalue()


# --- R3 -----------------------------------------------------------------------------------------
def test_r3_driver_killed_mid_batch_and_mid_training_restarts_on_its_checkpoint(stack: Stack):
    """SIGKILL of `recsys stream` (Python driver and its JVM) while a batch is in its staging
    folder, then again while a model trains: each restart goes on from the checkpoint, the batch
    is stored once, the model is published."""
    staging = Path(stack.settings.store, "_staging")
    before = len(_models(stack))
    feeder = threading.Thread(target=stack.feed, args=(6_000, 1_500))
    feeder.start()
    try:
        wait_for("a batch in its staging folder", lambda: any(staging.rglob("batch_id=*")),
                 240, every=0.05, dead=lambda: stack.exited("stream"))
        stack.kill("stream")
        stack.start("stream")
        offset = _log_size(stack, "stream")
        wait_for("a model in training", lambda: re.search(
            r"training model \d+", _log_since(stack, "stream", offset)), 900, every=0.2,
            dead=lambda: stack.exited("stream"))
        stack.kill("stream")
        assert len(_models(stack)) == before, "the model was published before the kill"
    finally:
        feeder.join(300)
    stack.start("stream")
    _wait_model(stack, before + 1)
    ledger = _settled(stack)
    assert ledger.model_version == before + 1, ledger.line()
    versions = [r["model_version"] for r in _models(stack)]
    assert len(versions) == len(set(versions)), f"a model published twice: {versions}"


# --- R5 -----------------------------------------------------------------------------------------
def test_r5_aggregator_and_speed_layer_killed_under_load_recover_from_their_changelogs(
        stack: Stack):
    """SIGKILL of the aggregator and the speed layer while sales stream in at 1,000/s; both
    restart from their changelogs: the aggregator's totals equal the recomputation, and the
    speed layer's state equals every user's stored sales netted once."""
    stats0 = wait_for("the aggregator's stats", stack.stats, 120)
    feeder = threading.Thread(target=stack.feed, args=(8_000, 1_000))
    feeder.start()
    try:
        wait_for("the aggregator under load", lambda: (s := stack.stats()) and s["sales"][
            "events"] > stats0["sales"]["events"] + 1_000, 120, every=0.2,
            dead=lambda: stack.exited("aggregate"))
        stack.kill("aggregate")
        stack.kill("speed")
        stack.start("aggregate", "speed")
    finally:
        feeder.join(300)
    _settled(stack)
    differ: list[str] = []

    def agrees() -> bool:
        differ[:] = speed_state_diff(stack.settings)
        return not differ

    try:
        wait_for("the speed layer's state to equal the store", agrees, 120, every=2,
                 dead=lambda: stack.exited("speed"))
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {len(differ)} users differ, e.g. {differ[:5]}") from None


# --- R6 -----------------------------------------------------------------------------------------
def test_r6_schema_evolution_newer_and_older_writers(stack: Stack):
    """A producer with a newer Sale (an added optional field) beside consumers that do not know
    it yet: its records go to sales.dlq with their bytes and the reason (unknown fingerprint),
    none lost, the consumers unhurt; replayed once the consumers have the schema. A producer
    with an older Sale (every version in schemas/history): read into the current schema and
    stored."""
    newer = json.loads(codec.schema("Sale").json)
    newer["fields"].append({"name": "channel", "type": ["null", "string"], "default": None})
    parsed = parse_schema(newer, _write_hint=False)
    fingerprint = bytes.fromhex(fastavro.schema.fingerprint(
        to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
    buf = io.BytesIO()
    buf.write(codec.MARKER + fingerprint)
    fastavro.schemaless_writer(buf, parse_schema(newer), _sale("r6:newer", channel="app"))
    old_values = []
    for i, old in enumerate(codec.history("Sale")):
        b = io.BytesIO()
        b.write(old.header)
        fastavro.schemaless_writer(b, old.fast, _sale(f"r6:{old.version}:{i}"))
        old_values.append(b.getvalue())
    assert _produce(stack, [(b"17850", buf.getvalue())] + [(b"17850", v) for v in old_values]
                    ) == [None] * (1 + len(old_values))
    ledger = _settled(stack)
    assert ledger.reasons[f"unknown schema fingerprint {fingerprint.hex()}"] == 1
    letters = [codec.decode(m.value(), "DeadLetter")[1]
               for m in read_to_end(stack.settings, T.SALES_DLQ)]
    kept = [d for d in letters if d["stage"] == "stream" and d["reason"].startswith("unknown")
            and d["original_bytes"] == buf.getvalue()]
    assert kept, "the newer record's bytes are not in the DLQ to replay"


# --- R7 -----------------------------------------------------------------------------------------
PAUSE_S = 50  # longer than the clients' request (30-40 s) and session (45 s) timeouts


def test_r7_broker_paused_past_client_timeouts_every_client_recovers(stack: Stack):
    """SIGSTOP of the broker for longer than the clients' timeouts, sales produced meanwhile,
    then SIGCONT: every process recovers by itself (none restarted), the producer's records are
    all acknowledged, the outage is logged a few times per process, not a stack trace per
    record."""
    broker = stack.broker  # type: ignore[attr-defined]
    offsets = {role: _log_size(stack, role) for role in ROLES}
    pids = {role: stack.pid(role) for role in ROLES}
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        feeder = threading.Thread(target=stack.feed, args=(3_000,))
        feeder.start()
        time.sleep(PAUSE_S)  # the fault itself: the broker frozen this long
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    feeder.join(300)
    assert not feeder.is_alive(), "the producer did not finish after the broker resumed"
    _settled(stack)
    assert {role: stack.pid(role) for role in ROLES} == pids, "a process was restarted"
    for role in ROLES:
        text = _log_since(stack, role, offsets[role])
        traces = text.count("Traceback (most recent call last)")
        assert traces <= 3, f"{role}: {traces} stack traces for one outage:\n{text[-4000:]}"


# --- R8 -----------------------------------------------------------------------------------------
def test_r8_store_disk_full_stops_with_a_clear_error_and_resumes(stack: Stack):
    """The store's file system filled up: the job stops with one clear line, commits no offset
    it did not store (the ledger finds nothing missing after the restart), and resumes once
    there is space again."""
    store = Path(stack.settings.store)
    filler = store / "filler.bin"
    free = shutil.disk_usage(store).free
    with open(filler, "wb") as f:  # all but 32 KB: not enough for one batch's Parquet file
        f.truncate(0)
        chunk = b"\0" * (1 << 20)
        left = free - (32 << 10)
        while left > 0:
            f.write(chunk[: min(len(chunk), left)])
            left -= len(chunk)
    offset = _log_size(stack, "stream")
    try:
        stack.feed(3_000)
        wait_for("the stream job to stop on the full disk", lambda: stack.pid("stream") is None,
                 300, every=1)
        text = _log_since(stack, "stream", offset)
        assert re.search(r"ERROR +spark\.job: query failed: .*No space left on device$", text,
                         re.MULTILINE), text[-4000:]
    finally:
        filler.unlink()
    stack.start("stream")
    _settled(stack)


# --- R9 -----------------------------------------------------------------------------------------
def _banner(stack: Stack) -> str | None:
    """The status banner's text in a new dashboard session, pulled by Bokeh's own client (the
    document a browser would get), or None while the server does not answer."""
    from bokeh.client import pull_session

    url = f"http://127.0.0.1:{stack.settings.dashboard_port}/"
    try:
        with pull_session(url=url) as session:
            banner = session.document.select_one({"name": "banner"})
            return banner.text if banner is not None else None
    except OSError as exc:  # not listening yet (Bokeh raises IOError)
        log.debug("dashboard at %s: %s", url, exc)
        return None


def test_r9_restarted_dashboard_shows_the_current_state_at_once(stack: Stack):
    """SIGKILL of the dashboard, restarted with no new input: its first session shows the model
    in service (its feed replays the result topics before it says it caught up)."""
    serving = max(r["model_version"] for r in _models(stack))
    stack.start("dashboard")
    try:
        wait_for("the dashboard's banner", lambda: (b := _banner(stack)) and
                 f"Model v{serving}" in b, 180, every=1, dead=lambda: stack.exited("dashboard"))
        stack.kill("dashboard")
        offset = _log_size(stack, "dashboard")
        stack.start("dashboard")
        started = time.monotonic()
        wait_for("the restarted dashboard to catch up", lambda: "caught up" in _log_since(
            stack, "dashboard", offset), 120, every=0.2, dead=lambda: stack.exited("dashboard"))
        banner = wait_for("a session", lambda: _banner(stack), 30, every=0.2)
        log.info("restarted dashboard: the first session %.1f s after the start",
                 time.monotonic() - started)
        assert f"Model v{serving}" in banner, banner
    finally:
        stack.stop("dashboard")
    _settled(stack)
