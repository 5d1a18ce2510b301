"""The stream job's plain parts: model-ready's encoding, topic prefixes, the store state across a
rerun batch, offsets and lag from a query's progress (when training is due:
tests/unit/test_trigger.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from schemas import codec
from spark import publish
from spark.offsets import lag, ranges
from spark.store import StoreState

pytestmark = pytest.mark.unit


def test_model_ready_record_encodes_with_lineage():
    result = SimpleNamespace(
        model_version=3, events=1000, users=10, products=20,
        event_time_min=datetime(2010, 12, 1), event_time_max=datetime(2011, 2, 28),
        params={"rank": 8}, metrics={"precision_at_k": 0.1, "rmse": float("nan")},
        baseline_metrics={"precision_at_k": 0.05}, train_seconds=1.5, model_path="/m/3",
    )
    offsets = [{"topic": "sales", "partition": 0, "from_offset": 0, "to_offset": 99}]
    record = publish.model_ready_record(result, "threshold", offsets, 2.0)
    again = publish.model_ready_record(result, "threshold", offsets, 9.0)
    assert record["model_id"] == again["model_id"]  # deterministic on version and lineage
    name, back = codec.decode(codec.encode("ModelReady", record))
    assert name == "ModelReady"
    assert back["offsets"] == offsets
    assert back["params"] == {"rank": "8"}
    assert back["event_time_min"] == datetime(2010, 12, 1, tzinfo=UTC)
    assert back["trigger"] == "threshold"


def test_topics_with_a_prefix():
    t = publish.Topics.with_prefix("t1.")
    assert (t.sales, t.dlq, t.model_ready, t.recommendations, t.graph_edges) == (
        "t1.sales", "t1.sales.dlq", "t1.model-ready", "t1.recommendations", "t1.graph-edges")


def test_state_counts_a_rerun_batch_once():
    s = StoreState()
    s.count_batch("q/0", 10, now=1.0)
    s.count_batch("q/1", 5, now=2.0)
    s.count_batch("q/1", 5, now=3.0)  # batch 1 again after a crash: replaced, not added
    assert (s.events, s.since_model, s.pending_since) == (15, 15, 1.0)
    s.model_trained(s.events, now=4.0)
    assert (s.since_model, s.pending_since, s.last_model_at) == (0, None, 4.0)
    s.count_batch("q/1", 5, now=5.0)  # a re-run after the model: still nothing new
    assert s.since_model == 0


def test_lag_reads_progress_offsets_as_json_or_repr():
    end = "{'sales': {'0': 10, '1': 20}}"  # PySpark 4 hands a dict's repr
    assert lag(end, '{"sales": {"0": 15, "1": 20}}') == 5
    assert lag({"sales": {"0": 10}}, {"sales": {"0": 10, "1": 3}}) == 3  # a new partition
    assert lag(end, None) is None


def test_ranges_name_the_offsets_a_batch_read():
    end = "{'sales': {'0': 10, '1': 20, '2': 7}}"
    assert ranges("None", end) == "sales[0]@0-9, sales[1]@0-19, sales[2]@0-6"  # a first batch
    assert ranges('{"sales": {"0": 4, "1": 20, "2": 7}}', end) == "sales[0]@4-9"
    assert ranges(None, "not offsets") == "?"
