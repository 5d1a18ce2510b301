"""Safe Kafka client defaults, in one place (librdkafka leaves idempotence off unless told).

Producers: idempotent, acks=all, so a retry never duplicates or reorders within a partition.
Consumers: offsets committed only after the work is done (auto commit off where we process).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from recsys.settings import Settings

PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "compression.type": "lz4",
    "max.in.flight.requests.per.connection": 5,
    "delivery.timeout.ms": 120_000,
    "queue.buffering.max.messages": 500_000,
    "queue.buffering.max.kbytes": 512 * 1024,
    # The Java client's key hash (murmur2), as Spark's Kafka sink and aiokafka use: a user's
    # fold-in list (speed layer) and retrain list (Spark) must land in the same partition of the
    # compacted `recommendations`, or both survive and readers see a stale one (librdkafka's
    # default, CRC32, put them apart: the reliability tier's ledger found it).
    "partitioner": "murmur2_random",
}

CONSUMER_DEFAULTS: dict[str, Any] = {
    "enable.auto.commit": False,
    "auto.offset.reset": "earliest",
    "enable.partition.eof": False,
}


def security_config(settings: Settings) -> dict[str, Any]:
    """librdkafka's security options for the settings (recsys/security.py resolves them): every
    confluent-kafka client of the product takes them through the three builders below."""
    from recsys.security import client_security

    sec = client_security(settings)
    conf: dict[str, Any] = {}
    if sec.protocol != "PLAINTEXT":
        conf["security.protocol"] = sec.protocol
    if sec.sasl:
        conf.update({"sasl.mechanism": sec.mechanism, "sasl.username": sec.username,
                     "sasl.password": sec.password.get_secret_value()})
    if sec.tls and sec.ca_file is not None:
        conf["ssl.ca.location"] = str(sec.ca_file)
    return conf


def java_security_options(settings: Settings, prefix: str = "kafka.") -> dict[str, str]:
    """The same for a Java client (Spark's Kafka source and sink take them `kafka.`-prefixed):
    the CA as a PEM trust store, the credentials as a JAAS line (Spark redacts it in logs and
    plans: its value matches spark.redaction.regex)."""
    from recsys.security import PLAIN_LOGIN, SCRAM_LOGIN, client_security

    sec = client_security(settings)
    out: dict[str, str] = {}
    if sec.protocol != "PLAINTEXT":
        out["security.protocol"] = sec.protocol
    if sec.sasl:
        module = PLAIN_LOGIN if sec.mechanism == "PLAIN" else SCRAM_LOGIN
        pw = sec.password.get_secret_value()
        out["sasl.mechanism"] = sec.mechanism
        out["sasl.jaas.config"] = f'{module} required username="{sec.username}" password="{pw}";'
    if sec.tls and sec.ca_file is not None:
        out["ssl.truststore.type"] = "PEM"
        out["ssl.truststore.location"] = str(sec.ca_file)
    return {prefix + k: v for k, v in out.items()}


def aiokafka_security(settings: Settings) -> dict[str, Any]:
    """The same as aiokafka keyword arguments (Faust's `broker_credentials` holds the same)."""
    from recsys.security import client_security

    sec = client_security(settings)
    out: dict[str, Any] = {}
    if sec.protocol == "PLAINTEXT":
        return out
    out["security_protocol"] = sec.protocol
    if sec.sasl:
        out.update(sasl_mechanism=sec.mechanism, sasl_plain_username=sec.username,
                   sasl_plain_password=sec.password.get_secret_value())
    if sec.tls:
        out["ssl_context"] = ssl_context(settings)
    return out


def ssl_context(settings: Settings) -> Any:
    """A client TLS context trusting the configured CA (or the system's), hostname checked."""
    from aiokafka.helpers import create_ssl_context

    from recsys.security import client_security

    ca = client_security(settings).ca_file
    return create_ssl_context(cafile=str(ca) if ca is not None else None)


def faust_credentials(settings: Settings) -> Any:
    """Faust's `broker_credentials` for the settings; None for PLAINTEXT."""
    import faust

    from recsys.security import client_security

    sec = client_security(settings)
    if sec.sasl:
        return faust.SASLCredentials(
            username=sec.username, password=sec.password.get_secret_value(),
            ssl_context=ssl_context(settings) if sec.tls else None, mechanism=sec.mechanism)
    if sec.tls:
        return faust.SSLCredentials(ssl_context(settings))
    return None


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    conf = {
        "bootstrap.servers": settings.kafka_bootstrap,
        **security_config(settings),
        "linger.ms": settings.producer_linger_ms,
        "batch.size": settings.producer_batch_kb * 1024,
        **PRODUCER_DEFAULTS,
    }
    conf.update(overrides)
    return conf


def consumer_config(settings: Settings, group: str, **overrides: Any) -> dict[str, Any]:
    conf = {"bootstrap.servers": settings.kafka_bootstrap, "group.id": group,
            **security_config(settings), **CONSUMER_DEFAULTS}
    conf.update(overrides)
    return conf


def admin_config(settings: Settings) -> dict[str, Any]:
    return {"bootstrap.servers": settings.kafka_bootstrap, **security_config(settings)}


def _watermarks(consumer: Any, tp: Any, wait: float = 30.0) -> tuple[int, int]:
    """(low, high) of a partition, once it has a leader: a topic created a moment ago may not
    have one yet, and the broker answers with an error until it does."""
    import time

    from confluent_kafka import KafkaException

    deadline = time.monotonic() + wait
    while True:
        try:
            return consumer.get_watermark_offsets(tp, timeout=15)
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def iter_to_end(consumer: Any, topic: str, partitions: list[int] | None = None,
                last: int | None = None, timeout: float = 60.0) -> Iterator[Any]:
    """The messages of `topic` (its `partitions`, default all) now, up to each partition's high
    watermark (or only the `last` of each), as `consumer` fetches them; the consumer stays
    assigned past them, so it can go on reading what comes next. LookupError for a topic the
    cluster lacks; TimeoutError when the partitions are not read to their end in `timeout` s."""
    import time

    from confluent_kafka import TopicPartition

    if partitions is None:
        meta = consumer.list_topics(topic, timeout=15).topics[topic]
        if meta.error is not None:
            raise LookupError(f"topic {topic!r}: {meta.error}")
        partitions = sorted(meta.partitions)
    ends = {p: _watermarks(consumer, TopicPartition(topic, p)) for p in partitions}
    start = {p: lo if last is None else max(lo, hi - last) for p, (lo, hi) in ends.items()}
    consumer.assign([TopicPartition(topic, p, start[p]) for p in ends])
    left = {p for p, (_, hi) in ends.items() if hi > start[p]}
    deadline = time.monotonic() + timeout
    while left:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{topic}: partitions {sorted(left)} not read to their end in "
                               f"{timeout:.0f} s")
        for m in consumer.consume(num_messages=5000, timeout=0.5):
            if m.error() is not None:
                continue
            yield m
            if m.offset() + 1 >= ends[m.partition()][1]:
                left.discard(m.partition())


def read_to_end(settings: Settings, topic: str, last: int | None = None, timeout: float = 60.0
                ) -> list[Any]:
    """`iter_to_end` with a throwaway consumer (nothing committed), in (partition, offset)
    order."""
    import os
    import time

    from confluent_kafka import Consumer

    consumer = Consumer(consumer_config(settings, f"read-{os.getpid()}-{time.time_ns()}"))
    try:
        out = list(iter_to_end(consumer, topic, last=last, timeout=timeout))
        return sorted(out, key=lambda m: (m.partition(), m.offset()))
    finally:
        consumer.close()


def login_problem(settings: Settings, timeout: float = 10.0) -> str | None:
    """When a client could not get metadata: the one line naming the setting to fix if the broker
    refused our credentials or our TLS trust (librdkafka reports both only as a transport
    failure, with the reason in its error callback); None otherwise. The line never holds a
    secret: a password is named by its setting, never shown."""
    import socket

    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient

    from recsys.security import client_security, redact

    sec = client_security(settings)
    if sec.protocol == "PLAINTEXT":
        return None
    for server in settings.kafka_bootstrap.split(","):  # nobody listening: not our question
        host, _, port = server.strip().rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
            break
        except OSError:
            continue
    else:
        return None
    errors: list[Any] = []
    admin = AdminClient({**admin_config(settings), "error_cb": errors.append, "log_level": 0,
                         "reconnect.backoff.max.ms": 1000})
    try:
        admin.list_topics(timeout=timeout)
        return None
    except KafkaException:
        admin.poll(0)  # hands the queued error callbacks over
    env = "RECSYS_"
    for err in errors:
        why = redact(err.str(), settings)
        if err.code() in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED):
            if settings.kafka_sasl_password_file is not None:
                name, shown = "KAFKA_SASL_PASSWORD_FILE", str(settings.kafka_sasl_password_file)
            elif settings.kafka_sasl_password.get_secret_value():
                name, shown = "KAFKA_SASL_PASSWORD", "**********"
            else:
                name, shown = "KAFKA_SASL_USERNAME", sec.username
            return (f"bad setting {env}{name}={shown!r}: Kafka at {settings.kafka_bootstrap} "
                    f"refused user {sec.username!r} ({sec.mechanism}): wrong password or no such "
                    f"user ({why.split(': ', 1)[-1][:160]})")
        if err.code() == KafkaError._SSL:
            ca = str(sec.ca_file) if sec.ca_file is not None else ""
            return (f"bad setting {env}KAFKA_SSL_CA_FILE={ca!r}: TLS with Kafka at "
                    f"{settings.kafka_bootstrap} failed: {why[-200:]}")
    return None


AUTHORIZATION_CODES = ("TOPIC_AUTHORIZATION_FAILED", "GROUP_AUTHORIZATION_FAILED",
                       "CLUSTER_AUTHORIZATION_FAILED", "TRANSACTIONAL_ID_AUTHORIZATION_FAILED")


def refusal_line(settings: Settings, exc: BaseException) -> str | None:
    """The line for an exception that is Kafka refusing this principal an operation (a fatal
    error confluent-kafka raises from inside a callback arrives as the SystemError's cause);
    None for anything else."""
    from confluent_kafka import KafkaError, KafkaException

    from recsys.security import client_security, redact

    while exc is not None and not isinstance(exc, KafkaException):
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    if exc is None or not exc.args or not isinstance(exc.args[0], KafkaError):
        return None
    err: Any = exc.args[0]
    if err.name() not in AUTHORIZATION_CODES:
        return None
    user = client_security(settings).username or "ANONYMOUS"
    return (f"Kafka at {settings.kafka_bootstrap} refused user {user!r} this command "
            f"({redact(err.str(), settings)[:200]}): its ACLs do not allow it; check "
            f"RECSYS_KAFKA_SASL_USERNAME (README: Security lists what each role may do)")
