"""graph: a model's recommendation graph on the full bundled data -- edges with `because`,
degrees, coverage and Gini next to the purchase graph, GraphX's PageRank, components and
communities of both (our jvm/ bridge), vertices -- and its CSV export.

A model is trained first on the whole file (`recsys train --file`'s path, not timed); then
`spark.graph.build` + `spark.graph_export.export` are timed, as the streaming job runs them
after each model (publishing the edges on Kafka is left out: no broker here).

Prints `graph: build + export N s / target 30 s = R` (target R <= 1); never asserts.
`python -m bench.graph`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from recsys.settings import load

log = logging.getLogger("bench.graph")


def main(argv: list[str] | None = None) -> None:
    from recsys import logs
    from recsys.paths import BUNDLED_DATA
    from spark import graph, graph_export, graphx, pipeline, session
    from spark.csv_input import read_purchases_csv

    logs.setup(os.environ.get("RECSYS_LOG_LEVEL", "WARNING"))
    tmp = Path(tempfile.mkdtemp(prefix="recsys-bench-graph-"))
    settings = load(data_dir=str(tmp), export_dir=str(tmp / "exports"))
    spark = session.build(settings, "bench-graph")
    try:
        sales = read_purchases_csv(spark, BUNDLED_DATA).cache()
        result = pipeline.run_training(spark, sales, settings, model_version=1,
                                       indexes=pipeline.load_indexes(spark, settings))
        started = time.perf_counter()
        g = graph.build(spark, result, sales)
        built = time.perf_counter() - started
        where = graph_export.export(g, settings.export_dir)
        seconds = time.perf_counter() - started
        rec, buy = g.summary["recommendations"], g.summary["purchases"]
        gx = g.seconds.get("graphx", 0.0)
        print(f"graph: build + export {seconds:.1f} s / target 30 s = {seconds / 30:.2f}  "
              f"(build {built:.1f} s of which GraphX {gx:.1f} s [{graphx.last_timings(spark)}], "
              f"export {seconds - built:.1f} s; PageRank top 1% share {rec['pagerank_top_share']:.3f}"
              f" vs purchases {buy['pagerank_top_share']:.3f}, {rec['communities']:,} communities"
              f" (largest {rec['largest_community']:,}); {rec['edges']:,} edges, "
              f"{g.summary['vertices']:,} vertices, coverage {rec['coverage']:.3f}, Gini "
              f"{rec['gini_in_degree']:.3f} vs purchases "
              f"{g.summary['purchases']['gini_in_degree']:.3f}; files in {where.name}/)")
        g.unpersist()
    finally:
        spark.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
