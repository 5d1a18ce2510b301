"""The streaming job and one training cycle: the wiring of ingest, store, training and publishing.

`recsys stream` is a long-running Structured Streaming query on `sales` (Kafka source, checkpoint
under `settings.checkpoints`). Each micro-batch is handled in foreachBatch (see `StreamJob._batch`
for the commit order); when the valid events accumulated since the last model reach
`settings.train_threshold` (or `train_max_wait_seconds` passed with at least one new event, or the
aggregator's `feedback` says the newest model does worse online than offline, see spark/feedback.py),
a model is trained on ALL accumulated events and published: recommendations first, then the
recommendation graph (exported under `settings.export_dir` and put on graph-edges), then
model-ready, whose `trigger` says which of them fired.

`recsys train` runs the same training and publishing (`train_and_publish`) once, on the store or
on a purchases CSV. The commands themselves are in spark/cli.py, when to train in spark/trigger.py,
the progress report's offsets in spark/offsets.py, the model versions in spark/registry.py.

SIGTERM/SIGINT stop the query after the batch in progress (and its training, if one started):
the handler only sets an event; the main thread waits for the batch lock, then stops the query.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyspark.errors import StreamingQueryException
from pyspark.sql import DataFrame, Observation, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming import StreamingQuery

from recsys.settings import Settings
from schemas.topics import PROMOTED, REJECTED
from spark import ingest, publish
from spark.feedback import FeedbackWatch
from spark.offsets import lag, ranges
from spark.publish import Topics
from spark.registry import Models
from spark.store import Store, StoreState, offset_ranges
from spark.trigger import FEEDBACK, Decision, decide, warm_up_now

log = logging.getLogger(__name__)

# After a failed training, wait this long before trying again (the batches keep flowing).
TRAIN_RETRY_SECONDS = 60.0
# Bad records named one by one in the log per batch; the rest are counted.
LOGGED_BAD = 10


class StopRequested(RuntimeError):
    """Raised in a batch that started after the stop was requested: it is not committed and
    runs again on the next start, from the checkpoint."""


@dataclass
class Published:
    """What one training cycle put on Kafka."""

    result: Any  # spark.pipeline.TrainResult
    model_ready: dict[str, Any]
    recommendations: int
    cycle_seconds: float  # trigger -> model-ready
    recommendations_seconds: float  # trigger -> every recommendation on the topic
    graph_edges: int = 0
    export: Path | None = None  # the graph's export folder


def train_and_publish(
    spark: SparkSession,
    settings: Settings,
    topics: Topics,
    sales: DataFrame,
    trigger: str,
    started: float | None = None,
    reason: str | None = None,
) -> Published:
    """Train on `sales` (the codes that are not products left out), score the new model and the
    one in service on the same test window, and let the gate (spark/gate.py) decide.

    Promoted: recommendations, the saved model, the graph (exported, on graph-edges), the factors
    (for the speed layer), then model-ready (status promoted); the model serves and the factors
    of the one it replaces are retired. Rejected: its lists go to recommendations-shadow (judged
    online, never served), the model is saved (`recsys models promote` can still serve it), and
    model-ready says rejected, the champion stays.

    `started` (perf_counter) is when the trigger fired: model-ready's cycle_seconds runs from
    there to just before model-ready is sent; `Published.recommendations_seconds` to the moment
    every list is on its topic. `reason` (why the trigger fired, when there is more to say than
    its name) goes into model-ready's params as `trigger_reason`.
    """
    from spark import gate, pipeline  # heavy imports (MLlib) only when a model is trained
    from spark.prepare import products_only

    started = time.perf_counter() if started is None else started
    models = Models(spark, settings.models)
    serving = models.serving()
    version = models.next_version()
    log.info("training model %d (trigger %s)", version, trigger)
    sales = products_only(sales, settings.non_product_pattern)
    if settings.tune_before_train:  # rank, reg and alpha chosen on this cycle's train side
        from spark import tune

        settings = tune.tuned_settings(spark, sales, settings)
    champion_version, champion = _champion(spark, models, serving, version)
    result = pipeline.run_training(spark, sales, settings, version, champion,
                                   indexes=pipeline.load_indexes(spark, settings))
    decision = gate.decide(result.metrics, result.baseline_metrics, result.champion_metrics,
                           settings, champion_version)
    log.info("model %d %s by the gate: %s", version,
             "promoted" if decision.promote else "rejected", decision.reason)
    edges, export, chunks = 0, None, 0
    try:
        lists_topic = topics.recommendations if decision.promote else topics.shadow
        n = publish.publish_recommendations(result.recommendations, version, settings,
                                            lists_topic)
        to_recommendations = time.perf_counter() - started
        pipeline.save(spark, result)
        offsets = offset_ranges(sales)
        if decision.promote:
            edges, export = publish_graph(spark, settings, topics, result, sales)
            chunks = publish.publish_factors(result, offsets, settings, topics.model_factors)
        cycle = time.perf_counter() - started
        record = publish.model_ready_record(result, trigger, offsets, cycle)
        record.update(
            status=PROMOTED if decision.promote else REJECTED,
            serving=version if decision.promote else champion_version,
            status_reason=decision.reason, champion_version=champion_version,
            champion_metrics=publish.finite(result.champion_metrics or {}),
        )
        if reason:
            record["params"]["trigger_reason"] = reason
        publish.publish_model_ready(record, settings, topics.model_ready)
    finally:
        result.recommendations.unpersist()
    models.record(record, chunks)
    if decision.promote:
        models.serve(version, chunks)
        old = serving or {}
        if old.get("factor_chunks") and int(old["model_version"]) != version:
            publish.retire_factors(int(old["model_version"]), int(old["factor_chunks"]),
                                   settings, topics.model_factors)
    fit = result.train_seconds
    log.info(
        "model %d published (%s): %d users' lists on %s after %.1f s (ALS.fit %.1f s, %.0f%%); "
        "model-ready after %.1f s", version, record["status"], n, lists_topic,
        to_recommendations, fit, 100.0 * fit / to_recommendations if to_recommendations else 0.0,
        cycle,
    )
    return Published(result, record, n, cycle, to_recommendations, edges, export)


def _champion(spark: SparkSession, models: Models, serving: dict[str, Any] | None, version: int
              ) -> tuple[int, Any]:
    """(version, ALSModel) of the model in service, or (0, None) before the first or when its
    folder is gone (a crashed cycle re-run of the same version faces its own champion)."""
    from pyspark.ml.recommendation import ALSModel

    if not serving or int(serving["model_version"]) == version:
        return 0, None
    champion = int(serving["model_version"])
    if champion not in models.saved():
        log.warning("model %d serves but its folder %s is gone: the gate compares with "
                    "popularity only", champion, models.path(champion))
        return 0, None
    return champion, ALSModel.load(models.path(champion))


def publish_graph(
    spark: SparkSession, settings: Settings, topics: Topics, result: Any, sales: DataFrame
) -> tuple[int, Path]:
    """Build the model's recommendation graph (GraphX analytics included), export it under
    `settings.export_dir`, put its edges on graph-edges; (edges published, export folder). The
    headline figures go into `result.metrics` (as `graph_*`), so model-ready carries them."""
    from spark import graph, graph_export

    started = time.perf_counter()
    g = graph.build(spark, result, sales)
    result.metrics.update(g.headline())
    try:
        where = graph_export.export(g, settings.export_dir)
        n = publish.publish_graph_edges(g.edges, g.model_version, settings, topics.graph_edges)
    finally:
        g.unpersist()
    rec, buy = g.summary["recommendations"], g.summary["purchases"]
    log.info(
        "graph of model %d: %d edges, %d vertices, %d of %d products recommended (coverage "
        "%.3f, Gini %.3f); top 1%% of products hold %.3f of the PageRank (purchases %.3f), %d "
        "communities (largest %d), GraphX %.1f s; exported to %s, %.1f s", g.model_version, n,
        g.summary["vertices"], rec["products"], rec["catalogue"], rec["coverage"],
        rec["gini_in_degree"], rec["pagerank_top_share"], buy["pagerank_top_share"],
        rec["communities"], rec["largest_community"], g.seconds.get("graphx", 0.0), where,
        time.perf_counter() - started,
    )
    return n, where


# --- the streaming job ------------------------------------------------------------------------------
def failure_cause(failure: Any) -> str:
    """The innermost `Caused by:` of a query failure's text (Spark wraps the batch's Python
    exception, itself wrapping the JVM's, in hundreds of lines), else its first line."""
    text = str(failure)
    causes = [line.split("Caused by:", 1)[1].strip() for line in text.splitlines()
              if "Caused by:" in line]
    return causes[-1] if causes else (text.splitlines() or ["?"])[0]


class StreamJob:
    """The ingest query and its threshold trigger; usable from the CLI and in-process (tests)."""

    def __init__(self, spark: SparkSession, settings: Settings, topics: Topics | None = None
                 ) -> None:
        self.spark = spark
        self.settings = settings
        self.topics = topics or Topics()
        self.store = Store(spark, settings.store)
        self.checkpoint = f"{settings.checkpoints.rstrip('/')}/ingest"
        self.state = StoreState()
        self.query: StreamingQuery | None = None
        self.published: list[Published] = []
        self._lock = threading.RLock()
        self._stopping = False
        self._query_id = ""
        self._ready = threading.Event()
        self._retry_at = 0.0
        self._last_progress = -1
        self.model_version = 0  # the model in service (read at start): its feedback counts
        self.feedback: FeedbackWatch | None = None
        self._feedback_fired: set[int] = set()  # versions already retrained for their feedback
        self._warmed = False  # spark.warmup ran in this job

    # -- life cycle --
    def start(self, available_now: bool = False) -> StreamingQuery:
        """Start the query (returns at once); `available_now` reads what is on the topic, then
        stops."""
        self.state = self.store.load_state()
        s = self.settings
        serving = Models(self.spark, s.models).serving()
        self.model_version = int(serving["model_version"]) if serving else 0
        if s.feedback_retrain_share and self.feedback is None:
            self.feedback = FeedbackWatch(s, self.topics.feedback).start()
        log.info(
            "stream %s -> %s (checkpoint %s); %d/%d new events toward the next model",
            self.topics.sales, self.store.root, self.checkpoint, self.state.since_model,
            s.train_threshold,
        )
        writer = (
            ingest.kafka_source(self.spark, s, self.topics.sales)
            .writeStream.queryName(f"ingest:{self.topics.sales}")
            .foreachBatch(self._batch)
            .option("checkpointLocation", self.checkpoint)
        )
        if available_now:
            writer = writer.trigger(availableNow=True)
        else:
            writer = writer.trigger(processingTime=f"{s.trigger_seconds} seconds")
        self.query = writer.start()
        self._query_id = str(self.query.id)
        self._ready.set()
        return self.query

    def run(self, stop: threading.Event) -> int:
        """Wait for the query (or `stop`), checking max-wait and logging progress; 0 when the
        query ended or was stopped cleanly, 1 when it failed."""
        assert self.query is not None, "start() first"
        while not stop.is_set():
            try:  # returns as soon as the query ends (an availableNow run: at once)
                self.query.awaitTermination(1.0)
            except StreamingQueryException:
                pass  # a failure: told below from query.exception()
            self._log_progress()
            if not self.query.isActive:
                failure = self.query.exception()
                if failure is not None and not self._stopping:
                    # One line with the cause (a full disk, a lost broker), the pages of JVM and
                    # Python trace around it only at DEBUG (the JVM logged its own already).
                    log.error("query failed: %s", failure_cause(failure))
                    log.debug("query failure in full: %s", failure)
                    return 1
                log.info("query finished; %d/%d new events toward the next model",
                         self.state.since_model, self.settings.train_threshold)
                return 0
            timed = self.settings.train_max_wait_seconds or self.settings.feedback_retrain_share
            if timed and self._lock.acquire(blocking=False):
                try:
                    self._maybe_train(time.time())
                finally:
                    self._lock.release()
        self.stop()
        return 0

    def stop(self) -> None:
        """Stop after the batch in progress: take the batch lock (waits for it), mark stopping,
        then stop the query. A batch that starts meanwhile refuses to run (StopRequested) and
        is not committed."""
        log.info("stopping after the batch in progress")
        with self._lock:
            self._stopping = True
        if self.feedback is not None:
            self.feedback.stop()
        if self.query is not None and self.query.isActive:
            try:
                self.query.stop()
            except Exception as exc:  # a batch refused with StopRequested ends the query too
                log.debug("query stop: %s", exc)
        log.info("stopped; %d/%d new events toward the next model", self.state.since_model,
                 self.settings.train_threshold)

    def _log_progress(self) -> None:
        p = self.query.lastProgress if self.query is not None else None
        if not p or p.get("batchId", -1) == self._last_progress:
            return
        self._last_progress = p["batchId"]
        source = (p.get("sources") or [{}])[0]
        behind = lag(source.get("endOffset"), source.get("latestOffset"))
        log.info(
            "progress: batch %d, %d rows [%s], input %.0f rows/s, processed %.0f rows/s, lag %s",
            p["batchId"], p.get("numInputRows", 0),
            ranges(source.get("startOffset"), source.get("endOffset")),
            p.get("inputRowsPerSecond") or 0.0, p.get("processedRowsPerSecond") or 0.0,
            "?" if behind is None else f"{behind} records",
        )

    # -- one micro-batch --
    def _batch(self, batch: DataFrame, batch_id: int) -> None:
        """Commit order of one micro-batch. foreachBatch is at-least-once: a crash anywhere below
        runs this batch again, with the same id and the same offsets, so every step is idempotent
        on that:

        1. good rows -> store folder <query>/<batch>, in the pass that reads and decodes the
           batch and counts it; deduped in the batch and against the store, replaced on a re-run
        2. bad rows (when that count found some) -> sales.dlq (keyed topic[partition]@offset; a
           re-run sends them again)
        3. counters -> _state.json (a re-run replaces its own count, never adds it twice)
        4. threshold reached -> train on the whole store -> recommendations -> model-ready ->
           models/LATEST -> counters reset. A re-run after the reset does not train again; one
           before LATEST trains the same version again and publishes the same ids.
        5. return -> Spark records the batch in the checkpoint's commit log (offsets done).
        """
        self._ready.wait()
        with self._lock:
            if self._stopping:
                raise StopRequested(f"batch {batch_id} not run: stopping")
            started = time.perf_counter()
            key = f"{self._query_id}/{batch_id}"
            # Counted on the way through the store's write. The observation also keeps the
            # optimizer from pushing the split's filter into the decoding (see ingest.split).
            seen = Observation(f"read-{key}")
            good, bad = ingest.split(ingest.decode(batch).observe(
                seen, F.count(F.lit(1)).alias("n"), F.count("reason").alias("bad")))
            new = self.store.append_batch(good, self._query_id, batch_id)  # (1)
            read, n_bad = int(seen.get["n"]), int(seen.get["bad"])
            t_store = time.perf_counter()
            if n_bad:  # (2) reads the batch from Kafka again: dead letters are rare
                self._dead_letter(bad, n_bad)
            t_dlq = time.perf_counter()
            now = time.time()
            self.state.count_batch(key, new, now)
            self.store.save_state(self.state)  # (3)
            done = time.perf_counter()
            seconds = done - started
            log.info(
                "batch %d: %d read (%d new, %d duplicate, %d dead-lettered) in %.1f s "
                "(store %.1f, dlq %.1f, state %.1f), %.0f rows/s; "
                "%d/%d new events toward the next model",
                batch_id, read, new, read - n_bad - new, n_bad, seconds, t_store - started,
                t_dlq - t_store, done - t_dlq, read / seconds if seconds else 0.0,
                self.state.since_model, self.settings.train_threshold,
            )
            self._maybe_warm_up(now)
            self._maybe_train(now)  # (4)

    def _dead_letter(self, bad: DataFrame, n_bad: int) -> None:
        bad = bad.persist()  # two reads below; only the bad rows are kept
        try:
            publish.write_kafka(ingest.dead_letters(bad), self.settings, self.topics.dlq)
            shown = bad.select(
                ingest.source_label(F.col("topic"), F.col("partition"), F.col("offset")).alias("src"),
                "reason",
            ).limit(LOGGED_BAD).collect()
        finally:
            bad.unpersist()
        for r in shown:
            log.warning("%s: dead-lettered to %s: %s", r["src"], self.topics.dlq, r["reason"])
        if n_bad > len(shown):
            log.warning("... and %d more dead-lettered to %s", n_bad - len(shown), self.topics.dlq)

    # -- the trigger (the policy is spark/trigger.py; the job acts on its decision) --
    def _decision(self, now: float) -> Decision:
        """The trigger policy on this job's counters and the feedback of the model in service."""
        record = self.feedback.latest(self.model_version) if self.feedback is not None else None
        return decide(self.state, self.settings, now, record, self._feedback_fired)

    def _maybe_warm_up(self, now: float) -> None:
        """Warm up once per job, while a model is near but not due yet."""
        if self._warmed or not warm_up_now(self.state, self.settings, now, self._decision(now)):
            return
        from spark import warmup

        self._warmed = True
        warmup.try_warm_up(self.spark, self.settings)

    def _maybe_train(self, now: float) -> None:
        decision = self._decision(now)
        if not decision or now < self._retry_at:
            return
        started = time.perf_counter()
        reason = decision.reason
        log.info("%s reached: %d new events since the last model (threshold %d)%s",
                 decision.trigger, self.state.since_model, self.settings.train_threshold,
                 f"; {reason}" if reason else "")
        if decision.trigger == FEEDBACK:
            self._feedback_fired.add(self.model_version)
        try:
            sales = self.store.read()
            done = train_and_publish(self.spark, self.settings, self.topics, sales,
                                     decision.trigger, started, reason)
        except Exception:
            self._retry_at = time.time() + TRAIN_RETRY_SECONDS
            log.exception("training failed; ingest goes on, next attempt in %.0f s",
                          TRAIN_RETRY_SECONDS)
            return
        self.published.append(done)
        self.model_version = int(done.model_ready["serving"])  # the feedback that counts
        self.state.model_trained(self.state.events, time.time())
        self.store.save_state(self.state)
