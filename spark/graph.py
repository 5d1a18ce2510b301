"""The recommendation graph of one model version: users -> the products recommended to them, each
edge explained by up to three products the user bought (`because`), next to the purchase graph
(who bought what) so the two read side by side.

Pure steps on DataFrames plus small numpy on the driver (`because` in both variants, as the
cycle's path says: `spark.train_path`); `build` chains them, `export` (in
`spark.graph_export`) writes the folder and `spark.publish.publish_graph_edges` the topic.

Figures of each graph, over the catalogue (every product of a valid event):
- in-degree of a product: the users it is recommended to (bought by, in the purchase graph);
- out-degree of a user: the length of their list (products bought);
- degree distribution: (degree, products with that degree), degree 0 included;
- coverage: the share of the catalogue with in-degree > 0;
- Gini coefficient of the product in-degrees (0: every product equally often, ~1: a few take all).

GraphX (through `spark.graphx`, the project's JVM bridge), on each graph with the whole
catalogue as vertices: PageRank of every user and product (undirected: a product's rank flows to
the users it is linked to and back; GraphX scales the ranks to sum to the number of vertices),
connected components and label-propagation communities, numbered 1, 2, ... by size (largest
first). Figures: the share of the products' PageRank held by the top 1 % of the catalogue, the
components, the communities and their sizes (vertices without an edge are left out of both).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark import graphx, prepare
from spark.train_path import TrainPath

log = logging.getLogger(__name__)

BECAUSE_MAX = 3
TOP_PRODUCTS = 20
# GraphX: PageRank's fixed iterations (the ranks of the bundled data's top products move by less
# than 0.1 % after 20), label propagation's rounds, the share the top figure looks at.
PAGERANK_ITERATIONS = 20
COMMUNITY_STEPS = 5
TOP_SHARE = 0.01
COMMUNITY_SIZES = 10  # summary.json lists the sizes of this many largest communities
# GraphX's edge partitions: one per this many (directed) edges of the graphs, at least one. Each
# iteration runs a few stages of that many tasks, and on graphs of this size their fixed cost is
# most of the time (the bundled data's ~310,000 pairs: 2 partitions; PageRank 5.4 s, in 4: 7.6 s).
EDGES_PER_PARTITION = 200_000

MEASURE_SCHEMA = T.StructType([
    T.StructField("id", T.StringType(), False),
    T.StructField("pagerank", T.DoubleType(), True),
    T.StructField("component", T.LongType(), True),
    T.StructField("community", T.LongType(), True),
    T.StructField("purchase_pagerank", T.DoubleType(), True),
    T.StructField("purchase_component", T.LongType(), True),
    T.StructField("purchase_community", T.LongType(), True),
])
EDGE_SCHEMA = T.StructType([
    T.StructField("user_id", T.StringType(), False),
    T.StructField("product_id", T.StringType(), False),
    T.StructField("because", T.ArrayType(T.StringType(), False), False),
])


@dataclass
class Graph:
    """One model version's graph; `edges`, `vertices` and what they read stay cached until
    `unpersist`. The small figures are on the driver already."""

    model_version: int
    edges: DataFrame  # user_id, product_id, score, rank, model_version, because array<string>
    vertices: DataFrame  # id, type, original_id, description, degree, + MEASURE_COLUMNS
    degree_distribution: list[dict[str, Any]]  # graph, degree, products
    top_products: list[dict[str, Any]]  # graph, rank, product_id, description, users, pagerank
    summary: dict[str, Any] = field(default_factory=dict)
    cached: list[DataFrame] = field(default_factory=list)  # intermediates, dropped with the rest
    seconds: dict[str, float] = field(default_factory=dict)  # of some steps (not in the export)

    def headline(self) -> dict[str, float]:
        """The figures model-ready carries in its `metrics` (all prefixed `graph_`)."""
        rec, buy = self.summary["recommendations"], self.summary["purchases"]
        return {
            "graph_coverage": float(rec["coverage"]),
            "graph_gini_in_degree": float(rec["gini_in_degree"]),
            "graph_pagerank_top1pct_share": float(rec["pagerank_top_share"]),
            "graph_purchase_pagerank_top1pct_share": float(buy["pagerank_top_share"]),
            "graph_components": float(rec["components"]),
            "graph_communities": float(rec["communities"]),
            "graph_largest_community": float(rec["largest_community"]),
        }

    def unpersist(self) -> None:
        """Drop every cache the build made (edges and vertices last)."""
        for df in [*self.cached, self.edges, self.vertices]:
            df.unpersist()


# --- inputs ---------------------------------------------------------------------------------------
def purchases(sales: DataFrame) -> DataFrame:
    """(user_id, product_id) with a positive net quantity: the interaction matrix's pairs."""
    return (
        prepare.valid_events(sales).groupBy("user_id", "product_id")
        .agg(F.sum("quantity").alias("quantity")).where(F.col("quantity") > 0)
        .select("user_id", "product_id")
    )


def catalogue(sales: DataFrame) -> DataFrame:
    """(product_id): every product of a valid event, bought for good or not."""
    return prepare.valid_events(sales).select("product_id").distinct()


def descriptions(sales: DataFrame) -> DataFrame:
    """(product_id, description): the most frequent non-empty description of each product; ties
    go to the latest, then to the smallest text (deterministic)."""
    if "description" not in sales.columns:
        return sales.select("product_id", F.lit(None).cast("string").alias("description")).limit(0)
    text = F.trim(F.col("description"))
    counted = (
        sales.where(F.col("product_id").isNotNull() & text.isNotNull() & (text != ""))
        .groupBy("product_id", text.alias("description"))
        .agg(F.count(F.lit(1)).alias("n"), F.max("event_time").alias("latest"))
    )
    best = Window.partitionBy("product_id").orderBy(
        F.desc("n"), F.desc_nulls_last("latest"), F.asc("description")
    )
    return (
        counted.withColumn("pick", F.row_number().over(best)).where(F.col("pick") == 1)
        .select("product_id", "description")
    )


def edge_list(recs: DataFrame, model_version: int) -> DataFrame:
    """(user_id, product_id, score, rank, model_version) from the pipeline's `user_id, items`."""
    return recs.select("user_id", F.explode("items").alias("it")).select(
        "user_id",
        F.col("it.product_id").alias("product_id"),
        F.col("it.score").cast("double").alias("score"),
        F.col("it.rank").cast("int").alias("rank"),
        F.lit(model_version).cast("long").alias("model_version"),
    ).where(F.col("user_id").isNotNull() & F.col("product_id").isNotNull())


# --- because --------------------------------------------------------------------------------------
def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (zero rows stay zero): dot products become cosines."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)


def closest(
    history: list[str], targets: list[str], vectors: dict[str, np.ndarray], k: int = BECAUSE_MAX
) -> list[list[str]]:
    """For each target, the up to k products of `history` whose unit vectors are most similar to
    the target's, best first (ties: smaller id first); [] for a target without a vector."""
    known = sorted(p for p in set(history) if p in vectors)
    if not known:
        return [[] for _ in targets]
    h = np.stack([vectors[p] for p in known])
    out = []
    for target in targets:
        v = vectors.get(target)
        if v is None:
            out.append([])
            continue
        sims = h @ v
        order = np.lexsort((np.arange(len(known)), -sims))[:k]  # by -sim, then by id
        out.append([known[i] for i in order])
    return out


def because_driver(
    spark: SparkSession, edges: DataFrame, bought: DataFrame, item_factors: DataFrame,
    k: int = BECAUSE_MAX,
) -> DataFrame:
    """(user_id, product_id, because) on the driver: per user, one matrix product of their
    recommended products against their history."""
    factors = item_factors.select("product_id", "features").collect()
    vectors = dict(zip(
        (r["product_id"] for r in factors),
        unit_rows(np.array([r["features"] for r in factors], dtype=np.float32).reshape(
            len(factors), -1)),
        strict=True,
    ))
    history: dict[str, list[str]] = {}
    for r in bought.select("user_id", "product_id").collect():
        history.setdefault(r["user_id"], []).append(r["product_id"])
    targets: dict[str, list[str]] = {}
    for r in edges.select("user_id", "product_id").collect():
        targets.setdefault(r["user_id"], []).append(r["product_id"])
    rows = []
    for user in sorted(targets):
        products = targets[user]
        for product, why in zip(products, closest(history.get(user, []), products, vectors, k),
                                strict=True):
            rows.append((user, product, why))
    return spark.createDataFrame(rows, EDGE_SCHEMA)


def because_spark(
    edges: DataFrame, bought: DataFrame, item_factors: DataFrame, k: int = BECAUSE_MAX
) -> DataFrame:
    """(user_id, product_id, because) in Spark: one row per (edge, bought product), cosine of the
    two factor vectors, the best k per edge."""
    norm = F.sqrt(F.aggregate("features", F.lit(0.0), lambda acc, x: acc + x * x))
    unit = item_factors.select(
        "product_id",
        F.transform("features", lambda x: F.when(norm > 0, x / norm).otherwise(0.0)).alias("v"),
    )
    pairs = (
        edges.select("user_id", "product_id").join(unit, "product_id")
        .join(bought.select("user_id", F.col("product_id").alias("why")), "user_id")
        .join(unit.select(F.col("product_id").alias("why"), F.col("v").alias("w")), "why")
    )
    dot = F.aggregate(F.zip_with("v", "w", lambda a, b: a * b), F.lit(0.0), lambda acc, x: acc + x)
    best = Window.partitionBy("user_id", "product_id").orderBy(F.desc("sim"), F.asc("why"))
    ranked = (
        pairs.select("user_id", "product_id", "why", dot.alias("sim"))
        .withColumn("n", F.row_number().over(best)).where(F.col("n") <= k)
    )
    return ranked.groupBy("user_id", "product_id").agg(
        F.transform(F.sort_array(F.collect_list(F.struct("n", "why"))), lambda s: s["why"])
        .alias("because")
    )


def because(
    spark: SparkSession, edges: DataFrame, bought: DataFrame, item_factors: DataFrame,
    path: TrainPath, k: int = BECAUSE_MAX,
) -> DataFrame:
    """(user_id, product_id, because): for each edge, up to k products the user bought, most
    similar (cosine of the ALS item factors) to the recommended product, best first; on the
    driver or in Spark as the cycle's `path` says. Users without a history get []."""
    if path.driver:
        return because_driver(spark, edges, bought, item_factors, k)
    return because_spark(edges, bought, item_factors, k)


# --- figures --------------------------------------------------------------------------------------
def in_degrees(pairs: DataFrame, products: DataFrame) -> DataFrame:
    """(product_id, degree): distinct users per product of `products`, 0 for the others."""
    counts = pairs.groupBy("product_id").agg(F.countDistinct("user_id").alias("degree"))
    return products.join(counts, "product_id", "left").select(
        "product_id", F.coalesce("degree", F.lit(0)).cast("long").alias("degree")
    )


def distribution(degrees: DataFrame) -> list[tuple[int, int]]:
    """[(degree, products)] ascending by degree."""
    rows = degrees.groupBy("degree").count().orderBy("degree").collect()
    return [(int(r["degree"]), int(r["count"])) for r in rows]


def gini(dist: list[tuple[int, int]]) -> float:
    """Gini coefficient of the values a (value, count) distribution describes: 0 when all are
    equal, (n-1)/n when one value holds everything; NaN without any positive total.

    With the values sorted ascending and ranked 1..n: G = 2 sum(i x_i) / (n sum(x)) - (n+1)/n; a
    block of c equal values v at ranks a+1..a+c adds v * c * (2a + c + 1) / 2 to sum(i x_i).
    """
    n = sum(c for _, c in dist)
    total = sum(v * c for v, c in dist)
    if n == 0 or total <= 0:
        return float("nan")
    weighted, before = 0.0, 0
    for v, c in sorted(dist):
        weighted += v * c * (2 * before + c + 1) / 2
        before += c
    return 2 * weighted / (n * total) - (n + 1) / n


def coverage(dist: list[tuple[int, int]]) -> float:
    """Share of the products with degree > 0 (NaN for an empty catalogue)."""
    n = sum(c for _, c in dist)
    return sum(c for v, c in dist if v > 0) / n if n else float("nan")


def top(degrees: DataFrame, names: DataFrame, n: int = TOP_PRODUCTS) -> list[dict[str, Any]]:
    """The n products of highest degree (ties: smaller id), with their description."""
    rows = (
        degrees.where(F.col("degree") > 0).orderBy(F.desc("degree"), F.asc("product_id"))
        .limit(n).join(names, "product_id", "left")
        .orderBy(F.desc("degree"), F.asc("product_id")).collect()
    )
    return [
        {"rank": i, "product_id": r["product_id"], "description": r["description"],
         "users": int(r["degree"])}
        for i, r in enumerate(rows, 1)
    ]


def figures(pairs: DataFrame, products: DataFrame) -> tuple[dict[str, Any], DataFrame,
                                                            list[tuple[int, int]]]:
    """Summary figures of a (user_id, product_id) graph over the catalogue `products`; also the
    per-product degrees and the degree distribution."""
    degrees = in_degrees(pairs, products).cache()
    dist = distribution(degrees)
    users = pairs.groupBy("user_id").agg(F.countDistinct("product_id").alias("d")).agg(
        F.count(F.lit(1)).alias("users"), F.sum("d").alias("edges"), F.max("d").alias("max_out"),
    ).first()
    n_users = int(users["users"] or 0)
    n_edges = int(users["edges"] or 0)
    summary = {
        "edges": n_edges,
        "users": n_users,
        "products": sum(c for v, c in dist if v > 0),
        "catalogue": sum(c for _, c in dist),
        "coverage": coverage(dist),
        "gini_in_degree": gini(dist),
        "max_in_degree": max((v for v, _ in dist), default=0),
        "mean_out_degree": n_edges / n_users if n_users else 0.0,
        "max_out_degree": int(users["max_out"] or 0),
    }
    return summary, degrees, dist


# --- GraphX analytics -----------------------------------------------------------------------------
MEASURE_COLUMNS = ("pagerank", "component", "community",
                   "purchase_pagerank", "purchase_component", "purchase_community")


def links(pairs: DataFrame, prefix: str = "") -> DataFrame:
    """(src, dst) = (`<prefix>u:<user>`, `<prefix>p:<product>`) of a (user_id, product_id) graph."""
    return pairs.select(F.concat(F.lit(f"{prefix}u:"), "user_id").alias("src"),
                        F.concat(F.lit(f"{prefix}p:"), "product_id").alias("dst"))


def analyse(graphs: dict[str, DataFrame], products: DataFrame, edges_count: int | None = None
            ) -> dict[str, pd.DataFrame]:
    """GraphX on (user_id, product_id) graphs, every catalogue product a vertex of each: per
    graph, (id, degree, pagerank, component, community) on the driver, one row per vertex.

    The graphs run as one: their disjoint union (vertex ids prefixed with the graph's name), so
    each iteration's Spark stages serve them all (the stages' fixed cost, not the edges, is most
    of GraphX's time on graphs this size). Components and communities never cross a disjoint
    union, and PageRank's iterations do not either; only GraphX's final scaling (ranks sum to
    the number of vertices) is over the union, so each graph's ranks are scaled back to sum to
    its own number of vertices: the same ranks as from separate runs.
    """
    names = sorted(graphs)
    edges = ids = None
    for name in names:
        e = links(graphs[name], f"{name}|")
        v = products.select(F.concat(F.lit(f"{name}|p:"), "product_id").alias("id"))
        edges = e if edges is None else edges.unionByName(e)
        ids = v if ids is None else ids.unionByName(v)
    partitions = None if edges_count is None else max(1, -(-edges_count // EDGES_PER_PARTITION))
    measured = graphx.analyse(edges, ids, iterations=PAGERANK_ITERATIONS, steps=COMMUNITY_STEPS,
                              partitions=partitions)
    # A local relation already (the bridge collected it): no job to speak of.
    table = measured.select("id", "degree", "pagerank", "component", "community").toPandas()
    log.info("graphx on %d vertices: %s", len(table), graphx.last_timings(products.sparkSession))
    graph_of = table["id"].str.split("|", n=1).str[0]
    out = {}
    for name in names:
        part = table[graph_of == name].copy()
        cut = len(name) + 1
        for column in ("id", "component", "community"):
            part[column] = part[column].str[cut:]
        part["pagerank"] *= len(part) / part["pagerank"].sum()
        out[name] = part.reset_index(drop=True)
    return out


def numbered(labels: pd.Series, linked: pd.Series) -> pd.Series:
    """Group labels (a representative vertex id) as 1, 2, ... by group size, largest first (ties:
    smaller label); vertices without an edge (`linked` False) get 0: no community of their own."""
    counts = labels[linked].value_counts()
    order = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    number = {label: i for i, (label, _) in enumerate(order, 1)}
    return labels.map(number).where(linked, 0).fillna(0).astype("int64")


def measures(measured: pd.DataFrame) -> pd.DataFrame:
    """(id, pagerank, component, community) with components and communities numbered."""
    linked = measured["degree"] > 0
    return pd.DataFrame({
        "id": measured["id"],
        # 9 decimals: the export stays byte-for-byte the same when GraphX sums in another order
        "pagerank": measured["pagerank"].astype("float64").round(9),
        "component": numbered(measured["component"], linked),
        "community": numbered(measured["community"], linked),
    })


def top_share(ranks: pd.Series, share: float = TOP_SHARE) -> float:
    """The part of the total held by the ceil(share x n) largest values (NaN when empty)."""
    values = np.sort(ranks.to_numpy(dtype="float64"))[::-1]
    total = values.sum()
    if len(values) == 0 or total <= 0:
        return float("nan")
    k = max(1, int(np.ceil(share * len(values))))
    return float(values[:k].sum() / total)


def analytics_figures(table: pd.DataFrame) -> dict[str, Any]:
    """Summary figures of one graph's `measures` table (products are the `p:` ids)."""
    products = table[table["id"].str.startswith("p:")]
    linked_components = table.loc[table["component"] > 0, "component"]
    sizes = table.loc[table["community"] > 0, "community"].value_counts().sort_values(
        ascending=False)
    comp_sizes = linked_components.value_counts()
    top = products.sort_values(["pagerank", "id"], ascending=[False, True]).head(5)
    return {
        "pagerank_top_share": top_share(products["pagerank"]),
        "pagerank_top_products": [i[2:] for i in top["id"]],
        "pagerank_max": float(products["pagerank"].max()) if len(products) else float("nan"),
        "components": int(comp_sizes.size),
        "largest_component": int(comp_sizes.max()) if comp_sizes.size else 0,
        "isolated_vertices": int((table["component"] == 0).sum()),
        "communities": int(sizes.size),
        "largest_community": int(sizes.iloc[0]) if sizes.size else 0,
        "community_sizes": [int(n) for n in sizes.iloc[:COMMUNITY_SIZES]],
    }


# --- the whole graph ------------------------------------------------------------------------------
def vertices(user_degrees: DataFrame, product_degrees: DataFrame, names: DataFrame,
             measured: DataFrame | None = None) -> DataFrame:
    """(id, type, original_id, description, degree): users as `u:<id>`, products (the whole
    catalogue, in-degree 0 included) as `p:<id>`; degree = out-degree for users, in-degree for
    products, in the recommendation graph. With `measured` (id + MEASURE_COLUMNS), those too."""
    users = user_degrees.select(
        F.concat(F.lit("u:"), "user_id").alias("id"), F.lit("user").alias("type"),
        F.col("user_id").alias("original_id"), F.lit(None).cast("string").alias("description"),
        F.col("degree").cast("long").alias("degree"),
    )
    products = product_degrees.join(names, "product_id", "left").select(
        F.concat(F.lit("p:"), "product_id").alias("id"), F.lit("product").alias("type"),
        F.col("product_id").alias("original_id"), "description",
        F.col("degree").cast("long").alias("degree"),
    )
    both = users.unionByName(products)
    if measured is None:
        return both
    return both.join(F.broadcast(measured), "id", "left")


def build(
    spark: SparkSession, result: Any, sales: DataFrame, path: TrainPath | None = None,
) -> Graph:
    """The graph of a `spark.pipeline.TrainResult` trained on `sales` (the `Sale` shape), on the
    path its cycle took (`result.path`) unless `path` says otherwise."""
    version = int(result.model_version)
    path = result.path if path is None else path
    bought = purchases(sales).cache()
    products = catalogue(sales).cache()
    names = descriptions(sales).cache()
    listed = edge_list(result.recommendations, version)  # the recommendations are cached
    why = because(spark, listed, bought, result.item_factors, path)
    edges = listed.join(why, ["user_id", "product_id"], "left").select(
        "user_id", "product_id", "score", "rank", "model_version",
        F.coalesce("because", F.array().cast("array<string>")).alias("because"),
    ).cache()

    rec_summary, rec_degrees, rec_dist = figures(edges, products)
    buy_summary, buy_degrees, buy_dist = figures(bought, products)
    user_degrees = edges.groupBy("user_id").agg(F.count(F.lit(1)).alias("degree"))
    started = time.perf_counter()
    measured = analyse({"recommendations": edges, "purchases": bought}, products,
                       rec_summary["edges"] + buy_summary["edges"])
    rec_measures = measures(measured["recommendations"])
    buy_measures = measures(measured["purchases"])
    graphx_seconds = time.perf_counter() - started
    rec_summary.update(analytics_figures(rec_measures))
    buy_summary.update(analytics_figures(buy_measures))
    table = rec_measures.merge(
        buy_measures.rename(columns={c: f"purchase_{c}" for c in ("pagerank", "component",
                                                                   "community")}),
        on="id", how="left",
    )
    measured = spark.createDataFrame(table, MEASURE_SCHEMA)
    verts = vertices(user_degrees, rec_degrees, names, measured).cache()
    n_vertices = verts.count()
    dist_rows = [
        {"graph": graph, "degree": d, "products": c}
        for graph, dist in (("recommendations", rec_dist), ("purchases", buy_dist))
        for d, c in dist
    ]
    rank_of = {graph: dict(zip(m["id"], m["pagerank"], strict=True))
               for graph, m in (("recommendations", rec_measures), ("purchases", buy_measures))}
    top_rows = [
        {"graph": graph, **row, "pagerank": rank_of[graph].get(f"p:{row['product_id']}")}
        for graph, degrees in (("recommendations", rec_degrees), ("purchases", buy_degrees))
        for row in top(degrees, names)
    ]
    summary = {
        "model_version": version,
        "vertices": n_vertices,
        "recommendations": rec_summary,
        "purchases": buy_summary,
        "graphx": {
            "pagerank_iterations": PAGERANK_ITERATIONS, "reset_prob": graphx.RESET_PROB,
            "undirected": True, "community_steps": COMMUNITY_STEPS, "top_share": TOP_SHARE,
        },
    }
    # Dropped only with the graph: unpersisting what a cached plan reads can drop that cache too.
    cached = [bought, products, names, rec_degrees, buy_degrees]
    return Graph(version, edges, verts, dist_rows, top_rows, summary, cached,
                 {"graphx": graphx_seconds})
