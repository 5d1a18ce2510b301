"""The read API, served by Faust's web server (127.0.0.1:6066 by default), JSON only.

    GET /recommendations/{user_id}  the user's list: the version in service first, then the newest
                                    model version, then the latest generated ("source": "retrain"
                                    or "fold-in", with its model_version and, for a fold-in, the
                                    sale_event_id that caused it); for a user without one, the
                                    most bought products ("source": "popular")
    GET /stats                      the version in service, each version's status, top products,
                                    degree distribution, feedback (per version and per source of
                                    the lists), the shadow comparison (a rejected challenger's
                                    lists against the served ones on the same sales), users by the
                                    source of their list, ingest rate, dead letters, model metrics
                                    (cached for STATS_TTL seconds)
    GET /ready                      200 once the tables are recovered and a first model exists,
                                    503 before

With `RECSYS_API_TOKEN` set, /recommendations and /stats answer only a request carrying
`Authorization: Bearer <token>` (401 otherwise; compared in constant time); /ready stays open for
health checks and tells nothing about users. With Kafka secured and no token the worker refuses to
start (`token_problem`): a secured pipeline must not serve every user's list to anyone who can
reach the port.

Handlers read the in-memory views only (no awaits), so an answer never sees half an update.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from typing import Any

from recsys.settings import Settings
from schemas.millis import now_ms
from streams.agents import Aggregation
from streams.feedback import SOURCES, source_figures

STATS_TTL = 1.0  # seconds a /stats answer is reused: it sorts every product
TOP = 20


def stats(agg: Aggregation) -> dict[str, Any]:
    """Everything /stats shows, computed from the derived views."""
    state = agg.state
    sales = state.sales
    latest = state.latest_model
    start, end = sales.window_bounds()
    versions = sorted(set(state.models) | set(state.recs.versions) | set(state.shadow.versions),
                      reverse=True)
    now = now_ms()
    per_version = []
    for mv in versions:
        rs = state.recs.versions.get(mv) or state.shadow.versions.get(mv)
        model = state.models.get(mv)
        per_version.append({
            "model_version": mv,
            "status": state.status(mv),
            "serving": mv == state.serving,
            "status_reason": model.get("status_reason") if model else None,
            "champion_version": model.get("champion_version") if model else None,
            "champion_metrics": model.get("champion_metrics") if model else None,
            # Every model-ready record read for it: a manual promotion adds one.
            "status_history": model.get("records") if model else None,
            "lists": "shadow" if mv in state.shadow.versions and mv not in state.recs.versions
            else "served" if rs else None,
            "users": rs.users if rs else 0,
            "k": rs.k if rs else 0,
            "top_recommended": state.recs.top_recommended(mv, TOP),
            "degree_distribution": state.recs.degree_histogram(mv),
            "metrics": model["metrics"] if model else None,
            "baseline_metrics": model["baseline_metrics"] if model else None,
            "trained_at": model["trained_at"] if model else None,
            "trigger": model["trigger"] if model else None,
            # Sales judged against this version's lists, served or (a challenger) in shadow.
            "feedback": agg.feedback(mv, (start, end), now)
            if mv in sales.window.by_version or mv in sales.window.shadow else None,
        })
    shadow = []
    for mv in sorted(sales.window.shadow, reverse=True):
        challenger, champion = sales.window.shadow_counts(mv)
        model = state.models.get(mv) or {}
        shadow.append({
            "model_version": mv,
            "status": state.status(mv),
            "champion_version": model.get("champion_version") or state.serving,
            "sales": challenger.sales,  # the same sales for both
            "challenger": source_figures(challenger),
            "champion": source_figures(champion),
        })
    minutes = sales.per_minute()
    # The newest full minute: the current one is still filling.
    full = [n for b, n in minutes if b + 60_000 <= sales.stream_ms]
    return {
        "ready": state.recovered and latest is not None,
        "serving": state.serving,  # the version in service (`serving` of the last model-ready)
        "latest_model": state.models.get(latest) if latest is not None else None,
        "models": per_version,
        # Per challenger version with shadow lists judged in the window, newest first: its
        # online figures and the served lists' on the same sales; `shadow` is the newest.
        "shadow": shadow[0] if shadow else None,
        "shadow_versions": shadow,
        "users_with_recommendations": state.latest_users,
        # Users by the source of the list the read API answers them.
        "users_by_source": state.users_by_source(),
        # The feedback window's purchases by the source of the list they were judged against.
        "feedback_by_source": {src: source_figures(sales.window.source_counts(src))
                               for src in SOURCES},
        "sales": sales.totals(),
        "top_products": sales.top_products(TOP, agg.settings.non_product_pattern),
        "feedback_window": {"start": start, "end": end, "horizon_ms": sales.horizon},
        "ingest": {
            "per_minute": minutes,
            "last_full_minute_per_s": full[-1] / 60 if full else 0.0,
            "stream_time": sales.stream_ms,
        },
        "dead_letters": state.dead_letters.totals(),
        "worker": dict(state.counters),
    }


class Cached:
    """`compute(agg)`, recomputed at most every `ttl` seconds: /stats and the popular list sort
    every product, too slow to do per request."""

    def __init__(self, compute: Callable[[Aggregation], Any], ttl: float = STATS_TTL) -> None:
        self.compute, self.ttl = compute, ttl
        self.at = -ttl
        self.value: Any = None

    def get(self, agg: Aggregation) -> Any:
        now = time.monotonic()
        if now - self.at >= self.ttl:
            self.value, self.at = self.compute(agg), now
        return self.value


def popular(agg: Aggregation) -> tuple[int | None, list[dict[str, Any]]]:
    """The list for users without one: the most bought products (or, before any sale, the
    products the latest model shows most)."""
    mv = agg.state.serving if agg.state.serving is not None else agg.state.latest_model
    stats_ = agg.state.recs.versions.get(mv) if mv is not None else None
    n = stats_.k if stats_ and stats_.k else agg.settings.top_n
    items = [{"product_id": t["product_id"], "sales": t["sales"], "rank": i}
             for i, t in enumerate(agg.state.sales.top_products(
                 n, agg.settings.non_product_pattern), 1)]
    if not items and mv is not None:  # no sales yet: the products the model shows most
        items = [{"product_id": t["product_id"], "users": t["users"], "rank": i}
                 for i, t in enumerate(agg.state.recs.top_recommended(mv, n), 1)]
    return mv, items


def recommendations(agg: Aggregation, user_id: str, cache: Cached | None = None
                    ) -> dict[str, Any]:
    lst = agg.state.recs.chosen(user_id, agg.state.serving)
    if lst is not None:
        scores = lst.scores if len(lst.scores) == len(lst.items) else (None,) * len(lst.items)
        return {
            "user_id": user_id, "source": lst.source,
            "model_version": lst.model_version, "generated_at": lst.generated_at,
            "serving": agg.state.serving, "sale_event_id": lst.sale_event_id,
            "items": [{"product_id": p, "score": s, "rank": i}
                      for i, (p, s) in enumerate(zip(lst.items, scores, strict=True), 1)],
        }
    mv, items = cache.get(agg) if cache is not None else popular(agg)
    return {"user_id": user_id, "source": "popular", "model_version": mv, "items": items}


def token_problem(settings: Settings) -> str | None:
    """The line refusing to start the read API without a token while Kafka is secured."""
    from recsys.security import token_problem as problem

    return problem(settings, "api_token", "the read API would serve every user's list")


def authorized(settings: Settings, header: str | None) -> bool:
    """Whether an `Authorization` header carries the configured bearer token (any, if none)."""
    token = settings.api_token.get_secret_value()
    if not token:
        return True
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                               token.encode())


UNAUTHORIZED = {"WWW-Authenticate": 'Bearer realm="recsys"'}


def register(app: Any, agg: Aggregation) -> None:
    stats_cache = Cached(stats)
    popular_cache = Cached(popular)

    @app.page("/recommendations/{user_id}")
    async def recommendations_view(self: Any, request: Any, user_id: str) -> Any:
        if not authorized(agg.settings, request.headers.get("Authorization")):
            return self.error(401, "a bearer token is required", headers=UNAUTHORIZED)
        if not agg.state.recovered:
            return self.json({"error": "recovering tables"}, status=503)
        return self.json(recommendations(agg, user_id, popular_cache))

    @app.page("/stats")
    async def stats_view(self: Any, request: Any) -> Any:
        if not authorized(agg.settings, request.headers.get("Authorization")):
            return self.error(401, "a bearer token is required", headers=UNAUTHORIZED)
        return self.json(stats_cache.get(agg))

    @app.page("/ready")
    async def ready_view(self: Any, request: Any) -> Any:
        state = agg.state
        if not state.recovered:
            return self.json({"ready": False, "reason": "recovering tables"}, status=503)
        if state.latest_model is None:
            return self.json({"ready": False, "reason": "no model yet"}, status=503)
        return self.json({"ready": True, "model_version": state.latest_model,
                          "serving": state.serving,
                          "users_with_recommendations": state.latest_users})
