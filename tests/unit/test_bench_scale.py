"""bench scale's report (bench/scale.py): the crossover and the growth lines from its figures."""

from __future__ import annotations

import pytest

from bench import scale

pytestmark = pytest.mark.unit


def _row(size: str, asked: str, cycle: float) -> dict:
    return {"size": size, "asked": asked, "path": asked, "cycle_seconds": cycle}


def test_no_crossover_when_the_driver_wins_at_every_size_and_growth_by_the_rule() -> None:
    rows = [_row("2M", "driver", 90.0), _row("2M", "distributed", 250.0),
            _row("20M", "driver", 600.0), _row("20M", "distributed", 1800.0)]
    lines = scale.summary(rows)
    assert "scale crossover: none up to 20M (the driver path faster at 2M, 20M)" in lines
    growth = next(line for line in lines if line.startswith("scale growth"))
    assert "= 6.7" in growth and "driver / driver" in growth  # the default rule: driver at 20M


def test_the_first_size_where_the_distributed_path_wins_is_the_crossover() -> None:
    rows = [_row("2M", "driver", 90.0), _row("2M", "distributed", 250.0),
            _row("10M", "driver", 900.0), _row("10M", "distributed", 800.0),
            _row("20M", "driver", 2000.0), _row("20M", "distributed", 1500.0)]
    assert "scale crossover: the distributed path first faster at 10M" in scale.summary(rows)


def test_a_failed_run_is_reported_not_compared() -> None:
    rows = [{"size": "20M", "asked": "driver", "error": "exit 137: killed"},
            _row("20M", "distributed", 1500.0)]
    assert scale.line(rows[0]) == "scale 20M driver: FAILED (exit 137: killed)"
    assert not [line for line in scale.summary(rows) if "crossover" in line]


def test_a_run_stopped_after_the_other_path_finished_counts_as_the_slower() -> None:
    rows = [_row("20M", "driver", 600.0),
            {"size": "20M", "asked": "distributed", "error": "over 1200 s", "over_seconds": 1200}]
    lines = scale.summary(rows)
    assert ("scale 20M: driver 600.0 s / distributed stopped unfinished after 1200 s (driver "
            "faster)") in lines
    assert "scale crossover: none up to 20M (the driver path faster at 20M)" in lines
