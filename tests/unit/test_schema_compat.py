"""The compatibility gate: every schema version stays backward and forward compatible with the
versions before it, checked with fastavro's own schema resolution (not a hand-written rule).

Releasing a schema change: edit `schemas/<name>.avsc`, copy it to `schemas/history/<Name>/vN+1.avsc`;
this gate then checks it against every earlier version.
"""

from __future__ import annotations

import io
import json

import fastavro
import pytest
from fastavro.schema import parse_schema
from fastavro.utils import generate_many

from schemas import codec

pytestmark = pytest.mark.unit


def can_read(writer: dict, reader: dict, samples: int = 50) -> str | None:
    """None when records written with `writer` resolve into `reader`; else the reason."""
    for record in generate_many(writer, samples):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, writer, record)
        buf.seek(0)
        try:
            fastavro.schemaless_reader(buf, writer, reader)
        except Exception as exc:  # SchemaResolutionError and friends
            return f"{type(exc).__name__}: {exc}"
    return None


def versions():
    for name, current in codec.schemas().items():
        old = codec.history(name)
        chain = old + ([current] if not old or old[-1].fingerprint != current.fingerprint else [])
        for i, newer in enumerate(chain):
            for older in chain[:i]:
                yield pytest.param(older, newer, id=f"{name}:{older.version}->{newer.version}")


def test_backward_and_forward_compatible():
    for pair in versions():
        older, newer = pair.values
        assert can_read(older.parsed, newer.parsed) is None, f"{pair.id}: new readers, old data"
        assert can_read(newer.parsed, older.parsed) is None, f"{pair.id}: old readers, new data"


@pytest.mark.parametrize("name", sorted(codec.schemas()))
def test_current_schema_is_released_in_history(name):
    history = codec.history(name)
    assert history, f"schemas/history/{name}/v1.avsc is missing"
    assert history[-1].fingerprint == codec.schema(name).fingerprint, (
        f"schemas/{name} changed: copy it to schemas/history/{name}/v{len(history) + 1}.avsc "
        "so the gate checks it against earlier versions"
    )


def test_gate_catches_a_breaking_change():
    sale = json.loads(codec.schema("Sale").json)
    # Adding a required field without default breaks backward compatibility.
    broken = json.loads(json.dumps(sale))
    broken["fields"].append({"name": "store_id", "type": "string"})
    assert can_read(parse_schema(sale), parse_schema(broken)) is not None
    # Changing a type breaks both ways.
    retyped = json.loads(json.dumps(sale))
    for f in retyped["fields"]:
        if f["name"] == "quantity":
            f["type"] = "string"
    assert can_read(parse_schema(sale), parse_schema(retyped)) is not None


def test_gate_accepts_an_optional_field_with_default():
    sale = json.loads(codec.schema("Sale").json)
    grown = json.loads(json.dumps(sale))
    grown["fields"].append({"name": "channel", "type": ["null", "string"], "default": None})
    assert can_read(parse_schema(sale), parse_schema(grown)) is None
    assert can_read(parse_schema(grown), parse_schema(sale)) is None
