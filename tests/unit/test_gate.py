"""The promotion gate: a pure function of the challenger's, popularity's and the champion's
figures on the challenger's test window."""

from __future__ import annotations

import math

import pytest

from recsys.settings import load
from spark.gate import decide

pytestmark = pytest.mark.unit


def p(value: float) -> dict[str, float]:
    return {"precision_at_k": value, "ndcg_at_k": value}


@pytest.fixture
def settings():
    return load(promote_tolerance=0.05)


def test_a_first_model_faces_popularity_alone(settings):
    assert decide(p(0.06), p(0.04), None, settings).promote
    worse = decide(p(0.03), p(0.04), None, settings)
    assert not worse.promote and "not above popularity" in worse.reason
    assert not decide(p(0.04), p(0.04), None, settings).promote  # a tie is not better


def test_a_challenger_within_the_tolerance_of_the_champion_is_promoted(settings):
    assert decide(p(0.0575), p(0.04), p(0.06), settings, 3).promote  # 0.0575 >= 0.95 x 0.06
    rejected = decide(p(0.0565), p(0.04), p(0.06), settings, 3)
    assert not rejected.promote
    assert "champion 3 0.0600" in rejected.reason and "floor 0.0570" in rejected.reason


def test_beating_the_champion_is_not_enough_without_beating_popularity(settings):
    assert not decide(p(0.05), p(0.055), p(0.03), settings, 2).promote


def test_without_a_test_window_only_a_first_model_serves(settings):
    nan = p(math.nan)
    assert decide(nan, nan, None, settings).promote
    assert not decide(nan, nan, p(0.06), settings, 1).promote


def test_the_gate_can_be_turned_off():
    off = load(promote_gate=False)
    decision = decide(p(0.01), p(0.04), p(0.06), off, 1)
    assert decision.promote and decision.reason.startswith("gate off")


def test_a_zero_tolerance_needs_the_champions_precision(settings):
    strict = load(promote_tolerance=0.0)
    assert decide(p(0.06), p(0.04), p(0.06), strict, 1).promote
    assert not decide(p(0.0599), p(0.04), p(0.06), strict, 1).promote
