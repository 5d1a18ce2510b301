"""The dashboard's shared, bounded state: what the Kafka feed has read, as every session sees it.

One `DashboardState` per server process. The feed thread writes through `apply`; browser sessions
read small, ready-to-plot views. One lock guards everything; each view copies what it returns, so
a session never holds the lock while it draws.

Bounded on purpose, because the server reads its topics from the beginning and runs for weeks:
only the latest two graph versions are kept (the latest drawn, the previous faded), at most
`MAX_EDGES_PER_VERSION` edges each; the model history, the product descriptions, the dead-letter
reasons and the per-second sales counts all roll over.

Progress to the next training threshold (n of N): N is `train_threshold`; n is the number of
valid sales after the latest model. When that model's `offsets` name `sales` partitions, n counts
the decodable sales records past each partition's `to_offset` (exact: offsets say what the model
saw); otherwise n counts the valid sales whose Kafka timestamp falls in a later second than the
model-ready event's (an approximation, to the second, for models trained from a file). Before the first
model, n is every valid sale read.

The speed layer's lists: `recommendations` carries a retrain list per user and model (source
"retrain", from Spark) and fold-in lists between retrains (source "fold-in", from the speed layer);
both are counted by source. A fold-in's freshness is its record's Kafka timestamp (its arrival)
minus the Kafka timestamp of the sale that caused it (`sale_timestamp`); the fold-ins that arrived
in the last FRESHNESS_WINDOW_MS are kept (at most MAX_FRESHNESS) for p50/p95.

The model lifecycle: each `model-ready` record says whether its version was promoted or rejected
by the gate and which version serves once it is read (`serving`; 0 on a record written before
the gate, which then names its own version). A manual promotion or rollback sends another record
for an existing version: the last one read is that version's status, and the last record read
overall names the version in service. A rejected challenger's lists go to
`recommendations-shadow` (counted here, never drawn); the aggregator judges them on live sales
and publishes their `feedback` under the challenger's version, so the challenger's online
hit-rate shows beside the champion's (`shadow`).
"""

from __future__ import annotations

import bisect
import heapq
import logging
import math
import threading
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from schemas import topics
from schemas.dead_letters import reason_label
from schemas.millis import to_ms
from schemas.topics import FOLD_IN, RETRAIN  # Recommendation.source

log = logging.getLogger(__name__)

MAX_EDGES_PER_VERSION = 200_000
MAX_HISTORY = 500
MAX_DESCRIPTIONS = 100_000
MAX_DLQ_REASONS = 24
RATE_WINDOW_S = 600
MAX_SECONDS = 100_000
MAX_BAD_OFFSETS = 10_000
MAX_WINDOWS = 10_000  # feedback windows kept per model version
FRESHNESS_WINDOW_MS = 60_000  # fold-in freshness: p50/p95 over the arrivals of the last minute
MAX_FRESHNESS = 300_000  # fold-ins kept for it: a minute at 5,000 lists/s

# Parts of the state a session may redraw separately; each has its own revision counter.
MODELS, GRAPH, STREAM, FEEDBACK = "models", "graph", "stream", "feedback"
PARTS = (MODELS, GRAPH, STREAM, FEEDBACK)

class Meta(NamedTuple):
    """Where a record came from, as the consumer saw it."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int


class Edge(NamedTuple):
    user_id: str
    product_id: str
    score: float
    rank: int
    because: tuple[str, ...]


@dataclass
class VersionGraph:
    """The recommendation edges of one model version, indexed by product (degree = len)."""

    version: int
    by_product: dict[str, dict[str, Edge]] = field(default_factory=dict)
    edges: int = 0
    dropped: int = 0

    def add(self, edge: Edge) -> bool:
        users = self.by_product.get(edge.product_id)
        if users is None:
            if self.edges >= MAX_EDGES_PER_VERSION:
                self.dropped += 1
                return False
            users = self.by_product[edge.product_id] = {}
        old = users.get(edge.user_id)
        if old is None:
            if self.edges >= MAX_EDGES_PER_VERSION:
                self.dropped += 1
                return False
            self.edges += 1
        elif not edge.because and old.because:
            # A Recommendation carries no `because`; keep the one its GraphEdge brought.
            edge = edge._replace(because=old.because)
        users[edge.user_id] = edge
        return True

    def degrees(self) -> dict[str, int]:
        return {p: len(u) for p, u in self.by_product.items()}


@dataclass(frozen=True)
class ModelSummary:
    version: int
    trained_at_ms: int
    arrived_ms: int
    trigger: str
    events: int
    users: int
    products: int
    metrics: dict[str, float]
    baseline: dict[str, float]
    sales_to_offsets: dict[int, int]  # partition -> last offset (inclusive) the model saw
    status: str = topics.PROMOTED  # of the last model-ready record read for this version
    status_reason: str = ""
    champion_version: int | None = None  # the champion the gate compared it with
    records: int = 1  # model-ready records read for it (a manual promotion adds one)


def percentile(ordered: list[int], q: float) -> int:
    """Nearest-rank percentile of sorted values (a value that occurred, never an interpolation)."""
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class DashboardState:
    """Everything the panels draw, fed by one consumer thread, read by many sessions."""

    def __init__(self, threshold: int, eval_k: int = 10) -> None:
        self.threshold = threshold
        self.eval_k = eval_k
        self._lock = threading.Lock()
        self._rev = dict.fromkeys(PARTS, 0)
        self.caught_up = False
        self.records = 0
        self.bad: Counter[str] = Counter()  # undecodable records per topic
        # models
        self.history: dict[int, ModelSummary] = {}
        self.serving: int | None = None  # `serving` of the last model-ready record read
        # graph: the latest two versions
        self.graphs: dict[int, VersionGraph] = {}
        self.stale_edges = 0
        # stream
        self.descriptions: OrderedDict[str, str] = OrderedDict()
        self.valid_sales = 0
        self.valid_by_second: dict[int, int] = {}
        self.sales_first: dict[int, int] = {}  # partition -> first offset read
        self.sales_next: dict[int, int] = {}  # partition -> next offset to read
        self.sales_bad: dict[int, list[int]] = {}  # partition -> sorted undecodable offsets
        self.dlq: Counter[str] = Counter()
        self.dlq_total = 0
        # feedback: per model version, the latest record and (sales, hits) per window
        self.feedback: dict[int, dict[str, Any]] = {}
        self.feedback_windows: dict[int, dict[int, tuple[int, int]]] = {}
        # speed layer: lists by source; (arrival ms, freshness ms) of the latest fold-ins
        self.lists_by_source: Counter[str] = Counter()
        self.freshness: deque[tuple[int, int]] = deque(maxlen=MAX_FRESHNESS)
        self._handlers = {
            topics.MODEL_READY: self._on_model,
            topics.RECOMMENDATIONS: self._on_recommendation,
            topics.RECOMMENDATIONS_SHADOW: self._on_shadow,
            topics.GRAPH_EDGES: self._on_edge,
            topics.SALES: self._on_sale,
            topics.SALES_DLQ: self._on_dead_letter,
            topics.FEEDBACK: self._on_feedback,
        }

    # --- writing (the feed thread) ------------------------------------------------------------
    def apply(self, record: dict[str, Any] | None, meta: Meta) -> None:
        """One consumed record, by topic; None means it did not decode."""
        self.apply_many([(record, meta)])

    def apply_many(self, items: list[tuple[dict[str, Any] | None, Meta]]) -> None:
        with self._lock:
            for record, meta in items:
                self.records += 1
                handler = self._handlers.get(meta.topic)
                if record is None or handler is None:
                    self._on_bad(meta)
                    continue
                try:
                    handler(record, meta)
                except (KeyError, TypeError, ValueError) as exc:
                    # A record that decodes but lacks what a panel needs: counted, never fatal.
                    log.warning("%s[%d]@%d: unusable record: %s", meta.topic, meta.partition,
                                meta.offset, exc)
                    self._on_bad(meta)

    def mark_caught_up(self) -> None:
        with self._lock:
            self.caught_up = True
            self._bump(MODELS)

    def _bump(self, part: str) -> None:
        self._rev[part] += 1

    def _on_bad(self, meta: Meta) -> None:
        self.bad[meta.topic] += 1
        if meta.topic == topics.SALES:
            offsets = self.sales_bad.setdefault(meta.partition, [])
            if len(offsets) < MAX_BAD_OFFSETS:
                bisect.insort(offsets, meta.offset)
            self._advance_sales(meta)
            self._bump(STREAM)

    def _on_model(self, rec: dict[str, Any], meta: Meta) -> None:
        version = int(rec["model_version"])
        offsets = {
            int(o["partition"]): int(o["to_offset"])
            for o in rec.get("offsets") or []
            if o.get("topic") == "sales"
        }
        status = str(rec.get("status") or topics.PROMOTED)
        serving = int(rec.get("serving") or 0)
        self.serving = serving or (version if status == topics.PROMOTED else self.serving)
        before = self.history.get(version)
        gated = int(rec.get("champion_version") or 0) or None
        self.history[version] = ModelSummary(
            version=version,
            trained_at_ms=_ms(rec.get("trained_at")),
            # A version announced again (promoted by hand) keeps its first arrival: progress to
            # the next model counts from when it was trained.
            arrived_ms=before.arrived_ms if before else meta.timestamp_ms,
            trigger=str(rec.get("trigger", "")),
            events=int(rec.get("events", 0)),
            users=int(rec.get("users", 0)),
            products=int(rec.get("products", 0)),
            metrics={k: float(v) for k, v in (rec.get("metrics") or {}).items()},
            baseline={k: float(v) for k, v in (rec.get("baseline_metrics") or {}).items()},
            sales_to_offsets=offsets,
            status=status,
            status_reason=str(rec.get("status_reason") or ""),
            champion_version=gated or (before.champion_version if before else None),
            records=before.records + 1 if before else 1,
        )
        while len(self.history) > MAX_HISTORY:
            del self.history[min(self.history)]
        self._prune_seconds()
        self._bump(MODELS)
        self._bump(STREAM)

    def _graph(self, version: int) -> VersionGraph | None:
        g = self.graphs.get(version)
        if g is not None:
            return g
        if len(self.graphs) >= 2 and version < min(self.graphs):
            self.stale_edges += 1
            return None
        g = self.graphs[version] = VersionGraph(version)
        while len(self.graphs) > 2:
            del self.graphs[min(self.graphs)]
        return g

    def _on_shadow(self, rec: dict[str, Any], meta: Meta) -> None:
        """A rejected challenger's list: counted, never drawn (it is not served)."""
        self.lists_by_source["shadow"] += 1
        self._bump(STREAM)

    def _on_recommendation(self, rec: dict[str, Any], meta: Meta) -> None:
        version = int(rec["model_version"])
        source = str(rec.get("source") or RETRAIN)
        self.lists_by_source[source] += 1
        if source == FOLD_IN and rec.get("sale_timestamp") is not None:
            arrived = meta.timestamp_ms
            self.freshness.append((arrived, arrived - _ms(rec["sale_timestamp"])))
            while self.freshness and self.freshness[0][0] <= arrived - FRESHNESS_WINDOW_MS:
                self.freshness.popleft()
        g = self._graph(version)
        if g is None:
            return
        user = str(rec["user_id"])
        for item in rec.get("items") or []:
            g.add(Edge(user, str(item["product_id"]), float(item["score"]), int(item["rank"]), ()))
        self._bump(GRAPH)

    def _on_edge(self, rec: dict[str, Any], meta: Meta) -> None:
        g = self._graph(int(rec["model_version"]))
        if g is None:
            return
        g.add(
            Edge(
                str(rec["user_id"]),
                str(rec["product_id"]),
                float(rec["score"]),
                int(rec["rank"]),
                tuple(str(b) for b in rec.get("because") or ()),
            )
        )
        self._bump(GRAPH)

    def _advance_sales(self, meta: Meta) -> None:
        self.sales_first.setdefault(meta.partition, meta.offset)
        if meta.offset + 1 > self.sales_next.get(meta.partition, 0):
            self.sales_next[meta.partition] = meta.offset + 1

    def _on_sale(self, rec: dict[str, Any], meta: Meta) -> None:
        self._advance_sales(meta)
        self.valid_sales += 1
        sec = meta.timestamp_ms // 1000
        self.valid_by_second[sec] = self.valid_by_second.get(sec, 0) + 1
        if len(self.valid_by_second) > MAX_SECONDS:
            self._prune_seconds()
        desc = rec.get("description")
        if desc:
            pid = str(rec["product_id"])
            self.descriptions[pid] = str(desc).strip()
            self.descriptions.move_to_end(pid)
            if len(self.descriptions) > MAX_DESCRIPTIONS:
                self.descriptions.popitem(last=False)
        self._bump(STREAM)

    def _prune_seconds(self) -> None:
        """Keep the rate window and, for the timestamp fallback, what follows the latest model."""
        if not self.valid_by_second:
            return
        newest = max(self.valid_by_second)
        keep_from = newest - RATE_WINDOW_S
        if self.history:
            latest = self.history[max(self.history)]
            keep_from = min(keep_from, latest.arrived_ms // 1000)
        else:
            keep_from = min(keep_from, newest - MAX_SECONDS)
        for sec in [s for s in self.valid_by_second if s < keep_from]:
            del self.valid_by_second[sec]
        if len(self.valid_by_second) > MAX_SECONDS:  # still too many: drop the oldest
            for sec in sorted(self.valid_by_second)[: len(self.valid_by_second) - MAX_SECONDS]:
                del self.valid_by_second[sec]

    def _on_dead_letter(self, rec: dict[str, Any], meta: Meta) -> None:
        label = reason_label(str(rec.get("stage") or ""), str(rec.get("reason") or ""))
        if label not in self.dlq and len(self.dlq) >= MAX_DLQ_REASONS:
            label = "other"
        self.dlq[label] += 1
        self.dlq_total += 1
        self._bump(STREAM)

    def _on_feedback(self, rec: dict[str, Any], meta: Meta) -> None:
        """The aggregator publishes one record per window of sale arrivals (republished as the
        window fills); the version's online hit-rate is sum(hits) / sum(sales) over its
        windows, each window counted once, at its latest figures."""
        version = rec.get("model_version")
        if version is None:
            return
        version = int(version)
        numbers = {k: float(v) for k, v in rec.items() if isinstance(v, int | float)}
        numbers["arrived_ms"] = float(meta.timestamp_ms)
        self.feedback[version] = numbers
        if "sales" in rec and "hits" in rec and rec.get("window_start") is not None:
            windows = self.feedback_windows.setdefault(version, {})
            windows[_ms(rec["window_start"])] = (int(rec["sales"]), int(rec["hits"]))
            while len(windows) > MAX_WINDOWS:
                del windows[min(windows)]
        while len(self.feedback) > MAX_HISTORY:
            oldest = min(self.feedback)
            del self.feedback[oldest]
            self.feedback_windows.pop(oldest, None)
        self._bump(FEEDBACK)

    # --- reading (Bokeh sessions) ------------------------------------------------------------
    def revisions(self) -> dict[str, int]:
        with self._lock:
            return dict(self._rev)

    def latest_model(self) -> ModelSummary | None:
        with self._lock:
            return self.history[max(self.history)] if self.history else None

    def progress(self) -> tuple[int, int]:
        """(n, N): valid sales since the latest model, and the training threshold."""
        with self._lock:
            return self._progress(), self.threshold

    def _progress(self) -> int:
        if not self.history:
            return self.valid_sales
        latest = self.history[max(self.history)]
        if not latest.sales_to_offsets:
            since = latest.arrived_ms // 1000
            return sum(c for s, c in self.valid_by_second.items() if s > since)
        n = 0
        for p, nxt in self.sales_next.items():
            start = latest.sales_to_offsets.get(p)
            start = self.sales_first.get(p, 0) if start is None else start + 1
            bad = self.sales_bad.get(p, [])
            n += max(0, nxt - start - (len(bad) - bisect.bisect_left(bad, start)))
        return n

    def status(self) -> dict[str, Any]:
        """The banner's figures."""
        with self._lock:
            latest = self.history[max(self.history)] if self.history else None
            g = self.graphs.get(max(self.graphs)) if self.graphs else None
            return {
                "caught_up": self.caught_up,
                "records": self.records,
                "n": self._progress(),
                "threshold": self.threshold,
                "model": latest,  # the newest trained, promoted or not
                "serving": self.history.get(self.serving) if self.serving is not None else None,
                "serving_version": self.serving,
                "shadow": self._shadow(),
                "models": len(self.history),
                "graph_version": g.version if g else None,
                "graph_edges": g.edges if g else 0,
                "graph_dropped": g.dropped if g else 0,
                "valid_sales": self.valid_sales,
                "dlq_total": self.dlq_total,
                "bad": dict(self.bad),
            }

    def versions(self) -> tuple[int | None, int | None]:
        """(current, previous) graph versions held."""
        with self._lock:
            held = sorted(self.graphs, reverse=True)
            return (held[0] if held else None, held[1] if len(held) > 1 else None)

    def description(self, product_id: str) -> str:
        with self._lock:
            return self.descriptions.get(product_id, "")

    def latest_graph_version(self) -> int | None:
        with self._lock:
            return max(self.graphs) if self.graphs else None

    def network(self, top_products: int, max_users: int,
                only: Callable[[str], bool] | None = None) -> dict[str, Any]:
        """The current version's sub-graph around its `top_products` most recommended products
        (those `only` accepts, when given): the users with most edges into them (at most
        `max_users`), and the edges between."""
        with self._lock:
            if not self.graphs:
                return {"version": None, "products": [], "users": [], "edges": []}
            g = self.graphs[max(self.graphs)]
            items = g.by_product.items()
            if only is not None:
                items = [(p, us) for p, us in items if only(p)]
            chosen = heapq.nsmallest(top_products, items, key=lambda kv: (-len(kv[1]), kv[0]))
            into: Counter[str] = Counter()
            for _, users in chosen:
                into.update(users.keys())
            users = heapq.nsmallest(max_users, into.items(), key=lambda kv: (-kv[1], kv[0]))
            keep = {u for u, _ in users}
            edges = [e for _, us in chosen for u, e in us.items() if u in keep]
            products = [
                (p, len(us), self.descriptions.get(p, "")) for p, us in chosen
            ]
            return {
                "version": g.version,
                "products": products,  # (product_id, degree in the whole version, description)
                "users": users,  # (user_id, edges into the chosen products)
                "edges": edges,
            }

    def degree_distribution(self) -> dict[str, Any]:
        """Products by how many users they are recommended to, for the two versions held."""
        with self._lock:
            out: dict[str, Any] = {}
            held = sorted(self.graphs, reverse=True)
            for role, version in zip(("current", "previous"), held, strict=False):
                counts = Counter(len(us) for us in self.graphs[version].by_product.values())
                degrees = sorted(counts)
                out[role] = (version, degrees, [counts[d] for d in degrees])
            return out

    def top_products(self, k: int) -> list[tuple[str, int, float, str]]:
        """(product_id, users it is recommended to, mean rank, description), best first."""
        with self._lock:
            if not self.graphs:
                return []
            g = self.graphs[max(self.graphs)]
            chosen = heapq.nsmallest(k, g.by_product.items(), key=lambda kv: (-len(kv[1]), kv[0]))
            return [
                (
                    p,
                    len(us),
                    sum(e.rank for e in us.values()) / len(us),
                    self.descriptions.get(p, ""),
                )
                for p, us in chosen
            ]

    def model_history(self) -> list[ModelSummary]:
        with self._lock:
            return [self.history[v] for v in sorted(self.history)]

    def serving_version(self) -> int | None:
        with self._lock:
            return self.serving

    def shadow(self) -> dict[str, Any] | None:
        """The challenger in force against the champion, online: see `_shadow`."""
        with self._lock:
            return self._shadow()

    def _shadow(self) -> dict[str, Any] | None:
        """The newest rejected version newer than the one in service (its lists are judged in
        shadow) and the one in service, each with its online hit-rate and sales judged (None
        before any feedback); None without such a challenger."""
        rejected = [v for v, m in self.history.items() if m.status == topics.REJECTED
                    and (self.serving is None or v > self.serving)]
        if not rejected:
            return None
        challenger = max(rejected)
        out: dict[str, Any] = {"challenger": challenger, "champion": self.serving}
        for role, v in (("challenger", challenger), ("champion", self.serving)):
            figures = self._online(v) if v is not None else None
            out[f"{role}_hit_rate"] = figures[0] if figures else None
            out[f"{role}_sales"] = figures[1] if figures else 0
        return out

    def _online(self, version: int) -> tuple[float, int] | None:
        """(hit-rate, sales) over the version's feedback windows."""
        windows = self.feedback_windows.get(version)
        if not windows:
            return None
        sales = sum(s for s, _ in windows.values())
        hits = sum(h for _, h in windows.values())
        return (hits / sales if sales else 0.0), sales

    def sales_rate(self, now_s: int, window_s: int = 120) -> tuple[list[int], list[int]]:
        """Valid sales per second (by Kafka timestamp) over the `window_s` full seconds before
        `now_s`; zeros where nothing arrived."""
        with self._lock:
            secs = list(range(now_s - window_s, now_s))
            return secs, [self.valid_by_second.get(s, 0) for s in secs]

    def dead_letters(self) -> list[tuple[str, int]]:
        with self._lock:
            return self.dlq.most_common()

    def speed(self, now_ms: int) -> dict[str, Any]:
        """Lists read by source, and the freshness (ms) of the fold-ins that arrived in the
        minute before `now_ms`: their count, p50 and p95 (None without any)."""
        with self._lock:
            recent = sorted(f for at, f in self.freshness
                            if now_ms - FRESHNESS_WINDOW_MS < at <= now_ms)
            return {
                "lists": {src: self.lists_by_source[src] for src in (RETRAIN, FOLD_IN, "shadow")},
                "fold_ins": len(recent),
                "p50_ms": percentile(recent, 50) if recent else None,
                "p95_ms": percentile(recent, 95) if recent else None,
            }

    def feedback_by_version(self) -> list[tuple[int, dict[str, float]]]:
        """Per version: the latest record's figures, with `hit_rate` over all its windows
        (and `sales`, `hits`, `windows`) where the records carry window counts."""
        with self._lock:
            out = []
            for v in sorted(self.feedback):
                figures = dict(self.feedback[v])
                windows = self.feedback_windows.get(v)
                if windows:
                    sales = sum(s for s, _ in windows.values())
                    hits = sum(h for _, h in windows.values())
                    figures.update(sales=float(sales), hits=float(hits),
                                   windows=float(len(windows)),
                                   hit_rate=hits / sales if sales else 0.0)
                out.append((v, figures))
            return out


def _ms(value: Any) -> int:
    """fastavro reads timestamp-millis as an aware datetime; keep plain epoch ms."""
    if value is None:
        return 0
    return to_ms(value)
