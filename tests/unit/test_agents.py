"""The agents' logic on hand-built streams with known hits: through Faust's test_context (the real
agents, no broker: the tables' changelog writes are recorded instead of produced), through the
sales reader's fetch handling with a fake consumer (write -> flush -> commit, pauses around
Faust's recoveries), and through `Aggregation` directly with a changelog model that loses
unflushed writes, to show a worker killed at any point and replayed counts every sale exactly
once."""

from __future__ import annotations

import asyncio
import io
import random
from types import SimpleNamespace
from typing import Any

import fastavro
import pytest

from recsys import settings as settings_mod
from schemas import codec
from streams import views
from streams.agents import Aggregation, Topics
from streams.faust_codec import Undecodable
from streams.feedback import (
    BUCKET_MS,
    FOLD_IN,
    Listing,
    ServingTimeline,
    horizon_ms,
    recompute,
    recompute_by_source,
    recompute_shadow,
)
from streams.state import State
from streams.tables import Tables

pytestmark = pytest.mark.unit

T0 = 1_700_000_000_000 - 1_700_000_000_000 % BUCKET_MS
HORIZON_S = 120


@pytest.fixture
def settings(tmp_path):
    return settings_mod.load(kafka_bootstrap="127.0.0.1:1", data_dir=tmp_path,
                             feedback_horizon_seconds=HORIZON_S, aggregate_keep_models=2)


# --- hand-built inputs ------------------------------------------------------------------------


def rec_event(user: str, mv: int, items: list[str], generated_at: int = T0) -> dict[str, Any]:
    return {"id": f"{mv}:{user}", "user_id": user, "model_version": mv,
            "generated_at": generated_at,
            "items": [{"product_id": p, "score": 1.0 / r, "rank": r} for r, p in enumerate(items, 1)],
            "source": "retrain", "sale_event_id": None, "sale_timestamp": None}


def fold_in(user: str, mv: int, items: list[str], generated_at: int, sale_id: str
            ) -> dict[str, Any]:
    """The speed layer's list after the sale `sale_id` (speed/layer.py `recommendation`)."""
    return {**rec_event(user, mv, items, generated_at), "id": f"{mv}:{user}:{sale_id}",
            "source": FOLD_IN, "sale_event_id": sale_id, "sale_timestamp": generated_at - 5}


def sale(i: int, user: str, product: str, qty: int = 1) -> dict[str, Any]:
    return {"event_id": f"e{i}", "user_id": user, "product_id": product, "quantity": qty,
            "event_time": 1293840000000}


LISTS = {"u1": ["a", "b"], "u2": ["c", "d"]}
# (arrival minute after T0, user, product, quantity): 2 users with lists, 1 without.
SALES = [(0, "u1", "a", 1), (0, "u1", "a", 2), (0, "u1", "x", 1), (1, "u2", "d", 1),
         (1, "u3", "a", 1), (2, "u2", "d", -1), (3, "u2", "c", 1), (4, "u1", "b", 1),
         (5, "u3", "c", 4), (6, "u1", "a", 1), (6, "u2", "x", 1), (7, "u2", "d", 1)]


class Msg(SimpleNamespace):
    pass


def event(value: Any, topic: str, partition: int, offset: int, ts_ms: int) -> SimpleNamespace:
    return SimpleNamespace(value=value, message=Msg(topic=topic, partition=partition,
                                                    offset=offset, timestamp=ts_ms / 1000))


def sales_events() -> list[SimpleNamespace]:
    """SALES on two partitions (by user, as the producer keys them), offsets in arrival order."""
    offsets = [0, 0]
    out = []
    for i, (m, u, p, q) in enumerate(SALES):
        part = 1 if u == "u2" else 0
        out.append(event(sale(i, u, p, q), "sales", part, offsets[part], T0 + m * BUCKET_MS + i))
        offsets[part] += 1
    return out


# --- a changelog that loses what was not flushed ------------------------------------------------


class Log:
    """Every table write in order, with a marker at each flush."""

    FLUSH = ("flush",)

    def __init__(self) -> None:
        self.entries: list[tuple] = []

    async def flush(self) -> None:
        self.entries.append(self.FLUSH)

    def survivors(self, cut: int, rng: random.Random) -> list[tuple]:
        """What a worker killed after `cut` writes left on the changelog: everything up to the
        last flush, and any subset of the writes after it (partitions are written in parallel)."""
        head = self.entries[:cut]
        last = max((i for i, e in enumerate(head) if e == self.FLUSH), default=-1)
        tail = [e for e in head[last + 1:] if e != self.FLUSH and rng.random() < 0.5]
        return [e for e in head[: last + 1] if e != self.FLUSH] + tail


class LoggedTable(dict):
    def __init__(self, name: str, log: Log) -> None:
        super().__init__()
        self.name, self.log = name, log

    def __setitem__(self, key: str, value: Any) -> None:
        self.log.entries.append((self.name, key, value))
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self.log.entries.append((self.name, key, None))
        super().__delitem__(key)


NAMES = ("model_recs", "shadow_recs", "models", "sales_batches", "product_totals",
         "sales_rollup", "dead_letters")


def fake_tables(log: Log, restore: list[tuple] = ()) -> Tables:
    tables = {n: LoggedTable(n, log) for n in NAMES}
    for name, key, value in restore:  # recovery applies the changelog without logging it
        if value is None:
            dict.pop(tables[name], key, None)
        else:
            dict.__setitem__(tables[name], key, value)
    return Tables(**tables)


class Sent(list):
    async def __call__(self, topic: Any, key: bytes, value: dict[str, Any]) -> None:
        self.append((topic, key, value))


TOPICS = Topics(sales="sales", dead_letters=SimpleNamespace(get_topic_name=lambda: "sales.dlq"),
                model_ready="model-ready", recommendations="recommendations", feedback="feedback")


# --- the sales reader's Kafka side ---------------------------------------------------------------


def record(value: dict[str, Any] | bytes | None, partition: int, offset: int, ts_ms: int,
           topic: str = "sales") -> SimpleNamespace:
    """An aiokafka ConsumerRecord as the reader reads it (a dict value is encoded as a Sale)."""
    if isinstance(value, dict):
        value = codec.encode("Sale", value)
    return SimpleNamespace(topic=topic, partition=partition, offset=offset, timestamp=ts_ms,
                           key=None, value=value)


def fetched(records: list[SimpleNamespace]) -> dict[tuple[str, int], list[SimpleNamespace]]:
    """What getmany returns: records by partition, in offset order."""
    out: dict[tuple[str, int], list[SimpleNamespace]] = {}
    for r in records:
        out.setdefault((r.topic, r.partition), []).append(r)
    return out


class FakeConsumer:
    """An AIOKafkaConsumer that hands out the fetches it is given and logs its commits."""

    def __init__(self, log: Log, fetches: list[dict] = ()) -> None:
        self.log = log
        self.fetches: asyncio.Queue[dict] = asyncio.Queue()
        for f in fetches:
            self.fetches.put_nowait(f)
        self.fetch_calls = 0
        self.assigned: list[Any] = []
        self.started = self.stopped = False
        self.ends: dict[int, int] = {}  # end offsets of `recommendations` by partition

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    def assign(self, partitions: list[Any]) -> None:
        self.assigned = list(partitions)

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict:
        self.fetch_calls += 1
        try:
            return await asyncio.wait_for(self.fetches.get(), timeout_ms / 1000)
        except TimeoutError:
            return {}

    async def commit(self, offsets: dict[Any, int]) -> None:
        self.log.entries.append(("commit", {(tp[0], tp[1]): o for tp, o in offsets.items()}))

    async def beginning_offsets(self, tps: list[Any]) -> dict[Any, int]:
        return {tp: 0 for tp in tps}

    async def end_offsets(self, tps: list[Any]) -> dict[Any, int]:
        return {tp: self.ends.get(tp.partition, 0) for tp in tps}


def aggregation(settings, log: Log, restore: list[tuple] = ()) -> tuple[Aggregation, Sent]:
    sent = Sent()
    state = State(horizon_ms(settings.feedback_horizon_seconds), settings.aggregate_keep_models)
    agg = Aggregation(settings, fake_tables(log, restore), state, TOPICS, log.flush, sent)
    return agg, sent


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def feed(agg: Aggregation, events: list, batch: int) -> None:
    for i in range(0, len(events), batch):
        await agg.on_sales(events[i:i + batch])


def views_of(agg: Aggregation) -> dict[str, Any]:
    s = agg.state.sales
    counts = lambda c: (c.sales, c.hits, dict(c.users), dict(c.pairs))  # noqa: E731
    return {"totals": s.totals(), "products": s.products, "minutes": s.per_minute(),
            "window": {mv: counts(c) for mv, c in s.window.by_version.items()},
            "by_source": {src: counts(c) for src, c in s.window.by_source.items()},
            "shadow": {mv: counts(c) for mv, c in s.window.shadow.items()},
            "shadow_champion": {mv: counts(c) for mv, c in s.window.shadow_champion.items()},
            "lists": agg.state.recs.by_user, "shadow_lists": agg.state.shadow.by_user,
            "latest": {u: views.recommendations(agg, u) for u in agg.state.recs.by_user},
            "latest_by_source": agg.state.users_by_source(), "serving": agg.state.serving}


# --- tests ------------------------------------------------------------------------------------


def test_known_hits_through_the_agent_logic(settings):
    log = Log()
    agg, sent = aggregation(settings, log)
    agg.state.recovered = True
    recs = [event(rec_event(u, 1, items), "recommendations", 0, i, T0)
            for i, (u, items) in enumerate(LISTS.items())]
    run(agg.on_recommendations(recs))
    run(feed(agg, sales_events(), batch=4))
    # Each partition keeps its last 2 minutes: u2's partition (1) reached minute 7, so 6-7;
    # partition 0 reached minute 6, so 5-6. Earlier minutes were folded into the totals.
    start, end = agg.state.sales.window_bounds()
    assert (start, end) == (T0 + 5 * BUCKET_MS, T0 + 8 * BUCKET_MS)
    first = {0: 5, 1: 6}
    inside = [(T0 + m * BUCKET_MS + i, u, p, q) for i, (m, u, p, q) in enumerate(SALES)
              if m >= first[1 if u == "u2" else 0]]
    listings = {u: [Listing(1, T0, tuple(items))] for u, items in LISTS.items()}
    want = recompute(inside, listings, {1: 2})[1]
    published = run(agg.publish_feedback(now_ms=T0))
    assert len(published) == 1
    got = published[0]
    assert {k: got[k] for k in want} == want
    assert (got["sales"], got["hits"], got["users"]) == (3, 2, 2)  # u1 a, u2 x, u2 d
    assert got["k"] == 2 and got["window_start"] == start
    assert sent[-1][0] == "feedback" and sent[-1][1] == b"1"
    assert run(agg.publish_feedback(now_ms=T0 + 5)) == []  # unchanged: not sent again
    totals = agg.state.sales.totals()
    assert (totals["events"], totals["sales"], totals["returns"]) == (12, 11, 1)
    assert agg.state.sales.products["a"] == [4, 0, 5]


def test_duplicates_tombstones_and_bad_records(settings):
    agg, sent = aggregation(settings, Log())
    agg.state.recovered = True
    events = sales_events()[:3]
    again = [event(e.value, "sales", 1, 100 + i, T0 + 5) for i, e in enumerate(events)]
    bad = event(Undecodable("bad marker 0000 (want c301)", b"\0\0"), "sales", 1, 200, T0 + 6)
    tomb = event(None, "sales", 1, 201, T0 + 7)
    assert run(agg.on_sales(events + again + [bad, tomb])) == 3
    assert agg.state.counters["sales_duplicate"] == 3
    assert agg.state.counters["tombstones"] == 1
    (topic, key, dead), = sent
    assert key == b"sales[1]@200" and dead["reason"].startswith("bad marker")
    assert dead["stage"] == "aggregate" and dead["original_bytes"] == b"\0\0"
    assert dead["source_topic"] == "sales" and dead["source_offset"] == 200


def test_newest_list_wins_and_only_the_last_versions_are_kept(settings):
    """Without a model-ready, the newest version's list wins; the versions kept are the most
    recently published (a late fold-in under an old version does not keep it)."""
    agg, _ = aggregation(settings, Log())
    ev = lambda mv, g, off: event(rec_event("u1", mv, [f"p{mv}"], g), "recommendations", 0, off, g)  # noqa: E731
    run(agg.on_recommendations([ev(1, T0 + 10, 0), ev(2, T0 + 20, 1),
                                event(fold_in("u1", 1, ["q"], T0 + 25, "s1"), "recommendations",
                                      0, 2, T0 + 25)]))
    assert views.recommendations(agg, "u1")["model_version"] == 2  # the fold-in is older's
    run(agg.on_recommendations([ev(3, T0 + 30, 3)]))  # keep 2: v1 is dropped
    assert sorted(agg.state.recs.versions) == [2, 3]
    assert sorted(agg.tables.model_recs) == ["2:u1", "3:u1"]
    run(agg.on_recommendations([ev(1, T0 + 5, 4)]))  # a replay of v1's list: published before
    assert agg.state.counters["recommendations_stale"] == 1 and "1:u1" not in agg.tables.model_recs


def model_ready(mv: int, status: str = "promoted", serving: int | None = None,
                trigger: str = "threshold", champion: int = 0, v1: bool = False
                ) -> dict[str, Any]:
    """A ModelReady record; `v1`: as fastavro reads a record written before the gate (the new
    fields at their defaults)."""
    rec = {"model_version": mv, "model_id": f"m{mv}", "trained_at": T0 + mv, "trigger": trigger,
           "events": 100, "event_time_min": None, "event_time_max": None, "offsets": [],
           "users": 2, "products": 5, "params": {"rank": "8"},
           "metrics": {"precision_at_k": 0.1 * mv}, "baseline_metrics": {"precision_at_k": 0.05},
           "train_seconds": 1.0, "cycle_seconds": 2.0, "model_path": f"/m/{mv}",
           "status": status, "serving": mv if serving is None else serving,
           "status_reason": f"{status} by test", "champion_version": champion,
           "champion_metrics": {"precision_at_k": 0.2} if champion else {}}
    if v1:
        rec.update(status="promoted", serving=0, status_reason="", champion_version=0,
                   champion_metrics={})
    return rec


def test_v1_model_ready_records_read_as_promoted_and_serving(settings):
    """A record written before the gate, decoded with today's schema (fastavro fills the
    defaults: promoted, serving 0): its own version serves."""
    agg, _ = aggregation(settings, Log())
    run(agg.on_recovered())
    old = {k: v for k, v in model_ready(1).items()
           if k not in ("status", "serving", "status_reason", "champion_version",
                        "champion_metrics")}
    v1 = codec.history("ModelReady")[0]  # written before the gate: no status, no serving
    assert "status" not in {f["name"] for f in v1.parsed["fields"]}
    buf = io.BytesIO()
    buf.write(v1.header)
    fastavro.schemaless_writer(buf, v1.fast, old)
    decoded = codec.decode(buf.getvalue())[1]
    assert (decoded["status"], decoded["serving"]) == ("promoted", 0)
    run(agg.on_models([event(decoded, "model-ready", 0, 0, T0 + 100)]))
    assert agg.state.serving == 1 and agg.state.status(1) == "promoted"
    s = views.stats(agg)
    assert s["serving"] == 1 and s["models"][0]["status"] == "promoted"
    assert s["models"][0]["serving"] is True


def test_model_ready_records_of_one_version_the_last_read_is_its_status(settings):
    """A rejected challenger, then promoted by hand (a second record for the same version),
    then a rollback: the last record read says who serves; a replay changes nothing."""
    agg, _ = aggregation(settings, Log())
    run(agg.on_recovered())
    recs = [model_ready(1), model_ready(2, "rejected", serving=1, champion=1),
            model_ready(2, trigger="manual"), model_ready(1, trigger="manual")]
    evs = [event(r, "model-ready", 0, i, T0 + 1000 * i) for i, r in enumerate(recs)]
    run(agg.on_models(evs[:2]))
    assert agg.state.serving == 1 and agg.state.status(2) == "rejected"
    assert agg.state.models[2]["champion_version"] == 1
    run(agg.on_models(evs[2:3]))
    assert agg.state.serving == 2 and agg.state.status(2) == "promoted"
    assert agg.state.models[2]["trigger"] == "manual"
    run(agg.on_models(evs[3:]))
    assert agg.state.serving == 1
    assert [r["status"] for r in agg.state.models[2]["records"]] == ["rejected", "promoted"]
    assert run(agg.on_models(evs)) == 0  # a replay: idempotent on the offsets
    # Which version served when: the timeline that judges sales.
    assert [agg.state.timeline.at(T0 + 1000 * i + 1) for i in range(4)] == [1, 1, 2, 1]
    assert agg.state.timeline.at(T0 - 1) is None
    stats = {m["model_version"]: m for m in views.stats(agg)["models"]}
    assert stats[1]["serving"] and not stats[2]["serving"]
    assert [r["trigger"] for r in stats[2]["status_history"]] == ["threshold", "manual"]
    again, _ = aggregation(settings, Log(), restore=[
        ("models", k, v) for k, v in agg.tables.models.items()])
    run(again.on_recovered())
    assert again.state.serving == 1 and again.state.models == agg.state.models
    assert [again.state.timeline.at(T0 + 1000 * i + 1) for i in range(4)] == [1, 1, 2, 1]


def test_read_api_answers_the_version_in_service_first_after_a_rollback(settings):
    """v1 serves, v2 is promoted, then `recsys models rollback` republishes v1's lists (newly
    generated) and says v1 serves: the API answers v1's list although v2 is newer; a fold-in
    under v1 then replaces it; a user v1 does not know keeps v2's list."""
    agg, _ = aggregation(settings, Log())
    run(agg.on_recovered())
    off = iter(range(100))

    def lists(*recs: dict[str, Any]) -> None:
        run(agg.on_recommendations([event(r, "recommendations", 0, next(off), r["generated_at"])
                                    for r in recs]))

    def ready(rec: dict[str, Any], ts: int) -> None:
        run(agg.on_models([event(rec, "model-ready", 0, next(off), ts)]))

    lists(rec_event("u1", 1, ["a"], T0))
    ready(model_ready(1), T0 + 1)
    lists(rec_event("u1", 2, ["b"], T0 + 10), rec_event("u2", 2, ["c"], T0 + 10))
    ready(model_ready(2, champion=1), T0 + 11)
    assert views.recommendations(agg, "u1")["model_version"] == 2
    lists(rec_event("u1", 1, ["a2"], T0 + 20))  # the rollback's republished list ...
    assert views.recommendations(agg, "u1")["model_version"] == 2  # ... v2 serves until ...
    ready(model_ready(1, trigger="manual"), T0 + 21)  # ... model-ready says v1 does
    got = views.recommendations(agg, "u1")
    assert (got["model_version"], got["serving"], got["items"][0]["product_id"]) == (1, 1, "a2")
    assert views.recommendations(agg, "u2")["model_version"] == 2  # unknown to v1
    lists(fold_in("u1", 1, ["f"], T0 + 30, "s1"))  # the speed layer follows v1
    assert views.recommendations(agg, "u1")["sale_event_id"] == "s1"
    s = views.stats(agg)
    assert s["serving"] == 1 and s["users_by_source"] == {"retrain": 1, FOLD_IN: 1}
    # Sales are judged by who served when they arrived.
    run(agg.on_sales([event(sale(i, "u1", p), "sales", 0, i, ts) for i, (ts, p) in
                      enumerate([(T0 + 15, "b"), (T0 + 22, "a2"), (T0 + 31, "f")])]))
    w = agg.state.sales.window
    assert (w.counts(2).sales, w.counts(2).hits) == (1, 1)  # v2 served at T0+15
    assert (w.counts(1).sales, w.counts(1).hits) == (2, 2)  # v1 after the rollback
    # A third version with keep_models 2: v1 (serving, republished last) stays, v2 goes.
    lists(rec_event("u1", 3, ["z"], T0 + 40))
    assert sorted(agg.state.recs.versions) == [1, 3]
    assert views.recommendations(agg, "u1")["model_version"] == 1  # until v3's model-ready
    ready(model_ready(3, champion=1), T0 + 41)
    assert views.recommendations(agg, "u1")["model_version"] == 3
    # Rebuilt from the tables: the same answers.
    again, _ = aggregation(settings, Log(), restore=[
        (t.name, k, v) for t in agg.tables.__dict__.values() for k, v in t.items()])
    run(again.on_recovered())
    for user in ("u1", "u2"):
        assert views.recommendations(again, user) == views.recommendations(agg, user)


def test_shadow_lists_are_judged_on_the_same_sales_and_never_answered(settings):
    """v1 serves; challenger v2 is rejected: its lists go to recommendations-shadow. Each sale
    by a user with both lists counts for v1 (served) and for v2 (shadow); /stats puts both
    side by side; the read API never answers a shadow list; both survive a restart."""
    agg, sent = aggregation(settings, Log())
    run(agg.on_recovered())
    served = [rec_event("u1", 1, ["a", "b"]), rec_event("u2", 1, ["c"])]
    shadow = [rec_event("u1", 2, ["b", "x"], T0 + 100), rec_event("u3", 2, ["y"], T0 + 100)]
    run(agg.on_recommendations([event(r, "recommendations", 0, i, T0)
                                for i, r in enumerate(served)]))
    run(agg.on_models([event(model_ready(1), "model-ready", 0, 0, T0 + 1)]))
    run(agg.on_shadow([event(r, "recommendations-shadow", 0, i, T0 + 100)
                       for i, r in enumerate(shadow)]))
    run(agg.on_models([event(model_ready(2, "rejected", serving=1, champion=1), "model-ready",
                             0, 1, T0 + 101)]))
    assert views.recommendations(agg, "u1")["model_version"] == 1
    assert views.recommendations(agg, "u3")["source"] == "popular"  # shadow lists never served
    rows = [(T0 + 50, "u1", "b", 1),    # before the shadow lists: v1 only, hit
            (T0 + 200, "u1", "b", 1),   # both hit
            (T0 + 201, "u1", "x", 1),   # shadow hit, served miss
            (T0 + 202, "u1", "a", 1),   # served hit, shadow miss
            (T0 + 203, "u2", "c", 1),   # no shadow list for u2: v1 only
            (T0 + 204, "u3", "y", 1),   # no served list for u3: judged by neither
            (T0 + 205, "u1", "q", -1)]  # a return
    run(agg.on_sales([event(sale(i, u, p, q), "sales", 0, i, ts)
                      for i, (ts, u, p, q) in enumerate(rows)]))
    s = views.stats(agg)
    want = recompute_shadow(
        rows,
        {"u1": [Listing(1, T0, ("a", "b"))], "u2": [Listing(1, T0, ("c",))]},
        {"u1": [Listing(2, T0 + 100, ("b", "x"))], "u3": [Listing(2, T0 + 100, ("y",))]},
        ServingTimeline([(T0 + 1, 1), (T0 + 101, 1)]))
    assert s["shadow"]["challenger"] == want[2]["challenger"]
    assert s["shadow"]["champion"] == want[2]["champion"]
    assert s["shadow"]["model_version"] == 2 and s["shadow"]["champion_version"] == 1
    assert s["shadow"]["sales"] == 3 and s["shadow"]["status"] == "rejected"
    assert s["shadow"]["challenger"]["hits"] == 2 and s["shadow"]["champion"]["hits"] == 2
    by_version = {m["model_version"]: m for m in s["models"]}
    assert by_version[2]["lists"] == "shadow" and by_version[2]["status"] == "rejected"
    assert by_version[1]["feedback"]["sales"] == 5 and by_version[1]["feedback"]["hits"] == 4
    published = {r["model_version"]: r for r in run(agg.publish_feedback(now_ms=T0))}
    assert (published[2]["sales"], published[2]["hits"]) == (3, 2)  # the challenger's own
    assert (published[1]["sales"], published[1]["hits"]) == (5, 4)
    again, _ = aggregation(settings, Log(), restore=[
        (t.name, k, v) for t in agg.tables.__dict__.values() for k, v in t.items()])
    run(again.on_recovered())
    assert views_of(again) == views_of(agg)
    # The challenger promoted by hand: its lists are republished on recommendations; from then
    # on its shadow lists no longer count (a sale counts once per version).
    run(agg.on_recommendations([event(rec_event("u1", 2, ["b", "x"], T0 + 300),
                                      "recommendations", 0, 5, T0 + 300)]))
    run(agg.on_models([event(model_ready(2, trigger="manual"), "model-ready", 0, 2, T0 + 301)]))
    run(agg.on_sales([event(sale(20, "u1", "x"), "sales", 0, 20, T0 + 400)]))
    assert agg.state.sales.window.shadow_counts(2)[0].sales == 3
    assert agg.state.sales.window.by_version[2].hits == 1


@pytest.mark.parametrize("seed", range(12))
def test_a_worker_killed_anywhere_and_replayed_counts_each_sale_once(settings, seed):
    """Run once without a crash; then kill after a random number of table writes (unflushed
    writes partly lost), recover the tables from what survived, replay every event from the
    beginning (the committed offset can be anywhere before the crash) and compare."""
    rng = random.Random(seed)
    recs = [event(rec_event(u, 1, items), "recommendations", 0, i, T0)
            for i, (u, items) in enumerate(LISTS.items())]
    # Fold-ins after u1's minute-0 sales and inside minute 6 for u2: later sales are judged by
    # them, earlier ones by the retrain lists.
    recs += [event(fold_in(u, 1, items, T0 + m * BUCKET_MS + 30_000, f"e{i}"),
                   "recommendations", 0, 2 + i, T0 + m * BUCKET_MS + 30_000)
             for i, (m, u, items) in enumerate([(0, "u1", ["b", "x"]), (6, "u2", ["d", "c"])])]
    events = sales_events() + [event(sale(i, "u4", "a"), "sales", 2, i, T0 + 7 * BUCKET_MS + i)
                               for i in range(100, 110)]
    if rng.random() < 0.5:  # a backlog read one partition after the other
        events.sort(key=lambda e: (e.message.partition, e.message.offset))
    else:  # live: partitions interleaved, each in offset order
        rng.shuffle(events)
        events.sort(key=lambda e: e.message.timestamp // 60)
    dead = [event({"stage": "produce", "reason": f"r{i % 2}: x"}, "sales.dlq", 0, i, T0)
            for i in range(5)]
    # A rejected challenger (v2): its shadow lists judge the sales from minute 3 on.
    shadow = [event(rec_event(u, 2, items[::-1] + ["x"], T0 + 3 * BUCKET_MS),
                    "recommendations-shadow", 0, i, T0 + 3 * BUCKET_MS)
              for i, (u, items) in enumerate(LISTS.items())]
    models = [event(model_ready(1), "model-ready", 0, 0, T0),
              event(model_ready(2, "rejected", serving=1, champion=1), "model-ready", 0, 1,
                    T0 + 3 * BUCKET_MS)]

    async def full(agg: Aggregation) -> None:
        await agg.on_models(models)
        await agg.on_shadow(shadow)
        await agg.on_recommendations(recs)
        await agg.on_dead_letters(dead[:3])
        await feed(agg, events, batch=rng.randint(1, 5))
        await agg.on_dead_letters(dead)

    log = Log()
    reference, _ = aggregation(settings, log)
    run(full(reference))
    want = views_of(reference)
    assert want["totals"]["events"] == len(events)

    cut = rng.randint(0, len(log.entries))
    survivors = log.survivors(cut, rng)
    restarted, _ = aggregation(settings, Log(), restore=survivors)
    run(restarted.on_recovered())
    run(full(restarted))
    assert views_of(restarted) == want
    assert set(want["by_source"]) == {"retrain", FOLD_IN} and set(want["shadow"]) == {2}
    assert restarted.state.dead_letters.totals() == reference.state.dead_letters.totals()
    # And the recovered-then-replayed tables rebuild to the same views once more.
    again, _ = aggregation(settings, Log(), restore=[
        (t.name, k, v) for t in restarted.tables.__dict__.values() for k, v in t.items()])
    run(again.on_recovered())
    assert views_of(again) == want


def test_read_api_answers_for_a_known_and_an_unknown_user(settings):
    agg, _ = aggregation(settings, Log())
    run(agg.on_recovered())
    assert views.recommendations(agg, "u1")["items"] == []
    run(agg.on_recommendations([event(rec_event("u1", 1, ["a", "b"]), "recommendations", 0, 0,
                                      T0)]))
    run(agg.on_sales([event(sale(0, "u9", "z"), "sales", 0, 0, T0 + 1),
                      event(sale(1, "u8", "z"), "sales", 0, 1, T0 + 2),
                      event(sale(2, "u8", "y"), "sales", 0, 2, T0 + 3)]))
    known = views.recommendations(agg, "u1")
    assert known["source"] == "retrain" and [i["product_id"] for i in known["items"]] == ["a", "b"]
    assert known["items"][0]["rank"] == 1 and known["model_version"] == 1
    unknown = views.recommendations(agg, "nobody")
    assert unknown["source"] == "popular"
    assert [i["product_id"] for i in unknown["items"]] == ["z", "y"]  # k = 2, by sales
    s = views.stats(agg)
    assert s["ready"] is False  # no model-ready yet
    assert s["models"][0]["degree_distribution"] == [[1, 2]]
    assert s["sales"]["events"] == 3 and s["top_products"][0]["product_id"] == "z"


def test_read_api_answers_the_freshest_list(settings):
    """Newest model version first; within a version the latest generated: a fold-in generated
    after its version's retrain list wins, a fold-in under an older version never does."""
    agg, _ = aggregation(settings, Log())
    run(agg.on_recovered())

    def send(*recs: dict[str, Any]) -> dict[str, Any]:
        run(agg.on_recommendations([event(r, "recommendations", 0, i, r["generated_at"])
                                    for i, r in enumerate(recs)]))
        return views.recommendations(agg, "u1")

    got = send(rec_event("u1", 1, ["a", "b"], T0))
    assert (got["source"], got["model_version"], got["sale_event_id"]) == ("retrain", 1, None)
    got = send(fold_in("u1", 1, ["c", "a"], T0 + 10, "s1"))  # retrain, then a fold-in
    assert (got["source"], got["model_version"], got["sale_event_id"]) == (FOLD_IN, 1, "s1")
    assert [i["product_id"] for i in got["items"]] == ["c", "a"]
    got = send(rec_event("u1", 1, ["a", "b"], T0))  # the retrain list again (a replay)
    assert got["sale_event_id"] == "s1"
    got = send(rec_event("u1", 2, ["d", "e"], T0 + 20),  # a new model's list, then a fold-in
               fold_in("u1", 1, ["f", "g"], T0 + 30, "s2"))  # under the old one, generated later
    assert (got["source"], got["model_version"], got["items"][0]["product_id"]) == (
        "retrain", 2, "d")
    got = send(fold_in("u1", 2, ["h", "d"], T0 + 40, "s3"))
    assert (got["source"], got["model_version"], got["sale_event_id"]) == (FOLD_IN, 2, "s3")
    assert sorted(agg.tables.model_recs) == ["1:u1", "1:u1:s1", "1:u1:s2", "2:u1", "2:u1:s3"]
    # Degrees count each user's newest list of a version; both kinds of list are counted.
    assert agg.state.recs.top_recommended(1, 5) == [{"product_id": "f", "users": 1},
                                                   {"product_id": "g", "users": 1}]
    s = views.stats(agg)
    assert s["users_by_source"] == {"retrain": 0, FOLD_IN: 1}
    assert agg.state.counters["recommendations_fold-in"] == 3
    # The same after a restart: the views come back from the tables.
    again, _ = aggregation(settings, Log(), restore=[
        ("model_recs", k, v) for k, v in agg.tables.model_recs.items()])
    run(again.on_recovered())
    assert views.recommendations(again, "u1") == views.recommendations(agg, "u1")
    assert again.state.recs.by_user == agg.state.recs.by_user
    assert views.stats(again)["users_by_source"] == s["users_by_source"]


def test_feedback_judges_fold_in_lists_and_reports_hit_rate_per_source(settings):
    """Each sale is judged against the list in force when it arrived, whatever its source; the
    Feedback record of a version counts both, /stats splits them."""
    agg, sent = aggregation(settings, Log())
    run(agg.on_recovered())
    retrain = {"u1": rec_event("u1", 1, ["a", "b"]), "u2": rec_event("u2", 1, ["a"])}
    folds = [fold_in("u1", 1, ["d", "e"], T0 + 10_000, "s0"),
             fold_in("u2", 1, ["c"], T0 + 40_000, "s5")]
    run(agg.on_recommendations([event(r, "recommendations", 0, i, r["generated_at"])
                                for i, r in enumerate([*retrain.values(), *folds])]))
    rows = [(T0 + 5_000, "u1", "c", 1),   # s0: before u1's fold-in was generated: retrain, miss
            (T0 + 11_000, "u1", "d", 1),  # fold-in, hit
            (T0 + 12_000, "u1", "e", 2),  # fold-in, hit
            (T0 + 13_000, "u1", "x", 1),  # fold-in, miss
            (T0 + 14_000, "u2", "a", 1),  # retrain (u2's fold-in comes later), hit
            (T0 + 41_000, "u2", "c", 1),  # fold-in, hit
            (T0 + 42_000, "u2", "z", -1)]  # a return: not judged
    run(agg.on_sales([event(sale(i, u, p, q), "sales", 0, i, ts)
                      for i, (ts, u, p, q) in enumerate(rows)]))
    by_source = views.stats(agg)["feedback_by_source"]
    listings = {"u1": [Listing(1, T0, ("a", "b")), Listing(1, T0 + 10_000, ("d", "e"), FOLD_IN,
                                                            "s0")],
                "u2": [Listing(1, T0, ("a",)), Listing(1, T0 + 40_000, ("c",), FOLD_IN, "s5")]}
    assert by_source == recompute_by_source(rows, listings)
    assert by_source["retrain"] == {"sales": 2, "users": 2, "hits": 1, "hit_pairs": 1,
                                    "hit_rate": 0.5}
    assert by_source[FOLD_IN] == {"sales": 4, "users": 2, "hits": 3, "hit_pairs": 3,
                                  "hit_rate": 0.75}
    (published,) = run(agg.publish_feedback(now_ms=T0))
    assert (published["sales"], published["hits"]) == (6, 4)  # v1, both sources
    assert sent[-1][2] == published


# --- the real agents, through Faust's test_context ----------------------------------------------


def test_agents_in_faust_test_context(settings):
    from streams.app import create_app

    async def scenario() -> tuple[Any, list[tuple]]:
        aggregator = create_app(settings, web=False)
        app = aggregator.app
        app.finalize()
        app.flow_control.resume()
        log = Log()
        tables = aggregator.tables
        for name in NAMES:  # record the changelog instead of producing it
            table = getattr(tables, name)
            table.on_key_set = lambda k, v, n=name: log.entries.append((n, k, v))
            table.on_key_del = lambda k, n=name: log.entries.append((n, k, None))
        sent = Sent()
        aggregator.aggregation.flush = log.flush
        aggregator.aggregation.send = sent
        await aggregator.aggregation.on_recovered()

        async def until(check: Any) -> None:
            for _ in range(200):
                if check():
                    return
                await asyncio.sleep(0.02)
            raise AssertionError("the agent did not get there")

        async with aggregator.agents["recommendations"].test_context() as agent:
            for u, items in LISTS.items():
                await agent.put(rec_event(u, 1, items), key=u.encode(), timestamp=T0 / 1000,
                                wait=False)
            await until(lambda: aggregator.state.recs.versions.get(1, None) is not None
                        and aggregator.state.recs.versions[1].users == 2)
        # Sales come through the reader's fetch handling (no Faust agent reads them).
        reader = aggregator.sales_reader
        reader.consumer = FakeConsumer(log)
        records = [record(sale(i, u, p, q), 0, i, T0 + m * BUCKET_MS + i)
                   for i, (m, u, p, q) in enumerate(SALES[:5])]
        records.append(record(sale(0, "u1", "a"), 0, 5, T0 + 5))  # a duplicate of e0
        await reader.handle(fetched(records))
        assert aggregator.state.counters["sales_in"] == 6
        return aggregator, log.entries

    aggregator, changelog = run(scenario())
    counts = aggregator.state.sales.window.counts(1)
    # u1: a (hit), a (hit), x; u2: d (hit); u3 had no list.
    assert (counts.sales, counts.hits, counts.n_users, counts.hit_pairs) == (4, 3, 2, 2)
    assert aggregator.state.counters["sales_duplicate"] == 1
    assert [(i["product_id"], i["score"]) for i in
            views.recommendations(aggregator.aggregation, "u2")["items"]] == [("c", 1.0),
                                                                              ("d", 0.5)]
    written = {(e[0], e[1]) for e in changelog if e[0] not in ("flush", "commit")}
    assert ("model_recs", "1:u1") in written and ("model_recs", "1:u2") in written
    assert any(name == "sales_batches" for name, _ in written)
    assert changelog[-2:] == [Log.FLUSH, ("commit", {("sales", 0): 6})]


def test_events_fetched_while_recovery_seeks_are_not_thrown_away(settings):
    """Faust's recovery order: resume the flow (to read changelogs), call the on_recover
    callbacks, resume the input partitions and seek them to the committed offsets, then resume
    the flow once more, which clears every agent's input queue. An event fetched during that
    seek (a slow broker round trip) must wait at the flow control, not sit in a queue that the
    last resume empties (it was lost: never counted, never acked)."""
    from streams.app import create_app

    async def scenario() -> list[Any]:
        aggregator = create_app(settings, web=False)
        app = aggregator.app
        app.finalize()
        queue = app.FlowControlQueue(maxsize=10, clear_on_resume=True)  # an agent's input
        app.flow_control.resume()  # "Resuming flow..." to read the changelogs
        await aggregator.tables.sales_batches.call_recover_callbacks()

        async def deliver(event: str) -> None:  # what Conductor.on_message does per event
            await app.flow_control.acquire()
            queue.put_nowait(event)

        fetched = asyncio.ensure_future(deliver("sales[0]@563"))
        await asyncio.sleep(0.01)  # the seek to the committed offsets is under way
        app.flow_control.resume()  # after the seek: clears the queues
        await asyncio.wait_for(fetched, 1)
        return [queue.get_nowait() for _ in range(queue.qsize())]

    assert run(scenario()) == ["sales[0]@563"]


async def until(check: Any, what: str = "the reader did not get there") -> None:
    for _ in range(250):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(what)


def reader_of(agg: Aggregation, consumer: FakeConsumer, crashed: list | None = None) -> Any:
    from streams.sales_reader import SalesReader

    async def crash(exc: BaseException) -> None:
        (crashed if crashed is not None else []).append(exc)

    return SalesReader(agg, topic="sales", partitions=2, consumer=lambda: consumer, crash=crash)


def test_sales_reader_commits_a_fetch_after_its_writes_are_flushed(settings):
    """Per fetch: dead letters sent and tables written, then the flush, then the commit of the
    next offset of each partition; a killed worker reads again everything not committed."""
    log = Log()
    state = State(horizon_ms(settings.feedback_horizon_seconds), settings.aggregate_keep_models)

    async def send(topic: Any, key: bytes, value: dict[str, Any]) -> None:
        log.entries.append(("send", key, value["reason"]))

    agg = Aggregation(settings, fake_tables(log), state, TOPICS, log.flush, send)
    agg.state.recovered = True
    consumer = FakeConsumer(log)
    reader = reader_of(agg, consumer)
    reader.consumer = consumer
    events = sales_events()
    records = [record(e.value, e.message.partition, e.message.offset,
                      round(e.message.timestamp * 1000)) for e in events]
    records += [record(b"not avro at all", 1, 5, T0 + 8 * BUCKET_MS), record(None, 1, 6, T0 + 8 * BUCKET_MS)]
    assert run(reader.handle(fetched(records))) == len(events)
    *work, last_flush, commit = log.entries
    assert last_flush == Log.FLUSH and commit == ("commit", {("sales", 0): 7, ("sales", 1): 7})
    assert ("send", b"sales[1]@5", "bad marker 6e6f (want c301)") in work
    assert sum(1 for e in work if e[0] == "sales_batches") >= 2  # one per partition at least
    assert agg.state.counters["tombstones"] == 1 and agg.state.counters["sales_in"] == 14
    assert agg.state.sales.totals()["events"] == len(events)


def test_sales_reader_reads_only_between_recoveries_and_commits_before_it_pauses(settings):
    """The reader's side of Faust's recovery: nothing is read before the tables are recovered; a
    fetch that arrives while Faust rebalances waits for the recovery (it is not handled while the
    tables are being restored, and not thrown away); a pause or a stop waits until the fetch
    being handled is committed."""
    log = Log()
    agg, _ = aggregation(settings, log)
    events = sales_events()
    records = [record(e.value, e.message.partition, e.message.offset,
                      round(e.message.timestamp * 1000)) for e in events]
    first, second = records[:6], records[6:]
    consumer = FakeConsumer(log)
    crashed: list[BaseException] = []
    reader = reader_of(agg, consumer, crashed)
    commits = lambda: [e for e in log.entries if e[0] == "commit"]  # noqa: E731

    async def scenario() -> None:
        await reader.start()
        await asyncio.sleep(0.05)
        assert consumer.started and consumer.fetch_calls == 0  # the tables are not recovered yet
        assert [tuple(tp) for tp in consumer.assigned] == [("sales", 0), ("sales", 1)]
        reader.resume()  # the on_recover callback
        await until(lambda: consumer.fetch_calls == 1)  # waiting for records
        await reader.pause()  # Faust begins a rebalance
        consumer.fetches.put_nowait(fetched(first))  # ... and records arrive meanwhile
        await asyncio.sleep(0.1)
        assert commits() == [] and agg.state.counters["sales_in"] == 0
        reader.resume()  # recovered again
        await until(lambda: len(commits()) == 1)
        assert agg.state.counters["sales_in"] == len(first)

        hold = asyncio.Event()

        async def slow_flush() -> None:  # the broker is slow to ack the changelog writes
            await hold.wait()
            log.entries.append(Log.FLUSH)

        agg.flush = slow_flush
        consumer.fetches.put_nowait(fetched(second))
        await until(lambda: agg.state.counters["sales_in"] > len(first))  # handling it
        pausing = asyncio.ensure_future(reader.pause())
        await asyncio.sleep(0.05)
        assert not pausing.done() and len(commits()) == 1
        hold.set()
        await asyncio.wait_for(pausing, 1)
        assert log.entries[-1] == ("commit", {("sales", 0): 7, ("sales", 1): 5})
        await reader.stop()
        assert consumer.stopped and crashed == []

    run(scenario())
    assert agg.state.sales.totals()["events"] == len(events)


def test_sales_wait_until_faust_has_read_the_lists_published_before(settings, monkeypatch):
    """After a start (or a rebalance) the reader lets Faust's agent read the lists already on
    `recommendations` first (it is much slower), so a backlog of sales is judged against them."""
    from streams import sales_reader as sr

    log = Log()
    agg, _ = aggregation(settings, log)
    consumer = FakeConsumer(log, [fetched([record(sale(1, "u1", "a"), 0, 0, T0)])])
    consumer.ends = {0: 40, 1: 0}  # partition 1 is empty
    committed = {0: 25}  # Faust's group: partition 0 read up to 25 so far, 1 never

    class Admin:
        calls = 0

        async def start(self) -> None:
            pass

        async def close(self) -> None:
            pass

        async def list_consumer_group_offsets(self, group: str, partitions: list) -> dict:
            assert group == "recsys-aggregate"
            Admin.calls += 1
            return {tp: SimpleNamespace(offset=committed.get(tp.partition, -1))
                    for tp in partitions}

    reader = reader_of(agg, consumer)
    reader.lists = sr.Lists("recommendations", 2, "recsys-aggregate", Admin)

    async def scenario() -> None:
        await reader.start()
        reader.resume()
        await until(lambda: Admin.calls >= 2)
        assert consumer.fetch_calls == 0  # Faust is still reading lists
        committed[0] = 40
        await until(lambda: agg.state.counters["sales_in"] == 1)
        calls = Admin.calls
        await reader.pause()
        reader.resume()  # after a rebalance: asked again (and caught up at once)
        await until(lambda: Admin.calls == calls + 1)
        await reader.stop()

    monkeypatch.setattr(sr, "LISTS_POLL", 0.01)
    run(scenario())


def test_sales_reader_stops_the_worker_when_a_commit_fails(settings):
    log = Log()
    agg, _ = aggregation(settings, log)
    consumer = FakeConsumer(log, [fetched([record(sale(1, "u1", "a"), 0, 0, T0)])])

    async def refuse(offsets: Any) -> None:
        raise RuntimeError("CommitFailedError")

    consumer.commit = refuse
    crashed: list[BaseException] = []
    reader = reader_of(agg, consumer, crashed)

    async def scenario() -> None:
        await reader.start()
        reader.resume()
        await until(lambda: crashed)
        await reader.stop()

    run(scenario())
    assert str(crashed[0]) == "CommitFailedError"


def test_drain_buffer_waits_until_faust_buffer_is_empty():
    """Faust's buffer flush gives up after 0.1 s without progress; drain_buffer loops until
    every buffered changelog write has been handed to the client."""
    from streams.app import drain_buffer

    class SlowBuffer:
        size = 3

        async def flush(self) -> None:  # like Faust's under load: one message, then gives up
            await asyncio.sleep(0)
            self.size -= 1

    producer = SimpleNamespace(buffer=SlowBuffer())
    run(drain_buffer(producer))
    assert producer.buffer.size == 0
