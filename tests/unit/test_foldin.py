"""The speed layer's pure parts: the fold-in's normal equations, the user state, the factors'
chunks and when a version is complete."""

from __future__ import annotations

import io

import fastavro
import numpy as np
import pytest

from schemas import codec, factors
from speed import foldin
from speed.layer import recommendation
from speed.state import APPLIED, DUPLICATE, REPLAYED, UserState

pytestmark = pytest.mark.unit

PARAMS = {"als_mode": "implicit", "alpha": "10.0", "reg_param": "0.1", "confidence": "log1p",
          "rank": "4"}


def model(products: int = 50, rank: int = 4, params: dict | None = None, version: int = 1,
          offsets: list | None = None) -> foldin.Model:
    rng = np.random.default_rng(7)
    y = rng.normal(size=(products, rank)).astype(np.float32)
    ids = [f"p{i}" for i in range(products)]
    parts = list(factors.chunks(version, ids, y, params or PARAMS, offsets or []))
    return foldin.Model(factors.assemble(version, parts))


def direct(m: foldin.Model, quantities: dict[str, int]) -> np.ndarray:
    """The implicit-ALS user solve written out the long way: dense C_u over every item."""
    y = m.factors.item_factors.astype(np.float64)
    c = np.ones(len(y))
    p = np.zeros(len(y))
    n = 0
    for product, q in quantities.items():
        if q > 0 and product in m.index:
            r = np.log1p(q)
            c[m.index[product]] = 1 + 10.0 * r
            p[m.index[product]] = 1.0
            n += 1
    a = y.T @ np.diag(c) @ y + 0.1 * n * np.eye(y.shape[1])
    return np.linalg.solve(a, y.T @ (c * p))


def test_normal_equations_match_a_direct_solve():
    m = model()
    quantities = {"p1": 3, "p7": 1, "p20": 12}
    got = foldin.fold_in(m, "u", quantities, 5).vector
    np.testing.assert_allclose(got, direct(m, quantities), rtol=1e-5, atol=1e-6)


def test_explicit_mode_solves_the_ridge_regression():
    m = model(params={**PARAMS, "als_mode": "explicit"})
    y = m.factors.item_factors.astype(np.float64)[[2, 5, 9]]
    r = np.array([4.0, 1.0, 5.0])
    want = np.linalg.solve(y.T @ y + 0.1 * 3 * np.eye(4), y.T @ r)
    got = foldin.fold_in(m, "u", {"p2": 4, "p5": 1, "p9": 5}, 5).vector
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_new_user_gets_a_personal_list_without_what_they_bought():
    m = model()
    folded = foldin.fold_in(m, "new", {"p3": 2}, 5)
    assert len(folded.items) == 5 and "p3" not in [p for p, _ in folded.items]
    scores = [s for _, s in folded.items]
    assert scores == sorted(scores, reverse=True)
    best = m.factors.item_factors @ folded.vector
    best[m.index["p3"]] = -np.inf
    assert [p for p, _ in folded.items] == [f"p{i}" for i in np.argsort(-best, kind="stable")[:5]]


def test_a_return_that_nets_a_product_to_zero_leaves_it_out():
    m = model()
    s = UserState("u")
    s.apply(sale("e1", "p1", 2), 0, 0, 1000)
    s.apply(sale("e2", "p4", 1), 0, 1, 1000)
    s.apply(sale("e3", "p1", -2), 0, 2, 1000)  # the return
    assert s.quantities == {"p4": 1}
    folded = foldin.fold_in(m, "u", s.quantities, 10)
    np.testing.assert_allclose(folded.vector, direct(m, {"p4": 1}), rtol=1e-5, atol=1e-6)
    assert "p1" in [p for p, _ in folded.items] or len(folded.items) == 10  # p1 may come back


def test_a_product_unknown_to_the_model_is_counted_and_ignored():
    m = model()
    with_unknown = foldin.fold_in(m, "u", {"p1": 2, "NEW": 5}, 5)
    without = foldin.fold_in(m, "u", {"p1": 2}, 5)
    assert with_unknown.unknown_products == 1
    np.testing.assert_array_equal(with_unknown.vector, without.vector)
    only_unknown = foldin.fold_in(m, "u", {"NEW": 5}, 5)
    assert only_unknown.items == [] and only_unknown.unknown_products == 1


def test_fold_many_equals_fold_in_one_by_one():
    m = model()
    users = [("a", {"p1": 1}), ("b", {"p2": 3, "p9": 1}), ("c", {"NEW": 1})]
    many = foldin.fold_many(m, users, 5)
    for (user, q), got in zip(users, many, strict=True):
        one = foldin.fold_in(m, user, q, 5)
        assert [p for p, _ in got.items] == [p for p, _ in one.items] and got.user_id == user
        assert [s for _, s in got.items] == pytest.approx([s for _, s in one.items], rel=1e-5)


def sale(event_id: str, product: str, quantity: int) -> dict:
    return {"event_id": event_id, "user_id": "u", "product_id": product, "quantity": quantity}


def test_state_counts_a_sale_once_across_replays_and_duplicates():
    s = UserState("u")
    assert s.apply(sale("e1", "p1", 2), 1, 10, 1000) == APPLIED
    assert s.apply(sale("e1", "p1", 2), 1, 10, 1000) == REPLAYED  # same offset after a restart
    assert s.apply(sale("e1", "p1", 2), 1, 30, 2000) == DUPLICATE  # same event id, produced again
    assert s.apply(sale("e2", "p1", 1), 1, 31, 3000) == APPLIED
    assert s.quantities == {"p1": 3} and s.offset == 31 and s.event_id == "e2"


def test_state_round_trips_through_its_changelog_record():
    s = UserState("u")
    s.apply(sale("e1", "p1", 2), 1, 10, 1_700_000_000_123)
    s.apply(sale("e2", "p2", -1), 1, 11, 1_700_000_000_456)
    name, record = codec.decode(codec.encode("SpeedState", s.record()))
    back = UserState.of(record)
    assert name == "SpeedState" and back == s
    assert back.apply(sale("e1", "p1", 2), 1, 50, 0) == DUPLICATE


def test_factors_chunks_reassemble_and_fit_a_kafka_record():
    rng = np.random.default_rng(1)
    y = rng.normal(size=(1000, 8)).astype(np.float32)
    ids = [f"p{i}" for i in range(1000)]
    offsets = [{"topic": "sales", "partition": 0, "from_offset": 0, "to_offset": 99}]
    parts = list(factors.chunks(3, ids, y, PARAMS, offsets, chunk_bytes=4 * 8 * 300))
    assert [p["chunk"] for p in parts] == [0, 1, 2, 3] and {p["chunks"] for p in parts} == {4}
    asm = factors.Assembler()
    encoded = [codec.decode(codec.encode("ModelFactors", p))[1] for p in parts]
    assert asm.add(encoded[0]) is None
    assert asm.add(encoded[3]) is None and asm.add(encoded[1]) is None  # out of order
    done = asm.add(encoded[2])
    assert done is not None and done.model_version == 3 and done.product_ids == ids
    np.testing.assert_array_equal(done.item_factors, y)
    np.testing.assert_allclose(done.yty, y.astype(np.float64).T @ y.astype(np.float64))
    assert done.trained_to(0, "sales") == 99 and done.trained_to(1, "sales") == -1
    assert asm.add(encoded[0]) is None  # the version again: complete only with every chunk


def test_a_catalogue_of_a_million_products_at_rank_64_stays_under_the_record_limit():
    y = np.zeros((1_000_000, 64), dtype=np.float32)
    ids = [f"product-{i:07d}" for i in range(1_000_000)]
    sizes = [len(codec.encode("ModelFactors", p)) for p in factors.chunks(1, ids, y, PARAMS, [])]
    assert len(sizes) == -(-1_000_000 // factors.products_per_chunk(64))
    assert max(sizes) < 1_000_000  # Kafka's default max.message.bytes is 1,048,588


def test_a_version_is_complete_only_with_every_chunk_and_the_last_completed_serves():
    y = np.ones((10, 2), dtype=np.float32)
    ids = [f"p{i}" for i in range(10)]
    v1 = list(factors.chunks(1, ids, y, PARAMS, [], chunk_bytes=4 * 2 * 5))
    v2 = list(factors.chunks(2, ids, y * 2, PARAMS, [], chunk_bytes=4 * 2 * 5))
    asm = factors.Assembler()
    assert asm.add(v1[0]) is None and asm.add(v2[0]) is None
    assert asm.add(v2[1]).model_version == 2  # complete first: served
    # An older version completing later serves: a rollback publishes its factors again.
    assert asm.add(v1[1]).model_version == 1
    asm2 = factors.Assembler()
    asm2.add(v1[0])
    asm2.tombstone(b"1:0")
    assert asm2.add(v1[1]) is None  # chunk 0 was retired: incomplete


def test_a_fold_in_record_names_its_model_source_and_sale():
    m = model(version=4)
    s = UserState("u")
    s.apply(sale("shop:1", "p1", 2), 0, 5, 1_700_000_000_000)
    folded = foldin.fold_in(m, "u", s.quantities, 3)
    rec = recommendation(m, folded, s)
    _, back = codec.decode(codec.encode("Recommendation", rec))
    assert back["id"] == "4:u:shop:1" and back["source"] == "fold-in"
    assert back["model_version"] == 4 and back["sale_event_id"] == "shop:1"
    assert int(back["sale_timestamp"].timestamp() * 1000) == 1_700_000_000_000
    assert [i["rank"] for i in back["items"]] == [1, 2, 3]


def test_an_old_recommendation_reads_as_a_retrain():
    old = codec.history("Recommendation")[0]
    buf = io.BytesIO()
    buf.write(old.header)
    fastavro.schemaless_writer(buf, old.fast, {"id": "1:u", "user_id": "u", "model_version": 1,
                                               "generated_at": 0, "items": []})
    _, rec = codec.decode(buf.getvalue())
    assert rec["source"] == "retrain" and rec["sale_event_id"] is None


def test_the_demo_shows_a_user_whose_list_changed_after_a_purchase():
    from recsys.demo import fold_in_example

    def rec(user, version, items, source="retrain", event=None):
        return {"user_id": user, "model_version": version, "source": source,
                "sale_event_id": event, "items": [{"product_id": p} for p in items]}

    recs = [rec("a", 1, ["x", "y"]), rec("b", 1, ["x"]),
            rec("b", 1, ["x"], "fold-in", "e1"),  # unchanged: not an example
            rec("a", 1, ["z", "x"], "fold-in", "e2")]
    prior, after = fold_in_example(recs)
    assert prior["source"] == "retrain" and after["sale_event_id"] == "e2"
    assert fold_in_example(recs[:3]) is None


def test_a_model_switch_folds_in_again_exactly_the_users_with_newer_sales():
    from speed.layer import newer_than_model

    offsets = [{"topic": "sales", "partition": 0, "from_offset": 0, "to_offset": 100},
               {"topic": "sales", "partition": 1, "from_offset": 0, "to_offset": 50}]
    v2 = factors.assemble(2, list(factors.chunks(2, ["p1"], np.ones((1, 2), np.float32), PARAMS,
                                                 offsets)))
    states = [UserState("in-model", partition=0, offset=100),
              UserState("after-p0", partition=0, offset=101),
              UserState("in-model-p1", partition=1, offset=7),
              UserState("after-p1", partition=1, offset=51),
              UserState("partition-unseen", partition=2, offset=0)]
    assert [s.user_id for s in newer_than_model(states, v2, "sales")] == [
        "after-p0", "after-p1", "partition-unseen"]
    assert [s.user_id for s in newer_than_model(states, v2, "other.sales")] == [
        s.user_id for s in states]  # offsets of another topic say nothing: all fold in again


@pytest.mark.parametrize("mode", ["implicit", "explicit"])
def test_normal_equations_kept_sale_by_sale_equal_a_solve_from_scratch(mode):
    m = model(params={**PARAMS, "als_mode": mode})
    rng = np.random.default_rng(3)
    s, normal = UserState("u"), None
    for i in range(300):  # purchases, returns that net products to zero, unknown products
        product = "NEW" if i % 37 == 0 else f"p{rng.integers(0, 12)}"
        s.apply(sale(f"e{i}", product, int(rng.choice([1, 2, 5, -1, -2]))), 0, i, 1000)
        if normal is None:
            normal = foldin.Normal(m, s.quantities)
        else:
            normal.update(product, s.quantities.get(product, 0))
        want = foldin.fold_in(m, "u", s.quantities, 5)
        got = foldin.fold_normals(m, [("u", normal)], 5)[0]
        np.testing.assert_allclose(got.vector, want.vector, rtol=1e-5, atol=1e-6)
        assert [p for p, _ in got.items] == [p for p, _ in want.items]
        assert got.unknown_products == want.unknown_products


def test_ranking_a_large_catalogue_in_two_steps_finds_the_true_top():
    m = model(products=5000, rank=8)
    rng = np.random.default_rng(3)
    users = [(f"u{k}", {f"p{i}": 1 for i in rng.choice(5000, 30, replace=False)})
             for k in range(40)]
    for (user, quantities), got in zip(users, foldin.fold_many(m, users, 10), strict=True):
        scores = m.factors.item_factors @ got.vector
        scores[[m.index[p] for p in quantities]] = -np.inf
        assert [p for p, _ in got.items] == [f"p{i}" for i in np.argsort(-scores)[:10]], user


def test_a_user_who_bought_almost_everything_gets_what_is_left():
    m = model(products=6)
    folded = foldin.fold_many(m, [("u", {f"p{i}": 1 for i in range(5)})], 10)[0]
    assert [p for p, _ in folded.items] == ["p5"]
