"""Purchases CSV -> `Sale` records, or the reason a row cannot be one.

Every input row comes out as exactly one item, never dropped: `(sale, None)` for a good row,
`(None, dead_letter)` for a bad one, so the producer can prove read = published + dead-lettered.
The producer asks for `CsvSource.encoded()` instead: the same rows as ready (to_dlq, key, Avro
bytes) triples. That is the hot path (most of a replay's CPU): raw strings that repeat (users,
products, times, prices) are parsed, validated and encoded once, then looked up.

Row numbers count data rows from 1 (the header is not a row); the event id is
"<file name>:<row number>", the same on every replay of the same file, so consumers dedupe.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from recsys.csv_mapping import CsvMapping, open_text, time_parser
from schemas.millis import now_ms

Record = dict[str, Any]
Item = tuple[Record | None, Record | None]  # (sale, None) or (None, dead letter)

INT32 = (-(2**31), 2**31 - 1)
_CACHE_MAX = 200_000  # distinct raw values kept per column; the bundled file has ~23k times
_SALE_LAYOUT = (
    "event_id", "user_id", "product_id", "quantity", "event_time", "unit_price", "invoice_id",
    "description", "country",
)


class BadRow(ValueError):
    """A row that cannot become a `Sale`; str() is the DLQ reason."""


class RowMapper:
    """One CSV row (a list of strings) -> a `Sale` record; `BadRow(reason)` when it cannot be.

    Rules: the user id must be non-empty ("17850.0" becomes "17850"); the product must be
    non-empty; quantity an integer (an invoice starting with "C" is a cancellation, so its
    quantity is made negative); the time must parse; the price, when its column is mapped and
    the cell is not empty, must be a finite number. Empty optional cells become null.

    Calling it runs `map_row`, a closure over the column indexes and per-column caches of
    parsed raw text: locals and one dict lookup per column are most of the per-row cost.
    """

    def __init__(self, header: list[str], mapping: CsvMapping, source_name: str) -> None:
        self.mapping = mapping
        self.source_name = source_name
        self.width = len(header)
        index = {name.strip(): i for i, name in enumerate(header)}

        def col(name: str) -> int | None:
            if not name:
                return None
            if name not in index:
                raise ValueError(
                    f"{source_name}: no column {name!r} in the header "
                    f"(columns: {', '.join(header)}); see --delimiter and the --*-col flags"
                )
            return index[name]

        for required in ("user_col", "product_col", "quantity_col", "time_col"):
            if not getattr(mapping, required):
                raise ValueError(f"the {required.replace('_', '-')} mapping must name a column")
        self._parse_time = time_parser(mapping.time_format, mapping.timezone)
        self._users: dict[str, str] = {}
        self._products: dict[str, str] = {}
        self._quantities: dict[str, int] = {}
        self._times: dict[str, int] = {}
        self._prices: dict[str, float | None] = {}
        self.columns = (
            col(mapping.user_col), col(mapping.product_col), col(mapping.quantity_col),
            col(mapping.time_col), col(mapping.price_col), col(mapping.invoice_col),
            col(mapping.description_col), col(mapping.country_col),
        )
        self.map_row = self._compile(*self.columns)

    def __call__(self, row: list[str], row_number: int) -> Record:
        return self.map_row(row, row_number)

    def _compile(
        self, iu: int, ip: int, iq: int, it: int,
        iv: int | None, ii: int | None, idesc: int | None, ic: int | None,
    ) -> Callable[[list[str], int], Record]:
        width, prefix = self.width, self.source_name + ":"
        users, products, quantities = self._users, self._products, self._quantities
        times, prices = self._times, self._prices
        user_of, product_of, quantity_of = self._user, self._product, self._quantity
        time_of, price_of = self._time, self._price

        def map_row(row: list[str], n: int) -> Record:
            if len(row) != width:
                raise BadRow(f"{len(row)} fields where the header has {width}")
            raw = row[iu]
            user = users.get(raw) or user_of(raw)
            raw = row[ip]
            product = products.get(raw) or product_of(raw)
            raw = row[iq]
            quantity = quantities.get(raw)
            if quantity is None:
                quantity = quantity_of(raw)
            raw = row[it]
            ms = times.get(raw)
            if ms is None:
                ms = time_of(raw)
            if iv is None:
                price = None
            else:
                raw = row[iv]
                price = prices.get(raw, prices)
                if price is prices:
                    price = price_of(raw)
            invoice = None if ii is None else (row[ii] or None)
            if quantity > 0 and invoice is not None and invoice[0] == "C":
                quantity = -quantity  # a cancellation line is a return
            return {
                "event_id": prefix + str(n),
                "user_id": user,
                "product_id": product,
                "quantity": quantity,
                "event_time": ms,
                "unit_price": price,
                "invoice_id": invoice,
                "description": None if idesc is None else (row[idesc] or None),
                "country": None if ic is None else (row[ic] or None),
            }

        return map_row

    # --- the fused path: CSV row -> encoded Sale, for the producer ---------------------------------
    def row_encoder(self, sale: Any) -> Callable[[list[str], int], tuple[bool, str, bytes]] | None:
        """A function row -> (False, key, Avro bytes of the row's Sale), equal to
        `(False, s["user_id"], sale(s))` for `s = map_row(row, n)` (BadRow alike), at about
        half the cost: each column's raw text maps straight to its encoded bytes, the dict in
        between is never built. `sale` is the producer's FlatEncoder of Sale (its `writers`,
        `schema.header` and `field_names`, schemas/flat_encoder.py); False is `to_dlq`, as
        `CsvSource.encoded` yields.

        None when this mapping or schema does not fit the fused layout (an optional column not
        mapped, the Sale fields changed): the caller then maps and encodes in two steps.
        """
        if None in self.columns or getattr(sale, "field_names", None) != _SALE_LAYOUT:
            return None
        iu, ip, iq, it, iv, ii, idesc, ic = self.columns
        width, prefix, header = self.width, self.source_name + ":", sale.schema.header
        w = sale.writers
        # raw text -> encoded field. A user that is no user maps to (None, reason). A "C"
        # invoice is never cached, so cancellations take the slow path (quantity sign).
        users: dict[str, tuple[str | None, Any]] = {}
        products: dict[str, bytes] = {}
        quantities: dict[str, bytes] = {}
        times: dict[str, bytes] = {}
        prices: dict[str, bytes] = {}
        invoices: dict[str, bytes] = {}
        descriptions: dict[str, bytes] = {}
        countries: dict[str, bytes] = {}
        caches = (users, products, quantities, times, prices, invoices, descriptions, countries)
        map_row, user_of, event_id = self.map_row, self._user, w["event_id"]

        def slow(row: list[str], n: int) -> tuple[bool, str, bytes]:
            if any(len(c) >= _CACHE_MAX for c in caches):
                for c in caches:
                    c.clear()
            raw = row[iu]
            if raw not in users:
                try:
                    user_of(raw)
                except BadRow as exc:
                    users[raw] = (None, str(exc))
                    raise
            s = map_row(row, n)  # validates; BadRow goes to the caller
            user = s["user_id"]
            users[raw] = (user, w["user_id"](user))
            products[row[ip]] = w["product_id"](s["product_id"])
            times[row[it]] = w["event_time"](s["event_time"])
            prices[row[iv]] = w["unit_price"](s["unit_price"])
            descriptions[row[idesc]] = w["description"](s["description"])
            countries[row[ic]] = w["country"](s["country"])
            invoice = s["invoice_id"]
            if invoice is None or invoice[0] != "C":
                invoices[row[ii]] = w["invoice_id"](invoice)
                quantities[row[iq]] = w["quantity"](s["quantity"])
            return False, user, sale(s)

        def encode_row(row: list[str], n: int) -> tuple[bool, str, bytes]:
            if len(row) != width:
                raise BadRow(f"{len(row)} fields where the header has {width}")
            try:
                user, ub = users[row[iu]]
            except KeyError:
                return slow(row, n)
            if user is None:
                raise BadRow(ub)
            try:
                fields = (
                    header, event_id(prefix + str(n)), ub, products[row[ip]],
                    quantities[row[iq]], times[row[it]], prices[row[iv]], invoices[row[ii]],
                    descriptions[row[idesc]], countries[row[ic]],
                )
            except KeyError:
                return slow(row, n)
            return False, user, b"".join(fields)

        return encode_row

    # --- slow paths: first sight of a raw value; the result is cached by the raw text ----------
    @staticmethod
    def _remember(cache: dict[str, Any], raw: str, value: Any) -> Any:
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[raw] = value
        return value

    def _user(self, raw: str) -> str:
        user = raw.strip()
        if not user:
            raise BadRow(f"no user_id ({self.mapping.user_col} is empty)")
        if user.endswith(".0") and user[:-2].isdigit():
            user = user[:-2]  # integer ids written as floats ("17850.0")
        return self._remember(self._users, raw, user)

    def _product(self, raw: str) -> str:
        product = raw.strip()
        if not product:
            raise BadRow(f"no product_id ({self.mapping.product_col} is empty)")
        return self._remember(self._products, raw, product)

    def _quantity(self, raw: str) -> int:
        try:
            q = int(raw)
        except ValueError:
            try:
                f = float(raw)
            except ValueError:
                raise BadRow(f"unparsable quantity {raw!r}") from None
            if not f.is_integer():
                raise BadRow(f"quantity {raw!r} is not a whole number") from None
            q = int(f)
        if not INT32[0] <= q <= INT32[1]:
            raise BadRow(f"quantity {raw!r} out of range")
        return self._remember(self._quantities, raw, q)

    def _time(self, raw: str) -> int:
        try:
            ms = self._parse_time(raw.strip())
        except (ValueError, OverflowError):
            fmt = self.mapping.time_format
            raise BadRow(f"unparsable event_time {raw!r} (format {fmt!r})") from None
        return self._remember(self._times, raw, ms)

    def _price(self, raw: str) -> float | None:
        text = raw.strip()
        if not text:
            return self._remember(self._prices, raw, None)
        try:
            price = float(text)
        except ValueError:
            raise BadRow(f"unparsable unit_price {raw!r}") from None
        if not math.isfinite(price):
            raise BadRow(f"unit_price {raw!r} is not a finite number")
        return self._remember(self._prices, raw, price)


def dead_letter(source_name: str, row_number: int, reason: str, original_row: str) -> Record:
    """The DLQ record of one rejected input row ("file:row", stage produce)."""
    return {
        "source": f"{source_name}:{row_number}",
        "stage": "produce",
        "reason": reason,
        "failed_at": now_ms(),
        "original_bytes": None,
        "original_row": original_row,
        "source_topic": None,
        "source_partition": None,
        "source_offset": None,
        "row_number": row_number,
    }


class _Lines:
    """Feeds the csv reader whole blocks of lines and can give back the raw text of the lines
    of the current row, so a dead letter carries the row exactly as the file had it (a quoted
    field may span lines). The reader pulls lines through `itertools.chain` in C: no Python
    call per line. The last KEEP blocks are kept: a row longer than that (megabytes in one
    field) is rendered again from its parsed fields instead."""

    BLOCK = 1 << 20  # characters per readlines() call
    KEEP = 3

    def __init__(self, f: io.TextIOBase) -> None:
        self._f = f
        self._blocks: list[tuple[int, list[str]]] = []  # (index of first line, lines)
        self._next = 0

    def __iter__(self) -> Iterator[str]:
        return itertools.chain.from_iterable(self._read())

    def _read(self) -> Iterator[list[str]]:
        while lines := self._f.readlines(self.BLOCK):
            self._blocks.append((self._next, lines))
            del self._blocks[: -self.KEEP]
            self._next += len(lines)
            yield lines

    def text(self, start: int, stop: int, row: list[str], delimiter: str) -> str:
        """Lines [start, stop) (0-based, the header is line 0), without the final newline."""
        if not self._blocks or start < self._blocks[0][0]:
            out = io.StringIO()
            csv.writer(out, delimiter=delimiter, lineterminator="\r\n").writerow(row)
            return out.getvalue()[:-2]
        parts = []
        for s, block in self._blocks:
            lo, hi = max(start, s), min(stop, s + len(block))
            if lo < hi:
                parts.extend(block[lo - s : hi - s])
        return "".join(parts).rstrip("\r\n")


class CsvSource:
    """Iterate `Item`s from a purchases CSV: one per data row, after `skip`, up to `limit`.

    Blank lines are not rows (counted in `blank_lines`). A bad header or mapping raises
    ValueError from `check()` (or at the first row).
    """

    def __init__(
        self,
        path: str | Path,
        mapping: CsvMapping | None = None,
        *,
        skip: int = 0,
        limit: int | None = None,
    ) -> None:
        if skip < 0 or (limit is not None and limit < 0):
            raise ValueError("skip and limit must be >= 0")
        self.path = Path(path)
        self.mapping = mapping or CsvMapping()
        self.skip = skip
        self.limit = limit
        self.name = self.path.name
        self.rows_read = 0
        self.blank_lines = 0

    def check(self) -> None:
        """Read the header and fit the mapping to it now, rather than at the first row."""
        with open_text(self.path) as f:
            header = next(csv.reader(f, delimiter=self.mapping.delimiter), None)
        if header is None:
            raise ValueError(f"{self.path}: empty file, no header")
        RowMapper(header, self.mapping, self.name)

    def __iter__(self) -> Iterator[Item]:
        """(sale, None) per good row, (None, dead letter) per bad one."""

        def convert(mapper: RowMapper) -> Callable[[list[str], int], Item]:
            map_row = mapper.map_row
            return lambda row, n: (map_row(row, n), None)

        name = self.name
        return self._scan(convert, lambda n, why, text: (None, dead_letter(name, n, why, text)))

    def encoded(
        self, sale: Any, dead: Callable[[Record], bytes]
    ) -> Iterator[tuple[bool, str, bytes]]:
        """(to_dlq, key, value) per row, values already encoded: the producer's fast path.

        `sale` is a FlatEncoder of Sale (fused with the mapping when it fits, see
        `RowMapper.row_encoder`), `dead` an encoder of DeadLetter.
        """

        def convert(mapper: RowMapper) -> Callable[[list[str], int], tuple[bool, str, bytes]]:
            fused = mapper.row_encoder(sale)
            if fused is not None:
                return fused
            map_row = mapper.map_row

            def two_steps(row: list[str], n: int) -> tuple[bool, str, bytes]:
                s = map_row(row, n)
                return False, s["user_id"], sale(s)

            return two_steps

        name = self.name

        def reject(n: int, why: str, text: str) -> tuple[bool, str, bytes]:
            letter = dead_letter(name, n, why, text)
            return True, letter["source"], dead(letter)

        return self._scan(convert, reject)

    def _scan(self, convert: Callable[[RowMapper], Callable], reject: Callable) -> Iterator:
        """The one loop over the file: `convert(mapper)(row, n)` per data row after `skip`,
        `reject(n, reason, raw text)` when that raises BadRow."""
        with open_text(self.path) as f:
            lines = _Lines(f)
            reader = csv.reader(lines, delimiter=self.mapping.delimiter)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{self.path}: empty file, no header")
            one = convert(RowMapper(header, self.mapping, self.name))
            skip = self.skip
            end = sys.maxsize if self.limit is None else skip + self.limit
            n = 0
            try:
                while n < skip and (row := next(reader, None)) is not None:
                    if row:
                        n += 1
                    else:
                        self.blank_lines += 1
                prev = reader.line_num  # the next row starts at this line
                for row in reader:
                    if not row:  # a blank line is no row: nothing to publish or dead-letter
                        self.blank_lines += 1
                        prev = reader.line_num
                        continue
                    n += 1
                    if n > end:
                        n -= 1
                        break
                    try:
                        item = one(row, n)
                    except BadRow as exc:
                        text = lines.text(prev, reader.line_num, row, self.mapping.delimiter)
                        item = reject(n, str(exc), text)
                    prev = reader.line_num
                    yield item
            finally:
                self.rows_read = max(0, n - skip)
