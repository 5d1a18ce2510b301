"""The single-object framing: round trips, and every kind of bad input is told apart."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from schemas import codec
from schemas.codec import DecodeError

pytestmark = pytest.mark.unit

SALE = {
    "event_id": "online_retail.csv.gz:2",
    "user_id": "17850",
    "product_id": "85123A",
    "quantity": -6,
    "event_time": datetime(2010, 12, 1, 8, 26, tzinfo=UTC),
    "unit_price": 2.55,
    "invoice_id": "C536365",
    "description": "WHITE HANGING HEART T-LIGHT HOLDER",
    "country": "United Kingdom",
}


def test_round_trip():
    data = codec.encode("Sale", SALE)
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == codec.schema("Sale").fingerprint
    name, record = codec.decode(data)
    assert name == "Sale"
    assert record == SALE


def test_encoder_matches_encode():
    assert codec.Encoder("Sale")(SALE) == codec.encode("Sale", SALE)


def test_fingerprint_is_crc64_avro_little_endian():
    # The Avro specification's test vector: fingerprint64("int") == 0x7275d51a3f395c8f,
    # written little-endian in the single-object header.
    from fastavro.schema import fingerprint

    assert bytes.fromhex(fingerprint('"int"', "CRC-64-AVRO")) == (0x7275D51A3F395C8F).to_bytes(
        8, "little"
    )


def test_other_schemas_fingerprint_is_rejected_when_a_sale_is_expected():
    edge = codec.encode(
        "GraphEdge",
        {"id": "1:u:p", "model_version": 1, "user_id": "u", "product_id": "p", "score": 1.0,
         "rank": 1, "because": []},
    )
    with pytest.raises(DecodeError, match="GraphEdge where Sale was expected"):
        codec.decode(edge, expect="Sale")


def test_unknown_fingerprint():
    data = codec.encode("Sale", SALE)
    forged = data[:2] + b"\x00" * 8 + data[10:]
    with pytest.raises(DecodeError, match="unknown schema fingerprint 0000000000000000"):
        codec.decode(forged)


@pytest.mark.parametrize(
    "data, reason",
    [
        (None, "null value"),
        (b"\xc3\x01abc", "too short"),
        (b'{"json": "not avro"}', "bad marker"),
    ],
)
def test_bad_framing(data, reason):
    with pytest.raises(DecodeError, match=reason):
        codec.decode(data)


def test_truncated_body():
    data = codec.encode("Sale", SALE)
    with pytest.raises(DecodeError, match="body does not decode as Sale"):
        codec.decode(data[:14])


@pytest.mark.parametrize("field", ["event_id", "user_id", "product_id"])
def test_an_empty_required_id_is_rejected_as_spark_ingest_rejects_it(field):
    """Every reader (Spark's ingest, the speed layer, the aggregator) tells the same sales
    apart: a Sale with no user, product or event id is a dead letter everywhere."""
    from streams.faust_codec import AvroCodec, Undecodable

    data = codec.encode("Sale", {**SALE, field: ""})
    with pytest.raises(DecodeError, match=f"^required field {field} is empty$"):
        codec.decode(data)
    bad = AvroCodec("Sale").loads(data)  # the aggregator's fast path
    assert isinstance(bad, Undecodable) and bad.reason == f"required field {field} is empty"


def test_every_schema_round_trips_generated_records():
    from fastavro.utils import generate_many

    for name, s in codec.schemas().items():
        for record in generate_many(s.parsed, 20):
            got_name, got = codec.decode(codec.encode(name, record))
            assert got_name == name


def test_faust_codec_reads_what_decode_reads_and_never_raises():
    """The aggregator's codec (its own fast path for the current schema) agrees with decode."""
    from fastavro.utils import generate_many

    from streams.faust_codec import AvroCodec, Undecodable

    for name, s in codec.schemas().items():
        faust_codec = AvroCodec(name)
        for record in generate_many(s.parsed, 20):
            data = codec.encode(name, record)
            assert faust_codec.loads(data) == codec.decode(data, expect=name)[1]
    bad = AvroCodec("Sale").loads(codec.encode("Sale", SALE)[:14])
    assert isinstance(bad, Undecodable) and bad.reason.startswith("body does not decode as Sale")
