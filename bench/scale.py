"""scale: the cost curve of a training cycle, 0.4 M to 20 M events, on both training paths.

Synthetic purchases from the seeded generator (recsys.synthetic: Zipf-popular products, users
joining over time, returns), users and products growing with the events: one user per 20 events
and one product per 200 (20 M events: 1 M users, 100 K products). Each size is written once as a
Parquet file in the store's columns under var/bench/scale/ (reused by later runs: same seed, same
events). Each (size, path) cycle then runs in a fresh process (`python -m bench.scale --one`),
so its memory peak is its own: the job's own `train_and_publish` (default settings but for the
path, a scratch broker shared by all runs, topics under a prefix of their own) trains on the
file and publishes recommendations, the graph, the factors and model-ready. Printed per run:

    scale 2M driver: cycle 41.0 s to recommendations, ALS.fit 18.2 s, model-ready 70.1 s,
        driver memory: python 1.2 GiB + JVM 3.9 GiB (peak RSS)

and at the end the growth (cycle at the largest size / at 2 M, by the path the rule picks) and,
per size, which path was faster (the crossover `RECSYS_TRAIN_DRIVER_MAX_EVENTS` should sit at).
The figures go to var/bench/scale/results.json (merged with earlier runs: sizes can be run one
at a time), each run's log (its time and memory by step) to var/bench/scale/logs/ and the curve
to docs/scale.svg.

    python -m bench scale                                       # every size, both paths
    python -m bench.scale --sizes 0.4M,2M --paths driver,distributed,auto
    python -m bench.scale --plot-only                           # redraw docs/scale.svg

A run that fails (memory, time) is recorded with its error and the others go on. Never asserts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from recsys import paths

log = logging.getLogger("bench.scale")

SIZES = {"0.4M": 400_000, "2M": 2_000_000, "10M": 10_000_000, "20M": 20_000_000}
PATHS = ("driver", "distributed")
EVENTS_PER_USER, EVENTS_PER_PRODUCT = 20, 200
SEED = 7
CHUNK = 1_000_000  # events per Parquet row group while generating
HERE = paths.ROOT / "var" / "bench" / "scale"
RESULTS = HERE / "results.json"
PLOT = paths.ROOT / "docs" / "scale.svg"
RUN_TIMEOUT = 3 * 3600  # seconds one (size, path) cycle may take before it counts as failed


def dataset(events: int) -> Path:
    """The Parquet file of `events` synthetic sales (written the first time, then reused)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recsys.synthetic import SyntheticSales

    users, products = max(1, events // EVENTS_PER_USER), max(1, events // EVENTS_PER_PRODUCT)
    target = HERE / f"sales-{events}-{users}u-{products}p-seed{SEED}.parquet"
    if target.exists():
        return target
    HERE.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    schema = pa.schema([
        ("event_id", pa.string()), ("user_id", pa.string()), ("product_id", pa.string()),
        ("quantity", pa.int32()), ("event_time", pa.timestamp("ms", tz="UTC")),
        ("unit_price", pa.float64()), ("invoice_id", pa.string()), ("description", pa.string()),
        ("country", pa.string()), ("source_topic", pa.string()), ("source_partition", pa.int32()),
        ("source_offset", pa.int64()),
    ])
    started = time.perf_counter()
    names = [f.name for f in schema][:9]
    columns: dict[str, list[Any]] = {n: [] for n in names}
    written = 0
    with pq.ParquetWriter(partial, schema) as writer:
        def flush() -> None:
            nonlocal written
            n = len(columns["event_id"])
            if not n:
                return
            arrays = [pa.array(columns[name], type=schema.field(name).type) for name in names]
            arrays += [pa.array(["sales"] * n), pa.array([0] * n, pa.int32()),
                       pa.array(range(written, written + n), pa.int64())]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
            written += n
            for values in columns.values():
                values.clear()

        for sale, _ in SyntheticSales(users, products, events, seed=SEED):
            for name in names:
                columns[name].append(sale[name])
            if len(columns["event_id"]) == CHUNK:
                flush()
                log.warning("scale: generated %d of %d events", written, events)
        flush()
    partial.rename(target)
    log.warning("scale: %d events (%d users, %d products) written to %s in %.0f s", events,
                users, products, target, time.perf_counter() - started)
    return target


def _peak_rss(pid: int) -> int:
    """VmHWM (peak resident set) of a process in bytes; 0 when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    out = [int(c) for c in found]
    for c in list(out):
        out += _children(c)
    return out


def one(size: str, where: str, bootstrap: str, workdir: Path) -> dict[str, Any]:
    """One cycle in this process: train_and_publish on the size's file; its figures."""
    from recsys import topics as topic_admin
    from recsys.settings import load
    from spark import session
    from spark.job import train_and_publish
    from spark.publish import Topics
    from spark.store import SALES_SCHEMA

    events = SIZES[size]
    file = dataset(events)
    prefix = f"scale-{size}-{where}-{int(time.time())}."
    settings = load(kafka_bootstrap=bootstrap, data_dir=workdir, export_dir=workdir / "exports",
                    train_path=where)
    topics = Topics.with_prefix(prefix)
    topic_admin.create_topics(settings, names=topic_admin.renamed(prefix))
    spark = session.build(settings, f"bench-scale-{size}-{where}")
    java = spark.sparkContext._gateway.proc.pid  # the JVM (spark-submit execs java)
    try:
        sales = spark.read.schema(SALES_SCHEMA).parquet(str(file))
        started = time.perf_counter()
        done = train_and_publish(spark, settings, topics, sales, "manual", started)
        jvm = max([_peak_rss(java)] + [_peak_rss(c) for c in _children(java)])
    finally:
        spark.stop()
    result = done.result
    return {
        "size": size, "events": result.events, "users": result.users,
        "products": result.products, "pairs": int(result.params["pairs"]),
        "path": result.path.where, "asked": where,
        "cycle_seconds": done.recommendations_seconds, "model_ready_seconds": done.cycle_seconds,
        "fit_seconds": result.train_seconds, "fits": result.fit_seconds,
        "precision_at_k": result.metrics.get("precision_at_k"),
        "python_peak_bytes": _peak_rss(os.getpid()), "jvm_peak_bytes": jvm,
        "recommendations": done.recommendations,
        "load": os.getloadavg()[0], "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _load_results() -> list[dict[str, Any]]:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else []


def _store(row: dict[str, Any]) -> None:
    """Keep the latest row per (size, asked path)."""
    rows = [r for r in _load_results()
            if (r["size"], r.get("asked")) != (row["size"], row.get("asked"))]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows + [row], indent=1, default=str))


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def line(row: dict[str, Any]) -> str:
    label = f"scale {row['size']} {row.get('asked')}"
    if "over_seconds" in row:
        return f"{label}: stopped unfinished after {row['over_seconds']:.0f} s (--timeout)"
    if "error" in row:
        return f"{label}: FAILED ({row['error']})"
    return (f"{label}: cycle {row['cycle_seconds']:.1f} s to recommendations, ALS.fit "
            f"{row['fit_seconds']:.1f} s, model-ready {row['model_ready_seconds']:.1f} s, "
            f"driver memory: python {_gib(row['python_peak_bytes'])} + JVM "
            f"{_gib(row['jvm_peak_bytes'])} (peak RSS); {row['events']:,} events, "
            f"{row['users']:,} users, {row['products']:,} products, {row['pairs']:,} pairs, "
            f"{row['path']} path, precision@10 {row['precision_at_k']:.4f}, load {row['load']:.1f}")


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """The crossover per size and the growth of the path the rule picks."""
    out = []
    ok = {(r["size"], r["asked"]): r for r in rows if "error" not in r}
    compared, crossover = [], None
    stopped = {(r["size"], r["asked"]): r["over_seconds"] for r in rows if "over_seconds" in r}
    for size in SIZES:
        d, s = ok.get((size, "driver")), ok.get((size, "distributed"))
        for done, other, cut in ((d, "distributed", stopped.get((size, "distributed"))),
                                 (s, "driver", stopped.get((size, "driver")))):
            if done and cut and done["cycle_seconds"] < cut:
                faster = done["asked"]
                out.append(f"scale {size}: {faster} {done['cycle_seconds']:.1f} s / {other} "
                           f"stopped unfinished after {cut:.0f} s ({faster} faster)")
                compared.append(size)
                if faster == "distributed" and crossover is None:
                    crossover = size
        if d and s:
            faster = "driver" if d["cycle_seconds"] <= s["cycle_seconds"] else "distributed"
            out.append(f"scale {size}: driver {d['cycle_seconds']:.1f} s / distributed "
                       f"{s['cycle_seconds']:.1f} s = {d['cycle_seconds'] / s['cycle_seconds']:.2f}"
                       f" ({faster} faster)")
            compared.append(size)
            if faster == "distributed" and crossover is None:
                crossover = size
    if compared:
        out.append(f"scale crossover: the distributed path first faster at {crossover}"
                   if crossover else f"scale crossover: none up to {compared[-1]} (the driver "
                   f"path faster at {', '.join(compared)})")
    from recsys.settings import load
    from spark.train_path import decide

    settings = load()

    def by_rule(size: str) -> dict[str, Any] | None:
        return ok.get((size, "auto")) or ok.get((size, decide(SIZES[size], settings).where))

    small, large = by_rule("2M"), by_rule("20M")
    if small and large:
        out.append(f"scale growth: cycle(20M) {large['cycle_seconds']:.1f} s / cycle(2M) "
                   f"{small['cycle_seconds']:.1f} s = "
                   f"{large['cycle_seconds'] / small['cycle_seconds']:.1f} (target <= 12; paths "
                   f"{large['path']} / {small['path']}, chosen by the rule)")
    return out


def plot(rows: list[dict[str, Any]], target: Path = PLOT) -> Path:
    """The curve as a small hand-written SVG (no plotting library in the venv): cycle seconds
    and ALS.fit seconds against events, log-log, one colour per path."""
    w, h, left, right, top, bottom = 640, 400, 70, 160, 30, 50
    ok = [r for r in rows if "error" not in r and r.get("asked") in PATHS]
    import math

    xs = [math.log10(v) for v in SIZES.values()]
    ys = [max(r["cycle_seconds"], r["fit_seconds"], 1.0) for r in ok] or [10.0]
    lo_y, hi_y = 0.0, math.ceil(math.log10(max(ys)) + 0.1)
    lo_x, hi_x = min(xs) - 0.1, max(xs) + 0.1

    def px(events: float) -> float:
        return left + (math.log10(events) - lo_x) / (hi_x - lo_x) * (w - left - right)

    def py(seconds: float) -> float:
        return h - bottom - (math.log10(max(seconds, 1.0)) - lo_y) / (hi_y - lo_y) * (
            h - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{left}" y="18" font-size="14">bench scale: training cycle against '
             'events (log-log; one 2-core machine)</text>']
    for decade in range(int(lo_y), int(hi_y) + 1):
        y = py(10.0**decade)
        parts.append(f'<line x1="{left}" x2="{w - right}" y1="{y:.1f}" y2="{y:.1f}" '
                     'stroke="#ddd"/>')
        parts.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">'
                     f'{10**decade:g} s</text>')
    for size, events in SIZES.items():
        x = px(events)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{h - bottom}" '
                     'stroke="#eee"/>')
        parts.append(f'<text x="{x:.1f}" y="{h - bottom + 18}" text-anchor="middle">{size}'
                     '</text>')
    parts.append(f'<text x="{(left + w - right) / 2:.0f}" y="{h - 10}" text-anchor="middle">'
                 'sales events</text>')
    series = [("driver", "cycle_seconds", "#1f77b4", ""), ("distributed", "cycle_seconds",
              "#d62728", ""), ("driver", "fit_seconds", "#1f77b4", "4 3"),
              ("distributed", "fit_seconds", "#d62728", "4 3")]
    for i, (where, key, colour, dash) in enumerate(series):
        points = sorted((SIZES[r["size"]], r[key]) for r in ok if r["asked"] == where)
        if points:
            coords = " ".join(f"{px(e):.1f},{py(s):.1f}" for e, s in points)
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" '
                         f'stroke-width="2" stroke-dasharray="{dash}"/>')
            parts += [f'<circle cx="{px(e):.1f}" cy="{py(s):.1f}" r="3" fill="{colour}"/>'
                      for e, s in points]
        y = top + 20 + 20 * i
        parts.append(f'<line x1="{w - right + 10}" x2="{w - right + 35}" y1="{y}" y2="{y}" '
                     f'stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}"/>')
        what = "cycle" if key == "cycle_seconds" else "ALS.fit"
        parts.append(f'<text x="{w - right + 40}" y="{y + 4}">{where} {what}</text>')
    parts.append("</svg>")
    target.write_text("\n".join(parts) + "\n")
    return target


def _keep_log(size: str, where: str, text: str | bytes | None) -> None:
    """The run's own log (its time and memory by step) under var/bench/scale/logs/."""
    log_file = HERE / "logs" / f"{size}-{where}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    log_file.write_text(text or "")


def _run_one(size: str, where: str, bootstrap: str, tmp: Path,
             timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
    """`one` in a child process (its own memory peak, a clean JVM), with a time limit."""
    cmd = [sys.executable, "-m", "bench.scale", "--one", size, where, "--bootstrap", bootstrap,
           "--workdir", str(tmp / f"{size}-{where}")]
    env = {**os.environ, "RECSYS_LOG_LEVEL": os.environ.get("RECSYS_LOG_LEVEL", "INFO")}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=paths.ROOT, env=env)
    except subprocess.TimeoutExpired as stopped:
        _keep_log(size, where, stopped.stderr)
        # A lower bound still compares: the other path may have finished sooner.
        return {"size": size, "asked": where, "error": f"over {timeout:.0f} s",
                "over_seconds": timeout}
    _keep_log(size, where, done.stderr)
    marker = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode == 0 and marker:
        return json.loads(marker[-1])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"size": size, "asked": where, "error": f"exit {done.returncode}: {tail[:300]}"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=",".join(SIZES),
                   help=f"comma-separated, of {', '.join(SIZES)} (default: all)")
    p.add_argument("--paths", default=",".join(PATHS),
                   help="comma-separated, of driver, distributed, auto (default: driver,distributed)")
    p.add_argument("--timeout", type=float, default=RUN_TIMEOUT,
                   help=f"seconds one run may take; a run stopped there is recorded as slower "
                   f"than that (default {RUN_TIMEOUT})")
    p.add_argument("--plot-only", action="store_true", help="redraw docs/scale.svg and stop")
    p.add_argument("--one", nargs=2, metavar=("SIZE", "PATH"), help=argparse.SUPPRESS)
    p.add_argument("--bootstrap", help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv or [])
    if args.one:
        from recsys import logs

        logs.setup(os.environ.get("RECSYS_LOG_LEVEL", "WARNING"))
        print(json.dumps(one(*args.one, args.bootstrap, args.workdir), default=str), flush=True)
        return
    if args.plot_only:
        print(f"scale: curve in {plot(_load_results())}")
        return
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    wheres = [w.strip() for w in args.paths.split(",") if w.strip()]
    bad = [s for s in sizes if s not in SIZES] + [w for w in wheres if w not in (*PATHS, "auto")]
    if bad:
        raise SystemExit(f"bench scale: unknown {', '.join(bad)}; sizes {', '.join(SIZES)}, "
                         "paths driver, distributed, auto")
    from bench._broker import scratch_broker

    for size in sizes:  # generated before the broker starts, so no run waits on it
        dataset(SIZES[size])
    with scratch_broker("scale") as (broker, tmp):
        for size in sizes:
            for where in wheres:
                row = _run_one(size, where, broker.bootstrap, tmp, args.timeout)
                _store(row)
                print(line(row), flush=True)
    rows = _load_results()
    for text in summary(rows):
        print(text, flush=True)
    print(f"scale: curve in {plot(rows)} (figures in {RESULTS}, logs in {HERE / 'logs'})")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)-7s %(message)s")
    main(sys.argv[1:])
