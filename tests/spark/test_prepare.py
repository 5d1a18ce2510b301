"""Valid events, netting of returns, confidence, the time and random splits, and the CSV reader
(Spark local on tiny hand-built data, known answers)."""

from __future__ import annotations

import gzip
import math
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from recsys.settings import load
from spark import prepare
from spark.csv_input import CsvMapping, read_purchases

pytestmark = pytest.mark.spark

SALE = (
    "event_id string, user_id string, product_id string, quantity int, event_time timestamp"
)
T0 = datetime(2011, 1, 1)


def _events(spark, rows):
    """rows: (user, product, quantity, day offset); ids e0, e1, ... in order."""
    data = [
        (f"e{i}", u, p, q, T0 + timedelta(days=d)) for i, (u, p, q, d) in enumerate(rows)
    ]
    return spark.createDataFrame(data, SALE)


def _index(spark, values):
    return spark.createDataFrame([(v, i) for i, v in enumerate(sorted(values))], "id string, idx int")


def _matrix(spark, events, **settings):
    conf = load(**settings)
    users = _index(spark, {r["user_id"] for r in events.select("user_id").collect()})
    products = _index(spark, {r["product_id"] for r in events.select("product_id").collect()})
    rows = prepare.interactions(events, users, products, conf).collect()
    user_ids = {r["idx"]: r["id"] for r in users.collect()}
    product_ids = {r["idx"]: r["id"] for r in products.collect()}
    return {(user_ids[r["user"]], product_ids[r["item"]]): (r["quantity"], r["rating"])
            for r in rows}


def test_valid_events_drop_rows_without_user_or_quantity(spark) -> None:
    events = _events(
        spark,
        [("u1", "p1", 2, 0), (None, "p1", 1, 0), ("", "p1", 1, 0), ("u1", "p2", 0, 0),
         ("u1", None, 1, 0)],
    )
    kept = prepare.valid_events(events).collect()
    assert [r["event_id"] for r in kept] == ["e0"]


def test_returns_net_out_and_non_positive_pairs_drop(spark) -> None:
    events = _events(
        spark,
        [
            ("u1", "p1", 5, 0), ("u1", "p1", -5, 1),  # fully returned: gone
            ("u1", "p2", 3, 0), ("u1", "p2", -1, 2),  # net 2
            ("u2", "p1", -2, 0),  # a return without a purchase (bought before the data): gone
            ("u2", "p2", 1, 0), ("u2", "p2", 1, 3),  # bought twice: net 2
        ],
    )
    got = _matrix(spark, events)
    assert set(got) == {("u1", "p2"), ("u2", "p2")}
    assert got[("u1", "p2")] == (2, pytest.approx(math.log1p(2)))
    assert got[("u2", "p2")][0] == 2


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"confidence": "log1p"}, math.log1p(7)),
        ({"confidence": "raw"}, 7.0),
        ({"confidence": "binary"}, 1.0),
        ({"als_mode": "explicit", "confidence": "binary"}, 7.0),  # explicit: quantity = rating
    ],
)
def test_rating_follows_confidence_and_mode(spark, settings, expected) -> None:
    got = _matrix(spark, _events(spark, [("u1", "p1", 7, 0)]), **settings)
    assert got[("u1", "p1")][1] == pytest.approx(expected)


def test_time_split_at_the_cutoff(spark) -> None:
    events = _events(spark, [("u1", f"p{d}", 1, d) for d in range(10)])
    split = prepare.split_events(events, load(split_cutoff=T0 + timedelta(days=7)))
    train = sorted(r["product_id"] for r in split.train.collect())
    test = sorted(r["product_id"] for r in split.test.collect())
    assert train == [f"p{d}" for d in range(7)]  # before the cutoff
    assert test == ["p7", "p8", "p9"]  # at and after it
    assert split.cutoff == T0 + timedelta(days=7)


def test_time_split_without_cutoff_holds_out_the_latest_fraction(spark) -> None:
    events = _events(spark, [("u1", f"p{d}", 1, d) for d in range(20)])
    split = prepare.split_events(events, load(test_fraction=0.25))
    test = sorted(int(r["product_id"][1:]) for r in split.test.collect())
    assert test == list(range(15, 20))
    assert split.train.count() == 15


def test_time_split_is_on_events_then_each_side_nets_on_its_own(spark) -> None:
    # Bought before the cutoff, returned after it: a train purchase, no test purchase.
    events = _events(spark, [("u1", "p1", 4, 0), ("u1", "p1", -4, 9), ("u1", "p2", 1, 9)])
    split = prepare.split_events(events, load(split_cutoff=T0 + timedelta(days=5)))
    assert set(_matrix(spark, split.train)) == {("u1", "p1")}
    assert set(_matrix(spark, split.test)) == {("u1", "p2")}


def test_random_split_is_seeded_disjoint_and_complete(spark) -> None:
    events = _events(spark, [("u1", f"p{i}", 1, i % 30) for i in range(400)])
    conf = load(split="random", test_fraction=0.25, seed=7)
    first = prepare.split_events(events, conf)
    again = prepare.split_events(events.repartition(3), conf)
    ids = lambda df: {r["event_id"] for r in df.collect()}  # noqa: E731
    test, train = ids(first.test), ids(first.train)
    assert test == ids(again.test)  # same seed, same split, whatever the partitioning
    assert not test & train and len(test | train) == 400
    assert 60 <= len(test) <= 140  # about a quarter
    other = ids(prepare.split_events(events, load(split="random", test_fraction=0.25, seed=8)).test)
    assert other != test


def _prepared(spark, sales, settings, driver):
    from spark import pipeline, train_path

    path = train_path.DRIVER if driver else train_path.DISTRIBUTED
    got = prepare.prepare(spark, sales, settings, pipeline.load_indexes(spark, settings), path)
    rows = sorted(tuple(r) for r in got.matrix.collect())
    got.matrix.unpersist()
    numbers = tuple(ix.numbers for ix in got.indexes)
    return rows, got.counts, got.cutoff, numbers, got.events, got.first, got.last


@pytest.mark.parametrize(
    "split",
    [{"test_fraction": 0.2}, {"test_fraction": 0.3}, {"split_cutoff": T0 + timedelta(days=5)},
     {"split": "random", "test_fraction": 0.4, "seed": 3}, {"test_fraction": 0.01}],
    ids=["fraction-0.2", "fraction-0.3", "cutoff", "random", "nothing-after-the-quantile"],
)
def test_preparing_on_the_driver_equals_preparing_with_spark(spark, tmp_path, split) -> None:
    rows = [(f"u{u}", f"p{(u * 3 + d) % 7}", 1 + (u + d) % 4, d) for u in range(6)
            for d in range(0, 10, 1 + u % 3)]
    rows += [("u0", "p0", -9, 9), ("u1", "p3", -1, 8), ("u2", "p2", -1, 1)]  # returns
    rows += [("", "p1", 1, 2), ("u3", "p1", 0, 3)]  # not valid: no user, no quantity
    if split.get("test_fraction") == 0.01:  # every event at one time: none after the quantile
        rows = [(u, p, q, 0) for u, p, q, _ in rows]
    settings = load(data_dir=tmp_path, **split)
    sales = _events(spark, rows)
    on_driver = _prepared(spark, sales, settings, driver=True)
    assert on_driver == _prepared(spark, sales, settings, driver=False)
    matrix, counts, cutoff = on_driver[:3]
    assert counts["all"] > 0 and counts["users"] == 6
    if split.get("test_fraction") == 0.01:
        assert cutoff is None and counts["test"] == 0
    elif split.get("split") != "random":
        assert cutoff is not None and counts["train"] > 0 and counts["test"] > 0


def test_driver_side_pairs_equal_the_spark_side(spark) -> None:
    import pandas as pd

    from spark import evaluate

    net = pd.DataFrame({"user": [0, 0, 1, 2], "item": [1, 2, 1, 0], "train": [3, 0, 1, -1],
                        "test": [0, 2, 0, 4], "all": [3, 2, 1, 3]})
    matrix = spark.createDataFrame(net.astype({"user": "int32", "item": "int32"}),
                                   "user int, item int, train long, test long, all long")
    for conf in (load(), load(confidence="raw"), load(als_mode="explicit")):
        for which in ("train", "test", "all"):
            local = prepare.side_local(net, which, conf)
            spark_side = prepare.side(matrix, which, conf)
            want = sorted((r["user"], r["item"], r["quantity"], r["rating"])
                          for r in spark_side.collect())
            assert sorted(local.itertuples(index=False, name=None)) == [
                (u, i, q, pytest.approx(r)) for u, i, q, r in want]
            assert {u: (list(i), list(r)) for u, (i, r) in evaluate.by_user(local).items()} == {
                u: (list(i), list(r)) for u, (i, r) in evaluate.by_user(spark_side).items()}


CSV = (
    "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
    "536365,85123A,WHITE HANGING HEART,6,2010-12-01 08:26:00,2.55,17850.0,United Kingdom\n"
    "536366,22633,HAND WARMER,6,2011-06-01 10:00:00,1.85,,United Kingdom\n"
    'C536379,D,"Discount, big",1,2011-06-01 10:30:00,27.50,14527,United Kingdom\n'
    "536367,84879,BIRD ORNAMENT,x,2011-06-01 11:00:00,1.69,13047,France\n"
    "536368,22960,JAM MAKING SET,3,2011-06-01 12:00:00,,13047,\n"
)


def test_csv_reader_maps_like_the_producer(spark, tmp_path: Path) -> None:
    path = tmp_path / "shop.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write(CSV)
    read = read_purchases(spark, path, CsvMapping())
    assert (read.rows, read.dropped) == (5, 2)  # no customer; quantity "x"
    rows = {r["event_id"]: r.asDict() for r in read.sales.collect()}
    assert set(rows) == {"shop.csv.gz:1", "shop.csv.gz:3", "shop.csv.gz:5"}
    first = rows["shop.csv.gz:1"]
    assert first["user_id"] == "17850"  # "17850.0" -> "17850"
    assert first["event_time"] == datetime(2010, 12, 1, 8, 26)  # GMT in winter: UTC as is
    assert first["unit_price"] == pytest.approx(2.55)
    cancel = rows["shop.csv.gz:3"]
    assert cancel["quantity"] == -1  # cancellation invoice: a return
    assert cancel["description"] == "Discount, big"
    assert cancel["event_time"] == datetime(2011, 6, 1, 9, 30)  # BST: one hour ahead of UTC
    last = rows["shop.csv.gz:5"]
    assert last["unit_price"] is None and last["country"] is None


