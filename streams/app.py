"""The Faust app of `recsys aggregate`: tables, the feedback loop and the read API.

Built by `create_app(settings)` rather than at import, so the broker, ports and partitions come
from the one Settings object and tests build as many apps as they like; the layout inside
follows Faust's own (app, agents, tables, views).

Inputs. `sales` is read by the app's `SalesReader` service (streams/sales_reader.py), a plain
aiokafka consumer handing whole fetches to `Aggregation.on_sales`: Faust's per-event path held the
worker near 3,000 sales/s. `recommendations`, `recommendations-shadow` (a rejected challenger's
lists, judged beside the served ones), `model-ready` and `sales.dlq` stay on Faust agents
(streams/agents.py).

Guarantees. Processing is at-least-once (Faust's exactly_once has open duplicate bugs): the
producer is flushed (changelog writes, dead letters acked) before input offsets are committed, by
Faust for its agents and by the reader for `sales` (its own group, `<app id>-sales`). Every table
update is idempotent on the event's deterministic id, so the events a killed worker reads again
change nothing (streams/tables.py). Tables live in memory (`memory://`; RocksDB is not installed)
and come back from their changelog topics at start; the reader reads only once they have (and
pauses while Faust rebalances). One worker holds every partition.

Topics. The declared topics (schemas/topics.py) must exist (`recsys topics create`): Faust never
creates them, as they are not `internal`. Faust creates its own topics through the admin API,
which works with the broker's auto.create.topics.enable=false:

    recsys-aggregate-<table>-changelog   compacted, one per table
    recsys-aggregate-__assignor-__leader

Consumer groups: `recsys-aggregate` (Faust's agents and changelogs), `recsys-aggregate-sales`
(the sales reader's commits; it assigns itself the partitions, so the group has no members).

Partitions are read from the broker at start, so the tables match their source topics.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import faust

from recsys import settings as settings_mod
from recsys.settings import Settings
from schemas import topics as T
from streams import agents as agents_mod
from streams import state as state_mod
from streams import tables as tables_mod
from streams import views
from streams.faust_codec import AvroCodec
from streams.feedback import horizon_ms
from streams.sales_reader import Lists, SalesReader, aiokafka_admin, aiokafka_consumer

log = logging.getLogger(__name__)

APP_ID = "recsys-aggregate"
INPUTS = (T.SALES, T.SALES_DLQ, T.MODEL_READY, T.RECOMMENDATIONS, T.RECOMMENDATIONS_SHADOW)
OUTPUTS = (T.FEEDBACK,)


@dataclass(frozen=True)
class Aggregator:
    """The app and what tests and the benchmark reach into."""

    app: faust.App
    tables: tables_mod.Tables
    state: state_mod.State
    topics: agents_mod.Topics
    aggregation: agents_mod.Aggregation
    agents: dict[str, Any]
    sales_reader: SalesReader


def app_id(topic_prefix: str = "") -> str:
    return f"{topic_prefix}{APP_ID}"


def declared_partitions(settings: Settings) -> dict[str, int]:
    """Partitions as `recsys topics create` makes them (used when the broker is not asked)."""
    from recsys.topics import partition_count

    return {t.name: partition_count(settings, t) for t in T.TOPICS}


def broker_partitions(settings: Settings, topic_prefix: str = "", timeout: float = 15.0
                      ) -> dict[str, int]:
    """Partitions of the topics the aggregator uses, from the broker; TopicError when one is
    missing (Faust would otherwise wait for it forever)."""
    from recsys.topics import topic_partitions

    names = INPUTS + OUTPUTS
    found = topic_partitions(settings, [f"{topic_prefix}{n}" for n in names], timeout)
    return {n: len(found[f"{topic_prefix}{n}"]) for n in names}


async def drain_buffer(producer: Any) -> None:
    """Hand every buffered message (table changelog writes) to the Kafka client.

    Faust's own `ProducerBuffer.flush` returns as soon as no message left the buffer for 0.1 s,
    which happens under CPU load; a commit could then cover a batch whose changelog record was
    still in the buffer. Looping until the buffer is empty makes it a barrier; the client's own
    flush (which waits for the broker's acks) follows in `flush`.
    """
    buffer = producer.buffer
    while buffer.size:
        await buffer.flush()


def create_app(
    settings: Settings,
    *,
    partitions: Mapping[str, int] | None = None,
    topic_prefix: str = "",
    web: bool = True,
    name: str | None = None,
    **faust_options: Any,
) -> Aggregator:
    """A configured Faust app with its tables, agents, timers and views; `name` replaces the
    app id (consumer group and changelog prefix), for benchmarks that start from scratch."""
    parts = {**declared_partitions(settings), **(partitions or {})}
    brokers = [f"kafka://{s.strip()}" for s in settings.kafka_bootstrap.split(",")]
    options: dict[str, Any] = {
        "broker": brokers,
        "store": "memory://",
        "datadir": str((settings.data_dir / "aggregate").absolute()),
        "processing_guarantee": "at_least_once",
        "autodiscover": False,
        "topic_partitions": parts[T.SALES],
        "topic_replication_factor": settings.topic_replication,
        "topic_allow_declare": True,  # only Faust's own topics: ours are not `internal`
        "consumer_auto_offset_reset": "earliest",
        "producer_acks": -1,
        # A killed worker holds its partitions until its session times out; Faust's 60 s
        # default makes a restart wait that long.
        "broker_session_timeout": 15.0,
        "broker_heartbeat_interval": 3.0,
        "web_enabled": web,
        "web_bind": settings.aggregate_web_host,
        "web_host": settings.aggregate_web_host,
        "web_port": settings.aggregate_web_port,
        "web_router_enabled": False,
        "web_tables_enabled": False,
        "web_graph_enabled": False,
        "web_stats_enabled": False,
        "logging_config": None,
    }
    from recsys.kafka import faust_credentials

    if (credentials := faust_credentials(settings)) is not None:  # TLS, SASL: recsys/kafka.py
        options["broker_credentials"] = credentials
    options.update(faust_options)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(name or app_id(topic_prefix), **options)

    def topic(name: str, record: str) -> Any:
        return app.topic(f"{topic_prefix}{name}", key_serializer="raw",
                         value_serializer=AvroCodec(record), partitions=parts[name])

    topics = agents_mod.Topics(
        sales=topic(T.SALES, "Sale"),
        dead_letters=topic(T.SALES_DLQ, "DeadLetter"),
        model_ready=topic(T.MODEL_READY, "ModelReady"),
        recommendations=topic(T.RECOMMENDATIONS, "Recommendation"),
        feedback=topic(T.FEEDBACK, "Feedback"),
        shadow=topic(T.RECOMMENDATIONS_SHADOW, "Recommendation"),
    )
    tables = tables_mod.declare(app, parts)
    state = state_mod.State(horizon_ms(settings.feedback_horizon_seconds),
                             settings.aggregate_keep_models)

    async def drain() -> None:
        await drain_buffer(app.producer)

    async def flush() -> None:
        await drain_buffer(app.producer)
        await app.producer.flush()

    aggregation = agents_mod.Aggregation(settings, tables, state, topics, flush, drain=drain)
    agents = agents_mod.register(app, settings, topics, aggregation)
    views.register(app, aggregation)

    # `sales` is read by its own consumer, not by a Faust agent (streams/sales_reader.py). It
    # starts after the first recovery (Faust starts app services then), reads once `resume` is
    # called below, and pauses while Faust rebalances and restores the tables.
    sales_group = f"{app.conf.id}-sales"
    sales_reader = SalesReader(
        aggregation, topic=topics.sales.get_topic_name(), partitions=parts[T.SALES],
        consumer=aiokafka_consumer(settings, sales_group), crash=app.crash,
        lists=Lists(topics.recommendations.get_topic_name(), parts[T.RECOMMENDATIONS],
                    app.conf.id, aiokafka_admin(settings, sales_group),
                    shadow=(topics.shadow.get_topic_name(), parts[T.RECOMMENDATIONS_SHADOW])))
    app.service(sales_reader)

    @app.on_partitions_revoked.connect
    async def _pause_sales(_app: Any, revoked: Any, **_: Any) -> None:
        await sales_reader.pause()  # the fetch being handled commits before the tables move

    @tables.sales_batches.on_recover
    async def _recovered() -> None:
        # Faust resumes the flow to read the changelogs; after this callback it resumes the
        # input partitions, seeks them to the committed offsets and resumes the flow again, and
        # resuming CLEARS every agent's input queue (mode's FlowControlEvent.resume). Events
        # fetched while the seek waits for the broker would be queued, then thrown away: never
        # processed, never acked, and behind the read offset, so not read again until the next
        # restart. Suspended here, the flow holds them in the fetcher until that last resume.
        app.flow_control.suspend()
        try:
            await aggregation.on_recovered()
        except Exception as exc:  # counting on without the views would count wrong: stop
            log.critical("cannot derive the views from the recovered tables (%s: %s); their "
                         "changelog topics (%s-*-changelog) hold a format this version does not "
                         "read", type(exc).__name__, exc, app.conf.id)
            await app.crash(exc)
            return
        sales_reader.resume()  # not an agent: it reads on once the views are derived

    return Aggregator(app, tables, state, topics, aggregation, agents, sales_reader)


def _with_flags(settings: Settings, args: argparse.Namespace) -> Settings:
    return settings_mod.override(settings, aggregate_web_port=getattr(args, "web_port", None),
                                 aggregate_web_host=getattr(args, "web_host", None))


def cli(settings: Settings, args: argparse.Namespace) -> int:
    """`recsys aggregate`: run one worker until SIGTERM or Ctrl-C (it commits what it did)."""
    from recsys.topics import TopicError

    settings = _with_flags(settings, args)
    if (problem := views.token_problem(settings)) is not None:  # before any network I/O
        print(f"recsys: {problem}", file=sys.stderr)
        return 2
    prefix = getattr(args, "topic_prefix", None) or ""
    try:
        partitions = broker_partitions(settings, prefix)
    except TopicError as exc:
        print(f"recsys: {exc}", file=sys.stderr)
        return 1
    aggregator = create_app(settings, partitions=partitions, topic_prefix=prefix)
    log.info("aggregator %s on %s, partitions %s; read API http://%s:%d/stats",
             aggregator.app.conf.id, settings.kafka_bootstrap, partitions,
             settings.aggregate_web_host, settings.aggregate_web_port)
    if settings.log_level != "DEBUG":  # Faust's INFO is service start/stop chatter
        for noisy in ("mode", "faust", "streams.tables"):  # streams.tables: KeyedTable start/stop
            logging.getLogger(noisy).setLevel(logging.WARNING)
        logging.getLogger("faust.tables.recovery").setLevel(logging.INFO)
    worker = faust.Worker(
        aggregator.app,
        loglevel=settings.log_level,
        quiet=True,
        override_logging=False,
        redirect_stdouts=False,
    )
    worker.spinner = None  # a terminal spinner; its escape codes would land in log files
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
