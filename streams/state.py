"""The aggregator's views, derived from its tables (streams/tables.py): plain Python, no Faust,
so the rules are unit-tested on their own (tests/unit/test_feedback.py, test_agents.py).

Only the tables are state; every count the API shows is derived from them here, in memory, and
rebuilt from them after a restart (`State.rebuild`). Each table update is set-based and keyed by
the event's deterministic id, so a replay never double counts. What each table holds, and the
order a fold writes them in: streams/tables.py.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from schemas import topics as T
from schemas.dead_letters import reason_label
from streams.feedback import (
    BUCKET_MS,
    RETRAIN,
    SOURCES,
    FeedbackWindow,
    Listing,
    ServingTimeline,
    bucket_of,
    choose,
    window_bounds,
)

if TYPE_CHECKING:
    from streams.tables import Tables

MAX_MODEL_RECORDS = 16  # model-ready records kept per version (each promotion adds one)
MAX_MINUTES = 180  # per-minute counts kept after they leave the window
MAX_REASONS = 50  # distinct dead-letter labels per partition; the rest count as "other"
# Lists kept per user and version: the newest decides degrees and judges new sales; the older
# ones judge sales that arrived before it and are read late (a backlog, a replay after a crash).
MAX_LISTS = 8


class BatchSale(NamedTuple):
    """One sale as kept in sales_batches: on the changelog a JSON list, small, read back by
    position (`of`). `source`, the source of the list it was judged against, is absent from the
    records of older versions (then a retrain's); `shadow_version` and `shadow_hit`, the
    challenger whose shadow list was in force and whether it was a hit, are absent when none was
    (and from older records)."""

    event_id: str
    ts: int  # arrival (the Kafka timestamp), epoch ms
    user_id: str
    product_id: str
    quantity: int
    model_version: int | None  # of the list in force at arrival (None: no list)
    hit: int  # 1 when the product was on that list
    partition: int  # of `sales`
    source: str | None = RETRAIN
    shadow_version: int | None = None
    shadow_hit: int = 0

    @classmethod
    def of(cls, stored: Sequence[Any]) -> BatchSale:
        """From the stored list (or a BatchSale)."""
        return cls(*stored)

    def stored(self) -> list[Any]:
        """The list written to sales_batches: the shadow fields only when there was one."""
        return list(self) if self.shadow_version is not None else list(self[:9])


# --- recommendations --------------------------------------------------------------------------


@dataclass
class VersionStats:
    users: int = 0
    k: int = 0
    degree: Counter[str] = field(default_factory=Counter)  # product -> users it is shown to
    published: int = 0  # newest generated_at of its retrain lists: a republished version is new


def list_key(user_id: str, listing: Listing) -> str:
    """A list's `model_recs` key: its Recommendation id (speed/layer.py, spark/publish.py)."""
    key = f"{listing.model_version}:{user_id}"
    return key if listing.source == RETRAIN else f"{key}:{listing.sale_event_id or ''}"


def list_value(user_id: str, listing: Listing) -> dict[str, Any]:
    return {"g": listing.generated_at, "items": list(listing.items), "u": user_id,
            "src": listing.source, "eid": listing.sale_event_id, "s": list(listing.scores)}


def keep_rank(mv: int, published: int, serving: int | None) -> tuple[bool, int, int]:
    """Which versions' lists are kept: the one in service always, then the most recently
    published (a rollback republishes an older version: its lists are new), then the newest."""
    return mv == serving, published, mv


class RecommendationState:
    """Per-user lists of the kept versions, and per-version degrees, from `model_recs`.

    A user may hold several lists of one version (its retrain list, then a fold-in per sale),
    oldest first; degrees count each user's newest list of the version only.
    """

    def __init__(self) -> None:
        self.by_user: dict[str, dict[int, list[Listing]]] = {}
        self.versions: dict[int, VersionStats] = {}

    def listings(self, user_id: str) -> Iterable[Listing]:
        return [lst for lists in self.by_user.get(user_id, {}).values() for lst in lists]

    def put(self, user_id: str, listing: Listing) -> bool:
        """Add (or replace, same source and sale) one list of a user; False when nothing changed:
        it was already exactly that, or it is older than the MAX_LISTS kept."""
        mv = listing.model_version
        lists = self.by_user.setdefault(user_id, {}).setdefault(mv, [])
        old = next((lst for lst in lists if lst.ident == listing.ident), None)
        if old == listing or (old is None and len(lists) >= MAX_LISTS
                              and listing.order < lists[0].order):
            return False
        before = lists[-1] if lists else None
        if old is not None:
            lists.remove(old)
        bisect.insort(lists, listing, key=lambda lst: lst.order)
        stats = self.versions.setdefault(mv, VersionStats())
        if before is None:
            stats.users += 1
        if before is not lists[-1]:
            if before is not None:
                for p in before.items:
                    n = stats.degree[p] - 1
                    if n:
                        stats.degree[p] = n
                    else:
                        del stats.degree[p]
            stats.degree.update(lists[-1].items)
        stats.k = max(stats.k, len(listing.items))
        if listing.source == RETRAIN:
            stats.published = max(stats.published, listing.generated_at)
        return True

    def chosen(self, user_id: str, serving: int | None) -> Listing | None:
        """The list the read API answers for the user now."""
        return choose(self.listings(user_id), serving)

    def is_stale(self, listing: Listing, serving: int | None, keep: int) -> bool:
        """Would this list's version be dropped at once: a new version while `keep` are kept,
        each ranking above it (`keep_rank`)."""
        mv = listing.model_version
        if mv in self.versions or len(self.versions) < keep:
            return False
        published = listing.generated_at if listing.source == RETRAIN else 0
        return keep_rank(mv, published, serving) < min(
            keep_rank(v, s.published, serving) for v, s in self.versions.items())

    def to_drop(self, serving: int | None, keep: int) -> list[int]:
        """The versions beyond the `keep` that rank highest."""
        ranked = sorted(self.versions, key=lambda v: keep_rank(v, self.versions[v].published,
                                                               serving))
        return ranked[:max(0, len(ranked) - keep)]

    def by_source(self, serving: int | None) -> Counter[str]:
        """Users by the source of the list the read API answers them."""
        out: Counter[str] = Counter()
        for user in self.by_user:
            lst = self.chosen(user, serving)
            if lst is not None:
                out[lst.source] += 1
        return out

    def trim(self, user_id: str, mv: int) -> list[str]:
        """Keep a user's newest MAX_LISTS lists of a version; the keys of those dropped."""
        lists = self.by_user.get(user_id, {}).get(mv, [])
        dropped = lists[:-MAX_LISTS]
        del lists[:-MAX_LISTS]
        return [list_key(user_id, lst) for lst in dropped]

    def drop_version(self, mv: int) -> list[str]:
        """Forget a version; the `model_recs` keys of its lists."""
        keys = []
        for u in [u for u, lists in self.by_user.items() if mv in lists]:
            keys += [list_key(u, lst) for lst in self.by_user[u].pop(mv)]
            if not self.by_user[u]:
                del self.by_user[u]
        self.versions.pop(mv, None)
        return keys

    def rebuild(self, model_recs: Iterable[tuple[str, Any]]) -> None:
        self.__init__()
        for key, value in model_recs:
            if value is None:
                continue
            mv, _, user = key.partition(":")  # records of older versions: retrain lists only
            self.put(value.get("u", user), Listing(
                int(mv), int(value["g"]), tuple(value["items"]), value.get("src", RETRAIN),
                value.get("eid"), tuple(value.get("s") or ())))

    def degree_histogram(self, mv: int) -> list[list[int]]:
        """[[degree, products with that degree], ...]: how many users each product reaches."""
        stats = self.versions.get(mv)
        if stats is None:
            return []
        return [[d, n] for d, n in sorted(Counter(stats.degree.values()).items())]

    def top_recommended(self, mv: int, n: int) -> list[dict[str, Any]]:
        stats = self.versions.get(mv)
        if stats is None:
            return []
        return [{"product_id": p, "users": c} for p, c in stats.degree.most_common(n)]


# --- sales ------------------------------------------------------------------------------------


def _empty_rollup() -> dict[str, Any]:
    return {"upto": -1, "clock_ms": 0, "events": 0, "sales": 0, "returns": 0, "quantity": 0,
            "minutes": []}


def rollup_key(partition: int) -> str:
    return f"total/{partition}"


class Lane:
    """One partition of `sales`: its clock, its minutes inside the window, its folded totals."""

    def __init__(self) -> None:
        self.rollup: dict[str, Any] = _empty_rollup()
        self.upto = -1  # newest minute folded; older arrivals on this partition are replays
        self.clock_ms = 0  # newest arrival read by THIS worker (from the last fold's on restart)
        self.buckets: dict[int, list[BatchSale]] = {}


@dataclass
class ClosePlan:
    """What folding the minutes that left the window writes, in this order."""

    buckets: dict[int, list[int]]  # partition -> minutes folded
    products: dict[str, dict[str, Any]]  # product_totals records
    rollups: dict[int, dict[str, Any]]  # partition -> its sales_rollup record
    delete: list[str]  # sales_batches keys fully absorbed


class SalesState:
    """Sales counted once per event_id, from sales_batches + product_totals + sales_rollup.

    Time is the sales' arrival (Kafka timestamps), never the wall clock, so the same topic
    content always gives the same windows and folds, however fast it is read. Each partition of
    `sales` keeps its own clock and folds its own minutes: partitions are read at different
    speeds (a backlog is fetched partition by partition), and only within one partition do
    offsets follow arrival. A partition's clock counts only what this worker has read (after a
    restart it starts from the last fold's): a crash can leave recovered batches that hold later
    sales than some lost ones, and the lost ones are read again, in offset order, before the
    clock passes them, so their minute is still open when they come back.
    """

    def __init__(self, horizon: int) -> None:
        self.horizon = horizon
        self.reset()

    def reset(self) -> None:
        self.lanes: dict[int, Lane] = {}
        self.stream_ms = 0  # newest arrival known, recovered sales included
        self.index: dict[str, int] = {}  # event_id -> partition, for the sales not folded
        self.batches: dict[str, dict[int, int]] = {}  # key -> partition -> newest minute in it
        self.absorbed: dict[str, list[int]] = {}  # product -> [sales, returns, quantity] folded
        self.product_upto: dict[str, dict[int, int]] = {}  # product -> partition -> minute
        self.products: dict[str, list[int]] = {}  # all time: folded + not folded yet
        self.open = [0, 0, 0, 0]  # events, sales, returns, quantity not folded yet
        self.minutes: Counter[int] = Counter()  # not folded yet, all partitions
        self.window = FeedbackWindow()

    def lane(self, partition: int) -> Lane:
        lane = self.lanes.get(partition)
        if lane is None:
            lane = self.lanes[partition] = Lane()
        return lane

    # --- reads ---------------------------------------------------------------------------------
    def is_late(self, partition: int, ts_ms: int) -> bool:
        """Arrived in a minute its partition has folded: a replay of a counted sale."""
        lane = self.lanes.get(partition)
        return lane is not None and bucket_of(ts_ms) <= lane.upto

    def seen(self, event_id: str) -> bool:
        return event_id in self.index

    def window_bounds(self) -> tuple[int, int]:
        """[start, end) of the sales not folded yet: start by the slowest partition's clock."""
        end = window_bounds(self.stream_ms, self.horizon)[1]
        clocks = [lane.clock_ms for lane in self.lanes.values() if lane.clock_ms]
        start = window_bounds(min(clocks), self.horizon)[0] if clocks else end - self.horizon
        return start, end

    def observe(self, partition: int, ts_ms: int) -> None:
        """A sale read by this worker, counted or not (a duplicate still moves time on)."""
        lane = self.lane(partition)
        if ts_ms > lane.clock_ms:
            lane.clock_ms = ts_ms
        if ts_ms > self.stream_ms:
            self.stream_ms = ts_ms

    def totals(self) -> dict[str, int]:
        out = dict(zip(("events", "sales", "returns", "quantity"), self.open, strict=True))
        for lane in self.lanes.values():
            for k in ("events", "sales", "returns", "quantity"):
                out[k] += lane.rollup[k]
        out["distinct_products"] = len(self.products)
        out["in_window"] = len(self.index)
        return out

    def per_minute(self) -> list[list[int]]:
        """[[minute_start_ms, events], ...], oldest first, at most MAX_MINUTES."""
        merged: Counter[int] = Counter()
        for lane in self.lanes.values():
            for m, n in lane.rollup["minutes"]:
                merged[m] += n
        merged.update(self.minutes)
        return [[b, merged[b]] for b in sorted(merged)[-MAX_MINUTES:]]

    def top_products(self, n: int, not_product: str = "") -> list[dict[str, Any]]:
        """The most sold products; codes matching `not_product` (settings.non_product_pattern:
        postage, fees...) are left out."""
        skip = re.compile(not_product).match if not_product else None
        ranked = sorted(self.products.items(), key=lambda kv: (-kv[1][0], kv[0]))
        top = [kv for kv in ranked if skip is None or not skip(kv[0])][:n]
        return [{"product_id": p, "sales": s, "returns": r, "quantity": q}
                for p, (s, r, q) in top]

    # --- writes --------------------------------------------------------------------------------
    def _folded_for_product(self, e: BatchSale, b: int) -> bool:
        """A product record may have folded this minute already (a crash between writing
        product_totals and sales_rollup): then the sale is in the product's total."""
        return b <= self.product_upto.get(e.product_id, {}).get(e.partition, -1)

    def _add_entry(self, e: BatchSale, b: int) -> None:
        self.index[e.event_id] = e.partition
        self.lane(e.partition).buckets.setdefault(b, []).append(e)
        self.minutes[b] += 1
        qty = e.quantity
        delta = (1, 0, qty) if qty > 0 else (0, 1, qty)
        self.open[0] += 1
        self.open[1] += delta[0]
        self.open[2] += delta[1]
        self.open[3] += qty
        if not self._folded_for_product(e, b):
            totals = self.products.setdefault(e.product_id, [0, 0, 0])
            for i in range(3):
                totals[i] += delta[i]
        self.window.add(e.model_version, e.user_id, e.product_id, qty, bool(e.hit), e.source,
                        shadow_version=e.shadow_version, shadow_hit=bool(e.shadow_hit))
        if e.ts > self.stream_ms:
            self.stream_ms = e.ts

    def add(self, key: str, entries: Iterable[Sequence[Any]]) -> None:
        """A batch the agent has just written to sales_batches under `key` (BatchSales, or
        their stored lists)."""
        newest: dict[int, int] = {}
        for e in map(BatchSale.of, entries):
            b = bucket_of(e.ts)
            p = e.partition
            newest[p] = max(newest.get(p, -1), b)
            self.observe(p, e.ts)
            self._add_entry(e, b)
        self.batches[key] = newest

    def close_plan(self) -> ClosePlan | None:
        """The minutes that left each partition's window, folded: None when none has."""
        closing: dict[int, list[int]] = {}
        for p, lane in self.lanes.items():
            start = window_bounds(lane.clock_ms, self.horizon)[0]
            minutes = sorted(b for b in lane.buckets if b < start)
            if minutes:
                closing[p] = minutes
        if not closing:
            return None
        deltas: dict[str, list[int]] = {}
        rollups: dict[int, dict[str, Any]] = {}
        for p, minutes in closing.items():
            lane = self.lanes[p]
            roll = dict(lane.rollup)
            per_minute = dict(roll["minutes"])
            for b in minutes:
                entries = lane.buckets[b]
                per_minute[b] = per_minute.get(b, 0) + len(entries)
                for e in entries:
                    qty = e.quantity
                    d = (1, 0, qty) if qty > 0 else (0, 1, qty)
                    roll["events"] += 1
                    roll["sales"] += d[0]
                    roll["returns"] += d[1]
                    roll["quantity"] += qty
                    if not self._folded_for_product(e, b):
                        acc = deltas.setdefault(e.product_id, [0, 0, 0])
                        for i in range(3):
                            acc[i] += d[i]
            roll["upto"] = minutes[-1]
            roll["clock_ms"] = lane.clock_ms
            roll["minutes"] = [[m, per_minute[m]] for m in sorted(per_minute)[-MAX_MINUTES:]]
            rollups[p] = roll
        products = {}
        for product, d in deltas.items():
            s, r, q = self.absorbed.get(product, (0, 0, 0))
            upto = dict(self.product_upto.get(product, {}))
            for p, roll in rollups.items():
                upto[p] = max(upto.get(p, -1), roll["upto"])
            products[product] = {"upto": {str(p): m for p, m in upto.items()},
                                 "sales": s + d[0], "returns": r + d[1], "quantity": q + d[2]}
        folded = {p: lane.upto for p, lane in self.lanes.items()}
        folded.update({p: roll["upto"] for p, roll in rollups.items()})
        delete = [k for k, newest in self.batches.items()
                  if all(m <= folded.get(p, -1) for p, m in newest.items())]
        return ClosePlan(closing, products, rollups, delete)

    def apply_close(self, plan: ClosePlan) -> None:
        for p, minutes in plan.buckets.items():
            lane = self.lanes[p]
            for b in minutes:
                entries = lane.buckets.pop(b)
                self.minutes[b] -= len(entries)
                if self.minutes[b] <= 0:
                    del self.minutes[b]
                for e in entries:
                    self.index.pop(e.event_id, None)
                    qty = e.quantity
                    self.open[0] -= 1
                    self.open[1] -= 1 if qty > 0 else 0
                    self.open[2] -= 0 if qty > 0 else 1
                    self.open[3] -= qty
                    self.window.remove(e.model_version, e.user_id, e.product_id, qty,
                                       bool(e.hit), e.source, e.shadow_version,
                                       bool(e.shadow_hit))
        for product, rec in plan.products.items():
            self._absorb(product, rec)
        for p, roll in plan.rollups.items():
            lane = self.lanes[p]
            lane.rollup, lane.upto = roll, roll["upto"]
        for k in plan.delete:
            self.batches.pop(k, None)

    def _absorb(self, product: str, rec: Mapping[str, Any]) -> None:
        self.absorbed[product] = [rec["sales"], rec["returns"], rec["quantity"]]
        self.product_upto[product] = {int(p): m for p, m in rec["upto"].items()}

    def rebuild(
        self,
        batches: Iterable[tuple[str, Any]],
        product_totals: Iterable[tuple[str, Any]],
        rollups: Iterable[tuple[str, Any]],
    ) -> None:
        self.reset()
        for key, rec in rollups:
            if rec is None:
                continue
            lane = self.lane(int(key.rsplit("/", 1)[1]))
            lane.rollup = {**_empty_rollup(), **rec}
            lane.upto = lane.rollup["upto"]
            lane.clock_ms = lane.rollup["clock_ms"]
            self.stream_ms = max(self.stream_ms, lane.clock_ms)
        for product, rec in product_totals:
            if rec is None:
                continue
            self._absorb(product, rec)
            self.products[product] = list(self.absorbed[product])
        for key, value in sorted(batches, key=lambda kv: str(kv[0])):
            if value is None:
                continue
            newest: dict[int, int] = {}
            for e in map(BatchSale.of, value["e"]):
                b, p = bucket_of(e.ts), e.partition
                newest[p] = max(newest.get(p, -1), b)
                self.stream_ms = max(self.stream_ms, e.ts)
                lane = self.lanes.get(p)
                if (lane is not None and b <= lane.upto) or e.event_id in self.index:
                    continue  # folded already, or (never written twice, but cheap) a repeat
                self._add_entry(e, b)
            self.batches[key] = newest


# --- dead letters -----------------------------------------------------------------------------


class DeadLetterState:
    """Counts per `topic/partition` of sales.dlq, each with the last offset applied."""

    def __init__(self) -> None:
        self.partitions: dict[str, dict[str, Any]] = {}

    def record(self, key: str) -> dict[str, Any]:
        """A copy of one partition's record to update (the table gets the whole new value)."""
        rec = self.partitions.get(key) or {"offset": -1, "total": 0, "reasons": {}, "stages": {}}
        return {"offset": rec["offset"], "total": rec["total"], "reasons": dict(rec["reasons"]),
                "stages": dict(rec["stages"])}

    @staticmethod
    def count(rec: dict[str, Any], offset: int, stage: str, reason: str) -> bool:
        """Count one dead letter into `rec` unless its offset was applied; True when counted."""
        if offset <= rec["offset"]:
            return False
        label = reason_label(stage, reason)
        if label not in rec["reasons"] and len(rec["reasons"]) >= MAX_REASONS:
            label = "other"
        rec["reasons"][label] = rec["reasons"].get(label, 0) + 1
        rec["stages"][stage] = rec["stages"].get(stage, 0) + 1
        rec["total"] += 1
        rec["offset"] = offset
        return True

    def rebuild(self, items: Iterable[tuple[str, Any]]) -> None:
        self.partitions = {k: v for k, v in items if v is not None}

    def totals(self) -> dict[str, Any]:
        reasons: Counter[str] = Counter()
        stages: Counter[str] = Counter()
        for rec in self.partitions.values():
            reasons.update(rec["reasons"])
            stages.update(rec["stages"])
        return {"total": sum(r["total"] for r in self.partitions.values()),
                "by_reason": dict(reasons.most_common()), "by_stage": dict(stages.most_common())}


# --- everything the agents and views share ------------------------------------------------------


def serving_of(model_version: int, status: str, serving: int) -> int | None:
    """The version in service once a model-ready record is read. A record without `serving`
    (an old v1 record reads as 0, promoted) names its own version; a rejected one with 0, none."""
    if serving:
        return serving
    return model_version if status == T.PROMOTED else None


def model_records(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The model-ready records read for one version, oldest first (a summary written by an
    older aggregator has none: it stands for one promoted record)."""
    records = summary.get("records")
    if records:
        return records
    mv = summary["model_version"]
    return [{"offset": -1, "ts": summary.get("trained_at", 0), "status": T.PROMOTED,
             "serving": mv, "trigger": summary.get("trigger", "")}]


class State:
    """The derived views plus the worker's own counters (those restart at zero)."""

    def __init__(self, horizon: int, keep_models: int) -> None:
        self.keep_models = keep_models
        self.recs = RecommendationState()
        self.shadow = RecommendationState()  # a rejected challenger's lists, never answered
        self.sales = SalesState(horizon)
        self.dead_letters = DeadLetterState()
        self.models: dict[int, dict[str, Any]] = {}
        self.serving: int | None = None  # `serving` of the last model-ready record read
        self.timeline = ServingTimeline()  # which version served when (sales are judged by it)
        self.recovered = False
        self.feedback: dict[int, dict[str, Any]] = {}  # last published per version
        self.counters: Counter[str] = Counter()

    @property
    def latest_model(self) -> int | None:
        return max(self.models) if self.models else None

    @property
    def latest_users(self) -> int:
        """Users with a list."""
        return len(self.recs.by_user)

    def users_by_source(self) -> dict[str, int]:
        counts = self.recs.by_source(self.serving)
        return {src: counts[src] for src in SOURCES}

    def derive_serving(self) -> None:
        """`serving` and the timeline from every model-ready record kept, in offset order."""
        records = sorted(
            ((r["offset"], r["ts"], serving_of(mv, r["status"], r["serving"]))
             for mv, summary in self.models.items() for r in model_records(summary)),
            key=lambda r: (r[0], r[1]))
        self.serving = records[-1][2] if records else None
        self.timeline = ServingTimeline((ts, serving) for _, ts, serving in records)

    def status(self, mv: int) -> str | None:
        summary = self.models.get(mv)
        return summary.get("status", T.PROMOTED) if summary else None

    def rebuild(self, tables: Tables) -> None:
        """Every view from the tables, after Faust recovered them from their changelogs."""
        self.models = {int(k): v for k, v in tables.models.items() if v is not None}
        self.derive_serving()
        self.recs.rebuild(tables.model_recs.items())
        self.shadow.rebuild(tables.shadow_recs.items())
        self.sales.rebuild(
            tables.sales_batches.items(),
            tables.product_totals.items(),
            tables.sales_rollup.items(),
        )
        self.dead_letters.rebuild(tables.dead_letters.items())
        self.recovered = True


__all__ = ["BUCKET_MS", "BatchSale", "ClosePlan", "State"]
