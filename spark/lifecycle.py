"""`recsys models`: the registry of trained models (from `model-ready` and the saved models), and
promotion or rollback by hand.

`list` and `show` read `model-ready` only (no Spark). `promote V` puts a saved version in service:
its lists are computed again from its saved model for the users it knows (products they bought,
from the store, left out) and published on `recommendations`, then its factors on
`model-factors` (the speed layer switches to it), the factors of the version it replaces are
retired, and a `model-ready` for V with status promoted and trigger manual says who serves now.
`rollback` promotes the version that served before the one in service.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recsys.settings import Settings
from schemas import codec
from schemas.topics import PROMOTED


def history(settings: Settings, topic: str) -> list[dict[str, Any]]:
    """Every `model-ready` record in offset order (several per version after a manual promote)."""
    from recsys.kafka import read_to_end

    out = []
    for m in read_to_end(settings, topic):
        try:
            out.append(codec.decode(m.value(), expect="ModelReady")[1])
        except codec.DecodeError:
            continue
    return out


def serving_of(record: dict[str, Any]) -> int:
    """The version in service after `record` (0: none yet)."""
    if record.get("serving"):
        return int(record["serving"])
    # A record from before the gate (ModelReady v1, serving 0): every model served.
    return int(record["model_version"]) if record.get("status", PROMOTED) == PROMOTED else 0


def registry(records: list[dict[str, Any]]) -> tuple[dict[int, dict[str, Any]], int, list[int]]:
    """(the last record per version, the version in service, the versions that served, in order
    of service)."""
    last: dict[int, dict[str, Any]] = {}
    served: list[int] = []
    for r in records:
        last[int(r["model_version"])] = r
        now = serving_of(r)
        if now and (not served or served[-1] != now):
            served.append(now)
    return last, (served[-1] if served else 0), served


def previous_champion(served: list[int]) -> int | None:
    """The version that served before the one in service (None: there is none)."""
    current = served[-1] if served else None
    for v in reversed(served):
        if v != current:
            return v
    return None


def _table(last: dict[int, dict[str, Any]], serving: int, saved: set[int] | None) -> str:
    rows = [f"{'':1} {'version':>7} {'trained at (UTC)':<19} {'events':>9} {'trigger':<9} "
            f"{'status':<9} {'p@k':>7} {'pop':>7} {'champ':>7}  saved"]
    for v in sorted(last):
        r = last[v]
        m, b, c = r["metrics"], r["baseline_metrics"], r.get("champion_metrics") or {}
        rows.append(
            f"{'*' if v == serving else '':1} {v:>7} {r['trained_at']:%Y-%m-%d %H:%M:%S} "
            f"{r['events']:>9,} {r['trigger']:<9} {r.get('status', PROMOTED):<9} "
            f"{m.get('precision_at_k', float('nan')):7.4f} "
            f"{b.get('precision_at_k', float('nan')):7.4f} "
            f"{c.get('precision_at_k', float('nan')):7.4f}  "
            f"{'?' if saved is None else ('yes' if v in saved else 'no')}")
    rows.append(f"* serves (model {serving})" if serving else "no model serves yet")
    return "\n".join(rows)


def _saved_locally(settings: Settings) -> set[int] | None:
    root = settings.models
    if "://" in root and not root.startswith("file:"):
        return None  # on a cluster file system: `promote` checks with Spark
    folder = Path(root.removeprefix("file://").removeprefix("file:"))
    return {int(p.name) for p in folder.iterdir() if p.name.isdigit()} if folder.is_dir() else set()


def promote(settings: Settings, topics: Any, version: int, current: int,
            record: dict[str, Any], reason: str) -> dict[str, Any]:
    """Serve the saved `version`: its lists again, its factors, then a model-ready (status
    promoted, trigger manual); returns that record."""
    from pyspark.ml.recommendation import ALSModel
    from pyspark.sql import functions as F

    from spark import index, publish, recommend, session, train_path
    from spark.pipeline import index_path
    from spark.prepare import products_only, valid_events
    from spark.registry import Models
    from spark.store import Store

    spark = session.build(settings, "recsys-models")
    try:
        models = Models(spark, settings.models)
        if version not in models.saved():
            raise ValueError(f"model {version} is not saved under {settings.models}")
        model = ALSModel.load(models.path(version))
        users, products = (index.extend_ids(spark, [], index_path(settings, kind))
                           for kind in ("users", "products"))
        bought = None
        store = Store(spark, settings.store)
        # The path of a cycle over the store (spark.train_path), for scoring every user.
        path = train_path.decide(store.read().count() if store.has_data() else 0, settings)
        if settings.filter_bought and store.has_data():
            events = valid_events(products_only(store.read(), settings.non_product_pattern))
            net = events.groupBy("user_id", "product_id").agg(F.sum("quantity").alias("q"))
            pairs = net.where("q > 0").join(
                users.frame(spark).withColumnRenamed("id", "user_id")
                .withColumnRenamed("idx", "user"), "user_id").join(
                products.frame(spark).withColumnRenamed("id", "product_id")
                .withColumnRenamed("idx", "item"), "product_id")
            bought = recommend.bought_lists(pairs.select("user", "item"))
        top = recommend.top_items(model, model.userFactors.select(F.col("id").alias("user")),
                                  settings.top_n, bought, path)
        lists = recommend.with_ids(top, users.frame(spark), products.frame(spark)).cache()
        n = publish.publish_recommendations(lists, version, settings, topics.recommendations)
        lists.unpersist()
        result = _Saved(version, model, (users, products), dict(record["params"]))
        chunks = publish.publish_factors(result, list(record["offsets"]), settings,
                                         topics.model_factors)
        out = {**record, "trigger": "manual", "status": PROMOTED, "serving": version,
               "status_reason": reason}
        publish.publish_model_ready(out, settings, topics.model_ready)
        old = models.serving()
        models.serve(version, chunks)
        if old and old.get("factor_chunks") and int(old["model_version"]) != version:
            publish.retire_factors(int(old["model_version"]), int(old["factor_chunks"]),
                                   settings, topics.model_factors)
        print(f"model {version} serves again: {n:,} users' lists on {topics.recommendations}, "
              f"{chunks} factor chunk(s) on {topics.model_factors} (was model {current})")
        return out
    finally:
        spark.stop()


class _Saved:
    """A saved model in the shape `publish.publish_factors` reads (a TrainResult's)."""

    def __init__(self, version: int, model: Any, indexes: tuple[Any, Any], params: dict) -> None:
        self.model_version, self.model, self.indexes, self.params = version, model, indexes, params


def cli(settings: Settings, args: argparse.Namespace) -> int:
    """`recsys models list|show V|promote V|rollback`."""
    from spark.publish import Topics

    topics = Topics.with_prefix(args.topic_prefix or "")
    try:
        records = history(settings, topics.model_ready)
    except (LookupError, TimeoutError) as exc:
        print(f"recsys models: {exc}", file=sys.stderr)
        return 2
    last, serving, served = registry(records)
    if args.action == "list":
        print(_table(last, serving, _saved_locally(settings)))
        return 0
    if args.action == "rollback":
        target = previous_champion(served)
        if target is None:
            print("recsys models: no earlier model served: nothing to roll back to",
                  file=sys.stderr)
            return 1
        reason = f"rollback by hand from model {serving}"
    else:
        if args.version is None:
            print(f"recsys models {args.action}: give a version", file=sys.stderr)
            return 2
        target = args.version
        reason = f"promoted by hand (model {serving} served)"
    if target not in last:
        print(f"recsys models: no model {target} on {topics.model_ready}; known: "
              f"{', '.join(map(str, sorted(last))) or 'none'}", file=sys.stderr)
        return 1
    if args.action == "show":
        print(json.dumps(last[target], indent=2, default=_json, sort_keys=True))
        print(f"serves: {'yes' if target == serving else 'no'} (model {serving} serves)")
        return 0
    started = time.perf_counter()
    try:
        promote(settings, topics, target, serving, last[target], reason)
    except ValueError as exc:
        print(f"recsys models: {exc}", file=sys.stderr)
        return 1
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


def _json(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    return str(value)
