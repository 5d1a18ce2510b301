"""Fold-in: a user's factor vector from their net interactions and a model's fixed item factors,
with the normal equations Spark's ALS solves for that user in its last half-iteration (Spark
`ml.recommendation.ALS.computeFactors`), and the user's top-N from it. Pure numpy, no I/O.

Implicit mode (Hu, Koren, Volinsky 2008, as Spark extends it), for the user's items i with a
positive net quantity, strength r_i (`confidence`: log1p, raw or binary of the net quantity, as
spark.prepare makes the ALS input) and c_i = 1 + alpha * r_i:

    (YᵀY + Σ_i (c_i - 1) y_i y_iᵀ + reg · n_u · I) x_u = Σ_i c_i y_i

Explicit mode: (Σ_i y_i y_iᵀ + reg · n_u · I) x_u = Σ_i r_i y_i. In both, n_u is the number of
the user's rated items: Spark scales the regularisation by it ("ALS-WR"). Spark sums in float64
from float32 factors and keeps the result in float32; so do we.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from schemas.factors import Factors


@dataclass(frozen=True)
class Rule:
    """The parameters of the solve, as the model was trained (model-factors' params)."""

    implicit: bool
    alpha: float
    reg: float
    confidence: str  # log1p, raw or binary

    @classmethod
    def of(cls, params: Mapping[str, str]) -> Rule:
        try:
            return cls(params.get("als_mode", "implicit") == "implicit",
                       float(params["alpha"]), float(params["reg_param"]),
                       params.get("confidence", "log1p"))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"model parameters lack what a fold-in needs: {exc}") from None

    def strength(self, quantity: np.ndarray) -> np.ndarray:
        """spark.prepare.strength_local: float32, as Spark casts the rating."""
        if not self.implicit or self.confidence == "raw":
            return quantity.astype(np.float32)
        if self.confidence == "binary":
            return np.ones(len(quantity), dtype=np.float32)
        return np.log1p(quantity.astype(np.float64)).astype(np.float32)


class Model:
    """One model version ready to fold users in: factors in float64 for the sums, YᵀY, the rule."""

    def __init__(self, factors: Factors) -> None:
        self.version = factors.model_version
        self.factors = factors
        self.rule = Rule.of(factors.params)
        self.product_ids = np.asarray(factors.product_ids, dtype=object)
        self.index = factors.index
        self.y = factors.item_factors.astype(np.float64)
        self.yty = factors.yty
        self.rank = factors.rank
        self._padded: tuple[np.ndarray, int] | None = None

    def padded(self) -> tuple[np.ndarray, int]:
        """(the item factors with zero rows up to a whole number of `BLOCK`s, the products)."""
        if self._padded is None:
            y = self.factors.item_factors
            extra = -len(y) % BLOCK
            self._padded = (np.vstack([y, np.zeros((extra, self.rank), np.float32)]), len(y))
        return self._padded

    def known(self, quantities: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray, int]:
        """(item rows, net quantities) of the user's positive products the model knows, and
        how many positive products it does not know (ignored until the next retrain)."""
        rows, qty, unknown = [], [], 0
        for product, q in quantities.items():
            if q <= 0:
                continue
            i = self.index.get(product)
            if i is None:
                unknown += 1
            else:
                rows.append(i)
                qty.append(q)
        return np.asarray(rows, dtype=np.int64), np.asarray(qty, dtype=np.int64), unknown

    def solve(self, rows: np.ndarray, quantities: np.ndarray) -> np.ndarray:
        """The user's vector (float32) from their known items' rows and net quantities;
        zeros for a user with none (Spark gives such a user no vector at all)."""
        if len(rows) == 0:
            return np.zeros(self.rank, dtype=np.float32)
        rule = self.rule
        r = rule.strength(quantities).astype(np.float64)
        yu = self.y[rows]
        n = len(rows)
        if rule.implicit:
            c1 = rule.alpha * np.abs(r)
            a = self.yty + (yu * c1[:, None]).T @ yu
            b = yu.T @ (1.0 + c1)
        else:
            a = yu.T @ yu
            b = yu.T @ r
        a[np.diag_indices_from(a)] += rule.reg * n
        return np.linalg.solve(a, b).astype(np.float32)

    def top(self, vector: np.ndarray, n: int, exclude: np.ndarray | None = None
            ) -> list[tuple[str, float]]:
        """The `n` best (product_id, score) for `vector`, best first, leaving out `exclude`'s
        rows; scores as Spark computes them (float32 dot products)."""
        return _best(self, self.factors.item_factors @ vector.astype(np.float32), n, exclude)


@dataclass(frozen=True)
class Folded:
    """One user folded in: the vector, the list, and what was ignored."""

    user_id: str
    vector: np.ndarray
    items: list[tuple[str, float]]
    unknown_products: int


def fold_in(model: Model, user_id: str, quantities: Mapping[str, int], top_n: int,
            filter_bought: bool = True) -> Folded:
    """Solve `user_id`'s vector from their net `quantities` (product -> net quantity) and rank
    the catalogue, leaving out what they bought (positive net) when `filter_bought`."""
    rows, qty, unknown = model.known(quantities)
    vector = model.solve(rows, qty)
    items = model.top(vector, top_n, rows if filter_bought else None) if len(rows) else []
    return Folded(user_id, vector, items, unknown)


def fold_many(model: Model, users: Iterable[tuple[str, Mapping[str, int]]], top_n: int,
              filter_bought: bool = True) -> list[Folded]:
    """`fold_in` for several users, scoring the catalogue in one matrix product."""
    solved = []
    for user_id, quantities in users:
        rows, qty, unknown = model.known(quantities)
        solved.append((user_id, rows, model.solve(rows, qty), unknown))
    return _rank(model, solved, top_n, filter_bought)


class Normal:
    """One user's normal equations against one model, kept up to date one product at a time
    (`update`), so that a sale costs O(rank²) however long the user's history is: `Model.solve`
    sums over all the user's products on every call. The same sums in float64 (YᵀY + Σ (c_i - 1)
    y_i y_iᵀ and Σ c_i y_i, or the explicit ones), added up in another order: the vector agrees
    with `Model.solve`'s to float64 rounding."""

    __slots__ = ("model", "a", "b", "rows", "unknown")

    def __init__(self, model: Model, quantities: Mapping[str, int]) -> None:
        self.model = model
        self.a = np.zeros((model.rank, model.rank))
        self.b = np.zeros(model.rank)
        self.rows: dict[int, float] = {}  # the known positive products: row -> strength
        self.unknown: set[str] = set()  # positive products the model does not know
        rows, qty, _ = model.known(quantities)
        self.unknown.update(p for p, q in quantities.items() if q > 0 and p not in model.index)
        if len(rows):
            r = model.rule.strength(qty).astype(np.float64)
            self.rows.update(zip(rows.tolist(), r.tolist(), strict=True))
            self._add(model.y[rows], r)

    def _add(self, yu: np.ndarray, r: np.ndarray) -> None:
        """Add the terms of rows `yu` with strengths `r` (negative strengths subtract)."""
        rule = self.model.rule
        if rule.implicit:
            c1 = rule.alpha * r
            self.a += (yu * c1[:, None]).T @ yu
            self.b += yu.T @ (np.sign(r) + c1)
        else:
            w = np.sign(r)
            self.a += (yu * w[:, None]).T @ yu
            self.b += yu.T @ r

    def update(self, product: str, quantity: int) -> None:
        """`product`'s net quantity is now `quantity`."""
        row = self.model.index.get(product)
        if row is None:
            (self.unknown.add if quantity > 0 else self.unknown.discard)(product)
            return
        old = self.rows.pop(row, None)
        new = float(self.model.rule.strength(np.array([quantity]))[0]) if quantity > 0 else None
        if old == new:
            if new is not None:
                self.rows[row] = new
            return
        terms = [(old, -1.0)] if old is not None else []
        if new is not None:
            self.rows[row] = new
            terms.append((new, 1.0))
        yu = np.repeat(self.model.y[row][None, :], len(terms), axis=0)
        self._add(yu, np.array([s * r for r, s in terms]))

    def solve(self) -> np.ndarray:
        """`Model.solve` of the user's current quantities."""
        model, n = self.model, len(self.rows)
        if not n:
            return np.zeros(model.rank, dtype=np.float32)
        a = model.yty + self.a if model.rule.implicit else self.a.copy()
        a.flat[:: model.rank + 1] += model.rule.reg * n  # the diagonal
        return np.linalg.solve(a, self.b).astype(np.float32)


def fold_normals(model: Model, users: Iterable[tuple[str, Normal]], top_n: int,
                 filter_bought: bool = True) -> list[Folded]:
    """`fold_many` from users' `Normal`s (of `model`): every user's system solved in one
    stacked call, the lists ranked together (`_rank`)."""
    users = list(users)
    rank, rule = model.rank, model.rule
    rows = [np.fromiter(n.rows, dtype=np.int64, count=len(n.rows)) for _, n in users]
    vectors = np.zeros((len(users), rank), dtype=np.float32)
    known = [k for k, r in enumerate(rows) if len(r)]
    if known:
        a = np.stack([users[k][1].a for k in known])
        if rule.implicit:
            a += model.yty
        a[:, np.arange(rank), np.arange(rank)] += rule.reg * np.array(
            [len(rows[k]) for k in known], dtype=np.float64)[:, None]
        b = np.stack([users[k][1].b for k in known])[:, :, None]
        vectors[known] = np.linalg.solve(a, b)[:, :, 0]
    solved = [(u, r, v, len(n.unknown)) for (u, n), r, v in zip(users, rows, vectors, strict=True)]
    return _rank(model, solved, top_n, filter_bought)


BLOCK = 64  # `_top`: products per block of the two-step partial sort


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    """The column of each row's `n` largest `scores` (unordered). In two steps when the
    catalogue is large: the `n` blocks of BLOCK columns with the largest maxima hold every one
    of the `n` largest, so only those are sorted (a quarter of the work of one partial sort
    over the whole row at 3,600 products)."""
    users, width = scores.shape
    if width < 8 * n * BLOCK // 4 or width % BLOCK:
        return np.argpartition(-scores, n - 1, axis=1)[:, :n]
    maxima = scores.reshape(users, width // BLOCK, BLOCK).max(axis=2)
    blocks = np.argpartition(-maxima, n - 1, axis=1)[:, :n]
    columns = (blocks[:, :, None] * BLOCK + np.arange(BLOCK)).reshape(users, n * BLOCK)
    inside = np.argpartition(-np.take_along_axis(scores, columns, axis=1), n - 1, axis=1)[:, :n]
    return np.take_along_axis(columns, inside, axis=1)


def _rank(model: Model, solved: list[tuple[str, np.ndarray, np.ndarray, int]], top_n: int,
          filter_bought: bool) -> list[Folded]:
    """Each solved (user, known rows, vector, unknown) ranked, all at once: one matrix product
    against the factors padded to whole blocks, what each bought masked, `_top`, one sort."""
    if not solved:
        return []
    y, count = model.padded()
    scores = np.stack([v for _, _, v, _ in solved]) @ y.T  # users x padded products, float32
    scores[:, count:] = -np.inf
    if filter_bought:
        who = np.repeat(np.arange(len(solved)), [len(rows) for _, rows, _, _ in solved])
        scores[who, np.concatenate([rows for _, rows, _, _ in solved])] = -np.inf
    n = min(top_n, count)
    if n <= 0:
        return [Folded(u, v, [], unknown) for u, _, v, unknown in solved]
    best = _top(scores, n)
    top = np.take_along_axis(scores, best, axis=1)
    order = np.lexsort((best, -top))  # per user: by score, then by row (deterministic)
    best, top = np.take_along_axis(best, order, axis=1), np.take_along_axis(top, order, axis=1)
    ids = model.product_ids[np.minimum(best, count - 1)].tolist()  # padding: cut by `keep`
    values = top.tolist()
    out = []
    for k, (user_id, rows, vector, unknown) in enumerate(solved):
        keep = int(np.isfinite(top[k]).sum()) if len(rows) else 0  # fewer: catalogue ran out
        out.append(Folded(user_id, vector, list(zip(ids[k][:keep], values[k][:keep],
                                                    strict=True)), unknown))
    return out


def _best(model: Model, scores: np.ndarray, n: int, exclude: Sequence[int] | None
          ) -> list[tuple[str, float]]:
    """The `n` best rows of `scores` (best first; ties by row, so deterministic) but `exclude`."""
    if exclude is not None and len(exclude):
        scores = scores.copy()
        scores[exclude] = -np.inf
    n = min(n, int(np.isfinite(scores).sum()))
    if n <= 0:
        return []
    best = np.argpartition(-scores, n - 1)[:n]
    best = best[np.lexsort((best, -scores[best]))]
    # whole-array tolist: indexing numpy scalars one by one cost ~3 µs per item
    return list(zip(model.product_ids[best].tolist(), scores[best].tolist(), strict=True))
