"""The read API, served by Faust's web server (127.0.0.1:6066 by default), JSON only.

    GET /recommendations/{user_id}  the user's freshest list: newest model version, then latest
                                    generated ("source": "retrain" or "fold-in", with its
                                    model_version and, for a fold-in, the sale_event_id that
                                    caused it); for a user without one, the most bought products
                                    ("source": "popular")
    GET /stats                      top products, degree distribution, feedback (per version and
                                    per source of the lists), users by the source of their
                                    freshest list, ingest rate, dead letters, model metrics
                                    (cached for STATS_TTL seconds)
    GET /ready                      200 once the tables are recovered and a first model exists,
                                    503 before

Handlers read the in-memory views only (no awaits), so an answer never sees half an update.
"""

from __future__ import annotations

import time
from typing import Any

from streams.agents import Aggregation
from streams.feedback import RETRAIN, SOURCES, source_figures

STATS_TTL = 1.0  # seconds a /stats answer is reused: it sorts every product
TOP = 20


def stats(agg: Aggregation) -> dict[str, Any]:
    """Everything /stats shows, computed from the derived views."""
    state = agg.state
    sales = state.sales
    latest = state.latest_model
    start, end = sales.window_bounds()
    versions = sorted(set(state.models) | set(state.recs.versions), reverse=True)
    per_version = []
    for mv in versions:
        rs = state.recs.versions.get(mv)
        model = state.models.get(mv)
        per_version.append({
            "model_version": mv,
            "users": rs.users if rs else 0,
            "k": rs.k if rs else 0,
            "top_recommended": state.recs.top_recommended(mv, TOP),
            "degree_distribution": state.recs.degree_histogram(mv),
            "metrics": model["metrics"] if model else None,
            "baseline_metrics": model["baseline_metrics"] if model else None,
            "trained_at": model["trained_at"] if model else None,
            "trigger": model["trigger"] if model else None,
            "feedback": agg.feedback(mv, (start, end), int(time.time() * 1000))
            if mv in sales.window.by_version else None,
        })
    minutes = sales.per_minute()
    # The newest full minute: the current one is still filling.
    full = [n for b, n in minutes if b + 60_000 <= sales.stream_ms]
    return {
        "ready": state.recovered and latest is not None,
        "latest_model": state.models.get(latest) if latest is not None else None,
        "models": per_version,
        "users_with_recommendations": state.latest_users,
        "users_by_source": {src: state.latest_by_source[src] for src in SOURCES},
        # The feedback window's purchases by the source of the list they were judged against.
        "feedback_by_source": {src: source_figures(sales.window.source_counts(src))
                               for src in SOURCES},
        "sales": sales.totals(),
        "top_products": sales.top_products(TOP),
        "feedback_window": {"start": start, "end": end, "horizon_ms": sales.horizon},
        "ingest": {
            "per_minute": minutes,
            "last_full_minute_per_s": full[-1] / 60 if full else 0.0,
            "stream_time": sales.stream_ms,
        },
        "dead_letters": state.dead_letters.totals(),
        "worker": dict(state.counters),
    }


class Popular:
    """The list for users without one: the most bought products (or, before any sale, the
    products the latest model shows most), recomputed at most every STATS_TTL seconds: it
    sorts every product, too slow to do per request."""

    def __init__(self) -> None:
        self.at = -STATS_TTL
        self.value: tuple[int | None, list[dict[str, Any]]] = (None, [])

    def get(self, agg: Aggregation) -> tuple[int | None, list[dict[str, Any]]]:
        now = time.monotonic()
        if now - self.at >= STATS_TTL:
            self.value, self.at = popular(agg), now
        return self.value


def popular(agg: Aggregation) -> tuple[int | None, list[dict[str, Any]]]:
    mv = agg.state.latest_model
    stats_ = agg.state.recs.versions.get(mv) if mv is not None else None
    n = stats_.k if stats_ and stats_.k else agg.settings.top_n
    items = [{"product_id": t["product_id"], "sales": t["sales"], "rank": i}
             for i, t in enumerate(agg.state.sales.top_products(n), 1)]
    if not items and mv is not None:  # no sales yet: the products the model shows most
        items = [{"product_id": t["product_id"], "users": t["users"], "rank": i}
                 for i, t in enumerate(agg.state.recs.top_recommended(mv, n), 1)]
    return mv, items


def recommendations(agg: Aggregation, user_id: str, cache: Popular | None = None
                    ) -> dict[str, Any]:
    latest = agg.tables.recs.get(user_id)
    if latest is not None:
        return {
            "user_id": user_id, "source": latest.get("source", RETRAIN),
            "model_version": latest["model_version"], "generated_at": latest["generated_at"],
            "sale_event_id": latest.get("sale_event_id"),
            "items": [{"product_id": p, "score": s, "rank": i}
                      for i, (p, s) in enumerate(latest["items"], 1)],
        }
    mv, items = cache.get(agg) if cache is not None else popular(agg)
    return {"user_id": user_id, "source": "popular", "model_version": mv, "items": items}


def register(app: Any, agg: Aggregation) -> None:
    cache: dict[str, Any] = {"at": -STATS_TTL, "body": None}
    popular_cache = Popular()

    @app.page("/recommendations/{user_id}")
    async def recommendations_view(self: Any, request: Any, user_id: str) -> Any:
        if not agg.state.recovered:
            return self.json({"error": "recovering tables"}, status=503)
        return self.json(recommendations(agg, user_id, popular_cache))

    @app.page("/stats")
    async def stats_view(self: Any, request: Any) -> Any:
        now = time.monotonic()
        if cache["body"] is None or now - cache["at"] >= STATS_TTL:
            cache["body"], cache["at"] = stats(agg), now
        return self.json(cache["body"])

    @app.page("/ready")
    async def ready_view(self: Any, request: Any) -> Any:
        state = agg.state
        if not state.recovered:
            return self.json({"ready": False, "reason": "recovering tables"}, status=503)
        if state.latest_model is None:
            return self.json({"ready": False, "reason": "no model yet"}, status=503)
        return self.json({"ready": True, "model_version": state.latest_model,
                          "users_with_recommendations": state.latest_users})
