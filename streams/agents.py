"""What the aggregator does with its inputs (`Aggregation`), the agents that feed it, and the
feedback timer out.

`Aggregation` holds what is done with each batch of events, so tests drive the same code with or
without Faust. Two ways in:

- recommendations, recommendations-shadow, model-ready and dead letters: Faust agents taking their stream in batches
  (`take_events`: Faust acks a batch only after the body has handled it, so the guarantee stays
  at-least-once; the commit, Faust's, follows a producer flush);
- sales, the input with volume: not a Faust agent. streams/sales_reader.py reads whole fetches
  with its own consumer and hands them to `on_sales`, then flushes and commits itself (Faust's
  per-event path held the worker near 3,000 sales/s).

A batch of sales becomes ONE `sales_batches` record (a table write per event would halve the
throughput). Order per batch: dead letters sent -> tables written -> derived views updated; the
flush, then the commit, follow.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from recsys.settings import Settings
from schemas import topics as T
from schemas.metrics import PRECISION_AT_K
from schemas.millis import now_ms as _now_ms
from schemas.millis import to_ms
from streams.faust_codec import Undecodable
from streams.feedback import RETRAIN, Listing, feedback_record, match
from streams.state import (
    MAX_MODEL_RECORDS,
    BatchSale,
    DeadLetterState,
    RecommendationState,
    State,
    list_key,
    list_value,
    rollup_key,
    serving_of,
)
from streams.tables import Tables

log = logging.getLogger(__name__)

BATCH = 1000  # events per batch (take_events, and sales per `on_sales` call)
WITHIN = 0.25  # seconds a partial batch may wait
PROGRESS_SECONDS = 10.0

Send = Callable[[Any, bytes, dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Topics:
    """The Faust topics the aggregator reads and writes."""

    sales: Any
    dead_letters: Any
    model_ready: Any
    recommendations: Any
    feedback: Any
    shadow: Any = None  # recommendations-shadow


def _source(event: Any) -> str:
    m = event.message
    return f"{m.topic}[{m.partition}]@{m.offset}"


async def _send_via_topic(topic: Any, key: bytes, value: dict[str, Any]) -> Any:
    return await topic.send(key=key, value=value)


async def _flush_faust(app: Any) -> None:
    await app.producer.flush()


class Aggregation:
    """What the agents and the sales reader do with their batches; tables are written here and
    nowhere else."""

    def __init__(
        self,
        settings: Settings,
        tables: Tables,
        state: State,
        topics: Topics,
        flush: Callable[[], Awaitable[None]],
        send: Send = _send_via_topic,
        drain: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.tables = tables
        self.state = state
        self.topics = topics
        self.flush = flush  # table writes durable on the broker (the fold's barrier)
        self.send = send
        self.drain = drain  # table writes handed to the Kafka client (before a batch is acked)

    async def settle(self) -> None:
        """Run at the end of every batch, before Faust acks its events: the batch's table writes
        are with the Kafka client, so the flush that precedes Faust's commit includes them."""
        if self.drain is not None:
            await self.drain()

    # --- dead letters out ------------------------------------------------------------------------
    async def dead_letter(self, event: Any, reason: str, data: bytes | None) -> None:
        """Send an input we cannot use to sales.dlq, naming where it came from."""
        m = event.message
        source = _source(event)
        log.warning("%s: dead-lettered: %s", source, reason)
        self.state.counters["dead_lettered"] += 1
        if m.topic == self.topics.dead_letters.get_topic_name():
            return  # never loop a bad dead letter back into its own topic; counted above
        await self.send(self.topics.dead_letters, source.encode(), {
            "source": source, "stage": "aggregate", "reason": reason, "failed_at": _now_ms(),
            "original_bytes": data, "original_row": None, "source_topic": m.topic,
            "source_partition": m.partition, "source_offset": m.offset, "row_number": None,
        })

    async def _usable(self, event: Any) -> dict[str, Any] | None:
        value = event.value
        if isinstance(value, Undecodable):
            await self.dead_letter(event, value.reason, value.data)
            return None
        if value is None:  # a tombstone (recommendations is compacted): nothing to count
            self.state.counters["tombstones"] += 1
            return None
        return value

    # --- sales -----------------------------------------------------------------------------------
    async def on_sales(self, events: Sequence[Any]) -> int:
        """Judge each new sale against the list in force at its arrival, write the batch as one
        record, then fold the minutes that left the window. Returns the sales counted."""
        sales, recs, counters = self.state.sales, self.state.recs, self.state.counters
        shadow, timeline = self.state.shadow, self.state.timeline
        entries: list[BatchSale] = []
        fresh: set[str] = set()
        key = None
        for event in events:
            value = await self._usable(event)
            if value is None:
                continue
            ts = round(event.message.timestamp * 1000)
            eid = value["event_id"]
            part = event.message.partition
            sales.observe(part, ts)
            if sales.is_late(part, ts):
                counters["sales_late"] += 1  # its minute is folded: a replay of a counted sale
                continue
            if eid in fresh or sales.seen(eid):
                counters["sales_duplicate"] += 1
                continue
            user, product, qty = value["user_id"], value["product_id"], int(value["quantity"])
            m = match(recs.listings(user), product, ts, timeline.at(ts), shadow.listings(user))
            entries.append(BatchSale(eid, ts, user, product, qty, m.model_version, int(m.hit), part,
                                     m.source, m.shadow_version, int(m.shadow_hit)))
            fresh.add(eid)
            if key is None:
                msg = event.message
                key = f"{msg.topic}/{msg.partition}/{msg.offset}"
        counters["sales_in"] += len(events)
        if entries:
            # The key is the first NEW sale's position, so it can never name a record written
            # before (that record's first sale would be in the dedupe set).
            self.tables.sales_batches[key] = {"e": [e.stored() for e in entries]}
            sales.add(key, entries)
        await self.fold()
        return len(entries)

    async def fold(self) -> None:
        """Fold the minutes that left the window into product_totals and sales_rollup."""
        plan = self.state.sales.close_plan()
        if plan is None:
            return
        # Each step durable before the next (changelog partitions are written in parallel):
        # products, then the rollup whose `upto` makes the folded minutes' replays skip, then
        # the deletes of what they absorbed (see streams/tables.py).
        for product, rec in plan.products.items():
            self.tables.product_totals[product] = rec
        await self.flush()
        for partition, rollup in plan.rollups.items():
            self.tables.sales_rollup[rollup_key(partition)] = rollup
        await self.flush()
        for key in plan.delete:
            if key in self.tables.sales_batches:
                del self.tables.sales_batches[key]
        self.state.sales.apply_close(plan)
        log.debug("folded minutes %s; %d batch records deleted", plan.buckets, len(plan.delete))

    # --- recommendations ---------------------------------------------------------------------
    async def on_recommendations(self, events: Sequence[Any]) -> int:
        """Add each list (a retrain's or a fold-in's) to its user's lists of its version; which
        one the read API answers is chosen at query time (the version in service first)."""
        return await self._on_lists(events, self.state.recs, self.tables.model_recs,
                                    "recommendations")

    async def on_shadow(self, events: Sequence[Any]) -> int:
        """A rejected challenger's lists: kept to judge sales beside the served ones."""
        return await self._on_lists(events, self.state.shadow, self.tables.shadow_recs, "shadow")

    async def _on_lists(self, events: Sequence[Any], recs: RecommendationState, table: Any,
                        what: str) -> int:
        state, counters = self.state, self.state.counters
        changed = 0
        for event in events:
            value = await self._usable(event)
            if value is None:
                continue
            mv, user = int(value["model_version"]), value["user_id"]
            g = to_ms(value["generated_at"])
            ranked = sorted(value["items"], key=lambda it: it["rank"])
            source = value.get("source") or RETRAIN
            listing = Listing(mv, g, tuple(it["product_id"] for it in ranked), source,
                              value.get("sale_event_id") if source != RETRAIN else None,
                              tuple(float(it["score"]) for it in ranked))
            counters[f"{what}_{source}"] += 1
            if recs.is_stale(listing, state.serving, state.keep_models):
                counters[f"{what}_stale"] += 1  # ranks below every kept version
                continue
            if recs.put(user, listing):
                table[list_key(user, listing)] = list_value(user, listing)
                for key in recs.trim(user, mv):
                    if key in table:
                        del table[key]
                changed += 1
            self._prune(recs, table, what)
        counters[f"{what}_in"] += len(events)
        return changed

    def _prune(self, recs: RecommendationState, table: Any, what: str) -> None:
        for mv in recs.to_drop(self.state.serving, self.state.keep_models):
            keys = recs.drop_version(mv)
            for key in keys:
                if key in table:
                    del table[key]
            log.info("%s: model version %d: %d lists dropped (keeping %d versions)", what, mv,
                     len(keys), self.state.keep_models)

    # --- model-ready -----------------------------------------------------------------------------
    async def on_models(self, events: Sequence[Any]) -> int:
        """Keep each version's summary with every record read for it (a manual promotion or
        rollback sends another record for an existing version; the last one read is its status),
        idempotent on the record's offset; then derive which version serves."""
        changed = 0
        for event in events:
            value = await self._usable(event)
            if value is None:
                continue
            mv = int(value["model_version"])
            status = value.get("status") or T.PROMOTED
            serving = serving_of(mv, status, int(value.get("serving") or 0))
            record = {"offset": event.message.offset,
                      "ts": round(event.message.timestamp * 1000), "status": status,
                      "serving": serving or 0, "trigger": value["trigger"],
                      "reason": value.get("status_reason") or "",
                      "champion": int(value.get("champion_version") or 0),
                      "champion_metrics": dict(value.get("champion_metrics") or {})}
            old = self.tables.models.get(str(mv)) or {}
            records = [r for r in old.get("records") or [] if r["offset"] != record["offset"]]
            records = sorted([*records, record], key=lambda r: (r["offset"], r["ts"]))
            last = records[-1]
            gated = [r for r in records if r.get("champion")]  # the gate's (not a manual) record
            summary = {
                "model_version": mv,
                "model_id": value["model_id"],
                "trained_at": to_ms(value["trained_at"]),
                "trigger": last["trigger"],
                "events": value["events"],
                "users": value["users"],
                "products": value["products"],
                "params": dict(value["params"]),
                "metrics": dict(value["metrics"]),
                "baseline_metrics": dict(value["baseline_metrics"]),
                "train_seconds": value["train_seconds"],
                "cycle_seconds": value["cycle_seconds"],
                "status": last["status"],
                "status_reason": last["reason"],
                "champion_version": gated[-1]["champion"] if gated else None,
                "champion_metrics": gated[-1]["champion_metrics"] if gated else {},
                "records": records[-MAX_MODEL_RECORDS:],
            }
            if old != summary:
                self.tables.models[str(mv)] = summary
                self.state.models[mv] = summary
                changed += 1
                log.info("model %d %s (%s; serving: %s): %s", mv, last["status"],
                         last["trigger"], serving,
                         {k: round(v, 4) for k, v in summary["metrics"].items()})
        if changed:
            self.state.derive_serving()
        self.state.counters["models_in"] += len(events)
        return changed

    # --- dead letters in -------------------------------------------------------------------------
    async def on_dead_letters(self, events: Sequence[Any]) -> int:
        """Count by reason, once per offset of sales.dlq (a replay re-reads the same offsets)."""
        dls = self.state.dead_letters
        changed: dict[str, dict[str, Any]] = {}
        counted = 0
        for event in events:
            m = event.message
            key = f"{m.topic}/{m.partition}"
            rec = changed.get(key) or dls.record(key)
            value = event.value
            if isinstance(value, Undecodable) or value is None:
                stage, reason = "unknown", "undecodable dead letter"
                await self.dead_letter(event, value.reason if value else "null", None)
            else:
                stage, reason = value["stage"], value["reason"]
            if DeadLetterState.count(rec, m.offset, stage, reason):
                counted += 1
                changed[key] = rec
        for key, rec in changed.items():
            self.tables.dead_letters[key] = rec
            dls.partitions[key] = rec
        self.state.counters["dead_letters_in"] += len(events)
        return counted

    # --- feedback out ----------------------------------------------------------------------------
    async def publish_feedback(self, now_ms: int | None = None) -> list[dict[str, Any]]:
        """One `feedback` record per model version with sales in the window, unless unchanged
        since the last one published (same deterministic id)."""
        if not self.state.recovered:
            return []
        sales = self.state.sales
        window = sales.window_bounds()
        published = []
        for mv in sales.window.versions():
            rec = self.feedback(mv, window, now_ms or _now_ms())
            last = self.state.feedback.get(mv)
            if last is not None and last["id"] == rec["id"]:
                continue
            await self.send(self.topics.feedback, str(mv).encode(), rec)
            self.state.feedback[mv] = rec
            published.append(rec)
            log.info("feedback v%d: %d sales by %d users, hit-rate %.4f, precision@%d %.4f "
                     "(offline %s)", mv, rec["sales"], rec["users"], rec["hit_rate"], rec["k"],
                     rec["precision_at_k"], rec["offline_precision_at_k"])
        return published

    def feedback(self, mv: int, window: tuple[int, int], now_ms: int) -> dict[str, Any]:
        """A version's `Feedback`: the sales judged against its lists, served or in shadow."""
        counts = self.state.sales.window.counts(mv)
        stats = self.state.recs.versions.get(mv) or self.state.shadow.versions.get(mv)
        k = stats.k if stats and stats.k else self.settings.top_n
        model = self.state.models.get(mv) or {}
        offline = (model.get("metrics") or {}).get(PRECISION_AT_K)
        return feedback_record(mv, counts, k, window, offline, now_ms)

    async def on_recovered(self) -> None:
        """Faust restored the tables from their changelogs: derive every view again."""
        started = time.perf_counter()
        self.state.rebuild(self.tables)
        s = self.state.sales.totals()
        log.info("tables recovered in %.2fs: %d models (serving: %s), %d users with lists, %d "
                 "sales (%d inside the window), %d dead letters", time.perf_counter() - started,
                 len(self.state.models), self.state.serving, self.state.latest_users,
                 s["events"], s["in_window"],
                 self.state.dead_letters.totals()["total"])


class Progress:
    """Events/s per input since the last log line."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.last = dict(state.counters)
        self.at = time.monotonic()

    def line(self) -> str | None:
        now = time.monotonic()
        counters = dict(self.state.counters)
        dt = max(now - self.at, 1e-9)
        rates = {k: (v - self.last.get(k, 0)) / dt for k, v in counters.items()
                 if k.endswith("_in")}
        self.last, self.at = counters, now
        if not any(rates.values()):
            return None
        totals = self.state.sales.totals()
        parts = [f"{k[:-3]} {v:,.0f}/s" for k, v in sorted(rates.items()) if v]
        return (f"{', '.join(parts)}; sales counted {totals['events']:,} "
                f"({totals['in_window']:,} in window), duplicates "
                f"{counters.get('sales_duplicate', 0):,}, replays skipped "
                f"{counters.get('sales_late', 0):,}")


def register(app: Any, settings: Settings, topics: Topics, agg: Aggregation) -> dict[str, Any]:
    """Attach the agents and timers to `app`; returns the agents by name (tests use them)."""

    def batch_agent(topic: Any, name: str, size: int,
                    handle: Callable[[Sequence[Any]], Awaitable[int]]) -> Any:
        """An agent handing batches of up to `size` events to `handle`; the batch's table writes
        are settled before Faust acks its events (at the next iteration)."""

        async def agent(stream: Any) -> Any:
            async for events in stream.take_events(size, WITHIN):
                done = await handle(events)
                await agg.settle()
                yield done

        return app.agent(topic, name=name)(agent)

    agents = {
        "recommendations": batch_agent(topics.recommendations, "recommendations", BATCH,
                                       agg.on_recommendations),
        "recommendations-shadow": batch_agent(topics.shadow, "recommendations-shadow", BATCH,
                                              agg.on_shadow),
        "model-ready": batch_agent(topics.model_ready, "model-ready", 100, agg.on_models),
        "dead-letters": batch_agent(topics.dead_letters, "dead-letters", BATCH,
                                    agg.on_dead_letters),
    }

    @app.timer(settings.feedback_interval_seconds, name="publish-feedback")
    async def publish_feedback() -> None:
        await agg.publish_feedback()

    progress = Progress(agg.state)

    @app.timer(PROGRESS_SECONDS, name="progress")
    async def log_progress() -> None:
        line = progress.line()
        if line:
            log.info(line)

    return agents
