"""The graph's plain figures (Gini, coverage, group numbers, top share) on known distributions;
the graph itself runs in tests/spark/test_graph.py."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from spark import graph

pytestmark = pytest.mark.unit


def test_gini_and_coverage_of_known_distributions() -> None:
    assert graph.gini([(0, 1), (1, 3), (3, 1)]) == pytest.approx(0.4)  # [0, 1, 1, 1, 3]
    assert graph.gini([(2, 4)]) == pytest.approx(0.0)
    assert graph.gini([(0, 3), (5, 1)]) == pytest.approx(3 / 4)  # one of four holds all
    assert math.isnan(graph.gini([(0, 2)]))
    assert graph.coverage([(0, 2), (1, 1), (2, 2)]) == pytest.approx(0.6)


def test_group_numbers_and_top_share() -> None:
    labels = pd.Series(["x", "y", "y", "z", "z", "z", "w"])
    linked = pd.Series([True, True, True, True, True, True, False])
    assert list(graph.numbered(labels, linked)) == [3, 2, 2, 1, 1, 1, 0]
    assert graph.top_share(pd.Series([1.0] * 99 + [99.0])) == pytest.approx(0.5)
    assert graph.top_share(pd.Series([2.0, 1.0, 1.0]), share=0.5) == pytest.approx(0.75)
    assert math.isnan(graph.top_share(pd.Series([], dtype=float)))


