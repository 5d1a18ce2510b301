"""A user's own file, on the real broker and Spark: CSVs with foreign column names, only the four
required columns, day-first dates, epoch seconds, a tab delimiter and a ratings file in explicit
mode are read alike by the producer and Spark, train through `recsys train --file` and stream
through `recsys produce` + the streaming job; every malformed file ends with exit 2, its one line,
and nothing produced or stored.

Files are tiny and the ALS settings small (rank 4, 3 iterations): this is about the mapping.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pyspark.sql import SparkSession

from recsys import cli
from recsys.csv_mapping import resolve
from recsys.kafka import read_to_end
from recsys.settings import Settings, load
from recsys.topics import create_topics, renamed
from schemas import codec
from spark.csv_input import read_purchases
from spark.job import StreamJob
from spark.publish import Topics
from streams.csv_source import CsvSource

pytestmark = pytest.mark.integration

SMALL_ALS = {"als_rank": 4, "als_max_iter": 3, "top_n": 5, "eval_k": 5, "promote_gate": False,
             "spark_shuffle_partitions": 2}
T0 = datetime(2011, 3, 13, 9, 0, tzinfo=UTC)


# --- the files ------------------------------------------------------------------------------------
def events(n_users: int = 24, n_items: int = 15, per_user: int = 6, seed: int = 7
           ) -> list[tuple[str, str, int, datetime]]:
    """(user, item, quantity or rating 1-5, UTC time) in time order, one per hour; days > 12
    so day-first and month-first dates cannot be confused."""
    rng = random.Random(seed)
    rows = []
    for u in range(n_users):
        for item in rng.sample(range(n_items), per_user):
            rows.append((f"u{u}", f"p{item}", rng.randint(1, 5)))
    return [(u, p, q, T0 + timedelta(hours=i)) for i, (u, p, q) in enumerate(rows)]


def write_csv(path: Path, header: list[str], rows: list[list[Any]], delimiter: str = ",") -> Path:
    path.write_text("\n".join(delimiter.join(map(str, r)) for r in [header, *rows]) + "\n",
                    encoding="utf-8")
    return path


def four_columns(tmp_path: Path) -> Path:
    """Foreign names, only the four required columns, the default time format (UTC times:
    the Europe/London zone is UTC in March before the clocks change)."""
    return write_csv(tmp_path / "shop.csv", ["client", "article", "amount", "ts"],
                     [[u, p, q, t.strftime("%Y-%m-%d %H:%M:%S")] for u, p, q, t in events()])


def tab_day_first(tmp_path: Path) -> Path:
    """Tab-separated, day-first dates, extra columns (a price and a title) for auto to find."""
    return write_csv(
        tmp_path / "orders.tsv", ["customer_id", "product_id", "qty", "unit_price", "title",
                                  "order_date"],
        [[u, p, q, "1.5", f"Item {p}", t.strftime("%d/%m/%Y %H:%M")] for u, p, q, t in events()],
        delimiter="\t",
    )


def ratings(tmp_path: Path) -> Path:
    """A MovieLens-shaped ratings file: userId,movieId,rating,timestamp (epoch seconds)."""
    return write_csv(tmp_path / "ratings.csv", ["userId", "movieId", "rating", "timestamp"],
                     [[u[1:], p[1:], q, int(t.timestamp())] for u, p, q, t in events()])


FOUR_FLAGS = ["--user-col", "client", "--product-col", "article", "--quantity-col", "amount",
              "--time-col", "ts"]


# --- helpers --------------------------------------------------------------------------------------
def private_topics(settings: Settings, unique: str) -> Topics:
    prefix = f"t{unique}."
    create_topics(settings, names=renamed(prefix))
    return Topics.with_prefix(prefix)


def topic_values(settings: Settings, topic: str) -> list[dict[str, Any]]:
    """Every record on `topic` now, decoded."""
    return [codec.decode(m.value())[1] for m in read_to_end(settings, topic)]


@pytest.fixture
def run_cli(settings: Settings, monkeypatch: pytest.MonkeyPatch, spark: SparkSession
            ) -> Callable[..., int]:
    """A `recsys` subcommand's handler in this process, with the test's settings (small ALS,
    `env` on top) and without re-configuring logging; `recsys train` gets the session's Spark
    (its stop() is held off)."""
    monkeypatch.setattr(SparkSession, "stop", lambda self: None)

    def run(argv: list[str], **env: Any) -> int:
        args = cli.build_parser().parse_args(argv)
        s = load(**{**settings.model_dump(), **SMALL_ALS, **env})
        return cli._resolve(args.handler)(s, args)

    return run


def spark_events(spark: SparkSession, path: Path, auto: bool, given: dict[str, str]) -> list:
    mapping = resolve(path, given, auto=auto).mapping
    read = read_purchases(spark, path, mapping)
    assert read.dropped == 0
    rows = read.sales.collect()
    return sorted((r["event_id"], r["user_id"], r["product_id"], r["quantity"],
                   r["event_time"].replace(tzinfo=UTC)) for r in rows)


# --- producer and Spark read every shape alike ------------------------------------------------------
@pytest.mark.parametrize("make, auto, given", [
    (four_columns, False, {"user_col": "client", "product_col": "article",
                           "quantity_col": "amount", "time_col": "ts"}),
    (tab_day_first, True, {}),
    (ratings, True, {}),
])
def test_producer_and_spark_read_a_users_file_alike(spark, tmp_path, make, auto, given):
    path = make(tmp_path)
    mapping = resolve(path, given, auto=auto).mapping
    produced = sorted(
        (s["event_id"], s["user_id"], s["product_id"], s["quantity"],
         datetime.fromtimestamp(s["event_time"] / 1000, UTC))
        for s, dead in CsvSource(path, mapping) if dead is None
    )
    expected = [(f"{path.name}:{i}", u if make is not ratings else u[1:],
                 p if make is not ratings else p[1:], q, t)
                for i, (u, p, q, t) in enumerate(events(), start=1)]
    assert produced == sorted(expected)
    assert spark_events(spark, path, auto, given) == produced


# --- recsys train --file ----------------------------------------------------------------------------
def test_train_a_four_column_file_with_the_four_flags_only(settings, unique, tmp_path, run_cli,
                                                           capsys):
    topics = private_topics(settings, unique)
    path = four_columns(tmp_path)
    assert run_cli(["train", "--file", str(path), *FOUR_FLAGS,
                    "--topic-prefix", f"t{unique}."]) == 0, capsys.readouterr().err
    (ready,) = topic_values(settings, topics.model_ready)
    assert (ready["trigger"], ready["events"], ready["users"]) == ("file", len(events()), 24)
    assert ready["params"]["als_mode"] == "implicit"
    recs = topic_values(settings, topics.recommendations)
    assert {r["user_id"] for r in recs} == {f"u{u}" for u in range(24)}


def test_train_a_tab_separated_day_first_file_with_mapping_auto(settings, unique, tmp_path,
                                                                run_cli, capsys):
    topics = private_topics(settings, unique)
    path = tab_day_first(tmp_path)
    assert run_cli(["train", "--file", str(path), "--mapping", "auto",
                    "--topic-prefix", f"t{unique}."]) == 0, capsys.readouterr().err
    (ready,) = topic_values(settings, topics.model_ready)
    assert ready["events"] == len(events())
    last = max(t for *_, t in events())
    assert ready["event_time_max"] == last  # day-first, read in Europe/London (UTC in March)


def test_train_a_ratings_file_in_explicit_mode_reports_rmse(settings, unique, tmp_path, run_cli,
                                                            capsys):
    topics = private_topics(settings, unique)
    path = ratings(tmp_path)
    assert run_cli(["train", "--file", str(path), "--mapping", "auto",
                    "--topic-prefix", f"t{unique}."],
                   als_mode="explicit", split="random", test_fraction=0.2) == 0, \
        capsys.readouterr().err
    out = capsys.readouterr().out
    (ready,) = topic_values(settings, topics.model_ready)
    assert (ready["params"]["als_mode"], ready["params"]["split"]) == ("explicit", "random")
    rmse, base = ready["metrics"]["rmse"], ready["baseline_metrics"]["rmse"]
    assert math.isfinite(rmse) and 0 < rmse < 5 and math.isfinite(base)
    assert "rmse" in out
    recs = topic_values(settings, topics.recommendations)
    assert len(recs) == 24 and all(r["items"] for r in recs)


# --- recsys produce, then the streaming job ------------------------------------------------------
def test_stream_a_tab_separated_day_first_file(settings, unique, tmp_path, run_cli, spark,
                                               capsys):
    topics = private_topics(settings, unique)
    path = tab_day_first(tmp_path)
    assert run_cli(["produce", "--file", str(path), "--mapping", "auto", "--no-progress",
                    "--topic-prefix", f"t{unique}."]) == 0, capsys.readouterr().err
    sales = topic_values(settings, topics.sales)
    assert len(sales) == len(events()) and not topic_values(settings, topics.dlq)
    assert {s["unit_price"] for s in sales} == {1.5}  # the extra columns auto found
    assert {s["description"] for s in sales} == {f"Item {p}" for _, p, _, _ in events()}
    s = load(**{**settings.model_dump(), **SMALL_ALS, "train_threshold": len(events()),
                "trigger_seconds": 0.5, "warm_up": False})
    job = StreamJob(spark, s, topics)
    job.start(available_now=True)
    assert job.run(threading.Event()) == 0
    (ready,) = topic_values(settings, topics.model_ready)
    assert (ready["trigger"], ready["events"]) == ("threshold", len(events()))


# --- malformed files: exit 2, one line, nothing produced or stored -----------------------------------
MALFORMED: list[tuple[str, str, list[str], str]] = [
    ("missing.csv", "client,article,amount,ts\nc,a,1,2011-01-02 10:00:00\n",
     ["--user-col", "customer", "--product-col", "article", "--quantity-col", "amount",
      "--time-col", "ts"],
     "no column 'customer' for --user-col; the file's columns are client, article, amount, ts"),
    ("times.csv", "client,article,amount,ts\nc,a,1,1291191960\n", FOUR_FLAGS,
     "no value of time column 'ts' in the first 1 rows parses with time format "
     "'%Y-%m-%d %H:%M:%S' (e.g. '1291191960'); it looks like --time-format 'epoch-s'"),
    ("words.csv", "client,article,amount,ts\nc,a,lots,2011-01-02 10:00:00\n", FOUR_FLAGS,
     "quantity column 'amount' is not numeric in the first 1 rows (e.g. 'lots')"),
    ("empty.csv", "", FOUR_FLAGS, "empty file"),
    ("semicolons.csv", "client;article;amount;ts\nc;a;1;2011-01-02 10:00:00\n", FOUR_FLAGS,
     "the delimiter ',' finds one column in the header 'client;article;amount;ts'; the file "
     "looks ';'-separated: set --delimiter ';'"),
    ("binary.csv", "\0\1\2PK\3\4" * 40, FOUR_FLAGS, "not a CSV text file (binary data)"),
]


@pytest.mark.parametrize("command", ["produce", "train"])
@pytest.mark.parametrize("name, text, flags, line", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_file_is_one_line_and_nothing_happens(settings, unique, tmp_path, run_cli,
                                                          capsys, command, name, text, flags,
                                                          line):
    topics = private_topics(settings, unique)
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    assert run_cli([command, "--file", str(path), *flags, "--topic-prefix", f"t{unique}."]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"recsys {command}: {path}: {line}\n"
    assert "Traceback" not in captured.out
    for topic in (topics.sales, topics.dlq, topics.model_ready, topics.recommendations):
        assert topic_values(settings, topic) == []
    assert not (settings.data_dir / "models").exists()
    assert not (settings.data_dir / "store").exists()
    assert not (settings.data_dir / "index").exists()


# --- recsys tune, and tuning before a model ------------------------------------------------------
SMALL_GRID = {"tune_ranks": "2,4", "tune_reg_params": "0.1,1.0", "tune_alphas": "1,10"}


def test_tune_a_ratings_file_by_rmse_on_the_train_side(settings, tmp_path, run_cli, capsys):
    path = ratings(tmp_path)
    assert run_cli(["tune", "--file", str(path), "--mapping", "auto"], als_mode="explicit",
                   split="random", test_fraction=0.2, **SMALL_GRID) == 0, capsys.readouterr().err
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{path}: 4 fits (explicit, random split, ")
    assert out[1].split() == ["rank", "reg", "alpha", "RMSE", "precision@5", "fit", "s"]
    rows = [line.split() for line in out[2:6]]
    # SMALL_ALS's point (rank 4, reg 0.1) first, then the rest of 2,4 x 0.1,1.0; no alpha axis
    assert [(r[0], r[1]) for r in rows] == [("4", "0.1"), ("2", "0.1"), ("2", "1"), ("4", "1")]
    chosen = [r for r in rows if r[-1] == "chosen"]
    assert len(chosen) == 1
    assert min(float(r[3]) for r in rows) == float(chosen[0][3])  # the lowest RMSE
    assert out[-1].startswith("chosen by rmse: RECSYS_ALS_RANK=")
    assert not (settings.data_dir / "models").exists()  # nothing trained for keeps


def test_tune_before_train_puts_the_chosen_parameters_into_model_ready(settings, unique,
                                                                       tmp_path, run_cli, capsys):
    topics = private_topics(settings, unique)
    path = four_columns(tmp_path)
    assert run_cli(["train", "--file", str(path), *FOUR_FLAGS, "--topic-prefix", f"t{unique}."],
                   tune_before_train=True, tune_ranks="2,4", tune_reg_params="0.1,1.0",
                   tune_alphas="10") == 0, capsys.readouterr().err
    (ready,) = topic_values(settings, topics.model_ready)
    params = ready["params"]
    assert params["tuned"] == "true"
    assert (params["rank"], params["reg_param"], params["alpha"]) in {
        (str(r), str(g), "10.0") for r in (2, 4) for g in (0.1, 1.0)}
