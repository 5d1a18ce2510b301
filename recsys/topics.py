"""Create the declared topics (schemas/topics.py), idempotently, and list what a cluster holds.

Creation is safe to repeat: a topic that already exists counts as done, and its partition count
is compared with the declaration, so a drifted topic is reported (logged), never altered.
Tests create copies of a declared topic under unique names (`create_like`, `renamed`) so runs on
one broker never see each other's records.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import time
from collections.abc import Iterable

from recsys.kafka import admin_config
from recsys.settings import Settings
from schemas import topics as declared
from schemas.topics import TOPICS, Topic

log = logging.getLogger(__name__)


class TopicError(RuntimeError):
    """A topic could not be created or the cluster did not answer."""


def partition_count(settings: Settings, topic: Topic) -> int:
    """Declared single-partition topics (ordered logs) stay at 1; the keyed, scalable ones take
    `topic_partitions` (default 2, as declared)."""
    return 1 if topic.partitions == 1 else settings.topic_partitions


def renamed(prefix: str = "", suffix: str = "", topics: Iterable[Topic] = TOPICS) -> dict[str, str]:
    """Declared name -> `prefix + name + suffix`, for the `names` argument of create_topics."""
    return {t.name: f"{prefix}{t.name}{suffix}" for t in topics}


def _admin(settings: Settings):  # -> AdminClient, imported lazily like every client library
    """An admin client, once some bootstrap server accepts connections: with none up,
    librdkafka would print a refused connection twenty times a second until the timeout."""
    from confluent_kafka.admin import AdminClient

    for server in settings.kafka_bootstrap.split(","):
        host, _, port = server.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
            break
        except OSError as exc:
            reason = exc.strerror or str(exc)
    else:
        raise TopicError(
            f"Kafka at {settings.kafka_bootstrap} is not reachable ({reason}); "
            "is the broker running (`recsys broker status`)?"
        )
    return AdminClient(admin_config(settings))


def topic_partitions(settings: Settings, names: Iterable[str], timeout: float = 15.0
                     ) -> dict[str, list[int]]:
    """The partition ids of every topic in `names`, from the broker. TopicError, whose str() is
    the line to show the user, when the broker does not answer or a topic is missing. The one
    "does this topic exist" of every command: each checks before it starts its real work."""
    from confluent_kafka import KafkaException

    try:
        md = _admin(settings).list_topics(timeout=timeout)
    except KafkaException as exc:
        from recsys.kafka import login_problem  # refused credentials: name the setting

        raise TopicError(login_problem(settings) or f"cannot reach Kafka at "
                         f"{settings.kafka_bootstrap}: {exc.args[0]}") from None
    out = {}
    for name in names:
        found = md.topics.get(name)
        if found is None or found.error is not None:
            raise TopicError(f"topic {name!r} does not exist on {settings.kafka_bootstrap}: "
                             "run `recsys topics create`")
        out[name] = sorted(found.partitions)
    return out


def missing_topics(settings: Settings, names: list[str], timeout: float = 15.0) -> str | None:
    """None when the broker answers and every topic in `names` exists; otherwise the line to
    show the user."""
    try:
        topic_partitions(settings, names, timeout)
    except TopicError as exc:
        return str(exc)
    return None


def create_topics(
    settings: Settings,
    topics: Iterable[Topic] = TOPICS,
    names: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> list[str]:
    """Create every topic in `topics` (under `names[topic.name]` when given); return the names
    created now. Existing topics are fine; returns once all are in the cluster's metadata, so a
    producer started next finds them."""
    names = names or {}
    wanted = {names.get(t.name, t.name): (t, partition_count(settings, t)) for t in topics}
    return _create(settings, wanted, timeout)


def create_like(
    settings: Settings, like: str, name: str, partitions: int | None = None, timeout: float = 30.0
) -> bool:
    """Create `name` with the declared topic `like`'s config (tests: `sales-<uuid>`); True when
    created now. `partitions` overrides the declared count."""
    template = declared.topic(like)
    count = partitions or partition_count(settings, template)
    return bool(_create(settings, {name: (template, count)}, timeout))


def _create(settings: Settings, wanted: dict[str, tuple[Topic, int]], timeout: float) -> list[str]:
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic

    if not wanted:
        return []
    admin = _admin(settings)
    specs = [
        NewTopic(
            name,
            num_partitions=count,
            replication_factor=settings.topic_replication,
            config=dict(t.config),
        )
        for name, (t, count) in wanted.items()
    ]
    try:
        futures = admin.create_topics(specs, operation_timeout=timeout, request_timeout=timeout)
    except KafkaException as exc:
        raise TopicError(f"cannot create topics on {settings.kafka_bootstrap}: {exc}") from None
    created: list[str] = []
    for name, future in futures.items():
        try:
            future.result(timeout=timeout + 5)
        except KafkaException as exc:
            err = exc.args[0]
            if err.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise TopicError(f"cannot create topic {name}: {err.str()}") from None
            log.debug("topic %s exists", name)
        else:
            created.append(name)
            log.info("created topic %s", name)
    _wait_visible(admin, settings, wanted, timeout)
    return created


def _wait_visible(
    admin, settings: Settings, wanted: dict[str, tuple[Topic, int]], timeout: float
) -> None:
    """Every topic in metadata with a leader per partition; drift from the declaration logged."""
    deadline = time.monotonic() + timeout
    while True:
        md = _metadata(admin, settings, timeout)
        missing = [
            n for n in wanted
            if n not in md.topics or md.topics[n].error is not None
            or any(p.leader < 0 for p in md.topics[n].partitions.values())
        ]  # fmt: skip
        if not missing:
            break
        if time.monotonic() > deadline:
            raise TopicError(f"topics not ready after {timeout:.0f}s: {', '.join(missing)}")
        time.sleep(0.1)
    for name, (_, want) in wanted.items():
        have = len(md.topics[name].partitions)
        if have != want:
            log.warning("topic %s has %d partitions, declared %d (left as is)", name, have, want)


def _metadata(admin, settings: Settings, timeout: float):
    from confluent_kafka import KafkaException

    try:
        return admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise TopicError(
            f"Kafka at {settings.kafka_bootstrap} did not answer within {timeout:.0f}s "
            f"({exc.args[0].str()}); is the broker running (`recsys broker status`)?"
        ) from None


def describe(settings: Settings, timeout: float = 5.0) -> list[tuple[str, int, str]]:
    """(name, partitions, cleanup.policy) of every non-internal topic, sorted by name."""
    from confluent_kafka.admin import ConfigResource

    admin = _admin(settings)
    md = _metadata(admin, settings, timeout)
    names = sorted(n for n in md.topics if not n.startswith("__"))
    if not names:
        return []
    resources = [ConfigResource(ConfigResource.Type.TOPIC, n) for n in names]
    policies: dict[str, str] = {}
    for res, future in admin.describe_configs(resources, request_timeout=timeout).items():
        entry = future.result(timeout=timeout).get("cleanup.policy")
        policies[res.name] = entry.value if entry is not None else "?"
    return [(n, len(md.topics[n].partitions), policies.get(n, "?")) for n in names]


def cli(settings: Settings, args: argparse.Namespace) -> int:
    """`recsys topics create|list`."""
    try:
        if args.action == "create":
            created = set(create_topics(settings))
            for t in TOPICS:
                state = "created" if t.name in created else "exists"
                count = partition_count(settings, t)
                print(f"{t.name:<20} {count:>3} partition{'s'[: count - 1]:<1}  {state}")
            return 0
        rows = describe(settings)
        for name, count, policy in rows:
            mark = "" if name in declared.BY_NAME else "  (not declared)"
            plural = "s"[: count - 1]
            print(f"{name:<40} {count:>3} partition{plural:<1}  cleanup.policy={policy}{mark}")
        if not rows:
            print(f"no topics on {settings.kafka_bootstrap}; run `recsys topics create`")
        return 0
    except TopicError as exc:
        print(f"recsys: {exc}", file=sys.stderr)
        return 1
