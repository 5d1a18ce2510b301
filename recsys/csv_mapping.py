"""The mapping a CSV gets (`CsvMapping`: which column holds which `Sale` field, the time format
and zone, the delimiter): the user's flags (or `--mapping auto`) fitted to the file's header and
first rows, decided once, in `resolve`, for `produce`, `train --file` and `inspect`.

Shared by two processes (the producer's row reader, streams/csv_source.py, and Spark's,
spark/csv_input.py), so it lives in recsys/: neither imports the other.

Rules:
- A required column (user, product, quantity, time) is the one named by its flag; unnamed, the
  bundled file's name (`CsvMapping`'s default), or with `--mapping auto` a guess from common
  header names. Missing is a mistake.
- An optional column (price, invoice, description, country) named by its flag must exist ('' names
  none). Unnamed, it is the bundled file's name (or the auto guess) when the file has it, and
  simply absent otherwise.
- The time format named by `--time-format` (default the bundled file's) must parse at least one
  of the first rows; with `--mapping auto` and no flag it is detected from them (ISO with or
  without a zone, day-first or month-first dates, epoch seconds or milliseconds), and refused
  when day-first and month-first read them equally well.
- The quantity column must hold a number in at least one of the first rows.
- The file must be text, not empty, and the delimiter must split the header into columns.

Every mistake is a `MappingError`; its str() is the one line the CLI shows before it exits 2.
The resolved mapping is a plain `CsvMapping`, so both readers (streams.csv_source and
spark.csv_input) read with exactly what was decided here.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import gzip
import io
import math
import re
import sys
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from schemas.millis import EPOCH, MS


@dataclass(frozen=True)
class CsvMapping:
    """Which CSV column holds which `Sale` field; '' for an optional field means none.

    Field names match the `--*-col` flags and spark.csv_input.CsvMapping, so `produce` and
    `train --file` read a file the same way. The defaults are the bundled file's names; a
    user's file gets its mapping from `resolve` below, which fits the flags to
    the file's header (an optional column the file lacks and nobody named is simply absent).
    """

    user_col: str = "CustomerID"
    product_col: str = "StockCode"
    quantity_col: str = "Quantity"
    time_col: str = "InvoiceDate"
    price_col: str = "UnitPrice"
    invoice_col: str = "InvoiceNo"
    description_col: str = "Description"
    country_col: str = "Country"
    time_format: str = "%Y-%m-%d %H:%M:%S"  # strptime format, "iso", "epoch-s" or "epoch-ms"
    timezone: str = "Europe/London"  # zone of naive timestamps
    delimiter: str = ","

    def __post_init__(self) -> None:
        if len(self.delimiter) != 1:
            raise ValueError(f"--delimiter must be one character, not {self.delimiter!r}")
        if not self.time_format:
            raise ValueError("--time-format must not be empty")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CsvMapping:
        """The mapping from the shared CLI flags (unset flags keep the defaults); a typed `\\t`
        delimiter means a tab."""
        given = {f.name: getattr(args, f.name, None) for f in fields(cls)}
        if given.get("delimiter") == "\\t":
            given["delimiter"] = "\t"
        return cls(**{k: v for k, v in given.items() if v is not None})


def time_parser(time_format: str, timezone: str) -> Callable[[str], int]:
    """raw -> UTC epoch millis; ValueError when the text does not fit the format."""
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {timezone!r}") from None

    def aware(dt: datetime) -> int:
        # A naive time is wall-clock time in `zone`; in the autumn's repeated hour it reads as
        # the first (summer-time) one, as zoneinfo's fold=0 does.
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=zone)
        return (dt - EPOCH) // MS

    if time_format in ("epoch-ms", "epoch-s"):
        scale = 1 if time_format == "epoch-ms" else 1000

        def parse(raw: str) -> int:
            try:
                return int(raw) * scale
            except ValueError:
                value = float(raw)  # "1.29e12" or "1291191960000.0"
                if not math.isfinite(value):
                    raise
                return int(value * scale)  # truncated, as Spark's cast to long

        return parse
    if time_format == "iso":
        return lambda raw: aware(datetime.fromisoformat(raw))
    strptime = datetime.strptime
    return lambda raw: aware(strptime(raw, time_format))


def open_text(path: Path) -> io.TextIOBase:
    """Plain or gzip UTF-8 text (a BOM is skipped), newline='' as the csv module wants. Bytes
    that are not UTF-8 read as U+FFFD rather than stopping the replay."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="replace", newline="")
    return open(path, encoding="utf-8-sig", errors="replace", newline="")


SAMPLE_ROWS = 200  # data rows read to check and detect formats
HEAD_BYTES = 1 << 16  # bytes read to tell text from binary

REQUIRED = ("user_col", "product_col", "quantity_col", "time_col")
OPTIONAL = ("price_col", "invoice_col", "description_col", "country_col")
COLUMNS = REQUIRED + OPTIONAL
SALE_FIELD = {
    "user_col": "user_id", "product_col": "product_id", "quantity_col": "quantity",
    "time_col": "event_time", "price_col": "unit_price", "invoice_col": "invoice_id",
    "description_col": "description", "country_col": "country",
}
DELIMITERS = (",", ";", "\t", "|")

# Header words per field, in order of preference (lower case, compared per word of the name).
WORDS: dict[str, tuple[str, ...]] = {
    "user_col": ("user", "customer", "visitor", "client", "member", "buyer", "shopper",
                 "account", "reviewer", "person", "uid"),
    "product_col": ("item", "product", "sku", "movie", "article", "stockcode", "stock", "asin",
                    "isbn", "book", "song", "track", "video", "course", "game", "iid", "pid"),
    "quantity_col": ("quantity", "qty", "rating", "stars", "star", "score", "count", "units",
                     "plays", "clicks", "views"),
    "time_col": ("timestamp", "datetime", "time", "date", "ts", "when", "created", "occurred"),
    "price_col": ("unitprice", "price", "cost"),
    "invoice_col": ("invoice", "order", "transaction", "basket", "receipt"),
    "description_col": ("description", "desc", "title", "name"),
    "country_col": ("country", "region", "nation"),
}
_ID_WORDS = {"id", "code", "no", "num", "number", "key", "sku"}
_LABEL_WORDS = {"name", "title", "desc", "description", "label"}

# strptime formats tried by detection, in order; a day-first format and its month-first twin
# that both read every sampled value are ambiguous.
_ISO_LIKE = (
    "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d", "%Y/%m/%d %H:%M:%S", "%Y/%m/%d %H:%M",
    "%Y/%m/%d",
)
_DAY_FIRST = tuple(
    f"%d{sep}%m{sep}%Y{time}" for sep in "/-." for time in (" %H:%M:%S", " %H:%M", "")
)
_TWIN = {f: f.replace("%d", "\0").replace("%m", "%d").replace("\0", "%m") for f in _DAY_FIRST}
_EPOCH_S = (1e8, 1e11)  # 1973 .. 5138
_EPOCH_MS = (1e11, 1e14)


class MappingError(ValueError):
    """A mapping mistake; str() is the one line to show."""


@dataclass(frozen=True)
class Resolved:
    """The mapping to read with, and what it was decided from (for `recsys inspect`)."""

    mapping: CsvMapping
    header: list[str]
    rows: list[list[str]]  # the first data rows (up to SAMPLE_ROWS)
    guessed: frozenset[str]  # CsvMapping fields chosen by --mapping auto
    named: frozenset[str]  # CsvMapping fields the flags set
    detected_time_format: str | None  # what detection reads in the time column (None: nothing)


# --- the flags ----------------------------------------------------------------------------------


def given_flags(args: argparse.Namespace) -> dict[str, str]:
    """The mapping fields the user set on the command line (an unset flag is None); a typed
    `\\t` delimiter means a tab."""
    given = {f.name: getattr(args, f.name, None) for f in fields(CsvMapping)}
    if given.get("delimiter") == "\\t":
        given["delimiter"] = "\t"
    return {k: v for k, v in given.items() if v is not None}


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def resolve_args(path: str | Path, args: argparse.Namespace) -> Resolved:
    """`resolve` for the CLI flags in `args`; the resolved mapping is also written back onto
    `args`, so `CsvMapping.from_args(args)` afterwards gives exactly it."""
    resolved = resolve(path, given_flags(args), auto=getattr(args, "mapping", None) == "auto")
    for name, value in asdict(resolved.mapping).items():
        setattr(args, name, value)
    return resolved


# --- the file -----------------------------------------------------------------------------------


def _check_text(path: Path, name: str) -> None:
    """Empty, binary or broken-gzip files end here, before the csv module sees them."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                head = f.read(HEAD_BYTES)
        else:
            with open(path, "rb") as f:
                head = f.read(HEAD_BYTES)
    except (OSError, EOFError, zlib.error) as exc:
        raise MappingError(f"{name}: not a CSV text file (not readable gzip: {exc})") from None
    if not head.strip():
        raise MappingError(f"{name}: empty file")
    text = head.decode("utf-8", errors="replace")
    if b"\0" in head or text.count("\ufffd") > len(text) // 10:
        raise MappingError(f"{name}: not a CSV text file (binary data)")


def _read(path: Path, delimiter: str, n: int) -> tuple[list[str] | None, list[list[str]]]:
    """The header and the first `n` non-blank data rows."""
    with open_text(path) as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        rows: list[list[str]] = []
        for row in reader:
            if row:
                rows.append(row)
                if len(rows) >= n:
                    break
    return header, rows


def sniff_delimiter(path: Path) -> str | None:
    """The delimiter among , ; tab | that splits the header and the first rows into the most
    (and the same number of) columns; None when none splits the header."""
    best, width = None, 1
    for d in DELIMITERS:
        header, rows = _read(path, d, 20)
        if header is None or len(header) <= width:
            continue
        if rows and sum(len(r) == len(header) for r in rows) < len(rows) / 2:
            continue
        best, width = d, len(header)
    return best


def _shown(delimiter: str) -> str:
    return "'\\t'" if delimiter == "\t" else repr(delimiter)


# --- columns ------------------------------------------------------------------------------------


def _words(name: str) -> list[str]:
    parts = re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", name)
    return [p.lower() for p in parts]


def _score(field: str, name: str) -> tuple[int, int, int] | None:
    """How well a header name fits a field (higher is better), None when not at all."""
    words = _words(name)
    glued = "".join(words)
    candidates = WORDS[field]
    hits = [
        i for i, w in enumerate(candidates)
        if glued in (w, w + "s", w + "id", w + "ids") or any(t in (w, w + "s", w + "id")
                                                               for t in words)
    ]
    if not hits:
        return None
    id_like = bool(_ID_WORDS & set(words)) or any(glued == w + "id" for w in candidates)
    label = bool(_LABEL_WORDS & set(words))
    if field in ("user_col", "product_col"):
        kind = 2 if id_like else (0 if label else 1)
    elif field == "description_col":
        kind = 0 if id_like else 1
    else:
        kind = 1
    exact = int(glued in candidates)
    return kind, exact, -min(hits)


def guess_column(field: str, header: Sequence[str], taken: set[str] = frozenset()) -> str | None:
    """The header name `--mapping auto` takes for `field`, None when no name fits."""
    scored = [
        (s, -i, h) for i, h in enumerate(header)
        if h not in taken and (s := _score(field, h)) is not None
    ]
    return max(scored)[2] if scored else None


def closest(name: str, header: Sequence[str]) -> str | None:
    """The header name most like `name` (case ignored), None when none is close."""
    lowered = {h.lower(): h for h in header}
    match = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.5)
    return lowered[match[0]] if match else None


def _columns_line(header: Sequence[str], suggestion: str | None) -> str:
    line = f"the file's columns are {', '.join(header)}"
    return line + (f" (closest: {suggestion!r})" if suggestion else "")


def _columns(
    name: str, header: list[str], given: Mapping[str, str], auto: bool
) -> tuple[dict[str, str], set[str]]:
    """Each column field's header name ('' for none) and the fields that were guessed."""
    present = set(header)
    out: dict[str, str] = {}
    for field in COLUMNS:  # named ones first: they are the user's word
        if field in given:
            col = given[field].strip()
            if field in REQUIRED and not col:
                raise MappingError(f"{name}: {flag(field)} must name a column")
            if col and col not in present:
                raise MappingError(
                    f"{name}: no column {col!r} for {flag(field)}; "
                    + _columns_line(header, closest(col, header))
                )
            out[field] = col
    taken = {c for c in out.values() if c}
    guessed: set[str] = set()
    defaults = CsvMapping()
    for field in COLUMNS:
        if field in out:
            continue
        if auto:
            col = guess_column(field, header, taken) or ""
            if col:
                guessed.add(field)
        else:
            col = getattr(defaults, field)
            col = col if col in present else ""
        if not col and field in REQUIRED:
            what = field.removesuffix("_col")
            if auto:
                raise MappingError(
                    f"{name}: cannot guess the {what} column; set {flag(field)}; "
                    + _columns_line(header, None)
                )
            default = getattr(defaults, field)
            hint = guess_column(field, header, taken) or closest(default, header)
            raise MappingError(
                f"{name}: no {what} column: set {flag(field)} (the default {default!r} is the "
                "bundled file's) or try --mapping auto; " + _columns_line(header, hint)
            )
        out[field] = col
        if col:
            taken.add(col)
    return out, guessed


# --- values -------------------------------------------------------------------------------------


def _values(rows: list[list[str]], header: list[str], col: str) -> list[str]:
    i = header.index(col)
    return [r[i].strip() for r in rows if len(r) > i and r[i].strip()]


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None


def _parses(values: Sequence[str], fmt: str) -> int:
    if fmt == "iso":
        parse = datetime.fromisoformat
    else:
        def parse(v: str) -> datetime:
            return datetime.strptime(v, fmt)
    n = 0
    for v in values:
        try:
            parse(v)
            n += 1
        except ValueError:
            pass
    return n


def detect_time_format(values: Sequence[str], what: str = "the time column") -> str | None:
    """The format that reads most of `values` (epoch-s, epoch-ms, a strptime format or iso);
    None when none reads half of them. MappingError when day-first and month-first dates read
    them equally well."""
    if not values:
        return None
    numbers = [_number(v) for v in values]
    if all(x is not None for x in numbers):
        for fmt, (lo, hi) in (("epoch-s", _EPOCH_S), ("epoch-ms", _EPOCH_MS)):
            if all(lo <= x < hi for x in numbers):
                return fmt
        return None
    candidates = _ISO_LIKE + tuple(f for d in _DAY_FIRST for f in (d, _TWIN[d])) + ("iso",)
    counts = {fmt: _parses(values, fmt) for fmt in candidates}
    best = max(counts.values())
    if best == 0 or best * 2 < len(values):
        return None
    winners = [fmt for fmt in candidates if counts[fmt] == best]
    for fmt in winners:
        if fmt in _TWIN and _TWIN[fmt] in winners:
            example = next(v for v in values if _parses([v], fmt) and _parses([v], _TWIN[fmt]))
            raise MappingError(
                f"the dates in {what} read both day-first and month-first (e.g. {example!r}); "
                f"set --time-format {fmt!r} or {_TWIN[fmt]!r}"
            )
    return winners[0]


def _time_format(
    name: str, values: list[str], col: str, given: Mapping[str, str], auto: bool, n_rows: int
) -> tuple[str, str | None]:
    """(the format to read with, the detected one) for the time column's sampled values."""
    what = f"time column {col!r}"
    try:
        detected = detect_time_format(values, what)
        ambiguous = None
    except MappingError as exc:
        detected, ambiguous = None, exc
    fmt = given.get("time_format")
    if fmt is None and auto:
        if ambiguous is not None:
            raise MappingError(f"{name}: {ambiguous}")
        if detected is None:
            example = f" (e.g. {values[0]!r})" if values else ""
            raise MappingError(
                f"{name}: cannot detect the format of {what}{example}; set --time-format "
                "(a strptime format, iso, epoch-s or epoch-ms)"
            )
        return detected, detected
    fmt = fmt if fmt is not None else CsvMapping().time_format
    if not fmt:
        raise MappingError(f"{name}: --time-format must not be empty")
    timezone = given.get("timezone", CsvMapping().timezone)
    try:
        parse = time_parser(fmt, timezone)
    except ValueError as exc:
        raise MappingError(f"{name}: {exc}") from None
    ok = 0
    for v in values:
        try:
            parse(v)
            ok += 1
        except (ValueError, OverflowError):
            pass
    if not ok:
        example = f" (e.g. {values[0]!r})" if values else " (all empty)"
        hint = (f"it looks like --time-format {detected!r}" if detected
                else "set --time-format or try --mapping auto")
        raise MappingError(
            f"{name}: no value of {what} in the first {n_rows} rows parses with time format "
            f"{fmt!r}{example}; {hint}"
        )
    return fmt, detected


def resolve(path: str | Path, given: Mapping[str, str] | None = None, *, auto: bool = False
            ) -> Resolved:
    """The mapping for the file at `path`, from the flags the user gave (`given`: CsvMapping
    field -> value, unset ones left out) and, with `auto`, guesses for the rest."""
    given = dict(given or {})
    path = Path(path)
    name = str(path)
    _check_text(path, name)
    guessed: set[str] = set()
    delimiter = given.get("delimiter")
    if delimiter is None:
        delimiter = ","
        if auto:
            sniffed = sniff_delimiter(path)
            if sniffed is not None and sniffed != ",":
                delimiter = sniffed
                guessed.add("delimiter")
    if len(delimiter) != 1:
        raise MappingError(f"{name}: --delimiter must be one character, not {delimiter!r}")
    timezone = given.get("timezone", CsvMapping().timezone)
    try:
        time_parser("iso", timezone)
    except ValueError as exc:
        raise MappingError(f"{name}: {exc}") from None
    header, rows = _read(path, delimiter, SAMPLE_ROWS)
    if header is None:
        raise MappingError(f"{name}: empty file")
    header = [h.strip() for h in header]
    if len(header) < 2:
        sniffed = sniff_delimiter(path)
        hint = (f"the file looks {_shown(sniffed)}-separated: set --delimiter {_shown(sniffed)}"
                if sniffed else "set --delimiter")
        raise MappingError(
            f"{name}: the delimiter {_shown(delimiter)} finds one column in the header "
            f"{header[0] if header else ''!r}; {hint}"
        )
    if not rows:
        raise MappingError(f"{name}: empty file: a header and no rows")
    columns, guessed_columns = _columns(name, header, given, auto)
    guessed |= guessed_columns
    quantities = _values(rows, header, columns["quantity_col"])
    if not any(_number(v) is not None for v in quantities):
        example = f"e.g. {quantities[0]!r}" if quantities else "all empty"
        raise MappingError(
            f"{name}: quantity column {columns['quantity_col']!r} is not numeric in the first "
            f"{len(rows)} rows ({example})"
        )
    times = _values(rows, header, columns["time_col"])
    time_format, detected = _time_format(
        name, times, columns["time_col"], given, auto, len(rows)
    )
    if auto and "time_format" not in given:
        guessed.add("time_format")
    try:
        mapping = CsvMapping(
            **columns, time_format=time_format, delimiter=delimiter,
            timezone=timezone,
        )
    except ValueError as exc:
        raise MappingError(f"{name}: {exc}") from None
    return Resolved(mapping, header, rows, frozenset(guessed), frozenset(given), detected)


# --- recsys inspect -----------------------------------------------------------------------------


def as_flags(mapping: CsvMapping) -> str:
    """The command-line flags that give `mapping` (to paste after `produce` or `train`)."""
    out = []
    for field in COLUMNS:
        out.append(f"{flag(field)} {_quote(getattr(mapping, field))}")
    out.append(f"--time-format {_quote(mapping.time_format)}")
    if mapping.timezone != CsvMapping().timezone:
        out.append(f"--timezone {_quote(mapping.timezone)}")
    if mapping.delimiter != ",":
        out.append(f"--delimiter {_shown(mapping.delimiter)}")
    return " ".join(out)


def _quote(text: str) -> str:
    if text and re.fullmatch(r"[\w.:/+-]+", text):
        return text
    return "'" + text.replace("'", "'\\''") + "'"


def describe(resolved: Resolved, rows: int = 5) -> list[str]:
    """The lines `recsys inspect` prints."""
    m = resolved.mapping
    out = [f"columns ({len(resolved.header)}, delimiter {_shown(m.delimiter)}"
           + (", guessed" if "delimiter" in resolved.guessed else "") + "): "
           + ", ".join(resolved.header)]
    shown = resolved.rows[:rows]
    out.append(f"first {len(shown)} rows:")
    widths = [max(len(h), *(len(r[i]) if i < len(r) else 0 for r in shown))
              for i, h in enumerate(resolved.header)]
    widths = [min(w, 24) for w in widths]
    for r in [resolved.header, *shown]:
        cells = [(r[i] if i < len(r) else "")[:24].ljust(w) for i, w in enumerate(widths)]
        out.append("  " + "  ".join(cells).rstrip())
    out.append("mapping:")
    for field in COLUMNS:
        col = getattr(m, field)
        note = " (guessed)" if field in resolved.guessed else ""
        out.append(f"  {SALE_FIELD[field]:<12} <- {col!r}{note}" if col
                   else f"  {SALE_FIELD[field]:<12} -  none")
    how = ("guessed" if "time_format" in resolved.guessed
           else "--time-format" if "time_format" in resolved.named else "the default")
    out.append(f"time format: {m.time_format!r} ({how}); naive times in {m.timezone}")
    detected = resolved.detected_time_format
    out.append(f"detected time format: {detected!r}" if detected
               else "detected time format: none (no known format reads the first rows)")
    quantities = _values(resolved.rows, resolved.header, m.quantity_col)
    fractions = sum(1 for v in quantities if (x := _number(v)) is not None and x != int(x))
    if fractions:
        out.append(f"note: {fractions} of the first {len(resolved.rows)} quantities are not whole "
                   "numbers; such rows are dead-lettered (a Sale's quantity is an integer)")
    out.append("flags: " + as_flags(m))
    return out


def resolve_for(command: str, path: str | Path, args: argparse.Namespace) -> Resolved | None:
    """`resolve_args` for `recsys <command>`: the resolved mapping, or None after the one line of
    the mistake (no such file, or the MappingError) on stderr; the command then exits 2, before
    it asks the broker or Spark anything."""
    path = Path(path)
    if not path.is_file():
        print(f"recsys {command}: no such file {path}", file=sys.stderr)
        return None
    try:
        return resolve_args(path, args)
    except MappingError as exc:
        print(f"recsys {command}: {exc}", file=sys.stderr)
        return None


def inspect_cli(settings: object, args: argparse.Namespace) -> int:
    """`recsys inspect --file F`: the columns, a few rows, the mapping that would be used."""
    resolved = resolve_for("inspect", args.file, args)
    if resolved is None:
        return 2
    for line in describe(resolved, args.rows):
        print(line)
    return 0
