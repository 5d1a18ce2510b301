"""One cycle, two paths (spark.train_path): the same sales through `run_training` on the driver
and distributed give the same indexes, counts, split, metrics and lists; the graph's `because`
follows the cycle's path; the path is decided once from the settings and carried on."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pytest

from recsys.settings import load
from spark import graph, pipeline, train_path

pytestmark = pytest.mark.spark

SALE = "event_id string, user_id string, product_id string, quantity int, event_time timestamp"
T0 = datetime(2011, 1, 1)


def _sales(spark):
    """40 users, 30 products, ~500 events over 100 days: tastes in three groups, some returns."""
    rows = []
    for u in range(40):
        group = u % 3
        for j in range(12):
            p = group * 10 + (u * 7 + j * 3) % 10
            t = T0 + timedelta(days=(u * 13 + j * 17) % 100, minutes=u)
            rows.append((f"e{u}-{j}", f"U{u:02d}", f"P{p:02d}", 1 + (u + j) % 4, t))
        if u % 5 == 0:  # a return of the first purchase
            rows.append((f"r{u}", f"U{u:02d}", rows[-12][2], -1, T0 + timedelta(days=99)))
    return spark.createDataFrame(rows, SALE)


def _cycle(spark, tmp_path, where):
    settings = load(data_dir=tmp_path / where, als_rank=4, als_max_iter=5, top_n=5, eval_k=5)
    path = {"driver": train_path.DRIVER, "distributed": train_path.DISTRIBUTED}[where]
    return pipeline.run_training(spark, _sales(spark), settings, 1,
                                 indexes=pipeline.load_indexes(spark, settings), path=path)


def _lists(result):
    return {r["user_id"]: [(i["product_id"], i["score"]) for i in r["items"]]
            for r in result.recommendations.collect()}


def test_both_paths_train_to_the_same_result(spark, tmp_path) -> None:
    driver = _cycle(spark, tmp_path, "driver")
    distributed = _cycle(spark, tmp_path, "distributed")
    try:
        assert driver.path.where == "driver" and distributed.path.where == "distributed"
        assert [ix.numbers for ix in driver.indexes] == [ix.numbers for ix in distributed.indexes]
        assert (driver.events, driver.users, driver.products) == (
            distributed.events, distributed.users, distributed.products)
        assert (driver.event_time_min, driver.event_time_max) == (
            distributed.event_time_min, distributed.event_time_max)
        same = {k: v for k, v in driver.params.items() if k != "train_path"}
        assert same == {k: v for k, v in distributed.params.items() if k != "train_path"}
        assert int(driver.params["eval_users"]) > 0
        for ours, theirs in ((driver.metrics, distributed.metrics),
                             (driver.baseline_metrics, distributed.baseline_metrics)):
            assert ours.keys() == theirs.keys()
            for name, value in ours.items():
                # The two fits read the same matrix in another row order: float sums may differ
                # in the last bits, nothing more.
                assert theirs[name] == pytest.approx(value, rel=1e-3, abs=1e-6), name
        ours, theirs = _lists(driver), _lists(distributed)
        assert ours.keys() == theirs.keys() and len(ours) == driver.users
        assert all(len(items) == 5 for items in ours.values())
        for user, items in ours.items():
            # The same scores in the same order; products of (near-)equal score may swap.
            assert [s for _, s in theirs[user]] == pytest.approx([s for _, s in items], rel=1e-3)
            clear = [p for p, s in items if s > items[-1][1] + 1e-3]  # above the last place
            assert set(clear) <= {p for p, _ in theirs[user]}, user
    finally:
        for r in (driver, distributed):
            r.recommendations.unpersist()


def test_the_cycle_decides_once_from_the_settings_and_the_graph_follows(spark, tmp_path) -> None:
    settings = load(data_dir=tmp_path, als_rank=4, als_max_iter=3, top_n=3, eval_k=3,
                    train_path="auto", train_driver_max_events=10)  # ~500 events: above
    sales = _sales(spark)
    result = pipeline.run_training(spark, sales, settings, 3,
                                   indexes=pipeline.load_indexes(spark, settings))
    try:
        assert result.path.where == "distributed" and result.params["train_path"] == "distributed"
        assert "> 10" in result.path.reason
        # Index I/O is the caller's: nothing is written until `save`.
        assert not (tmp_path / "index").exists()
        pipeline.save(spark, result)
        assert (tmp_path / "index" / "users").exists()
        g = graph.build(spark, result, sales)
        try:
            via_result = {(r["user_id"], r["product_id"]): r["because"] for r in g.edges.collect()}
        finally:
            g.unpersist()
        g = graph.build(spark, result, sales, train_path.DRIVER)
        try:
            on_driver = {(r["user_id"], r["product_id"]): r["because"] for r in g.edges.collect()}
        finally:
            g.unpersist()
        # The same products explain each edge, but float32 (driver) and double (Spark) cosines
        # may pick either of two near-equal ones for the last place (tests/spark/test_graph.py
        # checks the order): a product only one path chose must be as similar as one the other
        # chose instead.
        assert via_result.keys() == on_driver.keys() and len(via_result) == 3 * result.users
        unit = {r["product_id"]: np.array(r["features"], dtype=np.float64)
                for r in result.item_factors.collect()}
        unit = {p: v / (np.linalg.norm(v) or 1.0) for p, v in unit.items()}
        for edge, ours in via_result.items():
            theirs = on_driver[edge]
            assert len(ours) == len(theirs), edge
            only_ours, only_theirs = set(ours) - set(theirs), set(theirs) - set(ours)
            sims = sorted(float(unit[edge[1]] @ unit[p]) for p in only_ours), sorted(
                float(unit[edge[1]] @ unit[p]) for p in only_theirs)
            assert sims[0] == pytest.approx(sims[1], abs=1e-5), (edge, ours, theirs)
    finally:
        result.recommendations.unpersist()


def test_the_grid_search_scores_every_point_alike_on_both_paths(spark, tmp_path) -> None:
    from spark import tune

    settings = load(data_dir=tmp_path, als_rank=4, als_max_iter=5, eval_k=5, tune_ranks="2,4",
                    tune_reg_params="0.1", tune_alphas="10")
    sales = _sales(spark)
    on_driver = tune.search(sales, settings, train_path.DRIVER)
    distributed = tune.search(sales, settings, train_path.DISTRIBUTED)
    assert (on_driver.fit_pairs, on_driver.validation_pairs) == (
        distributed.fit_pairs, distributed.validation_pairs)
    for ours, theirs in zip(on_driver.points, distributed.points, strict=True):
        assert ours.params() == theirs.params()
        assert ours.metrics[on_driver.metric] == pytest.approx(theirs.metrics[on_driver.metric],
                                                               abs=1e-9)
