"""The local broker for real: topics, a record round trip, clean stop, crash, and the CLI.

Each test takes its own broker from the factory (it stops and kills it), never the shared one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, ConfigResource

from recsys import paths
from recsys.broker import BrokerError, LocalBroker, free_port
from recsys.kafka import admin_config, consumer_config, producer_config
from recsys.settings import Settings, load
from recsys.topics import create_like, create_topics, describe
from schemas.topics import SALES, SALES_DLQ, TOPICS

pytestmark = pytest.mark.integration


def _produce(settings: Settings, topic: str, values: list[bytes]) -> None:
    producer = Producer(producer_config(settings))
    errors: list[str] = []
    for i, value in enumerate(values):
        producer.produce(
            topic, value, key=str(i).encode(), on_delivery=lambda e, _m: e and errors.append(str(e))
        )
    assert producer.flush(30) == 0
    assert errors == []


def _consume_all(settings: Settings, topic: str, expected: int, timeout: float = 30) -> list[bytes]:
    """Every value on `topic` from the beginning, with a fresh group."""
    group = f"test-{os.urandom(4).hex()}"
    consumer = Consumer(consumer_config(settings, group))
    consumer.subscribe([topic])
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            got.append(msg.value())
    finally:
        consumer.close()
    return got


def _cleanup_policy(settings: Settings, topic: str) -> str:
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    admin = AdminClient(admin_config(settings))  # kept referenced until the answer arrives
    return admin.describe_configs([resource])[resource].result(10)["cleanup.policy"].value


def test_topics_data_survive_clean_stop_and_crash(broker_factory, tmp_path):
    broker = broker_factory.start()
    settings = load(kafka_bootstrap=broker.bootstrap, data_dir=tmp_path)
    clean_marker = broker.log_dir / ".kafka_cleanshutdown"

    # topics: every declared one, idempotently
    assert sorted(create_topics(settings)) == sorted(t.name for t in TOPICS)
    assert create_topics(settings) == []
    listed = {name: (count, policy) for name, count, policy in describe(settings)}
    assert listed["recommendations"][1] == "compact"
    assert _cleanup_policy(settings, "recommendations") == "compact"
    assert listed[SALES_DLQ][0] == 1
    assert listed[SALES][0] == 2
    assert create_like(settings, SALES, "sales-copy") is True
    assert create_like(settings, SALES, "sales-copy") is False

    # a record round trip
    first = [f"before-{i}".encode() for i in range(100)]
    _produce(settings, SALES, first)
    assert sorted(_consume_all(settings, SALES, 100)) == sorted(first)

    # SIGTERM: a clean shutdown, then the same folder brings back topics and data
    pid = broker.pid
    broker.stop()
    assert broker.pid is None and not broker.pid_path.exists()
    assert clean_marker.exists(), "SIGTERM should end in Kafka's clean shutdown"
    with pytest.raises(ProcessLookupError):  # exited and reaped
        os.kill(pid, 0)
    broker.start()
    assert create_topics(settings) == []
    assert _cleanup_policy(settings, "recommendations") == "compact"
    assert sorted(_consume_all(settings, SALES, 100)) == sorted(first)

    # SIGKILL: no clean shutdown, yet everything acknowledged is still there after recovery
    second = [f"after-{i}".encode() for i in range(100)]
    _produce(settings, SALES, second)
    broker.kill()
    assert not clean_marker.exists()
    began = time.monotonic()
    broker.restart()
    log_recovery = time.monotonic() - began
    assert sorted(_consume_all(settings, SALES, 200)) == sorted(first + second)
    assert log_recovery < 60


def _recsys(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recsys.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_start_status_stop(tmp_path):
    port = free_port()
    env = {**os.environ, "RECSYS_DATA_DIR": str(tmp_path)}
    flags = ["--bootstrap", f"127.0.0.1:{port}"]
    broker = LocalBroker(tmp_path / "kafka", port)
    try:
        stopped = _recsys(*flags, "broker", "status", env=env)
        assert stopped.returncode == 1 and "stopped" in stopped.stdout

        started = _recsys(*flags, "broker", "start", "--timeout", "120", env=env)
        assert started.returncode == 0, started.stderr
        assert f"127.0.0.1:{port}" in started.stdout
        # the broker outlived the command that started it
        assert broker.is_ready(timeout=10)
        pid = broker.pid
        assert pid is not None and (tmp_path / "kafka" / "broker.pid").read_text().strip() == str(
            pid
        )

        again = _recsys(*flags, "broker", "start", env=env)
        assert again.returncode == 0 and "already running" in again.stdout

        status = _recsys(*flags, "broker", "status", env=env)
        assert status.returncode == 0, status.stdout
        assert "running" in status.stdout and str(pid) in status.stdout
        assert "answering" in status.stdout and "NOT" not in status.stdout

        created = _recsys(*flags, "topics", "create", env=env)
        assert created.returncode == 0, created.stderr
        listed = _recsys(*flags, "topics", "list", env=env)
        assert "recommendations" in listed.stdout and "cleanup.policy=compact" in listed.stdout

        stop = _recsys(*flags, "broker", "stop", env=env)
        assert stop.returncode == 0, stop.stderr
        assert broker.pid is None
        assert (broker.log_dir / ".kafka_cleanshutdown").exists()

        after = _recsys(*flags, "broker", "status", env=env)
        assert after.returncode == 1 and "stopped" in after.stdout
        assert _recsys(*flags, "broker", "stop", env=env).returncode == 0
    finally:
        broker.kill()


def test_topics_cli_without_a_broker_fails_in_one_line(tmp_path):
    env = {**os.environ, "RECSYS_DATA_DIR": str(tmp_path)}
    out = _recsys("--bootstrap", f"127.0.0.1:{free_port()}", "topics", "list", env=env)
    assert out.returncode == 1
    assert out.stderr.startswith("recsys: Kafka at 127.0.0.1:"), out.stderr
    assert "not reachable" in out.stderr and len(out.stderr.splitlines()) == 1


def test_a_failed_start_quotes_broker_log(tmp_path, monkeypatch):
    """Jars that hold no broker: the JVM fails and the error carries its own words."""
    jars = tmp_path / "jars"
    jars.mkdir()
    (jars / "slf4j-api.jar").symlink_to(next(paths.KAFKA_JARS.glob("slf4j-api-*.jar")))
    monkeypatch.setattr(paths, "KAFKA_JARS", jars)
    broker = LocalBroker(tmp_path / "kafka", free_port(), class_sharing=False)
    with pytest.raises(BrokerError) as failed:
        broker.start(timeout=30)
    message = str(failed.value)
    assert "broker.log" in message and "kafka.tools.StorageTool" in message
    assert broker.pid is None
