"""The feedback loop's arithmetic: which list a sale is judged against, hits, hit-rate and
precision@k per model version over a window. Pure Python, no Faust or Kafka, so it is tested
directly (tests/unit/test_feedback.py).

Which list counts. A sale is judged against the newest list the user had been given *before the
sale arrived*, whatever its source (a retrain's, or a fold-in the speed layer published after an
earlier sale of the user): the list's `generated_at` against the sale's Kafka record timestamp (its arrival;
our producers leave it to the producer's clock), never against the sale's `event_time`. A replay
of 2011 purchases arrives now, and its event times would predate every list ever generated; the
arrival time also makes a replay of the aggregator itself (a restart re-reading uncommitted sales)
judge each sale exactly as the first run did.

What counts. Only purchases (quantity > 0) by users who had a list count; a sale is a hit when its
product is on that list. Per model version, over the window:

    hit_rate       = hits / sales
    precision_at_k = hit_pairs / (k * users)

where `hit_pairs` counts distinct (user, product) hits (buying a recommended product twice is one
relevant item, as in offline precision@k) and `k` is the length of the version's lists. The same
counts are kept per source of the list (retrain, fold-in), so the two can be compared; `Feedback`
records stay per model version (both sources together).

Lists are ordered by (model_version, generated_at): a newer model wins, and within a version the
later list, so a fold-in generated after its version's retrain list replaces it, while a fold-in
under an older version never replaces a newer model's list, however late it arrives.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from schemas.topics import FOLD_IN, RETRAIN  # Recommendation.source

BUCKET_MS = 60_000  # sales are grouped by arrival minute: the ingest rate and the window's step

SOURCES = (RETRAIN, FOLD_IN)


def to_ms(value: int | float | datetime) -> int:
    """Milliseconds since the epoch from fastavro's timestamp-millis (a datetime) or a number."""
    if isinstance(value, datetime):
        return round(value.timestamp() * 1000)
    return int(value)


def bucket_of(ts_ms: int) -> int:
    return ts_ms - ts_ms % BUCKET_MS


def horizon_ms(seconds: float) -> int:
    """The feedback horizon in ms, rounded up to whole buckets."""
    ms = int(seconds * 1000)
    return -(-ms // BUCKET_MS) * BUCKET_MS


def window_bounds(stream_ms: int, horizon: int) -> tuple[int, int]:
    """[start, end) of the window that ends with the bucket holding `stream_ms`."""
    end = bucket_of(stream_ms) + BUCKET_MS
    return end - horizon, end


@dataclass(frozen=True)
class Listing:
    """One user's list from one model version: a retrain's, or a fold-in after a sale."""

    model_version: int
    generated_at: int
    items: tuple[str, ...]
    source: str = RETRAIN
    sale_event_id: str | None = None  # fold-in: the sale that caused it

    @property
    def order(self) -> tuple[int, int, bool]:
        """Freshness: model version, then generation time (a fold-in wins a tie)."""
        return self.model_version, self.generated_at, self.source == FOLD_IN

    @property
    def ident(self) -> tuple[str, str | None]:
        """Which list of its user and version this is: a version has one retrain list per user
        (republished, it replaces itself) and one fold-in list per sale."""
        return self.source, self.sale_event_id


def newer(a: Listing, b: Listing | None) -> bool:
    """Lists are ordered by (model_version, generated_at): a later model wins."""
    return b is None or a.order > b.order


def in_force(listings: Iterable[Listing], at_ms: int) -> Listing | None:
    """The newest list generated at or before `at_ms`."""
    best: Listing | None = None
    for lst in listings:
        if lst.generated_at <= at_ms and newer(lst, best):
            best = lst
    return best


@dataclass(frozen=True)
class Match:
    model_version: int | None  # None: the user had no list when the sale arrived
    hit: bool
    source: str | None = None  # the source of the list it was judged against


def match(listings: Iterable[Listing], product_id: str, at_ms: int) -> Match:
    lst = in_force(listings, at_ms)
    if lst is None:
        return Match(None, False)
    return Match(lst.model_version, product_id in lst.items, lst.source)


@dataclass
class Counts:
    """One model version's sales inside the window; add and remove keep it exact."""

    sales: int = 0
    hits: int = 0
    users: Counter[str] = field(default_factory=Counter)
    pairs: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(self, user: str, product: str, hit: bool, sign: int = 1) -> None:
        self.sales += sign
        _bump(self.users, user, sign)
        if hit:
            self.hits += sign
            _bump(self.pairs, (user, product), sign)

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def hit_pairs(self) -> int:
        return len(self.pairs)

    def hit_rate(self) -> float:
        return self.hits / self.sales if self.sales else 0.0

    def precision_at_k(self, k: int) -> float:
        return self.hit_pairs / (k * self.n_users) if self.n_users and k else 0.0


def _bump(counter: Counter, key: Any, sign: int) -> None:
    n = counter[key] + sign
    if n:
        counter[key] = n
    else:
        del counter[key]


class FeedbackWindow:
    """Counts per model version, and per source of the list, of the purchases inside the
    window."""

    def __init__(self) -> None:
        self.by_version: dict[int, Counts] = {}
        self.by_source: dict[str, Counts] = {}

    def add(self, model_version: int | None, user: str, product: str, quantity: int,
            hit: bool, source: str | None = RETRAIN, sign: int = 1) -> None:
        if model_version is None or quantity <= 0:
            return
        for table, key in ((self.by_version, model_version), (self.by_source, source or RETRAIN)):
            counts = table.get(key)
            if counts is None:
                counts = table[key] = Counts()
            counts.add(user, product, hit, sign)
            if counts.sales == 0:
                del table[key]

    def remove(self, model_version: int | None, user: str, product: str, quantity: int,
               hit: bool, source: str | None = RETRAIN) -> None:
        self.add(model_version, user, product, quantity, hit, source, sign=-1)

    def versions(self) -> list[int]:
        return sorted(self.by_version)

    def counts(self, model_version: int) -> Counts:
        return self.by_version.get(model_version) or Counts()

    def source_counts(self, source: str) -> Counts:
        return self.by_source.get(source) or Counts()


def feedback_id(model_version: int, start: int, end: int, sales: int, hits: int) -> str:
    """Deterministic: the same window with the same counts is the same record."""
    return f"{model_version}:{start}:{end}:{sales}:{hits}"


def feedback_record(
    model_version: int,
    counts: Counts,
    k: int,
    window: tuple[int, int],
    offline_precision_at_k: float | None,
    published_at: int,
) -> dict[str, Any]:
    """A `Feedback` record (schemas/feedback.avsc)."""
    start, end = window
    return {
        "id": feedback_id(model_version, start, end, counts.sales, counts.hits),
        "model_version": model_version,
        "window_start": start,
        "window_end": end,
        "sales": counts.sales,
        "users": counts.n_users,
        "hits": counts.hits,
        "hit_pairs": counts.hit_pairs,
        "hit_rate": counts.hit_rate(),
        "precision_at_k": counts.precision_at_k(k),
        "k": k,
        "offline_precision_at_k": offline_precision_at_k,
        "published_at": published_at,
    }


def source_figures(counts: Counts) -> dict[str, Any]:
    """One source's figures for /stats (no precision@k: k is a version's, not a source's)."""
    return {"sales": counts.sales, "users": counts.n_users, "hits": counts.hits,
            "hit_pairs": counts.hit_pairs, "hit_rate": counts.hit_rate()}


def replay(sales: Sequence[tuple[int, str, str, int]],
           listings: dict[str, Sequence[Listing]]) -> FeedbackWindow:
    """A window straight from (arrival_ms, user, product, quantity) rows."""
    window = FeedbackWindow()
    for ts, user, product, quantity in sales:
        m = match(listings.get(user, ()), product, ts)
        window.add(m.model_version, user, product, quantity, m.hit, m.source)
    return window


def recompute(
    sales: Sequence[tuple[int, str, str, int]],
    listings: dict[str, Sequence[Listing]],
    k_by_version: dict[int, int],
) -> dict[int, dict[str, float]]:
    """Feedback figures straight from (arrival_ms, user, product, quantity) rows: the reference
    the integration test and the unit tests compare the incremental window with."""
    window = replay(sales, listings)
    out = {}
    for mv in window.versions():
        c = window.counts(mv)
        k = k_by_version.get(mv, 0)
        out[mv] = {"sales": c.sales, "users": c.n_users, "hits": c.hits,
                   "hit_pairs": c.hit_pairs, "hit_rate": c.hit_rate(),
                   "precision_at_k": c.precision_at_k(k)}
    return out


def recompute_by_source(
    sales: Sequence[tuple[int, str, str, int]], listings: dict[str, Sequence[Listing]]
) -> dict[str, dict[str, Any]]:
    """The per-source figures of /stats, straight from the rows (the tests' reference)."""
    window = replay(sales, listings)
    return {src: source_figures(window.source_counts(src)) for src in SOURCES}
