"""foldin_quality: are the speed layer's fold-in lists as good as a retrain's, and better than the
stale lists they replace?

On the bundled data: a model trained (spark.pipeline.run_training, the default settings; its final
model, fitted on ALL events, is the one a cycle publishes) on every event before 2011-11-01. The
test period (2011-11-01 to the last event) is split at its midpoint in time. The first half is
replayed through the fold-in, as the speed layer computes it: every user with a sale in the first
half is folded in (speed.foldin, against the model's item factors) from their net quantities of all
their events up to the midpoint; every other user keeps the model's list, as on the topic. Every
evaluated user's list is then judged on the second half with spark.evaluate's protocol and metric
code (ranking_metrics_local): relevant = products bought (positive net) in the second half and not
before the midpoint, users with at least one such product who bought something before it,
products bought before the midpoint left out of every list, k = eval_k (10).

Three lists per user:
  (a) stale: the model's own user vector (no vector, no list: a user new since 2011-11-01);
  (b) fold-in: (a) with the first half folded in;
  (c) retrain: the final model of run_training on every event before the midpoint.

Prints (never asserts; targets: fold-in/stale > 1, fold-in/retrain >= 0.9):

    foldin_quality: precision@10 stale A / fold-in B / retrain C; fold-in/retrain = R ...
    foldin_quality: NDCG@10 ...
    foldin_quality_known: the same over the users the stale model knew (no new users)

`python -m bench foldin_quality` (about two retrains on the full bundled data).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from recsys.settings import Settings, load

log = logging.getLogger("bench.foldin_quality")

CUTOFF = datetime(2011, 11, 1, tzinfo=UTC)


@dataclass
class Trained:
    """A run_training result as the fold-in sees it: its Model and its users' vectors."""

    model: object  # speed.foldin.Model
    vectors: dict[str, np.ndarray]
    events: int


def _trained(spark, sales, settings: Settings, version: int) -> Trained:
    from schemas import factors
    from spark import pipeline, publish
    from speed import foldin

    result = pipeline.run_training(spark, sales, settings, version,
                                   indexes=pipeline.load_indexes(spark, settings))
    result.recommendations.unpersist()
    ids, y = publish.item_factors_local(result)
    model = foldin.Model(factors.assemble(version, list(
        factors.chunks(version, ids, y, result.params, []))))
    users = result.model.userFactors.toPandas()
    names = result.indexes[0].names()
    vectors = {str(names[i]): np.asarray(f, dtype=np.float32)
               for i, f in zip(users["id"], users["features"], strict=True)}
    return Trained(model, vectors, result.events)


def net_quantities(events: pd.DataFrame) -> dict[str, dict[str, int]]:
    """user -> product -> net quantity, zeros left out (speed.state.UserState.quantities)."""
    net = events.groupby(["user_id", "product_id"], sort=False)["quantity"].sum()
    out: dict[str, dict[str, int]] = {}
    for (user, product), q in net.items():
        if q:
            out.setdefault(user, {})[product] = int(q)
    return out


def positive(quantities: Mapping[str, Mapping[str, int]]) -> dict[str, set[str]]:
    return {u: {p for p, q in qs.items() if q > 0} for u, qs in quantities.items()
            if any(q > 0 for q in qs.values())}


def model_lists(trained: Trained, users: list[str], bought: dict[str, set[str]], k: int
                ) -> dict[str, list[str]]:
    """Each user's top k from their vector in `trained` (bought products left out); users
    without a vector get none."""
    m = trained.model
    out = {}
    for user in users:
        vector = trained.vectors.get(user)
        if vector is None:
            continue
        rows = np.array([m.index[p] for p in bought.get(user, ()) if p in m.index], np.int64)
        out[user] = [p for p, _ in m.top(vector, k, rows)]
    return out


def main() -> None:
    from pyspark.sql import functions as F

    from recsys import logs, paths
    from spark import evaluate
    from spark.csv_input import read_purchases_csv
    from spark.session import build
    from speed import foldin

    logs.setup(os.environ.get("RECSYS_LOG_LEVEL", "WARNING"))
    with tempfile.TemporaryDirectory(prefix="bench-foldin-quality-") as tmp:
        settings = load(data_dir=Path(tmp))
        k = settings.eval_k
        spark = build(settings, "bench-foldin-quality")
        try:
            sales = read_purchases_csv(spark, paths.BUNDLED_DATA).cache()
            micros = F.unix_micros("event_time")
            events = sales.select("user_id", "product_id", "quantity",
                                  micros.alias("micros")).toPandas()
            cut = int((CUTOFF - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * 1e6)
            end = int(events["micros"].max())
            mid = cut + (end - cut) // 2
            stale = _trained(spark, sales.where(micros < cut), settings, 1)
            retrain = _trained(spark, sales.where(micros < mid), settings, 2)
            sales.unpersist()
        finally:
            spark.stop()

    before_mid = events[events["micros"] < mid]
    assert stale.events == int((events["micros"] < cut).sum()), "the model saw every event"
    assert retrain.events == len(before_mid)
    quantities = net_quantities(before_mid)  # what the speed layer's states hold at the midpoint
    bought = positive(quantities)
    later = positive(net_quantities(events[events["micros"] >= mid]))
    relevant = {u: new for u, items in later.items() if u in bought
                and (new := items - bought[u])}
    users = sorted(relevant)
    touched = set(events.loc[(events["micros"] >= cut) & (events["micros"] < mid), "user_id"])

    lists = {"stale": model_lists(stale, users, bought, k)}
    folded_in = foldin.fold_many(stale.model, ((u, quantities[u]) for u in users if u in touched),
                                 k, filter_bought=True)
    lists["fold-in"] = dict(lists["stale"])
    lists["fold-in"].update({f.user_id: [p for p, _ in f.items] for f in folded_in if f.items})
    lists["retrain"] = model_lists(retrain, users, bought, k)

    catalog = len(stale.model.product_ids)
    known = {u: r for u, r in relevant.items() if u in stale.vectors}
    for label, judged in (("foldin_quality", relevant), ("foldin_quality_known", known)):
        m = {name: evaluate.ranking_metrics_local(recs, judged, k, catalog)
             for name, recs in lists.items()}
        for metric, title in (("precision_at_k", f"precision@{k}"), ("ndcg_at_k", f"NDCG@{k}")):
            a, b, c = (m[name][metric] for name in ("stale", "fold-in", "retrain"))
            print(f"{label}: {title} stale {a:.4f} / fold-in {b:.4f} / retrain {c:.4f}; "
                  f"fold-in/retrain = {b / c:.2f} (target >= 0.9), fold-in/stale = "
                  f"{b / a:.2f} (target > 1)", flush=True)
    new_users = len(relevant) - len(known)
    print(f"foldin_quality: {len(relevant):,} evaluated users ({new_users:,} new since the model, "
          f"no stale list; {len(known):,} known to it), {sum(bool(f.items) for f in folded_in):,} "
          f"of them folded in (a sale in the first half); model on {stale.events:,} events "
          f"before {CUTOFF:%Y-%m-%d}, retrain on {retrain.events:,} before the midpoint "
          f"{datetime.fromtimestamp(mid / 1e6, UTC):%Y-%m-%d %H:%M} UTC; "
          f"{len(stale.model.product_ids):,} products, rank {stale.model.rank}", flush=True)


if __name__ == "__main__":
    main()
