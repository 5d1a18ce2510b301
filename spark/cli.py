"""`recsys stream` and `recsys train`: the commands around spark/job.py.

Each checks what it needs before starting Spark (flags valid, every topic on the broker, a --file
readable and its CSV mapping resolved: one line and exit 2 on a mistake), then builds the one
Spark session, runs the job and stops Spark. The streaming job and the training cycle are in
spark/job.py; this module only parses, checks, wires signals and prints.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from typing import Any

from recsys.settings import Settings, override
from recsys.topics import missing_topics
from schemas.topics import PROMOTED
from spark import job
from spark.csv_input import CsvMapping, read_purchases_csv, resolve_file
from spark.publish import Topics
from spark.store import Store

log = logging.getLogger(__name__)


def _topics(args: argparse.Namespace) -> Topics:
    prefix = getattr(args, "topic_prefix", None)
    return Topics.with_prefix(prefix or "")


def stream_cli(settings: Settings, args: argparse.Namespace) -> int:
    """`recsys stream`: run until SIGTERM/SIGINT (or, with --once, until the topic is read)."""
    from spark import session

    settings = override(
        settings,
        train_threshold=args.threshold,
        train_max_wait_seconds=args.max_wait,
        trigger_seconds=args.trigger_seconds,
        max_offsets_per_trigger=args.max_offsets,
    )
    topics = _topics(args)
    needed = [topics.sales, topics.dlq, topics.model_ready, topics.recommendations,
              topics.graph_edges, topics.model_factors, topics.shadow]
    if settings.feedback_retrain_share:
        needed.append(topics.feedback)
    problem = missing_topics(settings, needed)
    if problem:
        print(f"recsys stream: {problem}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():
            log.warning("%s again: still finishing the batch in progress",
                        signal.Signals(signum).name)
        else:
            log.info("%s: stopping after the batch in progress", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    spark = session.build(settings, "recsys-stream")
    try:
        stream = job.StreamJob(spark, settings, topics)
        stream.start(available_now=args.once)
        code = stream.run(stop)
    finally:
        spark.stop()
        for s, h in previous.items():
            signal.signal(s, h)
    return code


def train_cli(settings: Settings, args: argparse.Namespace) -> int:
    """`recsys train`: one model on the accumulated store, or on a CSV with --file; published
    like the streaming job's (trigger "manual" or "file"). A --file's mapping is resolved before
    Spark starts (every mistake one line, exit 2); tuning first with RECSYS_TUNE_BEFORE_TRAIN."""
    return resolve_file("train", args) or _train(settings, args)


def _train(settings: Settings, args: argparse.Namespace) -> int:
    from spark import session

    topics = _topics(args)
    problem = missing_topics(settings, [topics.model_ready, topics.recommendations,
                                        topics.graph_edges, topics.model_factors, topics.shadow])
    if problem:
        print(f"recsys train: {problem}", file=sys.stderr)
        return 2
    spark = session.build(settings, "recsys-train")
    started = time.perf_counter()
    try:
        if args.file:
            sales = read_purchases_csv(spark, args.file, CsvMapping.from_args(args))
            done = job.train_and_publish(spark, settings, topics, sales, "file", started)
        else:
            store = Store(spark, settings.store)
            if not store.has_data():
                print(f"recsys train: the store {settings.store} is empty: run `recsys stream` "
                      "first, or train on a file with --file", file=sys.stderr)
                return 1
            state = store.load_state()
            sales = store.read()
            done = job.train_and_publish(spark, settings, topics, sales, "manual", started)
            state.model_trained(state.events, time.time())
            store.save_state(state)
    except ValueError as exc:  # nothing to train on, a bad CSV mapping
        print(f"recsys train: {exc}", file=sys.stderr)
        return 1
    finally:
        spark.stop()
    mr = done.model_ready
    promoted = mr["status"] == PROMOTED
    print(f"model {mr['model_version']} ({mr['trigger']}) {mr['status']}: {mr['status_reason']}")
    print(f"  {mr['events']:,} events, {mr['users']:,} users, {mr['products']:,} products; "
          f"{done.recommendations:,} lists on "
          f"{topics.recommendations if promoted else topics.shadow}"
          + (f", {done.graph_edges:,} graph edges on {topics.graph_edges} (export {done.export})"
             if promoted else "") + f", model-ready on {topics.model_ready}; "
          f"model {mr['serving']} serves")
    metrics = mr["metrics"]
    base = mr["baseline_metrics"]
    theirs = mr["champion_metrics"]
    for name in sorted(n for n in metrics if n in base):
        print(f"  {name:<18} {metrics[name]:.4f}   popularity {base[name]:.4f}"
              + (f"   champion {theirs[name]:.4f}" if name in theirs else ""))
    graph = {n: v for n, v in metrics.items() if n not in base}
    if graph:
        print("  graph: " + ", ".join(f"{n.removeprefix('graph_')} {v:g}"
                                      for n, v in sorted(graph.items())))
    print(f"  cycle {done.cycle_seconds:.1f} s, ALS.fit {mr['train_seconds']:.1f} s, "
          f"trained at {mr['trained_at']:%Y-%m-%d %H:%M:%S} UTC, saved to {mr['model_path']}")
    return 0
