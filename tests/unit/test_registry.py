"""The model registry from model-ready records: who serves, what a rollback returns to."""

from __future__ import annotations

import pytest

from spark.lifecycle import previous_champion, registry

pytestmark = pytest.mark.unit


def ready(version, status="promoted", serving=None, trigger="threshold"):
    record = {"model_version": version, "status": status, "trigger": trigger}
    if serving is not None:
        record["serving"] = serving
    return record


def test_records_from_before_the_gate_each_served():
    last, serving, served = registry([ready(1, serving=0), ready(2, serving=0)])
    assert serving == 2 and served == [1, 2] and set(last) == {1, 2}


def test_a_rejected_challenger_leaves_the_champion_in_service():
    last, serving, served = registry([ready(1, serving=1), ready(2, "rejected", 1)])
    assert serving == 1 and served == [1] and last[2]["status"] == "rejected"
    assert previous_champion(served) is None


def test_a_manual_promote_and_a_rollback():
    records = [ready(1, serving=1), ready(2, serving=2), ready(3, "rejected", 2),
               ready(1, serving=1, trigger="manual")]  # model 1 put back by hand
    last, serving, served = registry(records)
    assert serving == 1 and served == [1, 2, 1] and last[1]["trigger"] == "manual"
    assert previous_champion(served) == 2  # a rollback from here returns to model 2
    assert previous_champion([1]) is None and previous_champion([]) is None


def test_a_first_model_rejected_leaves_nothing_in_service():
    _, serving, served = registry([ready(1, "rejected", 0)])
    assert serving == 0 and served == []
