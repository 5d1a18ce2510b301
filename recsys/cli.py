"""The one `recsys` command. Subcommands import their process's code lazily, so `recsys --help`
and a bad setting answer at once, before any heavy import or network I/O."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from importlib import import_module

from recsys import settings as settings_mod

log = logging.getLogger("recsys")

EPILOG = """\
Settings come from RECSYS_* environment variables (`recsys config` lists them with their
defaults); the flags above override them. Typical local session:

  recsys broker start && recsys topics create
  recsys produce --rate 5000          # replay the bundled Online Retail data into `sales`
  recsys consume sales --max 5        # look at what arrived
  recsys broker stop
"""


def _mapping_flags(p: argparse.ArgumentParser) -> None:
    """CSV column mapping, shared by `produce`, `train --file` and `inspect`; fitted to the file's
    header by recsys.csv_mapping.resolve (an unset flag is None there)."""
    g = p.add_argument_group(
        "CSV mapping (unset: the bundled UCI Online Retail file's names; an optional column the "
        "file lacks is left out)")
    g.add_argument("--mapping", choices=["flags", "auto"], default="flags",
                   help="auto: guess unset columns, the time format and the delimiter from the "
                   "file (see `recsys inspect`); flags: unset ones are the bundled file's "
                   "(default %(default)s)")
    g.add_argument("--user-col", help="user id column (default CustomerID)")
    g.add_argument("--product-col", help="product id column (default StockCode)")
    g.add_argument("--quantity-col", help="quantity or rating column (default Quantity)")
    g.add_argument("--time-col", help="event time column (default InvoiceDate)")
    g.add_argument("--price-col", help="unit price column, '' for none (default UnitPrice)")
    g.add_argument("--invoice-col", help="invoice column, '' for none (default InvoiceNo)")
    g.add_argument("--description-col", help="product description column, '' for none "
                   "(default Description)")
    g.add_argument("--country-col", help="country column, '' for none (default Country)")
    g.add_argument("--time-format",
                   help="strptime format of the time column, or iso, epoch-s or epoch-ms "
                   "(default '%%Y-%%m-%%d %%H:%%M:%%S')")
    g.add_argument("--timezone", help="zone of naive timestamps (default Europe/London)")
    g.add_argument("--delimiter", help="CSV delimiter, \\t for a tab (default ',')")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recsys",
        description="Real-time product recommender on Apache Kafka and Apache Spark.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--bootstrap", dest="kafka_bootstrap", help="Kafka bootstrap servers (RECSYS_KAFKA_BOOTSTRAP)")
    p.add_argument("--data-dir", dest="data_dir", help="local state folder (RECSYS_DATA_DIR)")
    p.add_argument("--log-level", dest="log_level", help="DEBUG, INFO, WARNING or ERROR (RECSYS_LOG_LEVEL)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    b = sub.add_parser(
        "broker", help="start, stop or inspect the local single-node KRaft broker",
        description="The local broker, data in <RECSYS_DATA_DIR>/kafka. With "
        "RECSYS_BROKER_SECURE=true it is secured: one SASL_SSL port (CA and certificate made on "
        "first start), a SCRAM-SHA-512 user and least-privilege ACLs per role, no plaintext "
        "port; credentials under <RECSYS_DATA_DIR>/kafka/security/ (README: Security).")
    b.add_argument("action", choices=["start", "stop", "status"])
    b.add_argument("--port", type=int, default=None,
                   help="client port (default: the port of RECSYS_KAFKA_BOOTSTRAP)")
    b.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for ready/stopped")
    b.set_defaults(handler="recsys.broker:cli")

    cl = sub.add_parser(
        "cluster",
        help="start, stop or inspect the loopback cluster: 3 KRaft brokers, Spark master + 2 workers",
        description="docker-compose.yml's topology as processes on 127.0.0.1, for machines "
        "without a container engine: three combined broker+controller nodes (quorum of three, "
        "replication 3, min.insync.replicas 2) on 29092, 39092, 49092, a Spark standalone master "
        "(spark://127.0.0.1:7077, UI on 8080) and two workers of one core each. State, logs and the "
        "shared store/checkpoints/models live under <data_dir>/cluster. `up` also creates the "
        "declared topics and prints the RECSYS_* variables that point the product at it.",
    )
    cl.add_argument("action", choices=["up", "down", "status"])
    cl.add_argument("--timeout", type=float, default=180.0,
                    help="seconds to wait for ready/stopped (default %(default)s)")
    cl.set_defaults(handler="recsys.cluster:cli")

    t = sub.add_parser("topics", help="create (idempotently) or list the declared topics")
    t.add_argument("action", choices=["create", "list"])
    t.set_defaults(handler="recsys.topics:cli")

    pr = sub.add_parser(
        "produce",
        help="replay a purchases CSV (default: the bundled data) or a synthetic stream into `sales`",
        description="Each CSV row becomes one Avro `Sale` on `sales`, keyed by user; a row that "
        "cannot (no customer, bad number or date) goes to `sales.dlq` with the row and the reason. "
        "The run ends with: read = published + dead-lettered.",
    )
    pr.add_argument("--file", help="purchases CSV, plain or .gz (default: the bundled data set)")
    _mapping_flags(pr)
    pace = pr.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=float, help="events per second (default: as fast as possible)")
    pace.add_argument("--speedup", type=float,
                      help="replay at X times the original pace, from the event timestamps")
    pr.add_argument("--limit", type=int, help="stop after N input rows")
    pr.add_argument("--skip", type=int, default=0, help="skip the first N input rows")
    pr.add_argument("--synthetic", action="store_true",
                    help="generate events instead of reading a CSV (Zipf products, returns)")
    pr.add_argument("--users", type=int, default=5000, help="synthetic: users (default %(default)s)")
    pr.add_argument("--products", type=int, default=3000, help="synthetic: products (default %(default)s)")
    pr.add_argument("--events", type=int, default=100_000, help="synthetic: events (default %(default)s)")
    pr.add_argument("--seed", type=int, default=None, help="synthetic: seed (default RECSYS_SEED)")
    pr.add_argument("--topic", default="sales", help=argparse.SUPPRESS)
    pr.add_argument("--dlq-topic", default="sales.dlq", help=argparse.SUPPRESS)
    pr.add_argument("--topic-prefix", help=argparse.SUPPRESS)  # tests: `<prefix>sales`, ...
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.set_defaults(handler="streams.producer:cli")

    st = sub.add_parser(
        "stream",
        help="Spark: ingest `sales` into the Parquet store; retrain and publish at the threshold",
        description="A long-running Spark Structured Streaming query on `sales` (checkpointed "
        "under RECSYS_CHECKPOINT_PATH). Valid events are appended to the store (RECSYS_STORE_PATH), "
        "deduplicated by event_id; bad records go to `sales.dlq` with the reason. When the new "
        "events since the last model reach the threshold, a model is trained on ALL stored events "
        "and published: `recommendations` (one per user), then `model-ready`. SIGTERM or Ctrl-C "
        "stops after the batch in progress; a restart resumes from the checkpoint.",
    )
    st.add_argument("--threshold", type=int,
                    help="new events that trigger training (RECSYS_TRAIN_THRESHOLD)")
    st.add_argument("--max-wait", type=float,
                    help="also train when this many seconds passed since the last model and at "
                    "least one new event arrived; 0 is off (RECSYS_TRAIN_MAX_WAIT_SECONDS)")
    st.add_argument("--trigger-seconds", type=float,
                    help="micro-batch interval (RECSYS_TRIGGER_SECONDS)")
    st.add_argument("--max-offsets", type=int,
                    help="most records per micro-batch (RECSYS_MAX_OFFSETS_PER_TRIGGER)")
    st.add_argument("--once", action="store_true",
                    help="read what is on the topic now (training at the threshold), then exit")
    st.add_argument("--topic-prefix", help=argparse.SUPPRESS)
    st.set_defaults(handler="spark.cli:stream_cli")

    tr = sub.add_parser(
        "train",
        help="Spark: train one model now (on the store, or on a CSV with --file) and publish it",
        description="Trains on every event in the store that `recsys stream` fills (trigger "
        "'manual'), or on a purchases CSV read with the same column mapping as `recsys produce` "
        "(trigger 'file'), and publishes `recommendations` then `model-ready` like the stream.",
    )
    tr.add_argument("--file", help="purchases CSV, plain or .gz, instead of the store")
    _mapping_flags(tr)
    tr.add_argument("--topic-prefix", help=argparse.SUPPRESS)
    tr.set_defaults(handler="spark.cli:train_cli")

    tu = sub.add_parser(
        "tune",
        help="Spark: choose ALS rank, reg and alpha by a grid search on the train side",
        description="Splits the store's (or --file's) events as training does, then splits the "
        "train side again (the latest RECSYS_TEST_FRACTION of it validates; a random split "
        "reseeds) and fits ALS once per point of RECSYS_TUNE_RANKS x RECSYS_TUNE_REG_PARAMS x "
        "RECSYS_TUNE_ALPHAS, scoring RMSE (explicit mode) or precision@k (implicit). Prints "
        "every score and the settings of the best; the test side is never used. "
        "RECSYS_TUNE_BEFORE_TRAIN=true does this before each `recsys train`.",
    )
    tu.add_argument("--file", help="purchases or ratings CSV, plain or .gz, instead of the store")
    _mapping_flags(tu)
    tu.set_defaults(handler="spark.tune:tune_cli")

    ins = sub.add_parser(
        "inspect",
        help="show a CSV's columns, first rows and the mapping produce/train would use",
        description="Reads the header and the first rows only: the columns, a few rows, the "
        "mapping the same flags would give `recsys produce` and `recsys train --file` (with "
        "--mapping auto: guessed), the time format read and the flags that pin it.",
    )
    ins.add_argument("--file", required=True, help="CSV, plain or .gz")
    ins.add_argument("--rows", type=int, default=5, help="rows to show (default %(default)s)")
    _mapping_flags(ins)
    ins.set_defaults(handler="recsys.csv_mapping:inspect_cli")

    sp = sub.add_parser(
        "speed",
        help="the speed layer: fold every new sale into its user's vector and republish the list",
        description="Reads `sales` in a consumer group (more instances serve more partitions) and "
        "the current model from `model-factors`; for every sale newer than the model, solves the "
        "user's vector with the model's own implicit-ALS equations and publishes the user's top "
        "N on `recommendations` (source fold-in). Per-user state is changelogged to `speed-state` "
        "and restored on restart. SIGTERM or Ctrl-C commits the batch in progress and stops.",
    )
    sp.add_argument("--group", help="consumer group (default recsys-speed)")
    sp.add_argument("--topic-prefix", help=argparse.SUPPRESS)  # tests: `<prefix>sales`, ...
    sp.set_defaults(handler="speed.layer:cli")

    md = sub.add_parser(
        "models",
        help="the registry of trained models; put one in service by hand, or roll back",
        description="list: every model on model-ready (version, trained at, events, trigger, "
        "status, precision@k next to popularity and the champion it faced, saved or not; * "
        "marks the one in service). show V: one model's record. promote V: serve saved model V "
        "again (its lists republished from the saved model, its factors for the speed layer, a "
        "model-ready with status promoted and trigger manual). rollback: promote the model that "
        "served before the one in service.",
    )
    md.add_argument("action", choices=["list", "show", "promote", "rollback"])
    md.add_argument("version", nargs="?", type=int, help="model version (show, promote)")
    md.add_argument("--topic-prefix", help=argparse.SUPPRESS)
    md.set_defaults(handler="spark.lifecycle:cli")

    c = sub.add_parser("consume", help="print a topic's records as JSON lines, decoded")
    c.add_argument("topic", help="sales, sales.dlq, model-ready, recommendations, graph-edges, ...")
    c.add_argument("--from-beginning", action="store_true", help="start at the earliest offset")
    c.add_argument("--max", type=int, help="stop after N records")
    c.add_argument("--timeout", type=float, help="stop after S seconds without a record")
    c.set_defaults(handler="streams.consume:cli")

    db = sub.add_parser(
        "dashboard",
        help="serve the live Bokeh dashboard (http://127.0.0.1:5006 by default)",
        description="A Bokeh server reading model-ready, recommendations, graph-edges, feedback, "
        "sales and sales.dlq from the beginning, so a new page shows the current state at once.",
    )
    db.add_argument("--host", help="listen address (RECSYS_DASHBOARD_HOST)")
    db.add_argument("--port", type=int, help="listen port (RECSYS_DASHBOARD_PORT)")
    db.add_argument("--allow-websocket-origin", dest="allow_websocket_origin",
                    help="comma-separated host[:port] origins (RECSYS_DASHBOARD_ALLOW_WEBSOCKET_ORIGIN)")
    db.add_argument("--show", action="store_true", help="open a browser tab")
    db.set_defaults(handler="visualizer.server:cli")

    rp = sub.add_parser(
        "report",
        help="write one standalone HTML page (Bokeh) of a model's recommendation graph export",
        description="Reads <RECSYS_EXPORT_DIR>/<version>/ (written after each model) and draws the "
        "sampled user-product network, the degree distribution and the most recommended products "
        "into one HTML file that opens offline.",
    )
    rp.add_argument("--model-version", type=int, help="the export to draw (default: the newest)")
    rp.add_argument("--output", help="HTML file (default: report.html in the export folder)")
    rp.set_defaults(handler="visualizer.report:cli")

    ag = sub.add_parser(
        "aggregate",
        help="Faust: live tables, the feedback loop and a read API over the result topics",
        description="One Faust worker reading sales, sales.dlq, model-ready and recommendations "
        "into tables (recovered from changelog topics after a restart), publishing `feedback` "
        "(online hit-rate and precision@k per model version) and serving JSON at "
        "/recommendations/{user_id}, /stats and /ready. SIGTERM or Ctrl-C commits and stops.",
    )
    ag.add_argument("--web-host", help="API listen address (RECSYS_AGGREGATE_WEB_HOST)")
    ag.add_argument("--web-port", type=int, help="API port (RECSYS_AGGREGATE_WEB_PORT)")
    ag.add_argument("--topic-prefix", help=argparse.SUPPRESS)  # tests: `<prefix>sales`, ...
    ag.set_defaults(handler="streams.app:cli")

    cfg = sub.add_parser("config", help="show the effective settings (or the reference table)")
    cfg.add_argument("--markdown", action="store_true", help="print README's reference table")
    cfg.set_defaults(handler="recsys.cli:config_cli")

    d = sub.add_parser("demo", help="the main job on the embedded default, start to finish")
    d.add_argument("--limit", type=int, help="replay only the first N rows")
    d.set_defaults(handler="recsys.demo:cli")

    for name, text in (
        ("up", "start the broker and every role in the background (logs under var/log/)"),
        ("down", "stop every role `recsys up` started, then the broker"),
        ("status", "show which parts of the local stack run"),
    ):
        sub.add_parser(name, help=text).set_defaults(handler="recsys.supervisor:cli")

    return p


def config_cli(settings: settings_mod.Settings, args: argparse.Namespace) -> int:
    if args.markdown:
        print(settings_mod.markdown_table())
        return 0
    for name, value in settings.model_dump().items():
        print(f"{settings_mod.ENV_PREFIX}{name.upper()}={'' if value is None else value}")
    return 0


def _resolve(spec: str) -> Callable[[settings_mod.Settings, argparse.Namespace], int]:
    module, func = spec.split(":")
    return getattr(import_module(module), func)


# Commands that reach no broker, or start it (the credentials check of `main` skips them).
OFFLINE_COMMANDS = frozenset({"config", "inspect", "report", "broker", "up", "down", "status",
                              "demo"})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_mod.load(
            kafka_bootstrap=args.kafka_bootstrap, data_dir=args.data_dir, log_level=args.log_level
        )
    except settings_mod.SettingsError as exc:
        print(f"recsys: {exc}", file=sys.stderr)
        return 2
    from recsys import logs

    logs.setup(settings.log_level)
    try:
        if settings.secured and args.command not in OFFLINE_COMMANDS:
            # Refused credentials: one line naming the setting, before a client repeats the
            # refusal in its log twice a second (recsys/kafka.py login_problem).
            from recsys.kafka import login_problem

            if (problem := login_problem(settings)) is not None:
                raise settings_mod.SettingsError(problem)
        return _resolve(args.handler)(settings, args) or 0
    except settings_mod.SettingsError as exc:
        print(f"recsys: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        log.warning("interrupted")
        return 130
    except Exception as exc:  # Kafka refused this principal: one line, not a traceback
        from recsys.kafka import refusal_line

        if not settings.secured or (line := refusal_line(settings, exc)) is None:
            raise
        print(f"recsys: {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
