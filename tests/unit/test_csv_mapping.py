"""CSV rows -> Sale records or dead letters, and the producer's fast Avro encoding of both."""

from __future__ import annotations

import gzip
import random
from datetime import UTC, datetime
from pathlib import Path

import pytest

from recsys.csv_mapping import CsvMapping
from recsys.paths import BUNDLED_DATA
from schemas import codec
from schemas.flat_encoder import FlatEncoder, encoder
from streams import csv_source
from streams.csv_source import BadRow, CsvSource, RowMapper

pytestmark = pytest.mark.unit

HEADER = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country"


def ms(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp() * 1000)


def write(tmp_path: Path, text: str, name: str = "in.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8", newline="")
    return path


def items(path: Path, mapping: CsvMapping | None = None, **kw) -> list:
    return list(CsvSource(path, mapping, **kw))


# --- the bundled file ------------------------------------------------------------------------


def test_bundled_header_maps_the_first_rows():
    out = items(BUNDLED_DATA, limit=3)
    assert [dead for _, dead in out] == [None, None, None]
    first = out[0][0]
    assert first == {
        "event_id": "online_retail.csv.gz:1",
        "user_id": "17850",
        "product_id": "85123A",
        "quantity": 6,
        "event_time": ms(2010, 12, 1, 8, 26),  # GMT in December: UK time == UTC
        "unit_price": 2.55,
        "invoice_id": "536365",
        "description": "WHITE HANGING HEART T-LIGHT HOLDER",
        "country": "United Kingdom",
    }
    assert [s["event_id"] for s, _ in out] == [f"online_retail.csv.gz:{i}" for i in (1, 2, 3)]


def test_bundled_file_splits_as_documented():
    """data/README.md: 541,909 rows, 135,080 without CustomerID; everything else is a Sale."""
    source = CsvSource(BUNDLED_DATA)
    sales = dead = negative = 0
    reasons: set[str] = set()
    for sale, letter in source:
        if sale is not None:
            sales += 1
            negative += sale["quantity"] < 0
        else:
            dead += 1
            reasons.add(letter["reason"])
    assert (sales + dead, sales, dead) == (541_909, 406_829, 135_080)
    assert source.rows_read == 541_909
    assert reasons == {"no user_id (CustomerID is empty)"}
    assert negative == 8_905  # returns among rows with a customer


def test_skip_and_limit_keep_row_numbers(tmp_path):
    path = write(tmp_path, HEADER + "\n" + "".join(
        f"5{i},P{i},d,1,2011-01-01 10:00:00,1.0,1{i},UK\n" for i in range(1, 8)
    ))
    out = items(path, skip=2, limit=3)
    assert [s["event_id"] for s, _ in out] == ["in.csv:3", "in.csv:4", "in.csv:5"]
    assert items(path, skip=10) == []


# --- mapping rules ---------------------------------------------------------------------------


def test_custom_columns_semicolon_and_epoch_ms(tmp_path):
    path = write(tmp_path, (
        "when;who;sku;n;price\n"
        "1291191960000;u1;A-1;3;\n"
        "1291191960123;u2;B-2;-1;9.5\n"
    ), name="shop.csv")
    mapping = CsvMapping(
        user_col="who", product_col="sku", quantity_col="n", time_col="when",
        price_col="price", invoice_col="", description_col="", country_col="",
        time_format="epoch-ms", delimiter=";",
    )
    (a, none_a), (b, none_b) = items(path, mapping)
    assert none_a is None and none_b is None
    assert a == {
        "event_id": "shop.csv:1", "user_id": "u1", "product_id": "A-1", "quantity": 3,
        "event_time": 1291191960000, "unit_price": None, "invoice_id": None,
        "description": None, "country": None,
    }
    assert (b["quantity"], b["event_time"], b["unit_price"]) == (-1, 1291191960123, 9.5)


def test_iso_times_with_and_without_offset(tmp_path):
    path = write(tmp_path, (
        "t,u,p,q\n"
        "2011-06-01T12:00:00,u,p,1\n"  # naive: Europe/London summer time, UTC+1
        "2011-06-01T12:00:00+02:00,u,p,1\n"
        "2011-06-01T12:00:00Z,u,p,1\n"
    ))
    mapping = CsvMapping(user_col="u", product_col="p", quantity_col="q", time_col="t",
                         price_col="", invoice_col="", description_col="", country_col="",
                         time_format="iso")
    times = [s["event_time"] for s, _ in items(path, mapping)]
    assert times == [ms(2011, 6, 1, 11), ms(2011, 6, 1, 10), ms(2011, 6, 1, 12)]


def test_strptime_format_and_timezone(tmp_path):
    row = "536365,85123A,X,6,{t},2.55,17850.0,United Kingdom\n"
    path = write(tmp_path, HEADER + "\n" + row.format(t="01/07/2011 09:15"))
    london = items(path, CsvMapping(time_format="%d/%m/%Y %H:%M"))[0][0]
    assert london["event_time"] == ms(2011, 7, 1, 8, 15)
    assert london["user_id"] == "17850"  # the float form pandas writes
    utc = items(path, CsvMapping(time_format="%d/%m/%Y %H:%M", timezone="UTC"))[0][0]
    assert utc["event_time"] == ms(2011, 7, 1, 9, 15)


def test_cancellation_is_a_return(tmp_path):
    path = write(tmp_path, HEADER + "\n"
                 "C536379,D,Discount,-1,2010-12-01 09:41:00,27.5,14527,United Kingdom\n"
                 "C536380,22423,CAKESTAND,2,2010-12-01 09:41:00,10.95,14527,United Kingdom\n"
                 "536381,22423,CAKESTAND,2,2010-12-01 09:41:00,10.95,14527,United Kingdom\n")
    quantities = [s["quantity"] for s, _ in items(path)]
    assert quantities == [-1, -2, 2]


BAD_ROWS = [
    ("536414,22139,,56,2010-12-01 11:52:00,0.0,,United Kingdom",
     "no user_id (CustomerID is empty)"),
    ("536414,,X,56,2010-12-01 11:52:00,0.0,12345,United Kingdom",
     "no product_id (StockCode is empty)"),
    ("536414,22139,X,many,2010-12-01 11:52:00,0.0,12345,United Kingdom",
     "unparsable quantity 'many'"),
    ("536414,22139,X,1.5,2010-12-01 11:52:00,0.0,12345,United Kingdom",
     "quantity '1.5' is not a whole number"),
    ("536414,22139,X,1,yesterday,0.0,12345,United Kingdom",
     "unparsable event_time 'yesterday' (format '%Y-%m-%d %H:%M:%S')"),
    ("536414,22139,X,1,2010-12-01 11:52:00,cheap,12345,United Kingdom",
     "unparsable unit_price 'cheap'"),
    ("536414,22139,X,1,2010-12-01 11:52:00,nan,12345,United Kingdom",
     "unit_price 'nan' is not a finite number"),
    ("536414,22139,X,1,2010-12-01 11:52:00,1.0,12345", "7 fields where the header has 8"),
    ('536414,22139,"TWO\nLINES",1,2010-12-01 11:52:00,1.0,,UK', "no user_id (CustomerID is empty)"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_ROWS)
def test_bad_row_becomes_a_dead_letter_with_its_reason(tmp_path, line, reason):
    good = "536365,85123A,X,6,2010-12-01 08:26:00,2.55,17850,United Kingdom"
    path = write(tmp_path, f"{HEADER}\r\n{good}\r\n{line}\r\n{good}\r\n")
    out = items(path)
    assert [s is not None for s, _ in out] == [True, False, True]
    letter = out[1][1]
    assert letter["reason"] == reason
    assert letter["original_row"] == line  # exactly as in the file, without the line end
    assert (letter["source"], letter["row_number"], letter["stage"]) == ("in.csv:2", 2, "produce")
    assert out[2][0]["event_id"] == "in.csv:3"
    codec.decode(codec.encode("DeadLetter", letter), expect="DeadLetter")


def test_blank_lines_are_not_rows(tmp_path):
    path = write(tmp_path, HEADER + "\n\n536365,85123A,X,6,2010-12-01 08:26:00,2.55,1,UK\n\n")
    source = CsvSource(path)
    out = list(source)
    assert [s["event_id"] for s, _ in out] == ["in.csv:1"]
    assert (source.rows_read, source.blank_lines) == (1, 2)


def test_missing_column_is_reported_before_reading(tmp_path):
    path = write(tmp_path, "a;b;c\n1;2;3\n")
    with pytest.raises(ValueError, match="no column 'CustomerID'"):
        CsvSource(path).check()
    with pytest.raises(ValueError, match="unknown timezone"):
        RowMapper(HEADER.split(","), CsvMapping(timezone="Mars/Olympus"), "x")


@pytest.mark.parametrize("block", [64, 1 << 20])
def test_gzip_input_and_long_rows_across_read_blocks(tmp_path, monkeypatch, block):
    """Quoted fields spanning lines, in a file larger than one read block; with tiny blocks,
    rows straddle block ends."""
    monkeypatch.setattr(csv_source._Lines, "BLOCK", block)
    lines = [HEADER]
    for i in range(1, 30_001):
        desc = f'"multi\nline {i}"' if i % 1000 == 0 else f"item {i}"
        user = "" if i % 7 == 0 else str(10000 + i % 50)
        lines.append(f"5{i},P{i % 300},{desc},1,2011-01-01 10:00:00,1.0,{user},UK")
    path = tmp_path / "big.csv.gz"
    with gzip.open(path, "wt", newline="") as f:
        f.write("\n".join(lines) + "\n")
    out = items(path)
    assert len(out) == 30_000
    dead = [d for _, d in out if d is not None]
    assert len(dead) == 30_000 // 7
    assert all(d["original_row"] == lines[d["row_number"]] for d in dead)
    assert {d["row_number"] for d in dead} == {i for i in range(1, 30_001) if i % 7 == 0}
    assert out[999][0]["description"] == "multi\nline 1000"


def test_row_mapper_raises_badrow():
    mapper = RowMapper(HEADER.split(","), CsvMapping(), "f")
    with pytest.raises(BadRow, match="no user_id"):
        mapper(["1", "P", "d", "1", "2011-01-01 00:00:00", "1", " ", "UK"], 1)


# --- fast encoding: the same bytes as schemas.codec ---------------------------------------------


def random_sale(rng: random.Random, i: int) -> dict:
    text = "".join(rng.choice("abcXYZ é€😀,\"") for _ in range(rng.randint(0, 90)))
    return {
        "event_id": f"f:{i}",
        "user_id": str(rng.randint(0, 10**6)),
        "product_id": rng.choice(["85123A", "POST", "", "x" * 70]),
        "quantity": rng.choice([0, 1, -1, 63, 64, -64, -65, 80995, -80995, 2**31 - 1, -(2**31)]),
        "event_time": rng.choice([0, 1291191960000, -1, 253402300799999, datetime(2011, 1, 1, tzinfo=UTC)]),
        "unit_price": rng.choice([None, 0.0, 2.55, -11062.06, 1e300]),
        "invoice_id": rng.choice([None, "536365", "C536379"]),
        "description": rng.choice([None, text]),
        "country": rng.choice([None, "United Kingdom", "EIRE"]),
    }


def test_flat_encoder_writes_the_codec_bytes():
    rng = random.Random(7)
    fast, slow = FlatEncoder("Sale", unique=("event_id",)), codec.Encoder("Sale")
    for i in range(3000):
        sale = random_sale(rng, i)
        data = fast(sale)
        assert data == slow(sale), sale
        if all(sale[f] for f in ("event_id", "user_id", "product_id")):
            assert codec.decode(data, expect="Sale")[1]["event_id"] == sale["event_id"]
        else:  # the bytes are the same; every reader refuses a sale with an empty id
            with pytest.raises(codec.DecodeError, match="is empty"):
                codec.decode(data, expect="Sale")


def test_flat_encoder_dead_letter_and_every_flat_schema():
    letter = {
        "source": "sales[1]@42", "stage": "stream", "reason": "bad marker", "failed_at": 5,
        "original_bytes": bytes(range(256)), "original_row": None, "source_topic": "sales",
        "source_partition": 1, "source_offset": 2**40, "row_number": None,
    }
    assert FlatEncoder("DeadLetter")(letter) == codec.encode("DeadLetter", letter)
    # Schemas with arrays or maps are not flat: `encoder` falls back to the codec.
    for name in codec.schemas():
        enc = encoder(name)
        assert isinstance(enc, FlatEncoder | codec.Encoder)


def test_flat_encoder_refuses_bad_values():
    fast = FlatEncoder("Sale")
    sale = random_sale(random.Random(1), 1)
    with pytest.raises(ValueError, match="Avro int"):
        fast({**sale, "quantity": 2**31})
    with pytest.raises((TypeError, AttributeError)):
        fast({**sale, "user_id": None})
    with pytest.raises(KeyError):
        fast({k: v for k, v in sale.items() if k != "country"})


# --- the fused path (row -> encoded Sale in one step) equals map-then-encode ----------------------


def both_paths(source: CsvSource) -> tuple[list, list]:
    enc_sale, enc_dead = FlatEncoder("Sale", unique=("event_id",)), FlatEncoder("DeadLetter")

    def comparable(to_dlq: bool, key: str, value: bytes) -> tuple:
        name, record = codec.decode(value)
        if to_dlq:
            record.pop("failed_at")  # the clock, not the row
            return to_dlq, key, record
        return to_dlq, key, value

    fast = [comparable(*t) for t in source.encoded(enc_sale, enc_dead)]
    slow = [
        comparable(False, s["user_id"], codec.encode("Sale", s)) if s is not None
        else comparable(True, d["source"], codec.encode("DeadLetter", d))
        for s, d in source
    ]
    return fast, slow


def test_fused_encoding_equals_map_then_encode_on_the_bundled_rows():
    fast, slow = both_paths(CsvSource(BUNDLED_DATA, skip=20_000, limit=20_000))
    assert len(fast) == 20_000
    assert fast == slow


def test_fused_encoding_edge_rows(tmp_path):
    path = write(tmp_path, HEADER + "\n"
                 "536365,85123A,X,6,2010-12-01 08:26:00,2.55,17850.0,United Kingdom\n"
                 "C536366,85123A,X,6,2010-12-01 08:26:00,2.55,17850.0,United Kingdom\n"
                 "536367,85123A,X,6,2010-12-01 08:26:00,2.55,17850.0,United Kingdom\n"
                 "C536368,85123A,,-6,2010-12-01 08:26:00,,17850,\n"
                 "536369,85123A,,-6,2010-12-01 08:26:00,,17850,\n"
                 "536369, 85123A ,X,6,2010-12-01 08:26:00,2.55,,United Kingdom\n"
                 ",85123A,X,6,2010-12-01 08:26:00,2.55,1,United Kingdom\n")
    fast, slow = both_paths(CsvSource(path))
    assert fast == slow
    assert [codec.decode(v)[1]["quantity"] for dlq, _, v in fast if not dlq] == [6, -6, 6, -6,
                                                                                 -6, 6]


def test_fused_path_steps_aside_when_a_column_is_not_mapped(tmp_path):
    path = write(tmp_path, HEADER + "\n536365,85123A,X,6,2010-12-01 08:26:00,2.55,1,UK\n")
    mapping = CsvMapping(country_col="")
    mapper = RowMapper(HEADER.split(","), mapping, "in.csv")
    assert mapper.row_encoder(FlatEncoder("Sale")) is None
    assert RowMapper(HEADER.split(","), CsvMapping(), "x").row_encoder(object()) is None
    fast, slow = both_paths(CsvSource(path, mapping))
    assert fast == slow and len(fast) == 1


def test_a_row_longer_than_the_kept_blocks_is_rendered_from_its_fields(tmp_path, monkeypatch):
    monkeypatch.setattr(csv_source._Lines, "BLOCK", 8)  # one line per block
    monkeypatch.setattr(csv_source._Lines, "KEEP", 1)
    line = '536414,22139,"THREE\nLINE\nTEXT",1,2010-12-01 11:52:00,1.0,,UK'
    path = write(tmp_path, f"{HEADER}\n{line}\n536365,85123A,X,6,2010-12-01 08:26:00,2.55,1,UK\n")
    (_, letter), (sale, _) = items(path)
    assert letter["original_row"] == line  # the same text, rebuilt by the csv writer
    assert sale["event_id"] == "in.csv:2"


def test_mapping_from_the_cli_flags():
    from recsys.cli import build_parser

    args = build_parser().parse_args(["produce"])
    assert CsvMapping.from_args(args) == CsvMapping()
    args = build_parser().parse_args(["produce", "--user-col", "who", "--delimiter", "\\t",
                                      "--time-format", "epoch-ms", "--country-col", ""])
    mapping = CsvMapping.from_args(args)
    assert (mapping.user_col, mapping.delimiter, mapping.time_format, mapping.country_col) == (
        "who", "\t", "epoch-ms", "")
    with pytest.raises(ValueError, match="one character"):
        CsvMapping(delimiter=";;")


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeff".encode() + (HEADER + "\n536365,85123A,X,6,2010-12-01 08:26:00,"
                                           "2.55,17850,UK\n").encode())
    assert items(path)[0][0]["invoice_id"] == "536365"
