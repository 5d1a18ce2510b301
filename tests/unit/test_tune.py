"""The grid search's pure parts (spark/tune.py): the grid, the choice, the printed table."""

from __future__ import annotations

import math

import pytest

from recsys.settings import load
from spark.tune import Point, Tuned, better, grid, metric_of, table

pytestmark = pytest.mark.unit


def test_the_grid_starts_with_the_current_settings_and_has_no_alpha_in_explicit_mode():
    s = load(als_rank=32, als_reg_param=0.1, als_alpha=10.0, tune_ranks=[8, 32],
             tune_reg_params=[0.1], tune_alphas=[1.0, 10.0])
    assert grid(s) == [(32, 0.1, 10.0), (8, 0.1, 1.0), (8, 0.1, 10.0), (32, 0.1, 1.0)]
    explicit = load(als_mode="explicit", als_rank=4, als_reg_param=0.1, als_alpha=10.0,
                    tune_ranks=[4, 8], tune_reg_params=[0.1, 1.0], tune_alphas=[1.0, 40.0])
    assert grid(explicit) == [(4, 0.1, 10.0), (4, 1.0, 10.0), (8, 0.1, 10.0), (8, 1.0, 10.0)]


def test_rmse_is_lower_is_better_precision_higher_and_nan_never_wins():
    assert metric_of(load(als_mode="explicit")) == "rmse"
    assert metric_of(load()) == "precision_at_k"
    assert better("rmse", 0.9, 1.0) and not better("rmse", 1.0, 1.0)
    assert better("precision_at_k", 0.2, 0.1) and not better("precision_at_k", 0.1, 0.1)
    assert not better("rmse", math.nan, 1.0) and better("rmse", 1.0, None)
    assert better("precision_at_k", 0.0, math.nan)


def test_the_table_shows_every_point_and_marks_the_chosen_one():
    a = Point(4, 0.1, 10.0, {"rmse": 1.2, "precision_at_k": 0.05}, 1.25)
    b = Point(8, 1.0, 10.0, {"rmse": 0.9, "precision_at_k": 0.04}, 2.0)
    tuned = Tuned("rmse", [a, b], b, 100, 20)
    assert table(tuned, 10) == [
        "   rank      reg   alpha          RMSE  precision@10  fit s",
        "      4      0.1      10        1.2000        0.0500    1.2",
        "      8        1      10        0.9000        0.0400    2.0  <- chosen",
    ]
    chosen = tuned.settings(load(als_mode="explicit"))
    assert (chosen.als_rank, chosen.als_reg_param, chosen.als_alpha) == (8, 1.0, 10.0)
