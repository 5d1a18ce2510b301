"""soak: the whole stack on the loopback cluster under a steady load for minutes, with retrains.

Set-up: `LocalCluster` (three KRaft brokers, replication 3 and min ISR 2; a Spark standalone
master and two one-core workers) in a temporary folder, the declared topics, then `recsys stream`
(on the Spark cluster, store/checkpoints/models on the cluster's shared folder), `recsys speed`
and `recsys aggregate`, started by the product's supervisor (tests/reliability/stack.py, the
reliability tier's harness). A producer thread in this process publishes seeded synthetic sales
(recsys/synthetic.py) at a steady rate (default 2,000/s) for `--minutes` (default 10); the stream
job retrains every `--threshold` new events.

Every `--sample-seconds` it records the consumer lag of each reader (the speed layer's and the
aggregator's committed offsets against the end of `sales`; the stream job's from its progress
log) and the resident memory (VmRSS) of every process: brokers, Spark master, workers, executors
and their Python workers, and the three roles with their JVMs. After the load it waits for every
reader to catch up (the ledger balances; at most 15 minutes), then prints (never asserts):

    soak_rate: produced N sales in M min, X/s / target 2000/s = ratio
    soak_lag[<reader>]: p50 / p95 / max records while loaded, then after settling (the
        stream's: records on `sales` not yet stored nor dead-lettered)
    soak_retrains: K models, cycle seconds p50 / max (trigger -> model-ready), ALS.fit p50
    soak_rss[<process>]: MB once the first model is out (every JVM warm) -> MB at the end of
        the load (growth %)
    soak_ledger: the reliability tier's ledger (tests/reliability/ledger.py) over the whole run

A full run takes the minutes plus about 3 of set-up and settling; `make bench` runs it like every
other bench (BENCH_SOAK_MINUTES shortens it, e.g. to 2 for a quick check). On a machine shared
with other work the figures are noisy: lag and cycle times say what this machine managed.
`python -m bench.soak --minutes 10 [--rate 2000] [--threshold 200000] [--keep DIR]`.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROLES = ("stream", "speed", "aggregate")
log = logging.getLogger(__name__)


# --- processes and their memory ---------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return out


def _tree(root: int, children: dict[int, list[int]]) -> list[int]:
    todo, out = [root], []
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _kind(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "?"
    for needle, name in (("CoarseGrainedExecutorBackend", "executor"),
                         ("pyspark.daemon", "python-worker"), ("pyspark/daemon", "python-worker"),
                         ("SparkSubmit", "driver-jvm"), ("deploy.worker.Worker", "jvm"),
                         ("deploy.master.Master", "jvm"), ("kafka.Kafka", "jvm")):
        if needle in cmd:
            return name
    if not cmd:
        return ""  # exited meanwhile
    return "python" if "python" in cmd else cmd.split(" ", 1)[0].rsplit("/", 1)[-1]


def processes(cluster: Any, stack: Any) -> dict[str, int]:
    """label -> pid of every process of the cluster and the stack (children included)."""
    roots: dict[str, int] = {}
    for i, broker in enumerate(cluster.brokers, 1):
        if broker.pid:
            roots[f"kafka-{i}"] = broker.pid
    if cluster.master.pid:
        roots["spark-master"] = cluster.master.pid
    for i, worker in enumerate(cluster.workers, 1):
        if worker.pid:
            roots[f"spark-worker-{i}"] = worker.pid
    for role in ROLES:
        if (pid := stack.pid(role)) is not None:
            roots[role] = pid
    children = _children()
    out: dict[str, int] = {}
    for label, root in roots.items():
        out[label] = root
        seen: dict[str, int] = {}
        for pid in _tree(root, children)[1:]:
            kind = _kind(pid)
            if not kind:
                continue
            seen[kind] = seen.get(kind, 0) + 1
            out[f"{label}/{kind}{'' if seen[kind] == 1 else seen[kind]}"] = pid
    return out


# --- lag --------------------------------------------------------------------------------------------
def group_lag(settings: Any, group: str, topic: str) -> int | None:
    """Records on `topic` past `group`'s committed offsets (None: nothing committed yet)."""
    from confluent_kafka import Consumer, TopicPartition

    from recsys.kafka import consumer_config

    consumer = Consumer(consumer_config(settings, group))
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        tps = [TopicPartition(topic, p) for p in parts]
        committed = consumer.committed(tps, timeout=10)
        total, any_commit = 0, False
        for tp in committed:
            high = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition),
                                                  timeout=10)[1]
            if tp.offset >= 0:
                any_commit = True
                total += max(0, high - tp.offset)
            else:
                total += high
        return total if any_commit else None
    finally:
        consumer.close()


STREAM_LAG = re.compile(r"progress: batch \d+.*lag (\d+) records")


def stream_lag(stack: Any) -> int | None:
    """The lag in the stream job's newest progress line."""
    try:
        with open(stack.log_path("stream"), "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 200_000))
            found = STREAM_LAG.findall(f.read().decode(errors="replace"))
    except OSError:
        return None
    return int(found[-1]) if found else None


def lags(stack: Any) -> dict[str, int | None]:
    from schemas import topics as T
    from speed.layer import GROUP
    from streams.app import app_id

    s = stack.settings
    return {"stream": stream_lag(stack), "speed": group_lag(s, GROUP, T.SALES),
            "aggregate": group_lag(s, f"{app_id()}-sales", T.SALES)}


# --- the run ----------------------------------------------------------------------------------------
def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(minutes: float, rate: float, threshold: int, sample_seconds: float, base: Path) -> int:
    from recsys.cluster import LocalCluster
    from recsys.kafka import read_to_end
    from recsys.synthetic import SyntheticSales
    from recsys.topics import create_topics
    from schemas import codec
    from schemas import topics as T
    from tests.reliability.ledger import settle
    from tests.reliability.stack import Stack, wait_for

    started = time.monotonic()
    cluster = LocalCluster(base / "cluster", free_ports=True, die_with_parent=True)
    stack = None
    try:
        cluster.start(timeout=300)
        shared = cluster.settings()
        stack = Stack(cluster.bootstrap, cluster.shared_dir, store_path=shared.store,
                      spark_master=cluster.spark_master, topic_replication=shared.topic_replication,
                      checkpoint_path=shared.checkpoints, models_path=shared.models,
                      export_dir=shared.export_dir, train_threshold=threshold,
                      max_offsets_per_trigger=max(10_000, int(rate * 10)), trigger_seconds=2.0,
                      als_rank=16, als_max_iter=5, top_n=10, eval_k=10,
                      spark_driver_memory="2g")
        create_topics(stack.settings)
        stack.start(*ROLES)
        wait_for("the aggregator's API", stack.stats, 300, every=1,
                 dead=lambda: stack.exited(*ROLES))
        print(f"soak: cluster and stack up in {time.monotonic() - started:.0f} s; "
              f"{rate:.0f} sales/s for {minutes:g} min", flush=True)

        events = int(rate * minutes * 60)
        stop = threading.Event()
        result: dict[str, Any] = {}
        feeder = threading.Thread(target=lambda: result.update(summary=stack.produce(
            SyntheticSales(users=20_000, products=4_000, events=events, seed=7), rate, stop)))
        load_start = time.monotonic()
        warm_at = 0.0
        feeder.start()
        rss_start: dict[str, float | None] = {}  # once the first model is out: all warm
        samples: dict[str, list[int]] = {r: [] for r in ROLES}
        while feeder.is_alive():
            feeder.join(sample_seconds)
            if (why := stack.exited(*ROLES)) is not None:
                stop.set()
                feeder.join(120)
                print(f"soak: FAILED: {why}", flush=True)
                return 1
            for reader, n in lags(stack).items():
                if n is not None:
                    samples[reader].append(n)
            if not rss_start and read_to_end(stack.settings, T.MODEL_READY):
                rss_start = {k: rss_mb(p) for k, p in processes(cluster, stack).items()}
                warm_at = time.monotonic() - load_start
            elapsed = time.monotonic() - load_start
            log.info("%.0f s: lag %s", elapsed, {r: v[-1] if v else None
                                                  for r, v in samples.items()})
        loaded = time.monotonic() - load_start
        rss_end = {k: rss_mb(p) for k, p in processes(cluster, stack).items()}
        produced = result["summary"].published if "summary" in result else 0

        ledger = settle(stack.settings, 900, aggregator=stack.stats)
        settled = time.monotonic() - load_start - loaded
        final = lags(stack)
        final["stream"] = len(ledger.missing)  # read but not yet stored or dead-lettered
        models = [codec.decode(m.value(), "ModelReady")[1]
                  for m in read_to_end(stack.settings, T.MODEL_READY)]

        achieved = produced / loaded if loaded else 0.0
        print(f"soak_rate: produced {produced:,} sales in {loaded / 60:.1f} min, "
              f"{achieved:.0f}/s / target {rate:.0f}/s = {achieved / rate:.2f}")
        for reader, values in samples.items():
            print(f"soak_lag[{reader}]: p50 {_pct(values, 0.5):.0f} / p95 "
                  f"{_pct(values, 0.95):.0f} / max {max(values, default=float('nan')):.0f} "
                  f"records while loaded ({len(values)} samples), {final[reader]} after "
                  f"{settled:.0f} s of settling")
        cycles = [m["cycle_seconds"] for m in models]
        fits = [m["train_seconds"] for m in models]
        print(f"soak_retrains: {len(models)} models ({', '.join(m['trigger'] for m in models)}), "
              f"cycle p50 {_pct(cycles, 0.5):.1f} s / max {max(cycles, default=float('nan')):.1f}"
              f" s, ALS.fit p50 {_pct(fits, 0.5):.1f} s; events at the last "
              f"{models[-1]['events'] if models else 0:,}")
        for label in sorted(set(rss_start) | set(rss_end)):
            a, b = rss_start.get(label), rss_end.get(label)
            growth = f"{100 * (b - a) / a:+.0f}%" if a and b else "n/a"
            print(f"soak_rss[{label}]: {a or 0:.0f} MB -> {b or 0:.0f} MB ({growth})")
        if not rss_start:
            print("soak_rss: no model before the end of the load: no start figures")
        else:
            print(f"soak_rss: start = {warm_at:.0f} s into the load (the first model out), end "
                  "= the end of the load")
        print(f"soak_{ledger.line()}")
        print(f"soak: {time.monotonic() - started:.0f} s in all (a shared machine makes these "
              "figures noisy)", flush=True)
        return 0 if ledger.ok else 1
    finally:
        if stack is not None:
            stack.stop_all()
        cluster.kill()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float,
                   default=float(os.environ.get("BENCH_SOAK_MINUTES", 10)),
                   help="minutes of steady load (default 10, or BENCH_SOAK_MINUTES)")
    p.add_argument("--rate", type=float, default=2000.0, help="sales per second (default 2000)")
    p.add_argument("--threshold", type=int, default=200_000,
                   help="new events per retrain (default 200000: one every ~100 s at 2000/s)")
    p.add_argument("--sample-seconds", type=float, default=10.0,
                   help="seconds between lag samples (default 10)")
    p.add_argument("--keep", type=Path, help="keep the cluster's and the roles' folders here")
    args = p.parse_args(argv or [])

    from recsys import logs

    logs.setup(os.environ.get("RECSYS_LOG_LEVEL", "WARNING"))
    base = args.keep or Path(tempfile.mkdtemp(prefix="recsys-bench-soak-"))
    base.mkdir(parents=True, exist_ok=True)
    try:
        code = run(args.minutes, args.rate, args.threshold, args.sample_seconds, base)
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    if code:
        raise RuntimeError("soak: the ledger does not balance or a process died (see above)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main(sys.argv[1:])
