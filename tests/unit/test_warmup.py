"""The streaming job's warm-up costs only speed when it fails (when it runs: the policy in
tests/unit/test_trigger.py; the throw-away cycle itself: tests/spark/test_warmup_cycle.py)."""

from __future__ import annotations

import logging

import pytest

from recsys.settings import load
from spark import warmup

pytestmark = pytest.mark.unit


def test_a_failed_warm_up_is_logged_and_ingest_goes_on(tmp_path, monkeypatch, caplog):
    def broken(spark, settings):
        raise RuntimeError("no luck")

    monkeypatch.setattr(warmup, "warm_up", broken)
    with caplog.at_level(logging.ERROR, logger="spark.warmup"):
        assert warmup.try_warm_up(None, load(data_dir=tmp_path)) is False
    assert "warm-up failed" in caplog.text
