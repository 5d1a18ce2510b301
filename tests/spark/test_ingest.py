"""The decode/split of `sales` records in Spark, the dead letters, the store's dedupe and the
encodings the job publishes, on hand-built DataFrames of bytes (Spark local, no broker)."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime

import fastavro
import pytest
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

from schemas import codec
from spark import ingest, publish
from spark.store import Store, StoreState, offset_ranges

pytestmark = pytest.mark.spark

KAFKA = "value binary, topic string, partition int, offset long"
SALE = {
    "event_id": "online_retail.csv.gz:2",
    "user_id": "17850",
    "product_id": "85123A",
    "quantity": 6,
    "event_time": datetime(2010, 12, 1, 8, 26, tzinfo=UTC),
    "unit_price": 2.55,
    "invoice_id": "536365",
    "description": "WHITE HANGING HEART T-LIGHT HOLDER",
    "country": "United Kingdom",
}


def _sale(**changes: object) -> bytes:
    return codec.encode("Sale", SALE | changes)


def _older_sale_schema() -> codec.Schema:
    """A Sale as an earlier producer might have written it: no description, no country."""
    current = json.loads(codec.schema("Sale").json)
    current["fields"] = [f for f in current["fields"] if f["name"] not in ("description",
                                                                          "country")]
    text = json.dumps(current)
    parsed = parse_schema(json.loads(text), _write_hint=False)
    fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
    return codec.Schema("Sale", "v0", parsed, text, fp)


def _frame(schema: codec.Schema, record: dict) -> bytes:
    buf = io.BytesIO()
    buf.write(schema.header)
    fastavro.schemaless_writer(buf, schema.parsed, record)
    return buf.getvalue()


def _decode(spark, values: list[bytes | None], known=None):
    rows = [(v, "sales", 0, i) for i, v in enumerate(values)]
    return ingest.decode(spark.createDataFrame(rows, KAFKA), known=known)


def _reasons(spark, values):
    return [r["reason"] for r in _decode(spark, values).orderBy("offset").collect()]


def test_good_record_decodes_to_the_sale_with_its_source(spark):
    good, bad = ingest.split(_decode(spark, [_sale()]))
    assert bad.count() == 0
    (row,) = good.collect()
    got = row.asDict()
    assert got.pop("source_topic") == "sales"
    assert got.pop("source_partition") == 0
    assert got.pop("source_offset") == 0
    assert got.pop("event_time").replace(tzinfo=UTC) == SALE["event_time"]
    assert got == {k: v for k, v in SALE.items() if k != "event_time"}


def test_every_kind_of_bad_record_gets_its_reason(spark):
    data = _sale()
    edge = codec.encode("GraphEdge", {"id": "1:u:p", "model_version": 1, "user_id": "u",
                                      "product_id": "p", "score": 1.0, "rank": 1,
                                      "because": []})
    values = [
        None,
        b"\xc3\x01\x00",
        b"\x00\x01" + data[2:],
        data[:2] + b"\xde\xad\xbe\xef\x00\x00\x00\x00" + data[10:],
        edge,
        data[:18],  # truncated body
        data[:10] + b"\x80\x80\x80\x80\x08xxxx",  # a string "length" of 2^30: no allocation
        _sale(user_id=""),
        _sale(event_id=""),
        data,
    ]
    assert _reasons(spark, values) == [
        "null value",
        "too short for single-object framing (3 bytes)",
        "bad marker 0001 (want c301)",
        "unknown schema fingerprint deadbeef00000000",
        "schema GraphEdge where Sale was expected",
        "body does not decode as Sale",
        "body does not decode as Sale",
        "required field user_id is empty",
        "required field event_id is empty",
        None,
    ]


def test_reasons_agree_with_the_python_codec(spark):
    data = _sale()
    values = [b"\xc3", b"\x00\x01" + data[2:], data[:2] + bytes(8) + data[10:], data[:18]]
    for value, reason in zip(values, _reasons(spark, values), strict=True):
        with pytest.raises(codec.DecodeError) as err:
            codec.decode(value, expect="Sale")
        assert str(err.value).startswith(reason)


def test_an_older_writer_schema_is_read_into_the_current_one(spark):
    old = _older_sale_schema()
    record = {k: v for k, v in SALE.items() if k not in ("description", "country")}
    values = [_frame(old, record), _sale()]
    good, bad = ingest.split(_decode(spark, values, known=[codec.schema("Sale"), old]))
    assert bad.count() == 0
    rows = {r["source_offset"]: r for r in good.collect()}
    assert rows[0]["user_id"] == SALE["user_id"] and rows[0]["country"] is None
    assert rows[1]["country"] == SALE["country"]
    # Without the old schema among the known ones, it is an unknown fingerprint.
    assert _reasons(spark, values[:1])[0].startswith("unknown schema fingerprint")


def test_dead_letters_round_trip_through_the_codec(spark):
    data = _sale()
    rows = [(data[:18], "sales", 1, 41), (data, "sales", 1, 42)]
    decoded = ingest.decode(spark.createDataFrame(rows, KAFKA))
    _, bad = ingest.split(decoded)
    (out,) = ingest.dead_letters(bad).collect()
    assert bytes(out["key"]) == b"sales[1]@41"
    name, dl = codec.decode(bytes(out["value"]))
    assert name == "DeadLetter"
    assert dl["source"] == "sales[1]@41"
    assert dl["stage"] == "stream"
    assert dl["reason"] == "body does not decode as Sale"
    assert dl["original_bytes"] == data[:18]
    assert (dl["source_topic"], dl["source_partition"], dl["source_offset"]) == ("sales", 1, 41)
    assert dl["original_row"] is None and dl["row_number"] is None


def test_recommendations_round_trip_through_the_codec(spark):
    recs = spark.createDataFrame(
        [("u1", [("p1", 0.5, 1), ("p2", 0.25, 2)]), ("u2", []), (None, [("p3", 0.1, 1)])],
        "user_id string, items array<struct<product_id string, score double, rank int>>",
    )
    at = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    out = {bytes(r["key"]): bytes(r["value"]) for r in
           publish.recommendation_rows(recs, 7, at).collect()}
    assert set(out) == {b"u1", b"u2"}  # no user id, no record
    name, rec = codec.decode(out[b"u1"])
    assert name == "Recommendation"
    assert rec == {
        "id": "7:u1", "user_id": "u1", "model_version": 7, "generated_at": at,
        "items": [{"product_id": "p1", "score": 0.5, "rank": 1},
                  {"product_id": "p2", "score": 0.25, "rank": 2}],
        "source": "retrain", "sale_event_id": None, "sale_timestamp": None,
    }
    assert codec.decode(out[b"u2"])[1]["items"] == []


@pytest.mark.parametrize("ids_via", ["pyarrow", "spark"])
def test_store_dedupes_within_a_batch_against_the_store_and_on_rerun(
    spark, tmp_path, monkeypatch, ids_via
):
    from spark import files
    from spark import store as store_mod

    if ids_via == "spark":  # what an hdfs: or s3a: store does
        monkeypatch.setattr(store_mod, "local_path", lambda path: None)
    store = Store(spark, str(tmp_path / "store"))

    def good(ids: list[str], offset: int):
        values = [_sale(event_id=i) for i in ids]
        rows = [(v, "sales", 0, offset + n) for n, v in enumerate(values)]
        return ingest.split(ingest.decode(spark.createDataFrame(rows, KAFKA)))[0]

    assert store.count() == 0
    assert store.append_batch(good(["a", "b", "b"], 0), "q", 0) == 2
    assert store.append_batch(good(["b", "c"], 3), "q", 1) == 1
    assert store.append_batch(good(["b", "c"], 3), "q", 1) == 1  # re-run: same folder again
    assert store.append_batch(good(["a", "d"], 5), "q2", 0) == 1  # new checkpoint, old ids
    # Repeated within the batch AND stored ("c"), repeated only ("e"), stored only ("a").
    assert store.append_batch(good(["c", "c", "e", "e", "a", "f"], 7), "q2", 1) == 2
    assert store.append_batch(good(["f", "g"], 13), "q2", 2) == 1
    assert store.append_batch(good([], 15), "q2", 3) == 0  # every record dead-lettered
    assert not files.exists(spark, store.batch_path("q2", 3))
    assert files.list_names(spark, str(tmp_path / "store/_staging/query_id=q2")) == []
    stored = store.read()
    assert sorted(r["event_id"] for r in stored.collect()) == ["a", "b", "c", "d", "e", "f", "g"]
    assert offset_ranges(stored) == [
        {"topic": "sales", "partition": 0, "from_offset": 0, "to_offset": 14}]
    state = StoreState(events=7)
    store.save_state(state)
    assert store.load_state() == state


def test_model_versions_come_from_latest_or_the_model_folders(spark, tmp_path):
    from spark.registry import Models

    models = Models(spark, str(tmp_path / "models"))
    assert models.next_version() == 1
    (tmp_path / "models" / "3").mkdir(parents=True)  # a saved model, published or not
    assert models.next_version() == 4
    models.record({"model_version": 2, "model_id": "2:x", "trigger": "manual", "events": 1})
    assert models.latest() == 2 and models.next_version() == 3  # LATEST wins: v3 is redone
