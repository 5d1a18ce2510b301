"""The warm-up's throw-away cycle runs every step on Spark and leaves nothing behind (when it
runs is a unit test: tests/unit/test_warmup.py)."""

from __future__ import annotations

import logging

import pytest

from recsys.settings import load
from spark import warmup

pytestmark = pytest.mark.spark


def test_the_warm_up_trains_on_spark_and_leaves_nothing(spark, tmp_path, caplog):
    settings = load(data_dir=tmp_path / "var", store_path=str(tmp_path / "store"))
    pipeline_log = logging.getLogger("spark.pipeline")
    before = pipeline_log.level
    with caplog.at_level(logging.INFO):
        seconds = warmup.warm_up(spark, settings)
    assert seconds > 0
    assert "warmed up for the first model" in caplog.text
    assert "model 0:" not in caplog.text  # the throw-away model is not logged like a real one
    assert pipeline_log.level == before
    assert not (tmp_path / "store" / "_warmup").exists()
    assert not (tmp_path / "var").exists()  # no index, no model stored
