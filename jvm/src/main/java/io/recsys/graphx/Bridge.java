package io.recsys.graphx;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.List;

import org.apache.spark.api.java.JavaRDD;
import org.apache.spark.api.java.JavaSparkContext;
import org.apache.spark.graphx.Edge;
import org.apache.spark.graphx.EdgeContext;
import org.apache.spark.graphx.Graph;
import org.apache.spark.graphx.TripletFields;
import org.apache.spark.graphx.VertexRDD;
import org.apache.spark.graphx.lib.ConnectedComponents;
import org.apache.spark.graphx.lib.PageRank;
import org.apache.spark.sql.Column;
import org.apache.spark.sql.Dataset;
import org.apache.spark.sql.Row;
import org.apache.spark.sql.RowFactory;
import org.apache.spark.sql.SparkSession;
import org.apache.spark.sql.functions;
import org.apache.spark.sql.types.DataTypes;
import org.apache.spark.sql.types.StructType;
import org.apache.spark.storage.StorageLevel;

import scala.Option;
import scala.Tuple2;
import scala.reflect.ClassTag;
import scala.runtime.AbstractFunction1;
import scala.runtime.AbstractFunction2;
import scala.runtime.AbstractFunction3;
import scala.runtime.BoxedUnit;

/**
 * GraphX for PySpark: DataFrames in, DataFrames out, so nothing GraphX-specific crosses into
 * Python (spark/graphx.py is the one module that calls this class through py4j).
 *
 * <p>Input: an edge DataFrame with columns {@code src} and {@code dst} (any type, read as
 * strings), and optionally a vertex DataFrame with a column {@code id} for vertices without an
 * edge. Vertex names are sorted and numbered 0..n-1 (GraphX needs long ids), so every result is
 * deterministic and a "smallest id" is the smallest name. Duplicate edges count once.
 *
 * <p>Output: one row per vertex, sorted by {@code id} (string), plus the measure. GraphX runs
 * distributed; its per-vertex result (one number per vertex) is collected and returned as a local
 * DataFrame, so it is materialised before the graphs behind it are unpersisted (otherwise every
 * later action would recompute the iterations) and costs no join. The vertex names are collected
 * too (to number them): fine up to some millions of vertices on a driver of a few GB.
 *
 * <p>PageRank is GraphX's: edge weights ignored, rank of sink vertices not redistributed, ranks
 * scaled to sum to the number of vertices. With {@code undirected} every edge also counts
 * reversed: on such a graph (no sinks but isolated vertices) it equals networkx's PageRank times
 * the number of vertices.
 */
public final class Bridge {
  /** Bumped when an entry point changes; spark/graphx.py checks it at session start. */
  public static final String VERSION = "2";

  private static final ClassTag<Object> DOUBLE = ClassTag.Double();
  private static final StorageLevel MEMORY = StorageLevel.MEMORY_ONLY();
  private static final StructType DEGREES = new StructType()
      .add("id", DataTypes.StringType, false)
      .add("in_degree", DataTypes.LongType, false)
      .add("out_degree", DataTypes.LongType, false)
      .add("degree", DataTypes.LongType, false);

  private Bridge() {}

  public static String version() {
    return VERSION;
  }

  // --- entry points ---------------------------------------------------------------------------

  /** (id, pagerank) after a fixed number of iterations. */
  public static Dataset<Row> pageRank(
      Dataset<Row> edges, Dataset<Row> vertices, boolean undirected, int iterations,
      double resetProb) {
    Indexed g = Indexed.of(edges, vertices, undirected);
    try {
      Graph<Object, Object> ranks = PageRank.run(g.graph, iterations, resetProb, DOUBLE, DOUBLE);
      return g.done(g.measure(ranks.vertices(), "pagerank"), ranks);
    } finally {
      g.unpersist();
    }
  }

  /** (id, pagerank) iterated until no rank moves by more than {@code tol}. */
  public static Dataset<Row> pageRankUntilConvergence(
      Dataset<Row> edges, Dataset<Row> vertices, boolean undirected, double tol,
      double resetProb) {
    Indexed g = Indexed.of(edges, vertices, undirected);
    try {
      Graph<Object, Object> ranks =
          PageRank.runUntilConvergence(g.graph, tol, resetProb, DOUBLE, DOUBLE);
      return g.done(g.measure(ranks.vertices(), "pagerank"), ranks);
    } finally {
      g.unpersist();
    }
  }

  /** (id, component): the smallest vertex id of its (weakly) connected component. */
  public static Dataset<Row> connectedComponents(Dataset<Row> edges, Dataset<Row> vertices) {
    Indexed g = Indexed.of(edges, vertices, false);
    try {
      Graph<Object, Object> cc = ConnectedComponents.run(g.graph, DOUBLE, DOUBLE);
      return g.done(g.label(cc.vertices(), "component"), cc);
    } finally {
      g.unpersist();
    }
  }

  /**
   * (id, community): the vertex whose label its community took after {@code steps} rounds of
   * synchronous label propagation (edges count both ways; see {@link Communities}).
   */
  public static Dataset<Row> labelPropagation(
      Dataset<Row> edges, Dataset<Row> vertices, int steps) {
    Indexed g = Indexed.of(edges, vertices, false);
    try {
      Graph<Object, Object> lpa = Communities.run(g.graph, steps);
      return g.done(g.label(lpa.vertices(), "community"), lpa);
    } finally {
      g.unpersist();
    }
  }

  /** (id, in_degree, out_degree, degree) of the directed graph; 0 for isolated vertices. */
  public static Dataset<Row> degrees(Dataset<Row> edges, Dataset<Row> vertices) {
    Indexed g = Indexed.of(edges, vertices, false);
    try {
      return g.done(g.degrees());
    } finally {
      g.unpersist();
    }
  }

  /**
   * Every measure from one indexed graph: (id, in_degree, out_degree, degree, pagerank,
   * component, community). PageRank on the undirected graph ({@code iterations} fixed, or until
   * {@code tol} when iterations <= 0); components and communities do not depend on direction.
   * {@code partitions} > 0: the graph's edge partitions (each GraphX iteration runs a few stages
   * of that many tasks; on a small graph their fixed cost is most of the time).
   */
  public static Dataset<Row> analyse(
      Dataset<Row> edges, Dataset<Row> vertices, int iterations, double tol, double resetProb,
      int lpaSteps, int partitions) {
    Timer timer = new Timer();
    Indexed directed = Indexed.of(edges, vertices, false);
    HashMap<Long, long[]> inOut = directed.inOut(); // before the undirected copy: one pass
    Indexed g = directed.undirected(partitions);
    directed.unpersist();
    timer.lap("index+degrees");
    List<Graph<Object, Object>> made = new ArrayList<>();
    try {
      Graph<Object, Object> ranks = iterations > 0
          ? PageRank.run(g.graph, iterations, resetProb, DOUBLE, DOUBLE)
          : PageRank.runUntilConvergence(g.graph, tol, resetProb, DOUBLE, DOUBLE);
      made.add(ranks);
      HashMap<Long, Object> rank = Indexed.local(ranks.vertices());
      timer.lap("pagerank");
      Graph<Object, Object> cc = ConnectedComponents.run(g.graph, DOUBLE, DOUBLE);
      made.add(cc);
      HashMap<Long, Object> component = Indexed.local(cc.vertices());
      timer.lap("components");
      Graph<Object, Object> lpa = Communities.run(g.graph, lpaSteps);
      made.add(lpa);
      HashMap<Long, Object> community = Indexed.local(lpa.vertices());
      timer.lap("communities");
      String[] names = g.names;
      List<Row> rows = new ArrayList<>(names.length);
      long[] none = {0L, 0L};
      for (int i = 0; i < names.length; i++) {
        long v = i;
        long[] io = inOut.getOrDefault(v, none);
        rows.add(RowFactory.create(names[i], io[0], io[1], io[0] + io[1], rank.get(v),
            g.name(component.get(v)), g.name(community.get(v))));
      }
      StructType schema = DEGREES
          .add("pagerank", DataTypes.DoubleType, false)
          .add("component", DataTypes.StringType, false)
          .add("community", DataTypes.StringType, false);
      Dataset<Row> result = g.spark.createDataFrame(rows, schema);
      lastTimings = timer.toString();
      return g.done(result, made.toArray(new Graph[0]));
    } finally {
      g.unpersist();
    }
  }

  private static volatile String lastTimings = "";

  /** Seconds per phase of the last {@link #analyse} call, e.g. "index+degrees 1.2s, ...". */
  public static String lastTimings() {
    return lastTimings;
  }

  /** Wall-clock laps, for "where the time goes". */
  private static final class Timer {
    private long last = System.nanoTime();
    private final StringBuilder laps = new StringBuilder();

    void lap(String what) {
      long now = System.nanoTime();
      laps.append(laps.length() == 0 ? "" : ", ").append(what)
          .append(String.format(" %.1fs", (now - last) / 1e9));
      last = now;
    }

    @Override
    public String toString() {
      return laps.toString();
    }
  }

  // --- label propagation ----------------------------------------------------------------------

  /**
   * Synchronous label propagation on GraphX, as {@code org.apache.spark.graphx.lib.
   * LabelPropagation}: every vertex starts with its own id as label, and each round takes the
   * label most frequent among its neighbours (its own not counted; no neighbour: it keeps its
   * label). Two differences, both for speed and repeatability: the neighbour counts are merged
   * into one mutable map per vertex (GraphX's merges immutable maps, quadratic in a vertex's
   * degree: 16 s of 34 on the bundled purchase graph), and a tie goes to the smallest label
   * (GraphX's to whichever its hash map yields first).
   */
  static final class Communities {
    private static final ClassTag<Object> LONG = ClassTag.Long();
    @SuppressWarnings("unchecked")
    private static final ClassTag<HashMap<Long, Long>> COUNTS =
        (ClassTag<HashMap<Long, Long>>) (ClassTag<?>) ClassTag.apply(HashMap.class);

    private Communities() {}

    static Graph<Object, Object> run(Graph<Object, Object> graph, int steps) {
      Graph<Object, Object> labels = graph.mapVertices(new Own(), LONG, null).cache();
      for (int i = 0; i < steps; i++) {
        VertexRDD<HashMap<Long, Long>> counts = labels.aggregateMessages(
            new Send(), new Merge(), TripletFields.All, COUNTS);
        Graph<Object, Object> next =
            labels.outerJoinVertices(counts, new Pick(), COUNTS, LONG, null).cache();
        next.vertices().count(); // materialise before the previous labels go
        labels.unpersistVertices(false);
        labels = next;
      }
      return labels;
    }

    /** Label = own id. */
    static final class Own extends AbstractFunction2<Object, Object, Object>
        implements java.io.Serializable {
      @Override
      public Object apply(Object vid, Object attr) {
        return vid;
      }
    }

    /** Each end of an edge hears the other's label once. */
    static final class Send
        extends AbstractFunction1<EdgeContext<Object, Object, HashMap<Long, Long>>, BoxedUnit>
        implements java.io.Serializable {
      @Override
      public BoxedUnit apply(EdgeContext<Object, Object, HashMap<Long, Long>> ctx) {
        HashMap<Long, Long> toDst = new HashMap<>(2);
        toDst.put((Long) ctx.srcAttr(), 1L);
        ctx.sendToDst(toDst);
        HashMap<Long, Long> toSrc = new HashMap<>(2);
        toSrc.put((Long) ctx.dstAttr(), 1L);
        ctx.sendToSrc(toSrc);
        return BoxedUnit.UNIT;
      }
    }

    /** Adds the smaller map into the larger (each message is a fresh map: safe to reuse). */
    static final class Merge
        extends AbstractFunction2<HashMap<Long, Long>, HashMap<Long, Long>, HashMap<Long, Long>>
        implements java.io.Serializable {
      @Override
      public HashMap<Long, Long> apply(HashMap<Long, Long> a, HashMap<Long, Long> b) {
        HashMap<Long, Long> big = a.size() >= b.size() ? a : b;
        HashMap<Long, Long> small = big == a ? b : a;
        small.forEach((label, n) -> big.merge(label, n, Long::sum));
        return big;
      }
    }

    /** The most frequent label heard; ties: the smallest; nothing heard: unchanged. */
    static final class Pick
        extends AbstractFunction3<Object, Object, Option<HashMap<Long, Long>>, Object>
        implements java.io.Serializable {
      @Override
      public Object apply(Object vid, Object label, Option<HashMap<Long, Long>> heard) {
        if (heard.isEmpty()) {
          return label;
        }
        long best = 0L;
        long most = -1L;
        for (java.util.Map.Entry<Long, Long> e : heard.get().entrySet()) {
          long n = e.getValue();
          long l = e.getKey();
          if (n > most || (n == most && l < best)) {
            best = l;
            most = n;
          }
        }
        return best;
      }
    }
  }

  // --- the indexed graph ----------------------------------------------------------------------

  /**
   * A graph whose long vertex ids are the positions of the sorted vertex names. The names are
   * collected on the driver (one string per vertex) and broadcast; the edges never leave the
   * executors. Results come back to the driver as one value per vertex and return as a local
   * DataFrame: no join, and nothing left to recompute once the graphs are unpersisted.
   */
  private static final class Indexed {
    final SparkSession spark;
    final String[] names; // vid -> name
    final Dataset<Row> pairs; // s, d: distinct (src, dst) vids, cached
    final Graph<Object, Object> graph;
    final boolean ownsPairs;

    private Indexed(SparkSession spark, String[] names, Dataset<Row> pairs, boolean ownsPairs) {
      this.spark = spark;
      this.names = names;
      this.pairs = pairs;
      this.ownsPairs = ownsPairs;
      JavaSparkContext jsc = JavaSparkContext.fromSparkContext(spark.sparkContext());
      List<Tuple2<Object, Object>> ids = new ArrayList<>(names.length);
      for (long i = 0; i < names.length; i++) {
        ids.add(new Tuple2<>(i, 0.0));
      }
      JavaRDD<Edge<Object>> e = pairs.toJavaRDD()
          .map(r -> new Edge<Object>(r.getLong(0), r.getLong(1), 1.0));
      int slices = Math.max(1, e.getNumPartitions());
      this.graph = Graph.apply(jsc.parallelize(ids, slices).rdd(), e.rdd(), 0.0, MEMORY, MEMORY,
                               DOUBLE, DOUBLE);
    }

    static Indexed of(Dataset<Row> edges, Dataset<Row> vertices, boolean undirected) {
      SparkSession spark = edges.sparkSession();
      Column src = functions.col("src").cast("string");
      Column dst = functions.col("dst").cast("string");
      Dataset<Row> named = edges.select(src.as("src"), dst.as("dst"))
          .where(functions.col("src").isNotNull().and(functions.col("dst").isNotNull()));
      Dataset<Row> all = named.select(functions.col("src").as("id"))
          .union(named.select(functions.col("dst").as("id")));
      if (vertices != null) {
        all = all.union(vertices.select(functions.col("id").cast("string").as("id"))
            .where(functions.col("id").isNotNull()));
      }
      List<Row> distinct = all.distinct().collectAsList();
      String[] names = new String[distinct.size()];
      for (int i = 0; i < names.length; i++) {
        names[i] = distinct.get(i).getString(0);
      }
      Arrays.sort(names);
      List<Row> numbered = new ArrayList<>(names.length);
      for (int i = 0; i < names.length; i++) {
        numbered.add(RowFactory.create(names[i], (long) i));
      }
      StructType schema = new StructType()
          .add("id", DataTypes.StringType, false).add("vid", DataTypes.LongType, false);
      // A local relation: broadcast to the joins, no shuffle of the edges to number them.
      Dataset<Row> index = functions.broadcast(spark.createDataFrame(numbered, schema));
      Dataset<Row> pairs = named
          .join(index.withColumnRenamed("id", "src").withColumnRenamed("vid", "s"), "src")
          .join(index.withColumnRenamed("id", "dst").withColumnRenamed("vid", "d"), "dst")
          .select("s", "d");
      if (undirected) {
        pairs = pairs.union(pairs.select(functions.col("d").as("s"), functions.col("s").as("d")));
      }
      return new Indexed(spark, names, pairs.distinct().persist(MEMORY), true);
    }

    /** The same vertices with every edge also reversed (a pair and its reverse count once), in
     * `partitions` partitions when > 0. */
    Indexed undirected(int partitions) {
      Dataset<Row> both = pairs
          .union(pairs.select(functions.col("d").as("s"), functions.col("s").as("d")))
          .distinct();
      if (partitions > 0) {
        both = both.repartition(partitions);
      }
      both = both.persist(MEMORY);
      return new Indexed(spark, names, both, true);
    }

    /** vid -> {in-degree, out-degree} of the vertices with an edge, in one pass over the pairs. */
    HashMap<Long, long[]> inOut() {
      Column in = functions.col("d").multiply(2);
      Column out = functions.col("s").multiply(2).plus(1);
      List<Row> counts = pairs.select(functions.explode(functions.array(in, out)).as("k"))
          .groupBy("k").count().collectAsList();
      HashMap<Long, long[]> degrees = new HashMap<>();
      for (Row r : counts) {
        long k = r.getLong(0);
        degrees.computeIfAbsent(k / 2, x -> new long[2])[(int) (k % 2)] = r.getLong(1);
      }
      return degrees;
    }

    /** vid -> value of a vertex RDD, on the driver. */
    static HashMap<Long, Object> local(VertexRDD<Object> values) {
      HashMap<Long, Object> out = new HashMap<>();
      for (Tuple2<Object, Object> t : values.toJavaRDD().collect()) {
        out.put((Long) t._1(), t._2());
      }
      return out;
    }

    /** (id, column) from a vertex RDD of doubles. */
    Dataset<Row> measure(VertexRDD<Object> values, String column) {
      HashMap<Long, Object> got = local(values);
      List<Row> rows = new ArrayList<>(names.length);
      for (int i = 0; i < names.length; i++) {
        rows.add(RowFactory.create(names[i], got.get((long) i)));
      }
      StructType schema = new StructType()
          .add("id", DataTypes.StringType, false).add(column, DataTypes.DoubleType, true);
      return spark.createDataFrame(rows, schema);
    }

    /** (id, column) from a vertex RDD of vertex ids (component, community): their names. */
    Dataset<Row> label(VertexRDD<Object> labels, String column) {
      HashMap<Long, Object> got = local(labels);
      List<Row> rows = new ArrayList<>(names.length);
      for (int i = 0; i < names.length; i++) {
        rows.add(RowFactory.create(names[i], name(got.get((long) i))));
      }
      StructType schema = new StructType()
          .add("id", DataTypes.StringType, false).add(column, DataTypes.StringType, true);
      return spark.createDataFrame(rows, schema);
    }

    /** The name of a vertex id (null for null). */
    String name(Object vid) {
      return vid == null ? null : names[(int) (long) (Long) vid];
    }

    /** (id, in_degree, out_degree, degree), 0 where GraphX has no entry. */
    Dataset<Row> degrees() {
      HashMap<Long, Object> in = local(graph.ops().inDegrees());
      HashMap<Long, Object> out = local(graph.ops().outDegrees());
      List<Row> rows = new ArrayList<>(names.length);
      for (int i = 0; i < names.length; i++) {
        long a = ((Integer) in.getOrDefault((long) i, 0)).longValue();
        long b = ((Integer) out.getOrDefault((long) i, 0)).longValue();
        rows.add(RowFactory.create(names[i], a, b, a + b));
      }
      return spark.createDataFrame(rows, DEGREES);
    }

    /** Drop the graphs a result was computed from (the result is already on the driver). */
    @SafeVarargs
    final Dataset<Row> done(Dataset<Row> result, Graph<Object, Object>... made) {
      for (Graph<Object, Object> m : made) {
        m.unpersist(false);
      }
      return result;
    }

    void unpersist() {
      graph.unpersist(false);
      if (ownsPairs) {
        pairs.unpersist(false);
      }
    }
  }
}
