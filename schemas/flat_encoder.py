"""The fast writer of the single-object encoding for flat records (every field a primitive or
["null", primitive], timestamp-millis included): the same bytes as `schemas.codec.Encoder`, about
8x faster (`python -m bench producer`). The producer's hot path; the unit tests compare both byte
for byte (tests/unit/test_csv_mapping.py).

fastavro's schemaless_writer costs 10-20 us per record (it walks the schema on every call); a
generated writer with caches of the encoded values that repeat (users, products, times) does not.
Any other schema falls back to `codec.Encoder` (`encoder`).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from schemas import codec
from schemas.millis import to_ms

log = logging.getLogger(__name__)

Record = dict[str, Any]

_SMALL = [bytes([i]) for i in range(128)]
_pack_double = struct.Struct("<d").pack
_pack_float = struct.Struct("<f").pack
_CACHE_MAX = 50_000


def _varlong(n: int) -> bytes:
    """Avro long/int: zig-zag, then base-128 varint."""
    z = (n << 1) ^ (n >> 63)
    if 0 <= z < 0x80:
        return _SMALL[z]
    if 0 <= z < 0x4000:
        return bytes(((z & 0x7F) | 0x80, z >> 7))
    if 0 <= z < 0x200000:
        return bytes(((z & 0x7F) | 0x80, ((z >> 7) & 0x7F) | 0x80, z >> 14))
    if not 0 <= z < 1 << 64:
        raise ValueError(f"{n} does not fit an Avro long")
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _int(n: int) -> bytes:
    if not -(2**31) <= n < 2**31:
        raise ValueError(f"{n} does not fit an Avro int")
    return _varlong(n)


def _string(s: str) -> bytes:
    b = s.encode()
    n = len(b)
    if n < 64:
        return _SMALL[n << 1] + b
    if n < 0x2000:
        return bytes((((n << 1) & 0x7F) | 0x80, n >> 6)) + b
    return _varlong(n) + b


def _bytes(b: bytes) -> bytes:
    n = len(b)
    return (_SMALL[n << 1] if n < 64 else _varlong(n)) + bytes(b)


def _timestamp_ms(v: int | datetime) -> bytes:
    return _varlong(to_ms(v))


_PRIMITIVES: dict[str, Callable[[Any], bytes]] = {
    "string": _string,
    "bytes": _bytes,
    "int": _int,
    "long": _varlong,
    "double": lambda v: _pack_double(float(v)),
    "float": lambda v: _pack_float(float(v)),
    "boolean": lambda v: b"\x01" if v else b"\x00",
}


def _miss(raw: Callable[[Any], bytes], cache: dict[Any, bytes], tag: bytes) -> Callable:
    """Writer for a value not yet in `cache`; keeps the cache bounded (cleared when full)."""

    def write(v: Any) -> bytes:
        b = tag + raw(v)
        if len(cache) >= _CACHE_MAX:
            cache.clear()  # values that do not repeat (ids, rows) cost a miss, never memory
        cache[v] = b
        return b

    return write


def _kind(ftype: Any) -> tuple[Callable[[Any], bytes], bool, int] | None:
    """(writer of the value, cacheable, union index of null or -1), None when unsupported."""
    if isinstance(ftype, list):
        if len(ftype) != 2 or "null" not in ftype:
            return None
        null_at = ftype.index("null")
        inner = _kind(ftype[1 - null_at])
        if inner is None or inner[2] != -1:
            return None
        return inner[0], inner[1], null_at
    if isinstance(ftype, dict):
        logical, base = ftype.get("logicalType"), ftype.get("type")
        if logical == "timestamp-millis" and base == "long":
            return _timestamp_ms, True, -1
        return _kind(base) if logical is None and isinstance(base, str) else None
    if ftype in _PRIMITIVES:
        return _PRIMITIVES[ftype], ftype != "bytes", -1  # bytes: unique, maybe unhashable
    return None


def _field_bytes(raw: Callable[[Any], bytes], tag: bytes, null_at: int) -> Callable:
    if null_at < 0:
        return raw
    null_tag = _SMALL[null_at << 1]

    def write(v: Any) -> bytes:
        return null_tag if v is None else tag + raw(v)

    return write


class FlatEncoder:
    """Single-object encoding of a flat record, the same bytes as `codec.Encoder(name)`.

    `unique` names fields whose values never repeat (ids): they skip the cache.

    The writer is one generated function (as `dataclasses` generates `__init__`): per field one
    dict lookup in a cache of encoded values, a call only on a miss. Calling a closure per field
    instead costs about 3x as much, which is most of the producer's budget.
    """

    def __init__(self, name: str, unique: Iterable[str] = ()) -> None:
        self.schema = codec.schema(name)
        unique = set(unique)
        self.field_names: tuple[str, ...] = tuple(f["name"] for f in self.schema.parsed["fields"])
        self.writers: dict[str, Callable[[Any], bytes]] = {}  # field -> its bytes, uncached
        env: dict[str, Any] = {"H": self.schema.header}
        body = ["def encode(r):"]
        parts = []
        for i, f in enumerate(self.schema.parsed["fields"]):
            kind = _kind(f["type"])
            if kind is None:
                raise TypeError(f"{name}.{f['name']}: type {f['type']} has no fast writer")
            raw, cacheable, null_at = kind
            tag = b"" if null_at < 0 else _SMALL[(1 - null_at) << 1]
            self.writers[f["name"]] = _field_bytes(raw, tag, null_at)
            get = f"r[{f['name']!r}]"
            pad = "    "
            if null_at >= 0:
                env[f"N{i}"] = _SMALL[null_at << 1]
                body += [f"    v = {get}", f"    if v is None: b{i} = N{i}", "    else:"]
                pad = "        "
                get = "v"
            if cacheable and f["name"] not in unique:
                cache: dict[Any, bytes] = {}
                env[f"c{i}"], env[f"m{i}"] = cache, _miss(raw, cache, tag)
                if get != "v":
                    body.append(f"{pad}v = {get}")
                body += [f"{pad}b{i} = c{i}.get(v)", f"{pad}if b{i} is None: b{i} = m{i}(v)"]
            else:
                env[f"w{i}"], env[f"t{i}"] = raw, tag
                body.append(f"{pad}b{i} = t{i} + w{i}({get})" if tag else f"{pad}b{i} = w{i}({get})")
            parts.append(f"b{i}")
        body.append(f"    return b''.join((H, {', '.join(parts)}))")
        exec("\n".join(body), env)  # generated from a parsed .avsc, never from input data
        self.source = "\n".join(body)
        self._encode = env["encode"]

    def __call__(self, record: Record) -> bytes:
        return self._encode(record)


def encoder(name: str, unique: Iterable[str] = ()) -> Callable[[Record], bytes]:
    """The fastest correct encoder of `name`: FlatEncoder when it can, else codec.Encoder."""
    try:
        return FlatEncoder(name, unique)
    except TypeError as exc:
        log.warning("generic Avro encoder for %s (slower): %s", name, exc)
        return codec.Encoder(name)
