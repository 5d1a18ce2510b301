"""The ledger every fault case ends with: what the input holds, accounted for from the outputs.

1. Every record on `sales` is either stored (its event id in the Parquet store) or in `sales.dlq`
   (stage stream) under its own `topic[partition]@offset`, with a reason.
2. Nothing is in the store twice (by event id).
3. Every user the newest served model was trained on has a list of that model or a newer one
   (the users with a positive net quantity of a product in the store rows within the model's
   recorded offsets, as spark/prepare.py trains), and each user's lists are in one partition
   of the compacted `recommendations` (else the newest is not the one compaction keeps).
4. The aggregator's totals equal a recomputation from `sales` (distinct event ids of the records
   that decode as a `Sale`), when an aggregator runs.

Read with plain Kafka consumers and pyarrow: no JVM, so a bench can run it too. `settle` waits
until (1) holds (the outputs caught up with the input: the condition that proves the point),
then checks everything once.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys.kafka import read_to_end
from recsys.settings import Settings
from schemas import codec
from schemas import topics as T

AGGREGATE_TOTALS = ("events", "sales", "returns", "quantity", "distinct_products")


@dataclass
class Ledger:
    records: int = 0  # on `sales`
    stored: int = 0  # of them, stored (their event id is in the store)
    dead_lettered: int = 0  # of them, in sales.dlq
    stored_events: int = 0  # rows in the store
    twice: dict[str, int] = field(default_factory=dict)  # event id -> rows, where > 1
    missing: list[str] = field(default_factory=list)  # sources neither stored nor dead-lettered
    reasons: Counter[str] = field(default_factory=Counter)  # dead letters by reason
    model_version: int = 0  # the newest promoted model (0: none yet)
    trained_users: int = 0
    without_list: list[str] = field(default_factory=list)
    split: list[str] = field(default_factory=list)  # users with lists on two partitions
    aggregate_want: dict[str, int] | None = None
    aggregate_got: dict[str, int] | None = None

    @property
    def ok(self) -> bool:
        return (not self.missing and not self.twice and not self.without_list
                and not self.split and self.aggregate_want == self.aggregate_got)

    def line(self) -> str:
        out = (f"ledger: {self.records} records on sales = {self.stored} stored + "
               f"{self.dead_lettered} dead-lettered + {len(self.missing)} missing; "
               f"{self.stored_events} events in the store, {len(self.twice)} twice; model "
               f"{self.model_version}: {self.trained_users} trained users, "
               f"{len(self.without_list)} without a list, {len(self.split)} with lists on "
               "two partitions")
        if self.aggregate_want is not None:
            agrees = self.aggregate_got == self.aggregate_want
            out += "; aggregator " + ("agrees" if agrees else
                                      f"{self.aggregate_got} != recomputed {self.aggregate_want}")
        return out

    def check(self) -> None:
        assert not self.missing, f"{self.line()}; e.g. {self.missing[:5]}"
        assert not self.twice, f"{self.line()}; e.g. {list(self.twice.items())[:5]}"
        assert not self.without_list, f"{self.line()}; e.g. {self.without_list[:5]}"
        assert not self.split, f"{self.line()}; e.g. {self.split[:5]}"
        assert self.aggregate_got == self.aggregate_want, self.line()


def store_rows(store: str) -> list[dict[str, Any]]:
    """The rows under `<store>/sales/` (only checked batches live there), as dicts."""
    import pyarrow.dataset as ds

    folder = Path(store.removeprefix("file:"), "sales")
    if not folder.exists() or not any(folder.rglob("*.parquet")):
        return []
    table = ds.dataset(folder, format="parquet", partitioning="hive").to_table(columns=[
        "event_id", "user_id", "product_id", "quantity", "source_topic", "source_partition",
        "source_offset"])
    return table.to_pylist()


def source(msg: Any) -> str:
    return f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"


def account(settings: Settings, aggregator: dict[str, Any] | None = None, prefix: str = ""
            ) -> Ledger:
    """The ledger as the topics (`<prefix><declared name>`) and the store stand now."""
    sales_topic, dlq_topic = prefix + T.SALES, prefix + T.SALES_DLQ
    ledger = Ledger()
    rows = store_rows(settings.store)
    ids = Counter(r["event_id"] for r in rows)
    ledger.stored_events = len(rows)
    ledger.twice = {k: n for k, n in ids.items() if n > 1}
    dead: dict[str, str] = {}
    for m in read_to_end(settings, dlq_topic):
        letter = codec.decode(m.value(), "DeadLetter")[1]
        if letter["stage"] == "stream":
            dead[letter["source"]] = letter["reason"]
    sales: dict[str, dict[str, Any]] = {}  # event id -> decoded Sale (first seen)
    for m in read_to_end(settings, sales_topic):
        ledger.records += 1
        where = source(m)
        sale = _sale(m.value())
        if sale is not None:
            sales.setdefault(sale["event_id"], sale)
        if where in dead and dead[where]:
            ledger.dead_lettered += 1
            ledger.reasons[dead[where]] += 1
        elif sale is not None and sale["event_id"] in ids:
            ledger.stored += 1
        else:
            ledger.missing.append(where)
    _trained_users(settings, ledger, rows, prefix)
    if aggregator is not None:
        ledger.aggregate_want = aggregate_totals(sales.values())
        ledger.aggregate_got = {k: aggregator["sales"][k] for k in AGGREGATE_TOTALS}
    return ledger


def _sale(value: bytes | None) -> dict[str, Any] | None:
    try:
        return codec.decode(value, "Sale")[1]
    except codec.DecodeError:
        return None


def aggregate_totals(sales: Any) -> dict[str, int]:
    """The aggregator's `sales` totals recomputed from distinct decoded sales."""
    qty = [s["quantity"] for s in sales]
    products = {s["product_id"] for s in sales} if qty else set()
    return {"events": len(qty), "sales": sum(q > 0 for q in qty),
            "returns": sum(q <= 0 for q in qty), "quantity": sum(qty),
            "distinct_products": len(products)}


def _trained_users(settings: Settings, ledger: Ledger, rows: list[dict[str, Any]], prefix: str
                   ) -> None:
    served = [codec.decode(m.value(), "ModelReady")[1]
              for m in read_to_end(settings, prefix + T.MODEL_READY)]
    served = [r for r in served if r.get("status") in (None, T.PROMOTED)]
    if not served:
        return
    newest = max(served, key=lambda r: r["model_version"])
    ledger.model_version = version = newest["model_version"]
    upto = {(o["topic"], o["partition"]): o["to_offset"] for o in newest["offsets"]}
    fee = re.compile(settings.non_product_pattern)
    net: dict[tuple[str, str], int] = Counter()
    for r in rows:
        end = upto.get((r["source_topic"], r["source_partition"]))
        if end is not None and r["source_offset"] <= end and not fee.match(r["product_id"]):
            net[(r["user_id"], r["product_id"])] += r["quantity"]
    trained = {user for (user, _), q in net.items() if q > 0}
    ledger.trained_users = len(trained)
    latest: dict[str, int] = defaultdict(int)
    partitions: dict[str, set[int]] = defaultdict(set)
    for m in read_to_end(settings, prefix + T.RECOMMENDATIONS):
        if m.value() is not None:
            rec = codec.decode(m.value(), "Recommendation")[1]
            latest[rec["user_id"]] = rec["model_version"]  # offset order: the newest wins
            partitions[rec["user_id"]].add(m.partition())
    ledger.split = sorted(u for u, p in partitions.items() if len(p) > 1)
    ledger.without_list = sorted(u for u in trained if latest.get(u, 0) < version)


def settle(settings: Settings, timeout: float = 180.0, aggregator: Any = None, prefix: str = ""
           ) -> Ledger:
    """Wait until every record on `sales` is accounted for (and the aggregator, a callable
    returning its /stats, agrees with the recomputation), then return the ledger; the last one
    seen when `timeout` passes (its `check()` says what is wrong)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        began = time.monotonic()
        stats = aggregator() if aggregator is not None else None
        ledger = account(settings, stats if stats is not None else (
            {"sales": dict.fromkeys(AGGREGATE_TOTALS, -1)} if aggregator else None), prefix)
        if ledger.ok or time.monotonic() > deadline:
            return ledger
        time.sleep(max(2.0, time.monotonic() - began))  # a big ledger: not all the time


def speed_state_diff(settings: Settings, prefix: str = "") -> list[str]:
    """Users whose speed-layer state (the newest record per user on its changelog) differs from
    their stored sales netted once per event id (fees left out, zero nets dropped); [] when all
    agree."""
    from speed.state import UserState

    want: dict[str, Counter[str]] = defaultdict(Counter)
    fee = re.compile(settings.non_product_pattern)
    for r in store_rows(settings.store):
        if not fee.match(r["product_id"]):
            want[r["user_id"]][r["product_id"]] += r["quantity"]
    have: dict[str, dict[str, int]] = {}
    for m in read_to_end(settings, prefix + T.SPEED_STATE):
        if m.value() is not None:
            state = UserState.of(codec.decode(m.value(), "SpeedState")[1])
            have[state.user_id] = state.quantities
    return sorted(u for u in set(want) | set(have)
                  if have.get(u, {}) != {p: n for p, n in want.get(u, {}).items() if n})
