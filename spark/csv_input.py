"""Read a purchases CSV with Spark into the `Sale` shape, for `recsys train --file`.

The mapping follows the producer's rules so a file trained directly and the same file replayed
through Kafka give the same events: the user id loses a float suffix ("17850.0" -> "17850"), rows
without a user (or with an unreadable product, quantity or time) are dropped and counted, naive
times are read in the mapping's zone and stored as UTC.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

# One mapping for both readers (the flags of `produce` and `train --file`), in recsys/ because
# both processes read with it.
from recsys.csv_mapping import CsvMapping

__all__ = ["CsvMapping", "CsvRead", "read_purchases", "read_purchases_csv", "resolve_file"]

log = logging.getLogger(__name__)

# strptime directives and the java.time pattern letters Spark's to_timestamp understands.
_STRPTIME_TO_JAVA = {
    "%Y": "yyyy", "%y": "yy", "%m": "MM", "%d": "dd", "%H": "HH", "%I": "hh", "%M": "mm",
    "%S": "ss", "%f": "SSSSSS", "%p": "a", "%b": "MMM", "%B": "MMMM", "%j": "DDD",
    "%z": "xx", "%Z": "z", "%%": "%",
}
_FLEXIBLE = {"%m", "%d", "%H", "%I", "%M", "%S"}  # strptime reads one or two digits


@dataclass(frozen=True)
class CsvRead:
    """The valid events and what was left out (the producer would dead-letter those rows)."""

    sales: DataFrame
    rows: int
    dropped: int


def java_pattern(strptime_format: str) -> str:
    """strptime format -> java.time pattern; literal text is quoted so letters stay literal.

    strptime reads "1/7/2011 9:15" with "%d/%m/%Y %H:%M"; Spark's "dd" and "HH" want two digits,
    "d" and "H" take one or two. So a two-digit field followed by literal text (or the end) gets
    the one-letter form; one followed by another directive keeps its fixed width ("%Y%m%d").
    """
    out, literal, i = [], "", 0
    while i < len(strptime_format):
        pair = strptime_format[i : i + 2]
        if pair in _STRPTIME_TO_JAVA:
            if literal:
                out.append(_quote(literal))
                literal = ""
            java = _STRPTIME_TO_JAVA[pair]
            following = strptime_format[i + 2 : i + 4]
            if pair in _FLEXIBLE and not (following.startswith("%") and following != "%%"):
                java = java[0]
            out.append(java)
            i += 2
        elif pair.startswith("%"):
            raise ValueError(f"time format directive {pair!r} is not supported")
        else:
            literal += strptime_format[i]
            i += 1
    if literal:
        out.append(_quote(literal))
    return "".join(out)


def _quote(text: str) -> str:
    if all(not c.isalpha() and c != "'" for c in text):
        return text
    return "'" + text.replace("'", "''") + "'"


def _event_time(raw: Column, mapping: CsvMapping) -> Column:
    """UTC timestamp; naive times are wall clock in `mapping.timezone`."""
    if mapping.time_format in ("epoch-ms", "epoch-s"):
        scale = 1 if mapping.time_format == "epoch-ms" else 1000
        return F.timestamp_millis((raw.try_cast("double") * scale).cast("long"))
    if mapping.time_format == "iso":
        parsed = F.try_to_timestamp(raw)
        has_zone = raw.rlike(r"(Z|[+-]\d\d(:?\d\d)?)$") & raw.rlike(r"\d[T ]\d")
    else:
        parsed = F.try_to_timestamp(raw, F.lit(java_pattern(mapping.time_format)))
        has_zone = F.lit("%z" in mapping.time_format or "%Z" in mapping.time_format)
    # The session runs in UTC, so a naive value parses as the wall clock read as UTC: shift it.
    return F.when(has_zone, parsed).otherwise(F.to_utc_timestamp(parsed, mapping.timezone))


def _text(mapping_col: str) -> Column:
    """An optional text field as the producer keeps it: as written, empty means none."""
    if not mapping_col:
        return F.lit(None).cast("string")
    col = F.col(f"`{mapping_col}`")
    return F.when(col == "", None).otherwise(col)


def _price(mapping_col: str) -> tuple[Column, Column]:
    """(price, ok): empty is none, anything else must be a finite number."""
    if not mapping_col:
        return F.lit(None).cast("double"), F.lit(True)
    text = F.trim(F.col(f"`{mapping_col}`"))
    value = text.try_cast("double")
    empty = text.isNull() | (text == "")
    ok = empty | (value.isNotNull() & ~F.isnan(value) & (F.abs(value) < float("inf")))
    return F.when(empty, None).otherwise(value), ok


def _quantity(raw: Column) -> Column:
    """Whole numbers ("6" or "6.0") in the 32-bit range, else null."""
    value = F.trim(raw).try_cast("double")
    whole = (value == F.floor(value)) & (value >= -(2**31)) & (value <= 2**31 - 1)
    return F.when(whole, value.cast("int"))


def read_purchases_csv(
    spark: SparkSession, path: str | Path, mapping: CsvMapping | None = None
) -> DataFrame:
    """Sale-shaped events from a CSV (plain or .gz); the dropped rows are logged."""
    return read_purchases(spark, path, mapping or CsvMapping()).sales


def read_purchases(spark: SparkSession, path: str | Path, mapping: CsvMapping) -> CsvRead:
    """The events and the row counts (one counting pass over the file, here).

    The event id is "<file name>:<row number>" with data rows counted from 1, as the producer
    writes it. Spark numbers rows within each file split (`monotonically_increasing_id` keeps the
    split in its upper bits); the counting pass gives each split's first row number.
    """
    raw = (
        spark.read.option("header", True)
        .option("sep", mapping.delimiter)
        .option("quote", '"')
        .option("escape", '"')
        .option("mode", "PERMISSIVE")
        .csv(str(path))  # every column stays a string: parsing is ours, as in the producer
    )
    missing = [
        c for c in (mapping.user_col, mapping.product_col, mapping.quantity_col, mapping.time_col,
                    mapping.price_col, mapping.invoice_col, mapping.description_col,
                    mapping.country_col)
        if c and c not in raw.columns
    ]
    if missing:
        raise ValueError(f"{path}: no column {missing[0]!r} (columns: {', '.join(raw.columns)})")
    user = F.regexp_replace(F.trim(F.col(f"`{mapping.user_col}`")), r"^(\d+)\.0$", "$1")
    product = F.trim(F.col(f"`{mapping.product_col}`"))
    quantity = _quantity(F.col(f"`{mapping.quantity_col}`"))
    invoice = _text(mapping.invoice_col)
    price, price_ok = _price(mapping.price_col)
    row_id = F.monotonically_increasing_id()
    mapped = raw.select(
        F.shiftright(row_id, 33).alias("_split"),
        row_id.bitwiseAND(F.lit((1 << 33) - 1)).alias("_pos"),
        F.when(user == "", None).otherwise(user).alias("user_id"),
        F.when(product == "", None).otherwise(product).alias("product_id"),
        # A cancellation line is a return, whatever sign it was written with.
        F.when(invoice.startswith("C") & (quantity > 0), -quantity)
        .otherwise(quantity)
        .alias("quantity"),
        _event_time(F.trim(F.col(f"`{mapping.time_col}`")), mapping).alias("event_time"),
        price.alias("unit_price"),
        price_ok.alias("_price_ok"),
        invoice.alias("invoice_id"),
        _text(mapping.description_col).alias("description"),
        _text(mapping.country_col).alias("country"),
    )
    valid = (
        F.col("user_id").isNotNull()
        & F.col("product_id").isNotNull()
        & F.col("quantity").isNotNull()
        & F.col("event_time").isNotNull()
        & F.col("_price_ok")
    )
    splits = (
        mapped.groupBy("_split")
        .agg(F.count(F.lit(1)).alias("rows"), F.sum(F.when(valid, 0).otherwise(1)).alias("bad"))
        .orderBy("_split")
        .collect()
    )
    first_row, rows, dropped = {}, 0, 0
    for s in splits:
        first_row[int(s["_split"])] = rows + 1
        rows += int(s["rows"])
        dropped += int(s["bad"])
    offsets = F.create_map(*[F.lit(x) for kv in first_row.items() for x in kv]) if first_row else None
    row_number = (
        F.element_at(offsets, F.col("_split")) + F.col("_pos") if offsets is not None else F.lit(1)
    )
    sales = mapped.where(valid).select(
        F.concat(F.lit(Path(str(path)).name + ":"), row_number.cast("string")).alias("event_id"),
        "user_id", "product_id", "quantity", "event_time", "unit_price", "invoice_id",
        "description", "country",
    )
    log.info(
        "%s: %d rows, %d dropped (no user, or an unreadable product, quantity, time or price)",
        path, rows, dropped,
    )
    return CsvRead(sales=sales, rows=rows, dropped=dropped)


def resolve_file(command: str, args: argparse.Namespace) -> int:
    """For a local --file: fit the mapping to the file now (`resolve_args` leaves it on `args`,
    so `CsvMapping.from_args(args)` reads with it). 0, or 2 after the one line of the mistake."""
    from recsys.csv_mapping import resolve_for

    if not args.file or "://" in args.file:
        return 0
    return 0 if resolve_for(command, args.file, args) is not None else 2
