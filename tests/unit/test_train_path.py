"""The training path is decided once, from the events and two settings (no Spark needed)."""

from __future__ import annotations

import pytest

from recsys.settings import load
from spark import train_path

pytestmark = pytest.mark.unit


def test_auto_runs_on_the_driver_up_to_the_limit_and_distributed_above() -> None:
    s = load(train_driver_max_events=1000)
    assert train_path.decide(0, s).where == "driver"
    assert train_path.decide(1000, s).driver
    above = train_path.decide(1001, s)
    assert above.where == "distributed" and not above.driver
    assert "1,001 events > 1,000" in above.reason


@pytest.mark.parametrize("where", ["driver", "distributed"])
def test_a_set_path_wins_over_any_size(where) -> None:
    s = load(train_path=where, train_driver_max_events=10)
    for events in (0, 10, 10**9):
        decided = train_path.decide(events, s)
        assert decided.where == where and "RECSYS_TRAIN_PATH" in decided.reason


def test_the_default_limit_is_the_documented_crossover() -> None:
    s = load()
    assert s.train_path == "auto"
    assert train_path.decide(s.train_driver_max_events, s).driver
    assert not train_path.decide(s.train_driver_max_events + 1, s).driver


def test_the_decision_is_frozen() -> None:
    with pytest.raises(AttributeError):
        train_path.DRIVER.where = "distributed"  # type: ignore[misc]
