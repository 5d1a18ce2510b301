"""The persistent id index: numbers survive retrains, new ids get the next numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from spark import index

pytestmark = pytest.mark.spark


def _ids(spark, *values: str):
    return spark.createDataFrame([(v,) for v in values], "user_id string")


def _as_dict(df) -> dict[str, int]:
    return {r["id"]: r["idx"] for r in df.collect()}


def test_first_run_numbers_ids_in_sorted_order(spark, tmp_path: Path) -> None:
    got = index.update_index(spark, _ids(spark, "c", "a", "b", "a", None), tmp_path / "users")
    assert _as_dict(got) == {"a": 0, "b": 1, "c": 2}


def test_second_run_keeps_old_numbers_and_appends_new(spark, tmp_path: Path) -> None:
    path = tmp_path / "users"
    first = _as_dict(index.update_index(spark, _ids(spark, "17850", "13047", "12583"), path))
    second = _as_dict(index.update_index(spark, _ids(spark, "13047", "99999", "00001"), path))
    assert {k: second[k] for k in first} == first  # old ids unchanged
    assert second["00001"] == 3 and second["99999"] == 4  # next numbers, in id order
    assert sorted(second.values()) == list(range(5))  # dense, no duplicates
    assert _as_dict(index.load_index(spark, path)) == second  # what was returned is stored


def test_run_without_new_ids_writes_nothing(spark, tmp_path: Path) -> None:
    path = tmp_path / "products"
    index.update_index(spark, _ids(spark, "A", "B"), path)
    files = sorted(p.name for p in path.glob("*.parquet"))
    again = index.update_index(spark, _ids(spark, "B"), path)
    assert sorted(p.name for p in path.glob("*.parquet")) == files
    assert _as_dict(again) == {"A": 0, "B": 1}


def test_missing_index_loads_empty(spark, tmp_path: Path) -> None:
    assert index.load_index(spark, tmp_path / "nothing").count() == 0


def test_extend_numbers_new_ids_but_writes_only_on_save(spark, tmp_path: Path) -> None:
    path = tmp_path / "users"
    index.update_index(spark, _ids(spark, "b"), path)
    grown = index.extend(spark, _ids(spark, "c", "a", "b"), path)
    assert grown.numbers == {"b": 0, "a": 1, "c": 2} and grown.added == [("a", 1), ("c", 2)]
    assert _as_dict(grown.frame(spark)) == grown.numbers
    assert _as_dict(index.load_index(spark, path)) == {"b": 0}  # nothing stored yet
    grown.save(spark)
    assert _as_dict(index.load_index(spark, path)) == grown.numbers and grown.added == []
