"""The aggregator's tables (Faust tables with changelog topics); the views derived from them are
in streams/state.py (plain Python).

Only the tables are state; every count the API shows is *derived* from them, in memory, and
rebuilt from them after a restart (`State.rebuild`, run when Faust finishes recovering the
tables from their changelogs). So a replay (at-least-once: a worker killed after its changelog
writes but before its offset commit reads those events again) can never double count: each table
update is set-based and keyed by the event's deterministic id, and counts are recomputed from the
deltas of those updates.

    model_recs      record id -> list, for the last `aggregate_keep_models` versions: the retrain
                    list ("model_version:user_id") and the fold-in lists
                    ("model_version:user_id:sale_event_id", at most MAX_LISTS per user and version,
                    the newest): per-version degrees, the lists a sale is judged against, and the
                    list the read API answers (chosen at query time: the version in service first,
                    streams/feedback.py `rank`)
    shadow_recs     the same for `recommendations-shadow`: a rejected challenger's lists, judged
                    beside the served ones, never answered
    models          model_version -> ModelReady summary (offline metrics, the last record's
                    status and `serving`, and every record read for the version: a manual
                    promotion or rollback sends another one for the same version)
    sales_batches   one record per agent batch: the batch's new sales, each with its event_id,
                    arrival time, partition and feedback match. Kept while inside the feedback
                    window: the event ids in it are the dedupe set, bounded by the window
    product_totals  product_id -> sales folded in when their minute left the window, with `upto`
                    (per sales partition, the newest minute folded in), so folding again is a
                    no-op
    sales_rollup    "total/<partition>" -> totals and per-minute counts folded in, with `upto`
    dead_letters    "topic/partition" -> counts by reason, with the last offset applied

Folding a minute out of the window writes product_totals, flushes, writes sales_rollup,
flushes, and only then deletes the sales_batches records they absorbed: a crash at any point
leaves either records whose `upto` says they are already counted, or sales still there (or read
again) to fold again. tests/unit/test_agents.py kills a worker at every point to check it.

Partitions: each table has as many changelog partitions as its source topic. Writes go to the
partition of the key's hash (`KeyedTable`), so a key always lives in one partition and
compaction keeps its latest value. One worker holds every partition; running several workers
would need `sales` and `recommendations` co-partitioned: the producers agree on the partitioner
(murmur2, Java's default, set for librdkafka in `recsys.kafka.PRODUCER_DEFAULTS`), but the two
topics may have different partition counts, and the tables would need them equal.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import faust

from schemas import topics as T


@dataclass(frozen=True)
class Tables:
    model_recs: Any
    shadow_recs: Any
    models: Any
    sales_batches: Any
    product_totals: Any
    sales_rollup: Any
    dead_letters: Any


class KeyedTable(faust.Table):
    """A table whose changelog partition is a stable hash of the key, not the partition of the
    event being processed: a key then always lives in one partition (compaction keeps its last
    value), any agent or timer may write it, and no producer metadata is needed (Faust's own
    `use_partitioner` asks the producer, which does not know a changelog topic created at
    start)."""

    def partition_for_key(self, key: Any) -> int:
        return zlib.crc32(str(key).encode()) % (self.partitions or 1)


def declare(app: Any, partitions: Mapping[str, int]) -> Tables:
    """The tables, each with the partitions of the topic that feeds it."""

    def table(name: str, source: str, help: str) -> Any:
        return app.tables.add(KeyedTable(
            app, name=name, default=None, partitions=partitions[source], help=help,
            beacon=app.tables.beacon,
        ))

    return Tables(
        model_recs=table("model-recs", T.RECOMMENDATIONS, "list per model version and user"),
        shadow_recs=table("shadow-recs", T.RECOMMENDATIONS_SHADOW,
                          "a rejected challenger's list per version and user"),
        models=table("models", T.MODEL_READY, "model-ready summary per version"),
        sales_batches=table("sales-batches", T.SALES, "sales inside the feedback window"),
        product_totals=table("product-totals", T.SALES, "sales per product folded in"),
        sales_rollup=table("sales-rollup", T.SALES, "totals folded in"),
        dead_letters=table("dead-letters", T.SALES_DLQ, "dead letters by reason"),
    )


__all__ = ["KeyedTable", "Tables", "declare"]
