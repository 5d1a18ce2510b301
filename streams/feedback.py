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

Lists are ordered by (model_version == serving, model_version, generated_at): the lists of the
version in service first (after a rollback to an older version, its republished lists win over a
newer, demoted or rejected, version's), then a newer model, and within a version the later list,
so a fold-in generated after its version's retrain list replaces it, while a fold-in under an
older version never replaces a newer model's list, however late it arrives. `serving` is the
version in service when the sale arrived (`ServingTimeline`, from `model-ready`) or, for the read
API, now; None (no model-ready read yet) leaves the plain (model_version, generated_at) order.

Shadow lists. A rejected challenger's lists (`recommendations-shadow`) are never served, but a
sale is also judged against the user's shadow list in force (the newest generated before the sale
arrived, of a version newer than the served list's), so the challenger's online hit-rate is
measured on the same sales as the champion's: per challenger version, the window keeps its counts
and the served lists' counts on exactly those sales (`FeedbackWindow.shadow`,
`FeedbackWindow.shadow_champion`).
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from schemas.topics import FOLD_IN, RETRAIN  # Recommendation.source

BUCKET_MS = 60_000  # sales are grouped by arrival minute: the ingest rate and the window's step

SOURCES = (RETRAIN, FOLD_IN)


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
    scores: tuple[float, ...] = ()  # beside items, for the read API (absent in older records)

    @property
    def order(self) -> tuple[int, int, bool]:
        """Freshness: model version, then generation time (a fold-in wins a tie)."""
        return self.model_version, self.generated_at, self.source == FOLD_IN

    @property
    def ident(self) -> tuple[str, str | None]:
        """Which list of its user and version this is: a version has one retrain list per user
        (republished, it replaces itself) and one fold-in list per sale."""
        return self.source, self.sale_event_id


def rank(listing: Listing, serving: int | None) -> tuple[bool, int, int, bool]:
    """The order lists are chosen by: the version in service first, then `Listing.order`."""
    return (listing.model_version == serving, *listing.order)


def newer(a: Listing, b: Listing | None, serving: int | None = None) -> bool:
    """Is `a` chosen over `b`: the serving version's lists first, then a later model, then a
    later list."""
    return b is None or rank(a, serving) > rank(b, serving)


def in_force(listings: Iterable[Listing], at_ms: int, serving: int | None = None
             ) -> Listing | None:
    """The list chosen among those generated at or before `at_ms`."""
    best: Listing | None = None
    for lst in listings:
        if lst.generated_at <= at_ms and newer(lst, best, serving):
            best = lst
    return best


def choose(listings: Iterable[Listing], serving: int | None) -> Listing | None:
    """The list answered now (the read API): no time bound."""
    best: Listing | None = None
    for lst in listings:
        if newer(lst, best, serving):
            best = lst
    return best


def shadow_in_force(shadows: Iterable[Listing], served: Listing | None, at_ms: int
                    ) -> Listing | None:
    """The challenger's list a sale is also judged against: the newest shadow list generated
    at or before `at_ms` of a version newer than the served list's (a challenger promoted by
    hand, or one older than the model in service, is no longer one). None without a served
    list: the comparison needs both."""
    if served is None:
        return None
    best: Listing | None = None
    for lst in shadows:
        if (lst.generated_at <= at_ms and lst.model_version > served.model_version
                and newer(lst, best)):
            best = lst
    return best


class ServingTimeline:
    """Which version served when: (arrival ms, version) of every `model-ready` record read, in
    arrival order; `at(ts)` is the `serving` of the last record that arrived at or before ts."""

    def __init__(self, records: Iterable[tuple[int, int | None]] = ()) -> None:
        self.points = sorted(records, key=lambda r: r[0])
        self.times = [t for t, _ in self.points]

    def at(self, ts_ms: int) -> int | None:
        i = bisect.bisect_right(self.times, ts_ms)
        return self.points[i - 1][1] if i else None


@dataclass(frozen=True)
class Match:
    model_version: int | None  # None: the user had no list when the sale arrived
    hit: bool
    source: str | None = None  # the source of the list it was judged against
    shadow_version: int | None = None  # the challenger whose shadow list was in force
    shadow_hit: bool = False


def match(listings: Iterable[Listing], product_id: str, at_ms: int,
          serving: int | None = None, shadows: Iterable[Listing] = ()) -> Match:
    lst = in_force(listings, at_ms, serving)
    if lst is None:
        return Match(None, False)
    shadow = shadow_in_force(shadows, lst, at_ms)
    return Match(lst.model_version, product_id in lst.items, lst.source,
                 shadow.model_version if shadow else None,
                 shadow is not None and product_id in shadow.items)


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

    def merged(self, other: Counts) -> Counts:
        return Counts(self.sales + other.sales, self.hits + other.hits,
                      self.users + other.users, self.pairs + other.pairs)

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
    window; and per challenger version, its shadow lists' counts and the served lists' counts on
    the same sales."""

    def __init__(self) -> None:
        self.by_version: dict[int, Counts] = {}
        self.by_source: dict[str, Counts] = {}
        self.shadow: dict[int, Counts] = {}
        self.shadow_champion: dict[int, Counts] = {}

    def add(self, model_version: int | None, user: str, product: str, quantity: int,
            hit: bool, source: str | None = RETRAIN, sign: int = 1,
            shadow_version: int | None = None, shadow_hit: bool = False) -> None:
        if model_version is None or quantity <= 0:
            return
        bumps = [(self.by_version, model_version, hit), (self.by_source, source or RETRAIN, hit)]
        if shadow_version is not None:
            bumps += [(self.shadow, shadow_version, shadow_hit),
                      (self.shadow_champion, shadow_version, hit)]
        for table, key, is_hit in bumps:
            counts = table.get(key)
            if counts is None:
                counts = table[key] = Counts()
            counts.add(user, product, is_hit, sign)
            if counts.sales == 0:
                del table[key]

    def remove(self, model_version: int | None, user: str, product: str, quantity: int,
               hit: bool, source: str | None = RETRAIN, shadow_version: int | None = None,
               shadow_hit: bool = False) -> None:
        self.add(model_version, user, product, quantity, hit, source, -1, shadow_version,
                 shadow_hit)

    def versions(self) -> list[int]:
        """The versions with sales judged in the window, served or in shadow."""
        return sorted(set(self.by_version) | set(self.shadow))

    def counts(self, model_version: int) -> Counts:
        """A version's sales: judged against its served lists, or its shadow lists (a sale
        never counts twice for one version: a shadow list counts only under a newer version
        than the served list's)."""
        served, shadow = self.by_version.get(model_version), self.shadow.get(model_version)
        if served is not None and shadow is not None:
            return served.merged(shadow)
        return served or shadow or Counts()

    def shadow_counts(self, model_version: int) -> tuple[Counts, Counts]:
        """(the challenger's counts, the served lists' counts on the same sales)."""
        return (self.shadow.get(model_version) or Counts(),
                self.shadow_champion.get(model_version) or Counts())

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
           listings: dict[str, Sequence[Listing]],
           serving: ServingTimeline | None = None,
           shadows: dict[str, Sequence[Listing]] | None = None) -> FeedbackWindow:
    """A window straight from (arrival_ms, user, product, quantity) rows."""
    window = FeedbackWindow()
    for ts, user, product, quantity in sales:
        m = match(listings.get(user, ()), product, ts,
                  serving.at(ts) if serving is not None else None,
                  (shadows or {}).get(user, ()))
        window.add(m.model_version, user, product, quantity, m.hit, m.source,
                   shadow_version=m.shadow_version, shadow_hit=m.shadow_hit)
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


def recompute_shadow(
    sales: Sequence[tuple[int, str, str, int]],
    listings: dict[str, Sequence[Listing]],
    shadows: dict[str, Sequence[Listing]],
    serving: ServingTimeline | None = None,
) -> dict[int, dict[str, Any]]:
    """The shadow figures of /stats per challenger version, straight from the rows."""
    window = replay(sales, listings, serving, shadows)
    out = {}
    for mv in sorted(window.shadow):
        challenger, champion = window.shadow_counts(mv)
        out[mv] = {"challenger": source_figures(challenger),
                   "champion": source_figures(champion)}
    return out


def recompute_by_source(
    sales: Sequence[tuple[int, str, str, int]], listings: dict[str, Sequence[Listing]]
) -> dict[str, dict[str, Any]]:
    """The per-source figures of /stats, straight from the rows (the tests' reference)."""
    window = replay(sales, listings)
    return {src: source_figures(window.source_counts(src)) for src in SOURCES}
