"""aggregate: the Faust aggregator (`recsys aggregate`, a worker process) draining a backlog of
sales, next to a plain aiokafka consumer draining the same topic; then the read API's latency
under a steady load from a second process on loopback.

Prints (never asserts):

    aggregate: aggregator N events/s / plain aiokafka consumer M events/s = R    (target >= 0.3)
    aggregate_api: p99 X ms / target 10 ms = R                                   (target <= 1)

The yardstick consumer decodes every value with the same codec (the agent has to, too); its rate
without decoding is printed beside it. The agent's rate runs from the first sale it counted to the
last (start-up and table recovery excluded), read from its own /stats; /stats is cached for a
second, so the backlog is large enough to take the worker many seconds (200,000 sales: about 10 s
at 20,000/s; with 40,000 the figure varied twofold from run to run). The load: 500
requests/s for 10 s (bounded count and time), 80% lists of known users, 10% unknown users, 10%
/stats, sent open-loop (a slow answer does not slow the sender). Starts its own broker on free
ports in a temporary folder; `python -m bench.aggregate [--sales N] [--rate R] [--seconds S]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from recsys.settings import Settings, load

log = logging.getLogger("bench.aggregate")

USERS, PRODUCTS, K = 5000, 3000, 10
LISTED = 2000  # users with a list


def produce(settings: Settings, sales: int, seed: int = 42) -> None:
    """A model for LISTED users, then `sales` purchases (arrival: now)."""
    from confluent_kafka import Producer

    from recsys.kafka import producer_config
    from schemas import codec
    from schemas import topics as T

    rng = random.Random(seed)
    producer = Producer(producer_config(settings))
    now = int(time.time() * 1000)

    def send(topic: str, key: str, value: bytes) -> None:
        while True:
            try:
                producer.produce(topic, value, key.encode())
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)

    rec = codec.Encoder("Recommendation")
    for u in range(LISTED):
        items = rng.sample(range(PRODUCTS), K)
        send(T.RECOMMENDATIONS, f"u{u}", rec({
            "id": f"1:u{u}", "user_id": f"u{u}", "model_version": 1, "generated_at": now - 1000,
            "items": [{"product_id": f"p{p}", "score": 1.0 / r, "rank": r}
                      for r, p in enumerate(items, 1)]}))
    send(T.MODEL_READY, "1", codec.encode("ModelReady", {
        "model_version": 1, "model_id": "bench", "trained_at": now - 1000, "trigger": "manual",
        "events": sales, "users": LISTED, "products": PRODUCTS, "params": {},
        "metrics": {"precision_at_k": 0.1}, "baseline_metrics": {}, "train_seconds": 0.0,
        "cycle_seconds": 0.0, "model_path": ""}))
    sale = codec.Encoder("Sale")
    for i in range(sales):
        user = f"u{min(int(rng.paretovariate(1.2)) - 1, USERS - 1)}"
        send(T.SALES, user, sale({
            "event_id": f"bench-{i}", "user_id": user,
            "product_id": f"p{min(int(rng.paretovariate(1.1)) - 1, PRODUCTS - 1)}",
            "quantity": rng.choice((1, 1, 1, 2, 6, -1)), "event_time": now - 86_400_000 + i}))
    assert producer.flush(120) == 0


def drain(settings: Settings, n: int, decode: bool, timeout: float = 300.0) -> float:
    """Events/s of a plain aiokafka consumer reading `n` sales from the beginning."""
    from aiokafka import AIOKafkaConsumer

    from schemas import codec
    from schemas import topics as T

    async def run() -> float:
        consumer = AIOKafkaConsumer(
            T.SALES, bootstrap_servers=settings.kafka_bootstrap, group_id=None,
            auto_offset_reset="earliest", enable_auto_commit=False)
        await consumer.start()
        try:
            seen, started = 0, time.perf_counter()
            while seen < n and time.perf_counter() - started < timeout:
                batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
                for records in batches.values():
                    seen += len(records)
                    if decode:
                        for r in records:
                            codec.decode(r.value, "Sale")
            return seen / (time.perf_counter() - started)
        finally:
            await consumer.stop()

    return asyncio.run(run())


def get(port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except OSError:
        return 0, None


def agent_rate(settings: Settings, n: int, tmp: Path, timeout: float = 900.0
               ) -> tuple[float, subprocess.Popen, int]:
    """Start the worker; events/s from its first counted sale to the n-th. Returns the still
    running worker and its API port."""
    from recsys.broker import free_port

    port = free_port()
    log_file = open(tmp / "aggregate.log", "wb")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(
        [sys.executable, "-m", "recsys.cli", "--bootstrap", settings.kafka_bootstrap,
         "--data-dir", str(settings.data_dir), "aggregate", "--web-port", str(port)],
        stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "RECSYS_LOG_LEVEL": "INFO"})
    log_file.close()
    first: tuple[float, int] | None = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited ({proc.returncode}); see {tmp}/aggregate.log")
        status, stats = get(port, "/stats")
        counted = stats["sales"]["events"] if status == 200 else 0
        now = time.perf_counter()
        if counted and first is None:
            first = (now, counted)
        if counted >= n and first is not None:
            return (n - first[1]) / max(now - first[0], 1e-9), proc, port
        time.sleep(0.25)
    raise RuntimeError(f"the worker counted fewer than {n} sales in {timeout:.0f} s")


# --- the load, run in a second process --------------------------------------------------------


async def _load(port: int, rate: float, seconds: float) -> dict[str, Any]:
    import aiohttp

    rng = random.Random(1)
    n = int(rate * seconds)
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=64)
    timeout = aiohttp.ClientTimeout(total=2.0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(path: str) -> None:
            nonlocal errors
            started = time.perf_counter()
            try:
                async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                        return
            except (TimeoutError, aiohttp.ClientError):
                errors += 1
                return
            latencies.append(time.perf_counter() - started)

        for _ in range(50):  # warm the connections; not measured
            await one("/ready")
        latencies.clear()
        tasks = []
        begin = time.perf_counter()
        for i in range(n):
            delay = begin + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            r = rng.random()
            path = ("/stats" if r < 0.1 else f"/recommendations/nobody-{i}" if r < 0.2
                    else f"/recommendations/u{rng.randrange(LISTED)}")
            tasks.append(asyncio.create_task(one(path)))
        sent_s = time.perf_counter() - begin
        await asyncio.wait(tasks, timeout=seconds + 5)
    latencies.sort()

    def q(p: float) -> float:
        return latencies[min(int(p * len(latencies)), len(latencies) - 1)] * 1000 if latencies \
            else float("nan")

    return {"sent": n, "ok": len(latencies), "errors": errors, "send_seconds": sent_s,
            "p50_ms": q(0.50), "p99_ms": q(0.99), "max_ms": q(1.0)}


def api_latency(port: int, rate: float, seconds: float) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.aggregate", "--load", str(port), "--rate", str(rate),
         "--seconds", str(seconds)],
        capture_output=True, text=True, timeout=seconds + 60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.aggregate", description=__doc__)
    p.add_argument("--sales", type=int, default=200_000, help="sales in the backlog")
    p.add_argument("--rate", type=float, default=500.0, help="API requests per second")
    p.add_argument("--seconds", type=float, default=10.0, help="API load duration")
    p.add_argument("--load", type=int, help=argparse.SUPPRESS)  # the second process
    args = p.parse_args(argv or [])
    if args.load:
        print(json.dumps(asyncio.run(_load(args.load, args.rate, args.seconds))))
        return

    from bench._broker import scratch_broker
    from recsys import logs
    from recsys.topics import create_topics

    logs.setup(os.environ.get("RECSYS_LOG_LEVEL", "WARNING"))
    worker: subprocess.Popen | None = None
    with scratch_broker("aggregate") as (broker, tmp):
        try:
            settings = load(kafka_bootstrap=broker.bootstrap, data_dir=str(tmp / "var"))
            create_topics(settings)
            produce(settings, args.sales)
            raw = drain(settings, args.sales, decode=False)
            plain = drain(settings, args.sales, decode=True)
            ours, worker, port = agent_rate(settings, args.sales, tmp)
            print(f"aggregate: aggregator {ours:,.0f} events/s / plain aiokafka consumer "
                  f"{plain:,.0f} events/s = {ours / plain:.2f}  ({args.sales:,} sales, decoded with "
                  f"the same codec; without decoding the consumer reads {raw:,.0f}/s; "
                  f"target >= 0.3)", flush=True)
            lat = api_latency(port, args.rate, args.seconds)
            print(f"aggregate_api: p99 {lat['p99_ms']:.2f} ms / target 10 ms = "
                  f"{lat['p99_ms'] / 10:.2f}  ({lat['ok']:,} of {lat['sent']:,} requests answered at "
                  f"{args.rate:.0f}/s from a second process, {lat['errors']} errors, p50 "
                  f"{lat['p50_ms']:.2f} ms, max {lat['max_ms']:.1f} ms; target <= 1)", flush=True)
        finally:
            if worker is not None and worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
                try:
                    worker.wait(60)
                except subprocess.TimeoutExpired:
                    worker.kill()


if __name__ == "__main__":
    main(sys.argv[1:])
