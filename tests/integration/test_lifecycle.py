"""The model lifecycle on the real broker and Spark: the gate promotes a good model and rejects a
broken one (its lists go to the shadow topic, no user's served list changes), `recsys models`
lists them and rolls back; fee codes never reach a list or the graph."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from pyspark.sql import functions as F
from test_stream import decoded, job_settings, make_topics

from recsys.csv_mapping import CsvMapping
from recsys.kafka import read_to_end
from recsys.paths import BUNDLED_DATA, ROOT
from recsys.settings import load
from schemas import codec
from spark.csv_input import read_purchases_csv
from spark.job import train_and_publish

pytestmark = pytest.mark.integration

FEES = re.compile(r"^(POST|DOT|M|m|D|C2|CRUK|BANK CHARGES|AMAZONFEE|S|B|PADS)$")


def _lists(settings, topic: str) -> list[dict]:
    return [codec.decode(m.value())[1] for m in read_to_end(settings, topic)]


def _models(settings, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RECSYS_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
           "RECSYS_DATA_DIR": str(settings.data_dir), "RECSYS_TOP_N": str(settings.top_n),
           "RECSYS_SPARK_DRIVER_MEMORY": "1g"}
    return subprocess.run([sys.executable, "-m", "recsys.cli", "models", *args,
                           "--topic-prefix", prefix], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_the_gate_promotes_rejects_and_a_rollback_returns(settings, unique, spark):
    topics = make_topics(settings, unique)
    prefix = f"t{unique}."
    s = job_settings(settings, als_rank=8, als_max_iter=5, top_n=10, eval_k=10,
                     promote_gate=True, promote_tolerance=0.5)
    sales = read_purchases_csv(spark, str(BUNDLED_DATA), CsvMapping()).limit(60_000).cache()
    assert sales.where(F.col("product_id").rlike(FEES.pattern)).count() > 0  # fees are there

    first = train_and_publish(spark, s, topics, sales, "file").model_ready
    assert (first["status"], first["serving"], first["champion_version"]) == ("promoted", 1, 0)
    served = _lists(s, topics.recommendations)
    assert len(served) > 1000 and {r["model_version"] for r in served} == {1}

    # A broken challenger (rank 1, one iteration): rejected; the served lists do not change.
    broken = load(**{**s.model_dump(), "als_rank": 1, "als_max_iter": 1,
                     "promote_tolerance": 0.05})
    second = train_and_publish(spark, broken, topics, sales, "file").model_ready
    assert (second["status"], second["serving"], second["champion_version"]) == (
        "rejected", 1, 1), second["status_reason"]
    assert len(_lists(s, topics.recommendations)) == len(served)
    shadow = _lists(s, topics.shadow)
    assert shadow and {r["model_version"] for r in shadow} == {2}
    assert {c["model_version"] for c in decoded(s, topics.model_factors)} == {1}
    assert not Path(s.export_dir, "2").exists()

    # A good challenger (the same data again) passes the gate and serves.
    third = train_and_publish(spark, s, topics, sales, "file").model_ready
    assert (third["status"], third["serving"]) == ("promoted", 3), third["status_reason"]
    assert "precision_at_k" in third["champion_metrics"]
    sales.unpersist()

    listed = _models(s, prefix, "list")
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"^\*\s+3 ", listed.stdout, re.M) and "rejected" in listed.stdout

    rolled = _models(s, prefix, "rollback")
    assert rolled.returncode == 0, rolled.stderr + rolled.stdout
    ready = decoded(s, topics.model_ready)
    assert (ready[-1]["model_version"], ready[-1]["trigger"], ready[-1]["serving"]) == (
        1, "manual", 1)
    again = [r for r in _lists(s, topics.recommendations)[len(served):]
             if r["model_version"] == 1]
    assert len(again) >= 0.9 * len(served)  # model 1's lists, published again
    factors = read_to_end(s, topics.model_factors)
    chunks = [codec.decode(m.value())[1]["model_version"] for m in factors if m.value()]
    assert chunks[-1] == 1  # the speed layer switches back to model 1
    retired = {m.key().decode().split(":")[0] for m in factors if m.value() is None}
    assert retired == {"1", "3"}  # 1 when 3 took over, 3 at the rollback (1's chunks came back)

    # No fee code in any list or graph edge of the served models.
    for rec in _lists(s, topics.recommendations) + shadow:
        assert not [i for i in rec["items"] if FEES.match(i["product_id"])], rec
    edges = pd.read_csv(Path(s.export_dir, "1", "edges.csv"), dtype=str, keep_default_na=False)
    assert len(edges) and not edges["product_id"].str.match(FEES.pattern).any()
