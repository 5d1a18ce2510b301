"""The mapping a user's CSV gets (recsys/csv_mapping.py): optional columns, `--mapping auto`,
time format detection, and every mapping mistake as one golden line with exit status 2 from
`recsys produce`, `recsys train --file` and `recsys inspect`, before any broker or Spark."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from recsys import cli
from recsys.csv_mapping import (
    CsvMapping,
    MappingError,
    as_flags,
    detect_time_format,
    guess_column,
    resolve,
)
from recsys.paths import BUNDLED_DATA
from recsys.settings import load
from streams.csv_source import CsvSource

pytestmark = pytest.mark.unit

FOUR = "customer,item,amount,when\nc1,i1,2,2011-01-02 10:00:00\nc2,i2,1,2011-01-03 11:00:00\n"
FOUR_FLAGS = ["--user-col", "customer", "--product-col", "item", "--quantity-col", "amount",
              "--time-col", "when"]


def run(argv: list[str]) -> int:
    """A `recsys` subcommand's handler as `recsys.cli.main` calls it (logging left alone), with
    a bootstrap where nothing listens: past the mapping, a command fails on the broker."""
    args = cli.build_parser().parse_args(argv)
    return cli._resolve(args.handler)(load(kafka_bootstrap="127.0.0.1:1"), args)


def write(tmp_path: Path, text: str, name: str = "in.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8", newline="")
    return path


def error(path: Path, auto: bool = False, **given: str) -> str:
    with pytest.raises(MappingError) as exc:
        resolve(path, given, auto=auto)
    return str(exc.value)


# --- optional columns are optional ---------------------------------------------------------------


def test_four_columns_with_the_four_flags_only(tmp_path):
    path = write(tmp_path, FOUR)
    given = dict(user_col="customer", product_col="item", quantity_col="amount", time_col="when")
    mapping = resolve(path, given).mapping
    assert mapping == CsvMapping(
        user_col="customer", product_col="item", quantity_col="amount", time_col="when",
        price_col="", invoice_col="", description_col="", country_col="",
    )
    (sale, dead), _ = list(CsvSource(path, mapping))
    assert dead is None
    assert (sale["user_id"], sale["product_id"], sale["quantity"], sale["unit_price"],
            sale["invoice_id"], sale["country"]) == ("c1", "i1", 2, None, None, None)


def test_an_unnamed_optional_column_the_file_has_is_mapped(tmp_path):
    path = write(tmp_path, "customer,item,amount,when,Country\nc,i,1,2011-01-02 10:00:00,UK\n")
    mapping = resolve(path, dict(user_col="customer", product_col="item", quantity_col="amount",
                                 time_col="when")).mapping
    assert (mapping.country_col, mapping.price_col) == ("Country", "")


def test_a_named_optional_column_the_file_lacks_is_an_error(tmp_path):
    path = write(tmp_path, FOUR)
    assert error(path, user_col="customer", product_col="item", quantity_col="amount",
                 time_col="when", price_col="prise") == (
        f"{path}: no column 'prise' for --price-col; the file's columns are customer, item, "
        "amount, when"
    )


def test_an_empty_name_leaves_an_optional_column_out(tmp_path):
    mapping = resolve(BUNDLED_DATA, dict(country_col="", price_col="")).mapping
    assert (mapping.country_col, mapping.price_col, mapping.invoice_col) == ("", "", "InvoiceNo")


def test_the_bundled_file_keeps_its_mapping():
    assert resolve(BUNDLED_DATA).mapping == CsvMapping()
    assert resolve(BUNDLED_DATA, auto=True).mapping == CsvMapping()


# --- one line per mistake (golden messages) -------------------------------------------------------


def test_required_column_missing_names_it_lists_the_columns_and_the_closest(tmp_path):
    path = write(tmp_path, FOUR)
    assert error(path, user_col="custmer", product_col="item", quantity_col="amount",
                 time_col="when") == (
        f"{path}: no column 'custmer' for --user-col; the file's columns are customer, item, "
        "amount, when (closest: 'customer')"
    )


def test_an_unnamed_required_column_not_in_the_file(tmp_path):
    path = write(tmp_path, FOUR)
    assert error(path) == (
        f"{path}: no user column: set --user-col (the default 'CustomerID' is the bundled "
        "file's) or try --mapping auto; the file's columns are customer, item, amount, when "
        "(closest: 'customer')"
    )


def test_auto_cannot_guess_a_required_column(tmp_path):
    path = write(tmp_path, "who,what,n,t\na,b,1,2011-01-02\n")
    assert error(path, auto=True) == (
        f"{path}: cannot guess the user column; set --user-col; the file's columns are who, "
        "what, n, t"
    )


def test_a_time_format_that_parses_none_of_the_first_rows(tmp_path):
    path = write(tmp_path, "customer,item,amount,when\nc,i,1,1291191960\nc,i,1,1291191961\n")
    assert error(path, user_col="customer", product_col="item", quantity_col="amount",
                 time_col="when") == (
        f"{path}: no value of time column 'when' in the first 2 rows parses with time format "
        "'%Y-%m-%d %H:%M:%S' (e.g. '1291191960'); it looks like --time-format 'epoch-s'"
    )
    assert error(path, user_col="customer", product_col="item", quantity_col="amount",
                 time_col="when", time_format="%d.%m.%Y") == (
        f"{path}: no value of time column 'when' in the first 2 rows parses with time format "
        "'%d.%m.%Y' (e.g. '1291191960'); it looks like --time-format 'epoch-s'"
    )


def test_a_time_nothing_reads(tmp_path):
    path = write(tmp_path, "user,item,qty,time\nu,i,1,yesterday\n")
    assert error(path) == (
        f"{path}: no user column: set --user-col (the default 'CustomerID' is the bundled "
        "file's) or try --mapping auto; the file's columns are user, item, qty, time "
        "(closest: 'user')"
    )
    assert error(path, auto=True) == (
        f"{path}: cannot detect the format of time column 'time' (e.g. 'yesterday'); set "
        "--time-format (a strptime format, iso, epoch-s or epoch-ms)"
    )
    assert error(path, auto=True, time_format="iso") == (
        f"{path}: no value of time column 'time' in the first 1 rows parses with time format "
        "'iso' (e.g. 'yesterday'); set --time-format or try --mapping auto"
    )


def test_ambiguous_dates_are_refused(tmp_path):
    path = write(tmp_path, "user,item,qty,date\nu,i,1,01/02/2011\nu,i,1,03/04/2011\n")
    assert error(path, auto=True) == (
        f"{path}: the dates in time column 'date' read both day-first and month-first "
        "(e.g. '01/02/2011'); set --time-format '%d/%m/%Y' or '%m/%d/%Y'"
    )
    # named, it is read as told
    assert resolve(path, {"time_format": "%m/%d/%Y"}, auto=True).mapping.time_format == (
        "%m/%d/%Y")


def test_a_quantity_column_that_is_not_numeric(tmp_path):
    path = write(tmp_path, "user,item,title,time\nu,i,Toy Story,2011-01-02\n")
    assert error(path, auto=True, quantity_col="title") == (
        f"{path}: quantity column 'title' is not numeric in the first 1 rows (e.g. 'Toy Story')"
    )


def test_empty_files(tmp_path):
    empty = write(tmp_path, "")
    assert error(empty) == f"{empty}: empty file"
    blank = write(tmp_path, "\n\n  \n", "blank.csv")
    assert error(blank) == f"{blank}: empty file"
    header = write(tmp_path, "user,item,qty,time\n", "header.csv")
    assert error(header, auto=True) == f"{header}: empty file: a header and no rows"
    gz = tmp_path / "empty.csv.gz"
    with gzip.open(gz, "wt") as f:
        f.write("")
    assert error(gz) == f"{gz}: empty file"


def test_files_that_are_not_csv(tmp_path):
    binary = tmp_path / "data.parquet"
    binary.write_bytes(b"PAR1\x15\x00\x15\x1c\x00\x00\x00\x01\x02" * 50)
    assert error(binary) == f"{binary}: not a CSV text file (binary data)"
    fake_gz = write(tmp_path, "user,item\n", "plain.csv.gz")
    assert error(fake_gz).startswith(f"{fake_gz}: not a CSV text file (not readable gzip: ")


def test_a_delimiter_that_yields_one_column(tmp_path):
    path = write(tmp_path, "user;item;qty;time\nu;i;1;2011-01-02\n")
    assert error(path) == (
        f"{path}: the delimiter ',' finds one column in the header 'user;item;qty;time'; the "
        "file looks ';'-separated: set --delimiter ';'"
    )
    prose = write(tmp_path, "just some words\nand more\n", "prose.txt")
    assert error(prose) == (
        f"{prose}: the delimiter ',' finds one column in the header 'just some words'; set "
        "--delimiter"
    )


def test_bad_timezone_and_delimiter_flags(tmp_path):
    path = write(tmp_path, "user,item,qty,time\nu,i,1,2011-01-02\n")
    assert error(path, auto=True, timezone="Mars/Olympus") == (
        f"{path}: unknown timezone 'Mars/Olympus'")
    assert error(path, auto=True, delimiter=";;") == (
        f"{path}: --delimiter must be one character, not ';;'")
    assert error(path, auto=True, user_col="") == f"{path}: --user-col must name a column"


# --- --mapping auto --------------------------------------------------------------------------------


@pytest.mark.parametrize("header, expected", [
    ("userId,movieId,rating,timestamp", ("userId", "movieId", "rating", "timestamp")),
    ("visitorid,itemid,event,timestamp,count", ("visitorid", "itemid", "count", "timestamp")),
    ("Client ID,SKU,Qty,Order Date,Order ID", ("Client ID", "SKU", "Qty", "Order Date")),
    ("member_name,member_id,article_title,article_id,stars,datetime",
     ("member_id", "article_id", "stars", "datetime")),
    ("reviewerID,asin,overall score,unixReviewTime",
     ("reviewerID", "asin", "overall score", "unixReviewTime")),
])
def test_auto_guesses_columns_from_common_names(header, expected):
    names = header.split(",")
    taken: set[str] = set()
    got = []
    for field in ("user_col", "product_col", "quantity_col", "time_col"):
        col = guess_column(field, names, taken)
        taken.add(col)
        got.append(col)
    assert tuple(got) == expected


@pytest.mark.parametrize("values, fmt", [
    (["2011-01-02 10:00:00", "2011-01-02 11:00:00"], "%Y-%m-%d %H:%M:%S"),
    (["2011-01-02T10:00:00", "2011-01-02T11:00:00.5"], "iso"),
    (["2011-01-02T10:00:00Z", "2011-01-02T11:00:00+02:00"], "iso"),
    (["13/01/2011 10:00", "1/2/2011 9:05"], "%d/%m/%Y %H:%M"),
    (["01/13/2011 10:00", "2/1/2011 9:05"], "%m/%d/%Y %H:%M"),
    (["13.01.2011", "02.03.2011"], "%d.%m.%Y"),
    (["1260759144", "1260759179"], "epoch-s"),
    (["1291191960000", "1291191960123"], "epoch-ms"),
    (["1260759144.5"], "epoch-s"),
    (["42", "17"], None),
    (["soon", "later"], None),
    ([], None),
])
def test_time_formats_are_detected(values, fmt):
    assert detect_time_format(values) == fmt


def test_auto_detects_the_delimiter_and_the_time_format(tmp_path):
    path = write(tmp_path, "user\titem\tstars\tdate\nu1\ti1\t5\t2011-01-02T10:00:00Z\n")
    resolved = resolve(path, auto=True)
    assert resolved.mapping == CsvMapping(
        user_col="user", product_col="item", quantity_col="stars", time_col="date",
        price_col="", invoice_col="", description_col="", country_col="",
        time_format="iso", delimiter="\t",
    )
    assert {"delimiter", "time_format", "user_col"} <= resolved.guessed
    assert as_flags(resolved.mapping) == (
        "--user-col user --product-col item --quantity-col stars --time-col date --price-col '' "
        "--invoice-col '' --description-col '' --country-col '' --time-format iso "
        "--delimiter '\\t'"
    )


def test_flags_win_over_guesses(tmp_path):
    path = write(tmp_path, "user,buyer,item,qty,time\nu,b,i,1,2011-01-02\n")
    assert resolve(path, {"user_col": "buyer"}, auto=True).mapping.user_col == "buyer"
    assert resolve(path, auto=True).mapping.user_col == "user"


# --- the commands: exit 2 and the one line, before any broker or Spark ---------------------------


@pytest.mark.parametrize("command", ["produce", "train", "inspect"])
def test_every_command_reports_a_mapping_mistake_in_one_line(tmp_path, capsys, command):
    path = write(tmp_path, FOUR)
    argv = [command, "--file", str(path), *FOUR_FLAGS[:-2], "--time-col", "wehn"]
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        f"recsys {command}: {path}: no column 'wehn' for --time-col; the file's columns are "
        "customer, item, amount, when (closest: 'when')\n"
    )


@pytest.mark.parametrize("command", ["produce", "train"])
def test_a_good_mapping_gets_as_far_as_the_broker(tmp_path, capsys, monkeypatch, command):
    """The four flags are enough: the next stop is the (absent) broker, not the mapping."""
    from streams.producer import SalesProducer

    def no_broker(self):
        raise RuntimeError("cannot reach Kafka at 127.0.0.1:1")

    monkeypatch.setattr(SalesProducer, "check_topics", no_broker)  # not its 15 s timeout
    path = write(tmp_path, FOUR)
    code = run([command, "--file", str(path), *FOUR_FLAGS])
    err = capsys.readouterr().err
    assert code == 2 and "127.0.0.1:1" in err and "column" not in err


def test_inspect_prints_columns_rows_mapping_and_time_format(tmp_path, capsys):
    path = write(tmp_path, "userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n"
                 "1,1029,3,1260759179\n")
    assert run(["inspect", "--file", str(path), "--mapping", "auto", "--rows", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "columns (4, delimiter ','): userId, movieId, rating, timestamp",
        "first 1 rows:",
        "  userId  movieId  rating  timestamp",
        "  1       31       2.5     1260759144",
        "mapping:",
        "  user_id      <- 'userId' (guessed)",
        "  product_id   <- 'movieId' (guessed)",
        "  quantity     <- 'rating' (guessed)",
        "  event_time   <- 'timestamp' (guessed)",
        "  unit_price   -  none",
        "  invoice_id   -  none",
        "  description  -  none",
        "  country      -  none",
        "time format: 'epoch-s' (guessed); naive times in Europe/London",
        "detected time format: 'epoch-s'",
        "note: 1 of the first 2 quantities are not whole numbers; such rows are dead-lettered "
        "(a Sale's quantity is an integer)",
        "flags: --user-col userId --product-col movieId --quantity-col rating --time-col "
        "timestamp --price-col '' --invoice-col '' --description-col '' --country-col '' "
        "--time-format epoch-s",
    ]


def test_resolved_flags_reach_the_readers_through_args(tmp_path):
    """`train --file` hands spark.job its args: after resolution they give the same mapping."""
    from recsys.csv_mapping import resolve_args

    path = write(tmp_path, FOUR)
    args = cli.build_parser().parse_args(["train", "--file", str(path), *FOUR_FLAGS])
    resolved = resolve_args(path, args)
    assert CsvMapping.from_args(args) == resolved.mapping
    assert resolved.mapping.price_col == ""
