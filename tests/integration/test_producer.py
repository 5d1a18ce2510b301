"""`recsys produce` and `recsys consume` against the real broker, with a ledger: what the broker
acknowledged, what the topics hold, what went to the DLQ; loss and duplicates counted apart.

Every test writes to its own topics (`create_like` with a unique name), so tests sharing the
session broker never see each other's records. The restart tests take their own broker.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import threading
import time
from collections import Counter
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from recsys import cli as recsys_cli
from recsys.kafka import admin_config, producer_config, read_to_end
from recsys.paths import BUNDLED_DATA
from recsys.settings import Settings, load
from recsys.topics import create_like
from schemas import codec
from schemas.topics import SALES, SALES_DLQ, TOPICS
from streams import consume as consume_mod
from streams import producer as producer_mod
from streams.csv_source import CsvSource
from streams.producer import SalesProducer

pytestmark = pytest.mark.integration

ROWS = 20_000


def make_topics(settings: Settings, unique: str) -> tuple[str, str]:
    """A private copy of `sales` and `sales.dlq`: `t<unique>.sales`, `t<unique>.sales.dlq`."""
    prefix = f"t{unique}."
    create_like(settings, SALES, prefix + SALES)
    create_like(settings, SALES_DLQ, prefix + SALES_DLQ)
    return prefix + SALES, prefix + SALES_DLQ


def bundled_rows(limit: int) -> list[list[str]]:
    with gzip.open(BUNDLED_DATA, "rt", newline="") as f:
        reader = csv.reader(f)
        next(reader)
        return [row for _, row in zip(range(limit), reader, strict=False)]


# --- replay and read back ------------------------------------------------------------------------


def test_replay_first_rows_and_read_them_back(settings, unique):
    topic, dlq = make_topics(settings, unique)
    source = CsvSource(BUNDLED_DATA, limit=ROWS)
    expected = list(CsvSource(BUNDLED_DATA, limit=ROWS))
    with SalesProducer(settings, topic=topic, dlq_topic=dlq) as producer:
        summary = producer.run(source)

    rows = bundled_rows(ROWS)
    no_customer = [i for i, row in enumerate(rows, 1) if not row[6]]
    assert summary.ok, summary.line()
    assert summary.read == ROWS == summary.published + summary.dead_lettered
    assert summary.dead_lettered == len(no_customer) > 0
    assert (summary.failed, summary.unconfirmed) == (0, 0)

    # The sales topic holds exactly the mapped rows, keyed by user, nothing twice.
    msgs = read_to_end(settings, topic)
    decoded = [codec.decode(m.value(), expect="Sale")[1] for m in msgs]
    assert len(decoded) == summary.published
    assert all(m.key().decode() == d["user_id"] for m, d in zip(msgs, decoded, strict=True))
    by_id = {d["event_id"]: d for d in decoded}
    assert len(by_id) == len(decoded)
    want = {s["event_id"]: s for s, _ in expected if s is not None}
    assert by_id.keys() == want.keys()
    for event_id, sale in want.items():
        got = dict(by_id[event_id])
        got["event_time"] = int(got["event_time"].timestamp() * 1000)
        assert got == sale
    # Per user, order is kept (one key, one partition).
    first = next(s for s, _ in expected if s is not None)
    per_user = [d["event_id"] for d in decoded if d["user_id"] == first["user_id"]]
    assert per_user == sorted(per_user, key=lambda e: int(e.rsplit(":", 1)[1]))

    # The DLQ holds every row without a customer, with its reason and its text.
    letters = [codec.decode(m.value(), expect="DeadLetter")[1] for m in read_to_end(settings, dlq)]
    assert sorted(d["row_number"] for d in letters) == no_customer
    for d in letters:
        assert d["reason"] == "no user_id (CustomerID is empty)"
        assert d["source"] == f"online_retail.csv.gz:{d['row_number']}"
        assert d["stage"] == "produce"
        assert next(csv.reader(io.StringIO(d["original_row"]))) == rows[d["row_number"] - 1]


def test_failed_deliveries_are_counted_and_fail_the_run(settings, unique, capsys):
    """A topic that refuses every record (max.message.bytes too small): nothing is counted as
    published, every failure is reported, the CLI exits non-zero."""
    tiny, dlq = f"t{unique}.tiny", f"t{unique}.dlq"
    admin = AdminClient(admin_config(settings))
    futures = admin.create_topics([
        NewTopic(tiny, 1, 1, config={"max.message.bytes": "64"}),
        NewTopic(dlq, 1, 1),
    ])
    for future in futures.values():
        future.result(30)
    with SalesProducer(settings, topic=tiny, dlq_topic=dlq) as producer:
        summary = producer.run(CsvSource(BUNDLED_DATA, limit=700))
    assert summary.published == 0
    assert summary.dead_lettered > 0
    assert summary.failed == 700 - summary.dead_lettered
    assert not summary.ok and summary.errors
    assert "FAILED deliveries" in summary.line()

    args = recsys_cli.build_parser().parse_args(
        ["produce", "--limit", "50", "--topic", tiny, "--dlq-topic", dlq, "--no-progress"]
    )
    assert producer_mod.cli(settings, args) == 1
    assert "FAILED deliveries" in capsys.readouterr().out


# --- the commands --------------------------------------------------------------------------------


def run_cli(settings: Settings, argv: list[str]) -> int:
    """A `recsys` subcommand in this process (its handler, without re-configuring logging)."""
    args = recsys_cli.build_parser().parse_args(argv)
    return recsys_cli._resolve(args.handler)(settings, args)


def test_produce_and_consume_commands(settings, unique, capsys):
    prefix = f"t{unique}."
    topic, dlq = make_topics(settings, unique)
    assert run_cli(settings, ["produce", "--limit", "700", "--topic-prefix", prefix,
                              "--no-progress"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    sales, dead = 699, 1  # rows 1-700 of the bundled file: only row 623 has no CustomerID
    assert line.startswith(f"read 700 = published {sales} + dead-lettered {dead} in ")

    assert run_cli(settings, ["consume", topic, "--from-beginning", "--max", str(sales),
                              "--timeout", "20"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == sales
    assert {x["schema"] for x in lines} == {"Sale"}
    first = min((x for x in lines if x["value"]["event_id"] == "online_retail.csv.gz:1"),
                key=lambda x: x["offset"])
    assert first["key"] == "17850"
    assert first["value"]["event_time"] == "2010-12-01T08:26:00+00:00"
    assert first["value"]["quantity"] == 6

    assert run_cli(settings, ["consume", dlq, "--from-beginning", "--timeout", "3"]) == 0
    letters = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(letters) == dead
    assert letters[0]["value"]["reason"] == "no user_id (CustomerID is empty)"
    assert letters[0]["value"]["original_row"].startswith("536414,22139,,56,")

    # A synthetic stream, reproducible by seed.
    assert run_cli(settings, ["produce", "--synthetic", "--events", "1500", "--seed", "3",
                              "--topic-prefix", prefix, "--no-progress"]) == 0
    assert "read 1,500 = published 1,500 + dead-lettered 0" in capsys.readouterr().out


def test_consume_prints_undecodable_records_and_goes_on(settings, unique, capsys):
    topic, _ = make_topics(settings, unique)
    producer = Producer(producer_config(settings))
    sale = next(s for s, _ in CsvSource(BUNDLED_DATA, limit=1))
    for value in (b"not avro at all", codec.encode("Sale", sale), None):
        producer.produce(topic, value, key=b"\xff\xfe", partition=0)
    assert producer.flush(30) == 0
    assert run_cli(settings, ["consume", topic, "--from-beginning", "--max", "3",
                              "--timeout", "20"]) == 0
    bad, good, empty = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert bad["source"] == f"{topic}[0]@0" and "bad marker" in bad["error"]
    assert bad["key_base64"] == "//4="
    assert good["schema"] == "Sale" and good["value"]["event_id"] == "online_retail.csv.gz:1"
    assert empty["source"] == f"{topic}[0]@2" and empty["error"] == "null value"


def test_missing_topic_is_a_clear_error(settings, unique, capsys):
    assert run_cli(settings, ["consume", f"t{unique}.nothing", "--timeout", "1"]) == 2
    assert run_cli(settings, ["produce", "--limit", "1", "--topic-prefix", f"t{unique}.",
                              "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "recsys topics create" in err


def example(avro_type: Any, named: dict[str, Any]) -> Any:
    """A small valid value of any Avro type (so new schemas are covered without edits here)."""
    if isinstance(avro_type, list):
        branch = next((t for t in avro_type if t != "null"), "null")
        return example(branch, named)
    if isinstance(avro_type, str):
        simple = {"null": None, "string": "x", "int": 3, "long": 1291191960000,
                  "float": 1.5, "double": 2.5, "boolean": True, "bytes": b"\x00\x01"}
        return simple[avro_type] if avro_type in simple else example(named[avro_type], named)
    kind = avro_type["type"]
    if kind == "record":
        named[avro_type["name"]] = avro_type
        return {f["name"]: example(f["type"], named) for f in avro_type["fields"]}
    if kind == "array":
        return [example(avro_type["items"], named)]
    if kind == "map":
        return {"k": example(avro_type["values"], named)}
    if kind == "enum":
        named[avro_type["name"]] = avro_type
        return avro_type["symbols"][0]
    if kind == "fixed":
        return b"\x00" * avro_type["size"]
    return example(kind, named)


class FakeMessage:
    def __init__(self, topic: str, value: bytes | None, key: bytes | None = b"k") -> None:
        self._topic, self._value, self._key = topic, value, key

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return 9

    def timestamp(self) -> tuple[int, int]:
        return (1, 0)

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value


def test_consume_decodes_every_declared_schema(settings, unique, capsys):
    topic = f"t{unique}.all"
    create_like(settings, SALES, topic, partitions=1)
    names = sorted({t.value_schema for t in TOPICS if t.value_schema} | set(codec.schemas()))
    producer = Producer(producer_config(settings))
    for name in names:
        producer.produce(topic, codec.encode(name, example(codec.schema(name).parsed, {})))
    assert producer.flush(30) == 0
    assert run_cli(settings, ["consume", topic, "--from-beginning", "--max", str(len(names)),
                              "--timeout", "20"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x.get("schema") for x in lines] == names, lines
    assert all("error" not in x for x in lines)


def test_consume_renders_bytes_datetimes_and_schema_mismatch():
    letter = example(codec.schema("DeadLetter").parsed, {})
    line = json.loads(consume_mod.render(FakeMessage(SALES_DLQ, codec.encode("DeadLetter", letter)),
                                         "DeadLetter"))
    assert line["value"]["original_bytes"] == "AAE="
    assert line["value"]["failed_at"] == "2010-12-01T08:26:00+00:00"
    assert line["timestamp"] == "1970-01-01T00:00:00+00:00"
    # A DeadLetter where a Sale belongs is reported, not printed as a sale.
    wrong = json.loads(consume_mod.render(FakeMessage(SALES, codec.encode("DeadLetter", letter)),
                                          "Sale"))
    assert wrong["error"] == "schema DeadLetter where Sale was expected"
    assert wrong["source"] == "sales[0]@9"


# --- a broker restart in the middle of a replay --------------------------------------------------


def ident(value: bytes) -> str:
    """The input row a record stands for: a Sale's event_id, a dead letter's source."""
    name, record = codec.decode(value)
    return record["event_id"] if name == "Sale" else record["source"]


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_broker_restart_mid_replay_loses_nothing(broker_factory, tmp_path, unique, how):
    """Kill -9 (or stop) and restart the broker while a paced replay runs: every acknowledged
    event is on the topic afterwards; duplicates are counted separately (idempotence: none)."""
    broker = broker_factory.start()
    settings = load(kafka_bootstrap=broker.bootstrap, data_dir=tmp_path)
    topic, dlq = make_topics(settings, unique)
    acked: list[bytes] = []
    lock = threading.Lock()

    def ledger(err: Any, msg: Any) -> None:
        if err is None:
            with lock:
                acked.append(msg.value())

    rows = 30_000
    producer = SalesProducer(settings, topic=topic, dlq_topic=dlq, on_delivery=ledger)
    result: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: result.update(
            summary=producer.run(CsvSource(BUNDLED_DATA, limit=rows), rate=3000)
        )
    )
    thread.start()
    try:
        while len(acked) < 3000 and thread.is_alive():  # well into the replay
            time.sleep(0.05)
        before = len(acked)
        getattr(broker, how)()
        broker.start(timeout=120)
    finally:
        thread.join(timeout=300)
        producer.close()
    assert not thread.is_alive(), "the replay did not finish"
    summary = result["summary"]
    assert summary.ok, summary.line()
    assert summary.read == rows
    assert before < summary.published + summary.dead_lettered, "the restart came too late"

    acked_ids = Counter(ident(v) for v in acked)
    stored = Counter(ident(m.value()) for m in read_to_end(settings, topic))
    stored += Counter(ident(m.value()) for m in read_to_end(settings, dlq))
    lost = [e for e in acked_ids if e not in stored]
    duplicates = sum(n - 1 for n in stored.values() if n > 1)
    assert len(acked_ids) == summary.published + summary.dead_lettered == rows
    assert (len(lost), duplicates) == (0, 0), f"lost {len(lost)}, duplicates {duplicates}"
