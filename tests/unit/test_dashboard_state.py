"""The dashboard's shared state, layout and document, without a broker or a browser: tiny
hand-made records with known answers."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from recsys.settings import load
from schemas import topics
from schemas.dead_letters import reason_label
from visualizer import state as state_mod
from visualizer.panels.network import PRODUCT_RING, USER_RING, radial_bipartite_layout
from visualizer.panels.status import banner_html
from visualizer.panels.stream import progress_html, speed_html
from visualizer.panels.top_products import bar_label
from visualizer.state import DashboardState, Meta

pytestmark = pytest.mark.unit

T0 = 1_700_000_000_000  # a Kafka timestamp, ms


def meta(topic: str, offset: int = 0, partition: int = 0, ts: int = T0) -> Meta:
    return Meta(topic, partition, offset, ts)


def model(version: int, offsets: dict[int, int] | None = None, **metrics: float) -> dict:
    return {
        "model_version": version,
        "model_id": f"m{version}",
        "trained_at": datetime.fromtimestamp(T0 / 1000, UTC),
        "trigger": "threshold",
        "events": 100 * version,
        "offsets": [
            {"topic": "sales", "partition": p, "from_offset": 0, "to_offset": o}
            for p, o in (offsets or {}).items()
        ],
        "users": 3,
        "products": 4,
        "params": {},
        "metrics": {"rmse": 1.0 / version, **metrics},
        "baseline_metrics": {"rmse": 1.5},
        "train_seconds": 1.0,
        "cycle_seconds": 2.0,
        "model_path": "x",
    }


def rec(version: int, user: str, products: list[str]) -> dict:
    return {
        "id": f"{version}:{user}",
        "user_id": user,
        "model_version": version,
        "generated_at": T0,
        "items": [
            {"product_id": p, "score": 1.0 / r, "rank": r} for r, p in enumerate(products, 1)
        ],
    }


def fold_in(version: int, user: str, products: list[str], sale_ts: int, sale_id: str) -> dict:
    """A speed-layer list (speed/layer.py): the sale's Kafka timestamp as fastavro reads it."""
    return {**rec(version, user, products), "id": f"{version}:{user}:{sale_id}",
            "source": "fold-in", "sale_event_id": sale_id,
            "sale_timestamp": datetime.fromtimestamp(sale_ts / 1000, UTC)}


def edge(version: int, user: str, product: str, rank: int = 1, because=("B1",)) -> dict:
    return {
        "id": f"{version}:{user}:{product}",
        "model_version": version,
        "user_id": user,
        "product_id": product,
        "score": 0.5,
        "rank": rank,
        "because": list(because),
    }


def sale(product: str = "P1", description: str | None = "RED MUG") -> dict:
    return {
        "event_id": "e",
        "user_id": "u",
        "product_id": product,
        "quantity": 1,
        "event_time": T0,
        "description": description,
    }


def graph_state() -> DashboardState:
    """v1: P1 to 3 users, P2 to 2, P3 to 1 (known degrees)."""
    s = DashboardState(threshold=50)
    s.apply(model(1), meta(topics.MODEL_READY))
    s.apply(rec(1, "u1", ["P1", "P2", "P3"]), meta(topics.RECOMMENDATIONS))
    s.apply(rec(1, "u2", ["P1", "P2"]), meta(topics.RECOMMENDATIONS))
    s.apply(rec(1, "u3", ["P1"]), meta(topics.RECOMMENDATIONS))
    return s


def test_network_focuses_on_the_most_recommended_products():
    s = graph_state()
    view = s.network(top_products=2, max_users=10)
    assert view["version"] == 1
    assert [(p, d) for p, d, _ in view["products"]] == [("P1", 3), ("P2", 2)]
    assert [u for u, _ in view["users"]] == ["u1", "u2", "u3"]
    assert len(view["edges"]) == 5  # P3's edge is outside the focus
    # users with most edges into the focus come first when the user cap bites
    assert [u for u, _ in s.network(2, 2)["users"]] == ["u1", "u2"]


def test_degrees_and_top_products():
    s = graph_state()
    dist = s.degree_distribution()
    assert dist["current"] == (1, [1, 2, 3], [1, 1, 1])
    assert "previous" not in dist
    top = s.top_products(2)
    assert [(p, n) for p, n, _, _ in top] == [("P1", 3), ("P2", 2)]
    assert top[0][2] == pytest.approx(1.0)  # P1 is rank 1 for everyone
    assert top[1][2] == pytest.approx(2.0)


def test_graph_edge_brings_because_and_a_later_recommendation_keeps_it():
    s = DashboardState(threshold=10)
    s.apply(edge(1, "u1", "P1", because=("A", "B")), meta(topics.GRAPH_EDGES))
    s.apply(rec(1, "u1", ["P1"]), meta(topics.RECOMMENDATIONS))
    (e,) = s.network(5, 5)["edges"]
    assert e.because == ("A", "B") and e.rank == 1 and e.score == 1.0


def test_keeps_the_latest_two_versions_and_drops_stale_edges():
    s = DashboardState(threshold=10)
    for v in (1, 2, 3):
        s.apply(edge(v, "u1", f"P{v}"), meta(topics.GRAPH_EDGES))
    assert s.versions() == (3, 2)
    s.apply(edge(1, "u9", "P9"), meta(topics.GRAPH_EDGES))  # a late edge of a dropped version
    assert s.versions() == (3, 2)
    assert s.stale_edges == 1
    dist = s.degree_distribution()
    assert dist["current"][0] == 3 and dist["previous"][0] == 2


def test_edges_per_version_are_bounded(monkeypatch):
    monkeypatch.setattr(state_mod, "MAX_EDGES_PER_VERSION", 3)
    s = DashboardState(threshold=10)
    s.apply(rec(1, "u1", ["P1", "P2", "P3", "P4", "P5"]), meta(topics.RECOMMENDATIONS))
    status = s.status()
    assert status["graph_edges"] == 3 and status["graph_dropped"] == 2
    # an update of an edge already held is not a new edge
    s.apply(edge(1, "u1", "P1"), meta(topics.GRAPH_EDGES))
    assert s.status()["graph_edges"] == 3


def test_progress_before_the_first_model_counts_every_valid_sale():
    s = DashboardState(threshold=50)
    for i in range(7):
        s.apply(sale(), meta(topics.SALES, offset=i))
    s.apply(None, meta(topics.SALES, offset=7))  # did not decode: not valid
    assert s.progress() == (7, 50)
    text = banner_html(s.status(), 10)
    assert "Waiting for data: 7 of 50 events" in text


def test_progress_counts_valid_sales_past_the_model_offsets():
    s = DashboardState(threshold=100)
    for p, count in ((0, 15), (1, 10)):
        for o in range(count):
            s.apply(None if (p, o) == (0, 12) else sale(), meta(topics.SALES, o, p))
    s.apply(model(1, offsets={0: 9, 1: 4}), meta(topics.MODEL_READY))
    # p0: offsets 10..14 minus the bad 12 -> 4; p1: 5..9 -> 5
    assert s.progress() == (9, 100)
    s.apply(sale(), meta(topics.SALES, 15, 0))
    assert s.progress() == (10, 100)
    # a partition the model did not see counts from the first offset read
    s.apply(sale(), meta(topics.SALES, 0, 2))
    assert s.progress() == (11, 100)


def test_progress_without_offsets_counts_sales_after_the_model_by_timestamp():
    s = DashboardState(threshold=100)
    s.apply(sale(), meta(topics.SALES, 0, ts=T0 - 5000))
    s.apply(model(1), meta(topics.MODEL_READY, ts=T0))
    s.apply(sale(), meta(topics.SALES, 1, ts=T0 + 2000))
    s.apply(sale(), meta(topics.SALES, 2, ts=T0 + 3000))
    assert s.progress() == (2, 100)


def test_sales_rate_and_descriptions():
    s = DashboardState(threshold=10)
    for i, ts in enumerate((T0, T0 + 10, T0 + 1000)):
        s.apply(sale("P7", "WHITE HEART"), meta(topics.SALES, i, ts=ts))
    secs, counts = s.sales_rate(now_s=T0 // 1000 + 2, window_s=3)
    assert secs == [T0 // 1000 - 1, T0 // 1000, T0 // 1000 + 1]
    assert counts == [0, 2, 1]
    assert s.description("P7") == "WHITE HEART"


def test_descriptions_roll_over(monkeypatch):
    monkeypatch.setattr(state_mod, "MAX_DESCRIPTIONS", 2)
    s = DashboardState(threshold=10)
    for i, p in enumerate(("P1", "P2", "P3")):
        s.apply(sale(p, f"D{p}"), meta(topics.SALES, i))
    assert s.description("P1") == "" and s.description("P3") == "DP3"


def test_dead_letters_by_reason_are_bounded(monkeypatch):
    assert reason_label("produce", "bad quantity: 'x'") == "produce: bad quantity"
    assert reason_label("", "") == "unknown"
    monkeypatch.setattr(state_mod, "MAX_DLQ_REASONS", 2)
    s = DashboardState(threshold=10)
    for r in ("a: 1", "a: 2", "b", "c", "d"):
        s.apply({"stage": "stream", "reason": r}, meta(topics.SALES_DLQ))
    assert dict(s.dead_letters()) == {"stream: a": 2, "stream: b": 1, "other": 2}


def test_history_and_feedback_keep_one_entry_per_version_and_roll_over(monkeypatch):
    monkeypatch.setattr(state_mod, "MAX_HISTORY", 2)
    s = DashboardState(threshold=10)
    for v in (1, 2, 3, 3):
        s.apply(model(v), meta(topics.MODEL_READY))
        s.apply({"model_version": v, "hit_rate": v / 10}, meta(topics.FEEDBACK))
    assert [m.version for m in s.model_history()] == [2, 3]
    assert [v for v, _ in s.feedback_by_version()] == [2, 3]
    assert s.feedback_by_version()[-1][1]["hit_rate"] == pytest.approx(0.3)
    assert s.latest_model().metrics["rmse"] == pytest.approx(1 / 3)


def test_online_hit_rate_sums_each_window_once_at_its_latest_figures():
    s = DashboardState(threshold=10)

    def fb(start: int, sales: int, hits: int) -> dict:
        return {"model_version": 4, "window_start": T0 + start, "window_end": T0 + start + 60,
                "sales": sales, "hits": hits, "hit_rate": hits / sales, "precision_at_k": 0.1}

    s.apply(fb(0, 10, 1), meta(topics.FEEDBACK))
    s.apply(fb(0, 20, 4), meta(topics.FEEDBACK))  # the same window, republished as it filled
    s.apply(fb(60_000, 30, 2), meta(topics.FEEDBACK))
    ((version, figures),) = s.feedback_by_version()
    assert version == 4
    assert (figures["sales"], figures["hits"], figures["windows"]) == (50, 6, 2)
    assert figures["hit_rate"] == pytest.approx(6 / 50)


def test_lists_by_source_and_fold_in_freshness_over_the_last_minute():
    s = graph_state()  # three lists of v1 without a source (schema v1): retrains
    s.apply({**rec(1, "u4", ["P2"]), "source": "retrain"}, meta(topics.RECOMMENDATIONS))
    # 20 fold-ins arriving at T0 + i s, each i * 10 ms after its sale, and one a minute earlier.
    s.apply(fold_in(1, "u1", ["P4"], T0 - 90_000, "old"), meta(topics.RECOMMENDATIONS,
                                                                 ts=T0 - 60_000))
    for i in range(1, 21):
        at = T0 + i * 1000
        s.apply(fold_in(1, f"u{i}", ["P2"], at - i * 10, f"s{i}"),
                meta(topics.RECOMMENDATIONS, offset=i, ts=at))
    s.apply(fold_in(0, "u1", ["P9"], T0, "stale"), meta(topics.RECOMMENDATIONS, ts=T0))
    speed = s.speed(T0 + 20_000)
    assert speed["lists"] == {"retrain": 4, "fold-in": 22, "shadow": 0}  # an older version's list too
    # The minute (T0 - 40 s, T0 + 20 s]: the 20 fold-ins and the stale one (0 ms).
    assert speed["fold_ins"] == 21
    assert (speed["p50_ms"], speed["p95_ms"]) == (100, 190)  # nearest rank: 11th, 20th of 21
    later = s.speed(T0 + 70_000)  # a minute on: only the fold-ins after T0 + 10 s
    assert (later["fold_ins"], later["p50_ms"], later["p95_ms"]) == (10, 150, 200)
    assert s.speed(T0 + 200_000)["p50_ms"] is None
    assert speed_html(speed) == (
        "<b>lists:</b> 4 retrain · 22 fold-in &nbsp; <b>fold-in freshness</b> (last minute): "
        "p50 100 ms · p95 190 ms (21 lists)")
    assert speed_html(s.speed(T0 + 200_000)).endswith("(last minute): no fold-in")


def test_fold_in_freshness_samples_are_bounded(monkeypatch):
    monkeypatch.setattr(state_mod, "MAX_FRESHNESS", 5)
    s = DashboardState(threshold=10)
    for i in range(8):
        s.apply(fold_in(1, "u", ["P"], T0, f"s{i}"), meta(topics.RECOMMENDATIONS, i, ts=T0 + i))
    assert s.speed(T0 + 10)["fold_ins"] == 5 and s.speed(T0 + 10)["p50_ms"] == 5


def test_a_record_without_what_a_panel_needs_is_counted_not_fatal():
    s = DashboardState(threshold=10)
    s.apply({"user_id": "u1"}, meta(topics.RECOMMENDATIONS))  # no model_version
    s.apply({"x": 1}, meta("some-other-topic"))
    assert s.status()["bad"] == {topics.RECOMMENDATIONS: 1, "some-other-topic": 1}
    assert s.versions() == (None, None)


def test_revisions_move_only_for_the_part_that_changed():
    s = DashboardState(threshold=10)
    before = s.revisions()
    s.apply(sale(), meta(topics.SALES))
    after = s.revisions()
    assert after[state_mod.STREAM] > before[state_mod.STREAM]
    assert after[state_mod.GRAPH] == before[state_mod.GRAPH]


def test_layout_is_deterministic_and_on_two_rings():
    products = ["P1", "P2", "P3", "P4"]
    links = {"u1": ["P1"], "u2": ["P1", "P2"], "u3": ["P3"], "u4": ["P4", "P3"], "u5": ["P2"]}
    a = radial_bipartite_layout(products, links)
    b = radial_bipartite_layout(products, dict(reversed(list(links.items()))))
    assert a == b
    p_xy, u_xy = a
    assert set(p_xy) == set(products) and set(u_xy) == set(links)
    for x, y in p_xy.values():
        assert math.hypot(x, y) == pytest.approx(PRODUCT_RING)
    for x, y in u_xy.values():
        assert math.hypot(x, y) == pytest.approx(USER_RING)

    def angle(xy: tuple[float, float]) -> float:
        return math.atan2(xy[1], xy[0])

    # a user linked to one product sits on that product's side of the picture
    for u, ps in links.items():
        if len(ps) == 1:
            d = abs((angle(u_xy[u]) - angle(p_xy[ps[0]]) + math.pi) % (2 * math.pi) - math.pi)
            assert d < math.pi / 2, (u, d)


def test_labels_and_progress_text():
    assert bar_label("P1", "") == "P1"
    assert bar_label("85123A", "WHITE HANGING HEART T-LIGHT HOLDER").endswith("…")
    assert "3 of 10 events (30%)" in progress_html(3, 10, has_model=True)
    assert "training" not in progress_html(3, 10, has_model=True)
    assert "12 of 10 events (100%) — threshold reached, training" in progress_html(
        12, 10, has_model=True)


def test_origins_and_settings():
    from visualizer.server import origins

    assert origins(load(dashboard_port=5107)) == ["localhost:5107", "127.0.0.1:5107"]
    s = load(dashboard_allow_websocket_origin="dash.example:80, localhost:5006")
    assert origins(s) == ["dash.example:80", "localhost:5006"]


def test_the_document_builds_and_draws_the_shared_state(monkeypatch):
    """main.py, run the way the Bokeh server runs it, shows what the state holds at once."""
    from bokeh.application import Application
    from bokeh.application.handlers.directory import DirectoryHandler

    from visualizer import feed
    from visualizer.server import APP_DIR

    s = graph_state()
    s.apply(sale("P1", "RED MUG"), meta(topics.SALES))
    monkeypatch.setattr(feed, "_state", s)
    app = Application(DirectoryHandler(filename=str(APP_DIR)))
    doc = app.create_document()
    assert doc.get_model_by_name("network-edges").data["user"]
    assert len(doc.get_model_by_name("network-products").data["product"]) == 3
    assert doc.get_model_by_name("history").data["version"] == [1]
    assert doc.get_model_by_name("top-products").data["product"] == ["P3", "P2", "P1"]
    assert "RED MUG" in doc.get_model_by_name("top-products").data["description"][-1]
    assert "Model v1" in doc.get_model_by_name("banner").text
    assert "3 retrain · 0 fold-in" in doc.get_model_by_name("speed").text
    assert len(doc.session_callbacks) == 1  # the periodic redraw


# --- the model lifecycle: promoted, rejected, in service, shadow -----------------------------------


def gated(version: int, status: str, serving: int, trigger: str = "threshold",
          champion: int = 0) -> dict:
    """A ModelReady v2 record."""
    return {**model(version, precision_at_k=0.1 * version), "trigger": trigger,
            "status": status, "serving": serving, "status_reason": f"{status}: p@10 figures",
            "champion_version": champion, "champion_metrics": {}}


def feedback(version: int, sales: int, hits: int) -> dict:
    return {"model_version": version, "window_start": T0, "window_end": T0 + 60_000,
            "sales": sales, "hits": hits, "hit_rate": hits / sales, "precision_at_k": 0.1}


def test_v1_records_read_as_promoted_and_serving():
    """A record written before the gate reads with status promoted and serving 0 (fastavro's
    defaults): its own version serves."""
    s = DashboardState(threshold=10)
    s.apply({**model(1), "status": "promoted", "serving": 0}, meta(topics.MODEL_READY))
    s.apply(model(2), meta(topics.MODEL_READY, 1))  # no status field at all
    assert s.serving_version() == 2
    assert [m.status for m in s.model_history()] == ["promoted", "promoted"]
    assert s.shadow() is None


def test_rejected_challenger_manual_promotion_and_rollback():
    """v1 serves; v2 is rejected (v1 still serves, v2's shadow hit-rate beside v1's); v2 is
    promoted by hand (a second record for v2); a rollback puts v1 back (a second record for
    v1): the last record read is each version's status and says who serves."""
    s = DashboardState(threshold=10)
    s.apply(gated(1, "promoted", 1), meta(topics.MODEL_READY, 0, ts=T0))
    s.apply(gated(2, "rejected", 1, champion=1), meta(topics.MODEL_READY, 1, ts=T0 + 5))
    assert s.serving_version() == 1
    assert [(m.version, m.status) for m in s.model_history()] == [(1, "promoted"),
                                                                  (2, "rejected")]
    assert s.shadow() == {"challenger": 2, "champion": 1, "challenger_hit_rate": None,
                          "challenger_sales": 0, "champion_hit_rate": None, "champion_sales": 0}
    s.apply(feedback(1, 40, 4), meta(topics.FEEDBACK))
    s.apply(feedback(2, 20, 3), meta(topics.FEEDBACK))  # the challenger's shadow lists
    sh = s.shadow()
    assert (sh["challenger_hit_rate"], sh["challenger_sales"]) == (pytest.approx(0.15), 20)
    assert (sh["champion_hit_rate"], sh["champion_sales"]) == (pytest.approx(0.1), 40)
    st = s.status()
    assert st["model"].version == 2 and st["serving"].version == 1
    text = banner_html(st, 10)
    assert "Model v1</b> serving" in text and "newest v2 rejected" in text
    assert "challenger v2 online hit-rate 0.1500 (20 sales) vs v1 in service 0.1000" in text
    s.apply(gated(2, "promoted", 2, trigger="manual"), meta(topics.MODEL_READY, 2, ts=T0 + 9))
    assert s.serving_version() == 2 and s.shadow() is None
    v2 = s.model_history()[1]
    assert (v2.status, v2.trigger, v2.records, v2.champion_version) == ("promoted", "manual",
                                                                       2, 1)
    assert v2.arrived_ms == T0 + 5  # progress counts from when it was trained
    s.apply(gated(1, "promoted", 1, trigger="manual"), meta(topics.MODEL_READY, 3))
    assert s.serving_version() == 1
    assert s.status()["serving"].version == 1
    assert "Model v1</b> serving" in banner_html(s.status(), 10)


def test_history_panel_marks_status_and_the_version_in_service():
    from visualizer.panels.history import HistoryPanel

    s = DashboardState(threshold=10)
    s.apply(gated(1, "promoted", 1), meta(topics.MODEL_READY, 0))
    s.apply(gated(2, "rejected", 1, champion=1), meta(topics.MODEL_READY, 1))
    s.apply(gated(3, "promoted", 3, champion=1), meta(topics.MODEL_READY, 2))
    panel = HistoryPanel(10)
    panel.refresh(s)
    data = panel.source.data
    assert data["status"] == ["promoted", "rejected", "promoted"]
    assert data["serving"] == ["", "", "(serving)"]
    assert panel.serving.data["version"] == [3]
    assert panel.rank.title.text.endswith("serving: v3 · 1 rejected")
    s.apply(gated(1, "promoted", 1, trigger="manual"), meta(topics.MODEL_READY, 3))  # rollback
    panel.refresh(s)
    assert panel.serving.data["version"] == [1]
    assert panel.source.data["trigger"][0] == "manual"
    assert "serving: v1" in panel.rmse.title.text


def test_shadow_lists_are_counted_not_drawn():
    s = DashboardState(threshold=10)
    s.apply(rec(1, "u1", ["P1"]), meta(topics.RECOMMENDATIONS))
    s.apply(rec(2, "u1", ["P9"]), meta(topics.RECOMMENDATIONS_SHADOW))
    assert s.versions() == (1, None)
    speed = s.speed(T0)
    assert speed["lists"] == {"retrain": 1, "fold-in": 0, "shadow": 1}
    assert "1 shadow" in speed_html(speed)


def test_the_demo_summary_shows_each_models_status_and_which_serves():
    from recsys.demo import model_statuses

    old = {k: v for k, v in model(1).items()}  # before the gate: no status, no serving
    records = [old, gated(2, "rejected", 1, champion=1), gated(3, "promoted", 3, champion=1),
               gated(2, "promoted", 2, trigger="manual")]
    rows, serving = model_statuses(records)
    assert [(r["model_version"], r["status"], r["trigger"]) for r in rows] == [
        (1, "promoted", "threshold"), (2, "promoted", "manual"), (3, "promoted", "threshold")]
    assert serving == 2
    rows, serving = model_statuses(records[:2])
    assert [r["status"] for r in rows] == ["promoted", "rejected"] and serving == 1
    assert model_statuses([gated(1, "rejected", 0)])[1] is None  # a first model rejected
