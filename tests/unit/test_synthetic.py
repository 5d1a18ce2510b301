"""The synthetic generator: deterministic per seed, and shaped like the shop it imitates."""

from __future__ import annotations

from collections import Counter

import pytest

from recsys.synthetic import SyntheticSales
from schemas import codec

pytestmark = pytest.mark.unit


def sales(**kw) -> list[dict]:
    out = []
    for sale, dead in SyntheticSales(**kw):
        assert dead is None
        out.append(sale)
    return out


def test_same_seed_same_events_other_seed_other_events():
    a = sales(users=300, products=200, events=5000, seed=7)
    assert a == sales(users=300, products=200, events=5000, seed=7)
    b = sales(users=300, products=200, events=5000, seed=8)
    assert [s["product_id"] for s in a] != [s["product_id"] for s in b]
    assert a[0]["event_id"] == "synthetic-7:1" and b[-1]["event_id"] == "synthetic-8:5000"


def test_fixed_seed_gives_fixed_first_events():
    """A regression anchor: the stream may change only on purpose (then update these)."""
    first = sales(users=100, products=50, events=3, seed=42)
    assert [(s["user_id"], s["product_id"], s["quantity"], s["event_time"], s["unit_price"],
             s["invoice_id"]) for s in first] == [
        ("U000022", "P00026", 1, 1291190412798, 17.28, "S0000001"),
        ("U000022", "P00030", 3, 1291190412798, 3.64, "S0000001"),
        ("U000022", "P00020", 6, 1291190412798, 8.89, "S0000001"),
    ]


def test_shape_zipf_products_new_users_returns_and_valid_sales():
    events = sales(users=1000, products=500, events=20_000, seed=1)
    assert len(events) == 20_000
    assert len({s["event_id"] for s in events}) == 20_000
    times = [s["event_time"] for s in events]
    assert times == sorted(times)
    popularity = [n for _, n in Counter(s["product_id"] for s in events).most_common()]
    assert popularity[0] > 20 * popularity[len(popularity) // 2]  # a long tail
    users = {s["user_id"] for s in events}
    assert {f"U{i:06d}" for i in range(801, 1001)} <= users  # every new user shows up
    returns = [s for s in events if s["quantity"] < 0]
    assert 0.005 < len(returns) / len(events) < 0.05
    assert all(s["invoice_id"].startswith("C") for s in returns)
    bought = {(s["user_id"], s["product_id"]) for s in events if s["quantity"] > 0}
    assert all((s["user_id"], s["product_id"]) in bought for s in returns)
    for s in events[:200]:
        codec.decode(codec.encode("Sale", s), expect="Sale")


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        SyntheticSales(users=0)
    with pytest.raises(ValueError):
        SyntheticSales(return_share=1.5)
    assert sales(events=0) == []
