"""GraphX from PySpark, through the project's own bridge (`jvm/src/main/java/io/recsys/graphx/
Bridge.java`, built by `make setup` into `jvm/lib/spark/recsys-graphx-bridge.jar`, on
`spark.jars`). GraphX has no Python API; this is the one module that knows the bridge exists.

DataFrames in, DataFrames out: edges with columns `src`, `dst` (read as strings), optionally
vertices with a column `id` (for vertices without an edge); every result has one row per vertex,
`id` (string) and the measure, and is already materialised (localCheckpoint) when it is returned.

GraphX's PageRank ignores edge weights, does not redistribute the rank of sink vertices and scales
the ranks to sum to the number of vertices. With `undirected` (the default) every edge also
counts reversed: then there are no sinks (isolated vertices aside) and the ranks equal networkx's
`pagerank` times the number of vertices.
"""

from __future__ import annotations

from pyspark.sql import DataFrame, SparkSession

from recsys import paths

BRIDGE_CLASS = "io.recsys.graphx.Bridge"
BRIDGE_JAR = paths.SPARK_JARS / "recsys-graphx-bridge.jar"
BRIDGE_VERSION = "2"  # Bridge.VERSION: bumped with every change of an entry point
RESET_PROB = 0.15  # GraphX's and networkx's default (networkx's alpha = 1 - 0.15)


class BridgeMissing(RuntimeError):
    """The JVM has no (or an outdated) bridge class: `make setup` has not built the jar."""


def _bridge(spark: SparkSession):  # noqa: ANN202 (a py4j JavaClass)
    from py4j.java_gateway import JavaClass

    cls = spark.sparkContext._jvm
    for part in BRIDGE_CLASS.split("."):
        cls = getattr(cls, part)
    # py4j answers a missing class with a JavaPackage instead of an error: check the type.
    if not isinstance(cls, JavaClass):
        raise BridgeMissing(
            f"the GraphX bridge {BRIDGE_CLASS} is not on the JVM's classpath: {BRIDGE_JAR} "
            f"{'is not on spark.jars' if BRIDGE_JAR.exists() else 'is missing'}; run `make setup`"
        )
    return cls


def check(spark: SparkSession) -> str:
    """The bridge's version; raises `BridgeMissing` (naming the jar) when the class is absent or
    older than this module expects. Called by `spark.session.build`."""
    version = str(_bridge(spark).version())
    if version != BRIDGE_VERSION:
        raise BridgeMissing(
            f"the GraphX bridge in {BRIDGE_JAR} is version {version}, this code needs "
            f"{BRIDGE_VERSION}: run `make setup` to rebuild it"
        )
    return version


def _call(edges: DataFrame, name: str, vertices: DataFrame | None, *args: object) -> DataFrame:
    spark = edges.sparkSession
    method = getattr(_bridge(spark), name)
    jdf = method(edges._jdf, None if vertices is None else vertices._jdf, *args)
    return DataFrame(jdf, spark)


def page_rank(
    edges: DataFrame, vertices: DataFrame | None = None, iterations: int | None = 20,
    tol: float = 1e-4, reset_prob: float = RESET_PROB, undirected: bool = True,
) -> DataFrame:
    """(id, pagerank): `iterations` rounds, or until no rank moves by more than `tol` when
    `iterations` is None."""
    if iterations is None:
        return _call(edges, "pageRankUntilConvergence", vertices, undirected, float(tol),
                     float(reset_prob))
    return _call(edges, "pageRank", vertices, undirected, int(iterations), float(reset_prob))


def connected_components(edges: DataFrame, vertices: DataFrame | None = None) -> DataFrame:
    """(id, component): the smallest id of the vertex's connected component (edges count both
    ways)."""
    return _call(edges, "connectedComponents", vertices)


def communities(edges: DataFrame, vertices: DataFrame | None = None, steps: int = 5) -> DataFrame:
    """(id, community): the id whose label the vertex holds after `steps` rounds of synchronous
    label propagation (edges count both ways)."""
    return _call(edges, "labelPropagation", vertices, int(steps))


def degrees(edges: DataFrame, vertices: DataFrame | None = None) -> DataFrame:
    """(id, in_degree, out_degree, degree); duplicate edges count once, isolated vertices 0."""
    return _call(edges, "degrees", vertices)


def analyse(
    edges: DataFrame, vertices: DataFrame | None = None, iterations: int | None = 20,
    tol: float = 1e-4, reset_prob: float = RESET_PROB, steps: int = 5,
    partitions: int | None = None,
) -> DataFrame:
    """Every measure from one indexed graph, one row per vertex: (id, in_degree, out_degree,
    degree, pagerank, component, community); PageRank on the undirected graph. `partitions`:
    of the graph's edges (None: as the input's distinct gives them)."""
    return _call(edges, "analyse", vertices, 0 if iterations is None else int(iterations),
                 float(tol), float(reset_prob), int(steps), int(partitions or 0))


def last_timings(spark: SparkSession) -> str:
    """Seconds per phase of the last `analyse` on this JVM ("index+degrees 1.2s, pagerank ...")."""
    return str(_bridge(spark).lastTimings())
