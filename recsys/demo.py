"""`recsys demo` (what `make demo` runs): the whole product on the embedded default.

Local broker, topics, every role this build has (Spark streaming job, speed layer, Faust
aggregator, Bokeh dashboard), then the bundled Online Retail file replayed into `sales`. With the
streaming job the demo waits for the models the replay triggers and prints their metrics next to
the popularity baseline, a few users' recommendations and a user whose list the speed layer
changed after a purchase. With a dashboard it stays up until Ctrl-C; every process
it started is stopped cleanly on the way out.

The demo keeps its state in `<data_dir>/demo` and clears it at start, so every run tells the same
story from an empty system.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from recsys import supervisor
from recsys.security import role_env
from recsys.settings import Settings, load
from schemas import codec
from schemas.topics import FOLD_IN, MODEL_READY, PROMOTED, RECOMMENDATIONS, SALES

log = logging.getLogger(__name__)

# Pace and threshold chosen so the ~407,000 valid events of the bundled file yield exactly three
# models within ten minutes on a 2-core machine, with sales still arriving after the first model
# (so the feedback loop has something to judge). Training runs when a micro-batch ends at or past
# the threshold, so a model may see up to one batch more than the threshold: with batches of a
# quarter of it, three models need at most 3 x 1.25 x 105,000 = 393,750 events.
DEMO_THRESHOLD = 105_000
DEMO_BATCH_SHARE = 4  # micro-batch = threshold / 4
DEMO_RATE = 1_500  # input rows per second (about 1,130 valid sales/s): a replay of 6 minutes


def _demo_settings(settings: Settings) -> Settings:
    overrides: dict[str, Any] = {
        "data_dir": settings.data_dir / "demo",
        "export_dir": settings.data_dir / "demo" / "exports",
        "kafka_bootstrap": settings.kafka_bootstrap,
    }
    if "RECSYS_TRAIN_THRESHOLD" not in os.environ:
        overrides["train_threshold"] = DEMO_THRESHOLD
    return load(**overrides)


def _env(settings: Settings) -> dict[str, str]:
    return {
        "RECSYS_DATA_DIR": str(settings.data_dir),
        "RECSYS_EXPORT_DIR": str(settings.export_dir),
        "RECSYS_TRAIN_THRESHOLD": str(settings.train_threshold),
        # Batches well below the threshold, so every threshold crossing gets its own model even
        # when the replay runs ahead of a training in progress.
        "RECSYS_MAX_OFFSETS_PER_TRIGGER": str(max(1, settings.train_threshold // DEMO_BATCH_SHARE)),
        "RECSYS_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
    }


def _read_all(settings: Settings, topic: str, last: int | None = None) -> list[dict[str, Any]]:
    """Every record currently on `topic` (or the `last` of each partition), decoded."""
    from recsys.kafka import read_to_end

    out = []
    for m in read_to_end(settings, topic, last):
        try:
            out.append(codec.decode(m.value())[1])
        except codec.DecodeError:
            pass
    return out


def model_statuses(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int | None]:
    """(one row per version, the version in service) from model-ready records in offset order.

    A manual promotion or rollback sends another record for an existing version: the last one
    read is its status (and trigger), and the last record overall names the version in service
    (`serving`; 0 on a record written before the gate, which then names its own version)."""
    rows: dict[int, dict[str, Any]] = {}
    serving: int | None = None
    for m in records:
        v = int(m["model_version"])
        status = m.get("status") or PROMOTED
        serving = int(m.get("serving") or 0) or (v if status == PROMOTED else serving)
        rows[v] = {**rows.get(v, m), "status": status, "trigger": m["trigger"]}
    return [rows[v] for v in sorted(rows)], serving


def _print_models(settings: Settings) -> None:
    models, serving = model_statuses(_read_all(settings, MODEL_READY))
    if not models:
        print("no model was trained")
        return
    k = settings.eval_k
    print(f"\n{'version':>7} {'events':>8} {'users':>6} {'trigger':>9} {'status':>10}  "
          f"{'p@' + str(k):>14} {'ndcg@' + str(k):>14} {'rmse':>7} {'fit s':>6}")
    for m in models:
        met, base = m["metrics"], m["baseline_metrics"]
        status = m["status"] + ("*" if m["model_version"] == serving else "")
        print(
            f"{m['model_version']:>7} {m['events']:>8,} {m['users']:>6,} {m['trigger']:>9} "
            f"{status:>10}  "
            f"{met.get('precision_at_k', 0):.3f} ({base.get('precision_at_k', 0):.3f}) "
            f"{met.get('ndcg_at_k', 0):.3f} ({base.get('ndcg_at_k', 0):.3f}) "
            f"{met.get('rmse', float('nan')):7.3f} {m['train_seconds']:6.1f}"
        )
    print("(in brackets: the popularity baseline on the same split; * the model in service"
          + (")" if serving is not None else "; none serves)"))
    if serving is None:
        return
    by_user = {r["user_id"]: r for r in _read_all(settings, RECOMMENDATIONS)
               if r["model_version"] == serving and r.get("source") != FOLD_IN}
    recs = list(by_user.values())
    print(f"\n{len(recs):,} users have recommendations from model {serving}; a few of them:")
    for r in sorted(recs, key=lambda r: r["user_id"])[:3]:
        items = ", ".join(i["product_id"] for i in r["items"][:5])
        print(f"  user {r['user_id']}: {items} ...")


def fold_in_example(recs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A user whose list changed after a purchase: (the list in force before, the fold-in after
    it), from `recommendations` in offset order; the one whose top 5 changed most (the latest of
    those)."""
    before: dict[str, dict[str, Any]] = {}
    found, most = None, 0

    def top(r: dict[str, Any]) -> list[str]:
        return [i["product_id"] for i in r["items"]]

    for r in recs:
        prior = before.get(r["user_id"])
        if r.get("source") == FOLD_IN and prior is not None and top(prior) != top(r):
            changed = len(set(top(r)[:5]) - set(top(prior)[:5]))
            if changed >= most:
                found, most = (prior, r), changed
        before[r["user_id"]] = r
    return found


def _print_fold_in(settings: Settings) -> None:
    recs = _read_all(settings, RECOMMENDATIONS)
    folds = [r for r in recs if r.get("source") == FOLD_IN]
    example = fold_in_example(recs)
    if example is None:
        print(f"\nthe speed layer published {len(folds):,} fold-in lists")
        return
    prior, after = example
    sale = next((s for s in reversed(_read_all(settings, SALES, last=50_000))
                 if s["event_id"] == after["sale_event_id"]), None)
    bought = f"{sale['quantity']} x {sale['product_id']}" if sale else after["sale_event_id"]
    print(f"\nthe speed layer published {len(folds):,} fold-in lists between retrains; e.g. user "
          f"{after['user_id']} bought {bought}:")
    was = {i["product_id"] for i in prior["items"][:5]}
    for label, r in (("before", prior), ("after", after)):
        items = ", ".join(i["product_id"] + ("" if r is prior or i["product_id"] in was else " (new)")
                          for i in r["items"][:5])
        print(f"  {label:>6} (model {r['model_version']}, {r.get('source', 'retrain')}): "
              f"{items} ...")


def _wait_for_models(settings: Settings, expected: int, timeout: float) -> None:
    """Until `expected` model versions are on model-ready, the job dies, or the timeout."""
    stream = supervisor.service(settings, "stream")
    deadline = time.monotonic() + timeout
    seen = -1
    while time.monotonic() < deadline:
        count = len(_read_all(settings, MODEL_READY))
        if count != seen:
            log.info("models published: %d of %d expected", count, expected)
            seen = count
        if count >= expected:
            return
        if stream.pid() is None:
            log.error("the streaming job stopped; see %s", stream.log_file)
            return
        time.sleep(5)
    log.warning("gave up waiting for models after %.0f s", timeout)


def cli(settings: Settings, args: argparse.Namespace) -> int:
    demo = _demo_settings(settings)
    broker = supervisor.local_broker(demo)
    if broker.is_ready():
        print(f"recsys demo: a broker already answers on {demo.kafka_bootstrap}; "
              "stop it first (`recsys broker stop` / `recsys down`)", file=sys.stderr)
        return 2
    shutil.rmtree(demo.data_dir, ignore_errors=True)
    roles = [r for r in supervisor.ROLES if supervisor.role_available(r)]
    stop = {"now": False}

    def _on_signal(signum, frame):  # first Ctrl-C: clean stop; the finally block does the work
        stop["now"] = True
        raise KeyboardInterrupt

    # Both set explicitly: a shell that starts the demo in the background leaves SIGINT ignored,
    # and then Python would never raise KeyboardInterrupt.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        print(f"recsys demo: broker on {demo.kafka_bootstrap}, state in {demo.data_dir}")
        broker.start()
        from recsys.topics import create_topics

        create_topics(demo)
        for role in roles:
            supervisor.start_role(demo, role, extra_env=_env(demo))
        url = f"http://{demo.dashboard_host}:{demo.dashboard_port}/"
        if "dashboard" in roles:
            print(f"recsys demo: watch it live at {url}")
            if demo.broker_secure:  # the token itself is never printed
                token = demo.data_dir / "kafka" / "security" / "dashboard.token"
                print(f"recsys demo: secured; open {url}?token=$(cat {token}) once")
        cmd = [sys.executable, "-m", "recsys.cli", "produce"]
        if "stream" in roles:
            cmd += ["--rate", str(DEMO_RATE)]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        print("recsys demo: replaying the bundled Online Retail data into `sales`")
        produced = subprocess.run(cmd, env={**os.environ, **_env(demo),
                                            **role_env(demo, "producer")})
        if produced.returncode != 0:
            print("recsys demo: the replay failed", file=sys.stderr)
            return produced.returncode
        if "stream" in roles:
            expected = 406_829 // demo.train_threshold if not args.limit else 1
            _wait_for_models(demo, max(expected, 1), timeout=900)
            _print_models(demo)
            if "speed" in roles:
                _print_fold_in(demo)
        if "dashboard" in roles:
            print(f"\nrecsys demo: dashboard at {url} — Ctrl-C stops everything")
            while True:
                time.sleep(1)
        return 0
    except KeyboardInterrupt:
        print("\nrecsys demo: stopping")
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up
        for role in reversed(roles):
            supervisor.stop_role(demo, role)
        broker.stop()
        print("recsys demo: everything stopped")
