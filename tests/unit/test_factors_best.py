"""The driver path's scoring (spark.recommend.Factors.best): exact top n, bought items left out,
short rows padded, no users at all. Pure numpy and implicit: no JVM."""

from __future__ import annotations

import numpy as np
import pytest

from spark import recommend

pytestmark = pytest.mark.unit


def _factors(matrix: np.ndarray, ids: np.ndarray) -> recommend.Factors:
    f = recommend.Factors.__new__(recommend.Factors)  # as from model.itemFactors, without Spark
    f.ids, f.matrix = ids.astype(np.int64), matrix.astype(np.float32)
    f.position = np.full(int(ids.max()) + 1, -1, dtype=np.int64)
    f.position[f.ids] = np.arange(len(ids))
    return f


def test_the_best_items_are_the_exact_top_n_without_the_bought_ones() -> None:
    rng = np.random.default_rng(3)
    items = _factors(rng.standard_normal((300, 8)), np.arange(1000, 1300))
    users = rng.standard_normal((200, 8)).astype(np.float32)
    bought = [list(range(1000, 1000 + i % 7)) or None for i in range(len(users))]
    best, scores = items.best(users, bought, 10)
    full = users @ items.matrix.T
    for i in range(len(users)):
        mine = set(bought[i] or [])
        want = [int(items.ids[j]) for j in np.argsort(-full[i], kind="stable")
                if int(items.ids[j]) not in mine][:10]
        assert best[i].tolist() == want
        assert np.allclose(scores[i], full[i][items.position[best[i]]], atol=1e-5)


def test_a_user_who_bought_nearly_everything_gets_a_short_padded_row() -> None:
    items = _factors(np.eye(4), np.array([5, 6, 7, 8]))
    best, scores = items.best(np.ones((1, 4)), [[5, 6, 7]], 3)
    assert best.tolist() == [[8, -1, -1]] and np.isneginf(scores[0, 1:]).all()
    assert items.top(np.ones((1, 4)), [[5, 6, 7]], 3) == [([8], [1.0])]


def test_no_users_and_no_items_give_empty_answers() -> None:
    items = _factors(np.eye(4), np.array([0, 1, 2, 3]))
    best, scores = items.best(np.empty((0,), np.float32), [], 5)
    assert best.shape == (0, 4) and scores.shape == (0, 4)
    assert items.top([], [], 5) == []
    assert items.best(np.ones((2, 4)), [None, None], 0)[0].shape == (2, 0)
