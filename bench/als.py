"""ALS fit: Spark MLlib against the `implicit` library's CPU ALS, on the same train matrix (the
bundled data before 2011-11-01, netted quantities, the default confidence) with the same rank,
iterations, regularization, alpha and thread count, and precision@10 of both on the same test
protocol (spark.evaluate).

The two read `regularization` differently: Spark multiplies it by each user's (item's) number of
ratings, `implicit` does not; the same number is passed to both, as a user of either would.
Confidence differs slightly too: Spark uses 1 + alpha * r, `implicit` alpha * r.
"""

from __future__ import annotations

import logging
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from scipy.sparse import csr_matrix

from recsys import paths
from recsys.settings import Settings, load
from spark import evaluate, prepare, recommend, train, train_path
from spark.csv_input import read_purchases_csv
from spark.index import update_index
from spark.session import build

log = logging.getLogger(__name__)

CUTOFF = datetime(2011, 11, 1)
THREADS = 2  # Spark runs local[2]


def _implicit_fit(matrix: csr_matrix, settings: Settings):
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):  # implicit's advice: its own threads, single-thread BLAS
        model = AlternatingLeastSquares(
            factors=settings.als_rank,
            regularization=settings.als_reg_param,
            alpha=settings.als_alpha,
            iterations=settings.als_max_iter,
            num_threads=THREADS,
            random_state=settings.seed,
        )
        started = time.perf_counter()
        model.fit(matrix, show_progress=False)
        seconds = time.perf_counter() - started
    return model, seconds


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-als-") as tmp:
        settings = load(data_dir=Path(tmp), split_cutoff=CUTOFF)
        spark = build(settings, app_name="bench-als")
        try:
            _run(spark, settings)
        finally:
            spark.stop()


def _run(spark, settings: Settings) -> None:
    events = prepare.valid_events(read_purchases_csv(spark, paths.BUNDLED_DATA)).cache()
    users = update_index(spark, events.select("user_id"), f"{settings.data_dir}/index/users")
    products = update_index(
        spark, events.select("product_id"), f"{settings.data_dir}/index/products"
    )
    split = prepare.split_events(events, settings)
    train_m = prepare.interactions(split.train, users, products, settings).cache()
    test_m = prepare.interactions(split.test, users, products, settings).cache()
    train_m.count()
    test_m.count()
    k = settings.eval_k
    relevant = evaluate.relevant_items(train_m, test_m).cache()
    eval_users = relevant.select("user").distinct()
    bought = recommend.bought_lists(train_m).cache()
    catalog = train_m.select("item").distinct().count()

    model, spark_seconds = train.fit(train_m, settings)
    spark_recs = recommend.top_items(model, eval_users, k, bought, train_path.DRIVER)
    spark_p = evaluate.ranking_metrics(spark_recs, relevant, k, catalog)["precision_at_k"]

    rows = train_m.select("user", "item", "rating").toPandas()
    shape = (int(rows["user"].max()) + 1, int(rows["item"].max()) + 1)
    matrix = csr_matrix(
        (rows["rating"].to_numpy(np.float32), (rows["user"], rows["item"])), shape=shape
    )
    implicit_model, implicit_seconds = _implicit_fit(matrix, settings)
    ids = np.array(sorted(r["user"] for r in eval_users.collect()), dtype=np.int32)
    ids = ids[ids < shape[0]]
    items, _ = implicit_model.recommend(ids, matrix[ids], N=k, filter_already_liked_items=True)
    long_rows = [
        (int(u), int(item), rank + 1)
        for u, row in zip(ids, items, strict=True)
        for rank, item in enumerate(row)
        if item >= 0
    ]
    implicit_recs = spark.createDataFrame(long_rows, "user int, item int, rank int")
    implicit_p = evaluate.ranking_metrics(implicit_recs, relevant, k, catalog)["precision_at_k"]
    print(
        f"als fit: spark {spark_seconds:.1f} s / implicit {implicit_seconds:.1f} s = "
        f"{spark_seconds / implicit_seconds:.1f} (precision@{k} spark {spark_p:.4f}, "
        f"implicit {implicit_p:.4f}; rank {settings.als_rank}, {settings.als_max_iter} iterations, "
        f"reg {settings.als_reg_param:g}, alpha {settings.als_alpha:g}, {THREADS} threads)",
        flush=True,
    )


if __name__ == "__main__":
    main()
