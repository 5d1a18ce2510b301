"""Offline quality on the bundled data: the default settings must beat popularity and reach the
`implicit` library's precision@10 on the same chronological split.

Reference (train before 2011-11-01, test after; relevant = new purchases of known users, bought
products left out): `implicit` ALS precision@10 0.056, NDCG@10 0.066; popularity 0.035, 0.038.
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

import pytest

from recsys import paths
from recsys.settings import load
from spark.csv_input import read_purchases_csv
from spark.pipeline import load_indexes, run_training

pytestmark = pytest.mark.integration

IMPLICIT_PRECISION = 0.056
IMPLICIT_NDCG = 0.066


def test_default_settings_beat_popularity_and_implicit(
    spark, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = load(data_dir=tmp_path, split_cutoff=datetime(2011, 11, 1))
    sales = read_purchases_csv(spark, paths.BUNDLED_DATA)
    result = run_training(spark, sales, settings, model_version=1,
                          indexes=load_indexes(spark, settings))
    ours, base = result.metrics, result.baseline_metrics
    with capsys.disabled():
        print(
            f"\nquality @{settings.eval_k} ({result.params['eval_users']} users): "
            f"precision model {ours['precision_at_k']:.4f} / popularity "
            f"{base['precision_at_k']:.4f} (implicit {IMPLICIT_PRECISION}); NDCG model "
            f"{ours['ndcg_at_k']:.4f} / popularity {base['ndcg_at_k']:.4f} (implicit "
            f"{IMPLICIT_NDCG}); recall {ours['recall_at_k']:.4f} / {base['recall_at_k']:.4f}; "
            f"MAP {ours['map_at_k']:.4f} / {base['map_at_k']:.4f}; coverage "
            f"{ours['coverage']:.3f} / {base['coverage']:.3f}; RMSE {ours['rmse']:.3f} / "
            f"{base['rmse']:.3f}; cycle {result.cycle_seconds:.0f} s, ALS.fit "
            f"{result.train_seconds:.0f} s"
        )
    assert base["precision_at_k"] == pytest.approx(0.035, abs=0.002)  # the protocol matches
    assert ours["precision_at_k"] >= IMPLICIT_PRECISION
    assert ours["ndcg_at_k"] >= IMPLICIT_NDCG
    for name in ("precision_at_k", "recall_at_k", "ndcg_at_k", "map_at_k", "coverage"):
        assert ours[name] > base[name], name
    assert ours["rmse"] < base["rmse"]
    assert not any(math.isnan(v) for v in ours.values())
    assert result.recommendations.count() == result.users
