"""A Faust codec for our Avro single-object framing (schemas/codec.py), one record name per codec.

Decoding never raises: a value that is not a readable record of the expected schema becomes an
`Undecodable` carrying the reason and the original bytes, so the agent can send it to the
dead-letter topic with its topic[partition]@offset. A raising codec would make Faust log and
skip the message, which is a silent drop.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import fastavro
from faust.serializers.codecs import Codec

from schemas import codec


@dataclass(frozen=True)
class Undecodable:
    """A value that did not decode; `reason` is the DLQ reason."""

    reason: str
    data: bytes | None


class AvroCodec(Codec):
    """dumps(dict) -> framed Avro of `record`; loads(bytes) -> dict or Undecodable."""

    def __init__(self, record: str, **kwargs: Any) -> None:
        # Fails at start-up on an unknown record name, not at the first event.
        self._current = codec.schema(record)
        super().__init__(record=record, **kwargs)
        self.record = record

    def _dumps(self, obj: Any) -> bytes:
        return codec.encode(self.record, obj)

    def _loads(self, s: bytes) -> Any:
        try:
            if codec.writer_of(s) is self._current:
                # Written with the current schema: no resolution needed, about twice as fast as
                # codec.decode.
                record = fastavro.schemaless_reader(io.BytesIO(s[codec.HEADER_LEN:]),
                                                    self._current.fast, None)
                codec.require_ids(self.record, record)  # as decode does
                return record
            return codec.decode(s, expect=self.record)[1]
        except codec.DecodeError as exc:
            return Undecodable(str(exc), None if s is None else bytes(s))
        except Exception as exc:  # fastavro raises several types on corrupt bodies
            return Undecodable(f"body does not decode as {self.record}: {exc}", bytes(s))
