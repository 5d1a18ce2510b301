"""The feedback loop's arithmetic and the sales ledger, on tiny hand-built inputs with known
answers (streams/feedback.py, streams/state.py; no Faust, no Kafka)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from schemas import codec
from schemas.dead_letters import reason_label
from schemas.millis import to_ms
from streams.feedback import (
    BUCKET_MS,
    FOLD_IN,
    FeedbackWindow,
    Listing,
    ServingTimeline,
    choose,
    feedback_record,
    horizon_ms,
    in_force,
    match,
    newer,
    recompute,
    recompute_shadow,
    shadow_in_force,
    window_bounds,
)
from streams.state import (
    MAX_LISTS,
    DeadLetterState,
    RecommendationState,
    SalesState,
    serving_of,
)

pytestmark = pytest.mark.unit

T0 = 1_700_000_000_000 - 1_700_000_000_000 % BUCKET_MS  # a minute boundary
V1 = Listing(1, T0, ("a", "b"))
V2 = Listing(2, T0 + 10 * BUCKET_MS, ("c", "a"))


def test_to_ms_reads_fastavro_datetimes_and_numbers():
    assert to_ms(datetime(2011, 1, 1, tzinfo=UTC)) == 1293840000000
    assert to_ms(1293840000000) == 1293840000000


def test_the_list_in_force_is_the_newest_generated_before_the_sale_arrived():
    assert in_force([V1, V2], T0 - 1) is None
    assert in_force([V1, V2], T0) == V1
    assert in_force([V2, V1], T0 + 10 * BUCKET_MS - 1) == V1
    assert in_force([V1, V2], T0 + 10 * BUCKET_MS) == V2
    # A later model wins over an earlier one generated at the same time.
    same = Listing(3, T0, ("z",))
    assert in_force([V1, same], T0) == same


def test_match_hit_miss_and_no_list():
    assert match([V1], "a", T0 + 1).model_version == 1 and match([V1], "a", T0 + 1).hit
    assert match([V1], "c", T0 + 1).hit is False
    assert match([V1, V2], "c", T0 + 11 * BUCKET_MS).hit  # judged against v2 by then
    assert match([], "a", T0).model_version is None
    # A 2011 purchase replayed today arrives after the list was generated: it is judged.
    assert match([V1], "a", T0 + 5).hit


def test_known_hits_give_known_rates():
    listings = {"u1": [V1], "u2": [Listing(1, T0, ("c", "d"))]}
    sales = [
        (T0 + 1, "u1", "a", 1),   # hit
        (T0 + 2, "u1", "a", 3),   # hit again, same (user, product): one pair
        (T0 + 3, "u1", "x", 1),   # miss
        (T0 + 4, "u2", "d", 1),   # hit
        (T0 + 5, "u3", "a", 1),   # u3 had no list: not counted
        (T0 + 6, "u2", "d", -1),  # a return: not a purchase
        (T0 - 1, "u2", "c", 1),   # arrived before the list existed: not counted
    ]
    got = recompute(sales, listings, {1: 2})
    assert got == {1: {"sales": 4, "users": 2, "hits": 3, "hit_pairs": 2,
                       "hit_rate": pytest.approx(0.75), "precision_at_k": pytest.approx(0.5)}}


def test_window_add_then_remove_leaves_nothing():
    w = FeedbackWindow()
    w.add(1, "u", "a", 2, True)
    w.add(1, "u", "b", 1, False)
    w.add(None, "v", "a", 1, False)  # no list: ignored
    w.add(1, "v", "a", -1, False)  # return: ignored
    assert w.counts(1).sales == 2 and w.counts(1).hits == 1 and w.counts(1).n_users == 1
    w.remove(1, "u", "a", 2, True)
    w.remove(1, "u", "b", 1, False)
    assert w.versions() == [] and w.counts(1).sales == 0


def test_horizon_rounds_up_to_whole_minutes_and_the_window_ends_with_the_current_minute():
    assert horizon_ms(60) == 60_000
    assert horizon_ms(61) == 120_000
    assert window_bounds(T0 + 30_000, 120_000) == (T0 - 60_000, T0 + 60_000)


def test_feedback_record_is_a_valid_feedback_event_with_a_deterministic_id():
    w = FeedbackWindow()
    w.add(7, "u", "a", 1, True)
    w.add(7, "v", "b", 1, False)
    rec = feedback_record(7, w.counts(7), 10, (T0, T0 + 60_000), 0.12, published_at=T0 + 1)
    again = feedback_record(7, w.counts(7), 10, (T0, T0 + 60_000), 0.12, published_at=T0 + 99)
    assert rec["id"] == again["id"] == f"7:{T0}:{T0 + 60_000}:2:1"
    assert rec["hit_rate"] == 0.5 and rec["precision_at_k"] == pytest.approx(1 / 20)
    name, back = codec.decode(codec.encode("Feedback", rec))
    assert name == "Feedback" and back["users"] == 2 and back["offline_precision_at_k"] == 0.12


# --- the sales ledger -----------------------------------------------------------------------


def entry(i: int, minute: int, user: str = "u", product: str = "a", qty: int = 1,
          mv: int | None = 1, hit: int = 1, part: int = 0) -> list:
    return [f"e{i}", T0 + minute * BUCKET_MS + i, user, product, qty, mv, hit, part]


def test_a_stored_sale_reads_back_by_name_older_records_included():
    from streams.state import BatchSale

    new = BatchSale("e1", T0, "u", "a", 2, 3, 1, 0, "fold-in", 4, 1)
    assert new.stored() == ["e1", T0, "u", "a", 2, 3, 1, 0, "fold-in", 4, 1]
    assert BatchSale.of(new.stored()) == new
    plain = BatchSale("e2", T0, "u", "a", 1, 3, 0, 1, "retrain")
    assert plain.stored() == ["e2", T0, "u", "a", 1, 3, 0, 1, "retrain"]  # no shadow fields
    old = BatchSale.of(["e3", T0, "u", "a", 1, 3, 1, 0])  # written before `source` existed
    assert (old.source, old.shadow_version, old.shadow_hit) == ("retrain", None, 0)


def test_sales_inside_the_window_are_deduplicated_and_older_minutes_fold_into_totals():
    s = SalesState(horizon=2 * BUCKET_MS)
    s.add("b0", [entry(0, 0), entry(1, 0, product="b", qty=-2, hit=0)])
    s.add("b1", [entry(2, 1)])
    assert s.seen("e0") and s.close_plan() is None  # minutes 0 and 1 are in the window
    s.add("b2", [entry(3, 2, user="w", hit=0)])  # partition 0 at minute 2: window minutes 1-2
    plan = s.close_plan()
    assert plan.buckets == {0: [T0]} and plan.delete == ["b0"]
    assert plan.products == {"a": {"upto": {"0": T0}, "sales": 1, "returns": 0, "quantity": 1},
                             "b": {"upto": {"0": T0}, "sales": 0, "returns": 1, "quantity": -2}}
    assert plan.rollups[0]["events"] == 2 and plan.rollups[0]["minutes"] == [[T0, 2]]
    before = (s.totals(), s.top_products(5))
    s.apply_close(plan)
    assert (s.totals()["events"], s.top_products(5)) == (before[0]["events"], before[1])
    assert not s.seen("e0") and s.is_late(0, T0 + 5) and not s.is_late(0, T0 + BUCKET_MS)
    assert not s.is_late(1, T0 + 5)  # partition 1 has folded nothing
    # e0 left the window; e2 (a hit) and e3 (v1's list, a miss) are in it.
    assert (s.window.counts(1).sales, s.window.counts(1).hits) == (2, 1)
    assert s.per_minute() == [[T0, 2], [T0 + BUCKET_MS, 1], [T0 + 2 * BUCKET_MS, 1]]


def test_each_partition_folds_on_its_own_clock():
    """A backlog is read partition by partition: partition 0 running ahead must not fold the
    minutes partition 1 has not delivered yet."""
    s = SalesState(horizon=BUCKET_MS)
    s.add("p0", [entry(i, i, part=0) for i in range(5)])  # partition 0: minutes 0-4
    plan = s.close_plan()
    assert plan.buckets == {0: [T0 + m * BUCKET_MS for m in range(4)]}
    s.apply_close(plan)
    s.add("p1", [entry(10 + i, i, part=1) for i in range(2)])  # partition 1: minutes 0-1
    assert not s.is_late(1, T0) and s.totals()["events"] == 7
    assert s.close_plan().buckets == {1: [T0]}
    assert s.window_bounds() == (T0 + BUCKET_MS, T0 + 5 * BUCKET_MS)  # by the slowest clock


def test_rebuild_from_the_tables_gives_the_live_views():
    live = SalesState(horizon=2 * BUCKET_MS)
    batches: dict[str, dict] = {}
    products: dict[str, dict] = {}
    rollups: dict[str, dict] = {}
    for i in range(12):
        e = entry(i, i // 2, user=f"u{i % 3}", product="abc"[i % 3], hit=i % 2, part=i % 2)
        batches[f"k{i}"] = {"e": [e]}
        live.add(f"k{i}", [e])
        plan = live.close_plan()
        if plan:
            products.update(plan.products)
            rollups.update({f"total/{p}": r for p, r in plan.rollups.items()})
            for k in plan.delete:
                del batches[k]
            live.apply_close(plan)
    rebuilt = SalesState(horizon=2 * BUCKET_MS)
    rebuilt.rebuild(batches.items(), products.items(), rollups.items())
    assert rebuilt.totals() == live.totals()
    assert rebuilt.products == live.products and rebuilt.per_minute() == live.per_minute()
    assert rebuilt.window.by_version == live.window.by_version
    assert {p: lane.upto for p, lane in rebuilt.lanes.items()} == {
        p: lane.upto for p, lane in live.lanes.items()}
    assert rebuilt.stream_ms == live.stream_ms


def test_a_product_record_folded_before_a_crash_is_not_counted_twice():
    """product_totals written, sales_rollup not (the crash hit between them)."""
    s = SalesState(horizon=BUCKET_MS)
    batches = {"k0": {"e": [entry(0, 0)]}, "k1": {"e": [entry(1, 2, product="b")]}}
    folded_a = {"upto": {"0": T0}, "sales": 1, "returns": 0, "quantity": 1}
    s.rebuild(batches.items(), [("a", folded_a)], [])
    assert s.products["a"] == [1, 0, 1] and s.totals()["events"] == 2
    assert s.close_plan() is None  # nothing folds before this worker reads sales again
    s.observe(0, T0 + 2 * BUCKET_MS)  # the minute-2 sale, read again
    plan = s.close_plan()  # folds minute 0 again: the rollup gets e0, product a does not
    assert plan.rollups[0]["events"] == 1 and "a" not in plan.products
    s.apply_close(plan)
    assert s.products["a"] == [1, 0, 1] and s.totals()["events"] == 2


# --- recommendations and dead letters ---------------------------------------------------------


def test_degrees_follow_replaced_lists():
    r = RecommendationState()
    assert r.put("u1", Listing(1, T0, ("a", "b")))
    assert not r.put("u1", Listing(1, T0, ("a", "b")))  # the same list again: no change
    r.put("u2", Listing(1, T0, ("a", "c")))
    r.put("u1", Listing(1, T0 + 1, ("c", "d")))  # replaced: b loses u1, a loses u1
    assert dict(r.versions[1].degree) == {"a": 1, "c": 2, "d": 1}
    assert r.degree_histogram(1) == [[1, 2], [2, 1]]
    assert r.top_recommended(1, 1) == [{"product_id": "c", "users": 2}]
    assert r.versions[1].users == 2 and r.versions[1].k == 2
    assert sorted(r.drop_version(1)) == ["1:u1", "1:u2"] and r.versions == {}


def test_a_fold_in_adds_a_list_of_its_version_and_degrees_follow_the_newest():
    r = RecommendationState()
    r.put("u1", Listing(1, T0, ("a", "b")))
    fold = Listing(1, T0 + 5, ("c", "b"), FOLD_IN, "e1")
    assert r.put("u1", fold) and not r.put("u1", fold)
    assert list(r.listings("u1")) == [Listing(1, T0, ("a", "b")), fold]  # both judge sales
    assert dict(r.versions[1].degree) == {"b": 1, "c": 1} and r.versions[1].users == 1
    late = Listing(1, T0 + 1, ("z",), FOLD_IN, "e0")  # generated before e1's, read after it
    assert r.put("u1", late) and dict(r.versions[1].degree) == {"b": 1, "c": 1}
    assert in_force(r.listings("u1"), T0 + 2) == late
    for i in range(2, 12):
        r.put("u1", Listing(1, T0 + 10 + i, ("d",), FOLD_IN, f"e{i}"))
    dropped = r.trim("u1", 1)
    assert dropped == ["1:u1", "1:u1:e0", "1:u1:e1", "1:u1:e2", "1:u1:e3"]  # the oldest
    assert len(list(r.listings("u1"))) == MAX_LISTS
    assert not r.put("u1", Listing(1, T0 + 3, ("y",), FOLD_IN, "old"))  # older than all kept
    assert sorted(r.drop_version(1))[0] == "1:u1:e10"


def test_freshness_orders_by_version_then_generation_time():
    retrain2 = Listing(2, T0, ("a",))
    assert newer(Listing(2, T0 + 1, ("b",), FOLD_IN, "e"), retrain2)
    assert not newer(Listing(1, T0 + 99, ("b",), FOLD_IN, "e"), retrain2)  # older model
    assert newer(Listing(2, T0, ("b",), FOLD_IN, "e"), retrain2)  # a tie goes to the fold-in


def test_dead_letters_count_once_per_offset():
    rec = DeadLetterState().record("sales.dlq/0")
    assert DeadLetterState.count(rec, 0, "produce", "no customer id: row 7")
    assert DeadLetterState.count(rec, 1, "produce", "no customer id: row 9")
    assert not DeadLetterState.count(rec, 1, "produce", "no customer id: row 9")  # replay
    assert rec["reasons"] == {"produce: no customer id": 2} and rec["total"] == 2
    assert reason_label("", "") == "unknown"


# --- the version in service, shadow lists -------------------------------------------------------


def test_the_serving_version_is_chosen_first_then_the_newest():
    """A rollback to v1 republishes its list (generated after v2's): with v1 in service it
    wins; without a serving version (no model-ready read yet) the newest model does."""
    republished = Listing(1, T0 + 20 * BUCKET_MS, ("r",))
    fold = Listing(1, T0 + 21 * BUCKET_MS, ("f",), FOLD_IN, "s1")
    lists = [V1, V2, republished]
    assert choose(lists, serving=None) == V2
    assert choose(lists, serving=2) == V2
    assert choose(lists, serving=1) == republished
    assert choose([*lists, fold], serving=1) == fold  # the speed layer follows v1
    assert choose([V2], serving=1) == V2  # a user v1 does not know keeps v2's list
    # In force at a sale's arrival: generated before it, by who served then.
    assert in_force(lists, T0 + 15 * BUCKET_MS, serving=1) == V1
    assert in_force(lists, T0 + 25 * BUCKET_MS, serving=1) == republished
    assert newer(V1, V2, serving=1) and not newer(V1, V2)


def test_serving_timeline_and_old_records():
    timeline = ServingTimeline([(T0 + 10, 2), (T0, 1), (T0 + 20, 1)])
    assert [timeline.at(t) for t in (T0 - 1, T0, T0 + 15, T0 + 20)] == [None, 1, 2, 1]
    assert serving_of(3, "promoted", 0) == 3  # a v1 record (serving defaults to 0)
    assert serving_of(3, "rejected", 2) == 2
    assert serving_of(1, "rejected", 0) is None  # a first model rejected: none serves


def test_shadow_lists_are_judged_on_the_same_sales_as_the_served_ones():
    served = Listing(1, T0, ("a", "b"))
    challenger = Listing(2, T0 + BUCKET_MS, ("b", "c"))
    assert shadow_in_force([challenger], served, T0 + 5) is None  # not generated yet
    assert shadow_in_force([challenger], None, T0 + 2 * BUCKET_MS) is None  # nothing to compare
    assert shadow_in_force([challenger], served, T0 + 2 * BUCKET_MS) == challenger
    promoted = Listing(2, T0 + 3 * BUCKET_MS, ("b", "c"))  # the challenger promoted by hand
    assert shadow_in_force([challenger], promoted, T0 + 4 * BUCKET_MS) is None
    m = match([served], "c", T0 + 2 * BUCKET_MS, serving=1, shadows=[challenger])
    assert (m.model_version, m.hit, m.shadow_version, m.shadow_hit) == (1, False, 2, True)
    t = T0 + 2 * BUCKET_MS
    rows = [(t, "u1", "a", 1), (t + 1, "u1", "b", 1), (t + 2, "u1", "c", 1),
            (t + 3, "u1", "c", -1), (t + 4, "u2", "a", 1)]
    got = recompute_shadow(rows, {"u1": [served], "u2": [served]}, {"u1": [challenger]})
    assert got[2]["challenger"] == {"sales": 3, "users": 1, "hits": 2, "hit_pairs": 2,
                                    "hit_rate": 2 / 3}
    assert got[2]["champion"] == {"sales": 3, "users": 1, "hits": 2, "hit_pairs": 2,
                                  "hit_rate": 2 / 3}
    # Added and removed (a minute leaving the window), the window is empty again.
    w = FeedbackWindow()
    w.add(1, "u1", "a", 1, True, shadow_version=2, shadow_hit=False)
    w.add(1, "u1", "c", 1, False, shadow_version=2, shadow_hit=True)
    assert w.versions() == [1, 2]
    assert (w.counts(2).sales, w.counts(2).hits) == (2, 1)  # the challenger's own
    assert (w.shadow_counts(2)[1].sales, w.shadow_counts(2)[1].hits) == (2, 1)
    w.remove(1, "u1", "a", 1, True, shadow_version=2, shadow_hit=False)
    w.remove(1, "u1", "c", 1, False, shadow_version=2, shadow_hit=True)
    assert (w.by_version, w.shadow, w.shadow_champion, w.by_source) == ({}, {}, {}, {})


def test_codes_that_are_not_products_stay_out_of_the_top_products():
    from streams.state import SalesState

    s = SalesState(900)
    s.products.update({"POST": [50, 0, 50], "85123A": [10, 0, 30], "M": [9, 1, 8],
                       "22423": [5, 0, 5]})
    from recsys.settings import load

    pattern = load().non_product_pattern
    assert [t["product_id"] for t in s.top_products(2, pattern)] == ["85123A", "22423"]
    assert [t["product_id"] for t in s.top_products(2)] == ["POST", "85123A"]
