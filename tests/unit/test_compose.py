"""docker-compose.yml and the Dockerfile, checked statically (no Docker engine here): every
recsys service runs a real `recsys` subcommand with flags the CLI accepts, every RECSYS_
variable is a setting with a valid value, every image is pinned, the Kafka quorum is three
brokers, topics are replicated three times."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from recsys import cli
from recsys.settings import ENV_PREFIX, Settings, SettingsError, load

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
RECSYS_SERVICES = ("topics", "stream", "speed", "aggregate", "dashboard", "producer")
KAFKA = ("kafka-1", "kafka-2", "kafka-3")


def env(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {k: str(v) for k, v in raw.items()}


def built_here(service: dict[str, Any]) -> bool:
    return "build" in service


def test_the_expected_services_are_declared():
    assert set(RECSYS_SERVICES) | set(KAFKA) | {"spark-master"} <= set(SERVICES)
    workers = [n for n, s in SERVICES.items() if "Worker" in " ".join(s.get("command") or [])]
    assert len(workers) == 2


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_image_is_pinned(name):
    image = SERVICES[name]["image"]
    repo, _, tag = image.rpartition(":")
    assert repo and tag, f"{name}: {image} has no tag"
    assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{name}: {image} is not pinned"


def test_dockerfile_images_are_pinned_and_install_like_make_setup():
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms
    for image in froms:
        repo, _, tag = image.rpartition(":")
        assert repo and tag != "latest" and re.search(r"\d+\.\d+", tag), image
    assert any(i.startswith("python:3.11") for i in froms)
    assert "openjdk-17-jdk" in text
    assert "-c constraints.txt" in text
    assert "dependency:copy-dependencies" in text and "jvm/pom.xml" in text
    assert re.search(r'^ENTRYPOINT .*"recsys"\]', text, flags=re.M)


@pytest.mark.parametrize("name", RECSYS_SERVICES)
def test_recsys_services_run_a_real_subcommand(name):
    service = SERVICES[name]
    assert built_here(service) and "entrypoint" not in service
    command = service["command"]
    subcommands = cli.build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert command[0] in subcommands, f"{name}: `recsys {command[0]}` does not exist"
    try:
        args = cli.build_parser().parse_args(command)
    except SystemExit:
        pytest.fail(f"{name}: `recsys {' '.join(command)}` is rejected by the CLI")
    assert args.command == command[0]


def test_the_other_services_built_here_are_spark_workers_of_the_master():
    for name, service in SERVICES.items():
        if not built_here(service) or name in RECSYS_SERVICES:
            continue
        assert service["entrypoint"][-1] == "/opt/spark/bin/spark-class", name
        assert service["command"] == [
            "org.apache.spark.deploy.worker.Worker", "spark://spark-master:7077"
        ], name
    assert "org.apache.spark.deploy.master.Master" in SERVICES["spark-master"]["command"]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_recsys_variable_is_a_setting_with_a_valid_value(name, monkeypatch):
    variables = {k: v for k, v in env(SERVICES[name]).items() if k.startswith(ENV_PREFIX)}
    known = {ENV_PREFIX + f.upper() for f in Settings.model_fields}
    unknown = set(variables) - known
    assert not unknown, f"{name}: not settings: {sorted(unknown)}"
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    try:
        load()
    except SettingsError as exc:
        pytest.fail(f"{name}: {exc}")


def test_recsys_services_share_the_cluster_settings():
    for name in RECSYS_SERVICES:
        e = env(SERVICES[name])
        assert e["RECSYS_TOPIC_REPLICATION"] == "3", name
        servers = e["RECSYS_KAFKA_BOOTSTRAP"].split(",")
        assert sorted(s.split(":")[0] for s in servers) == list(KAFKA), name
    stream = env(SERVICES["stream"])
    assert stream["RECSYS_SPARK_MASTER"] == "spark://spark-master:7077"


def test_recsys_services_wait_for_the_topics():
    assert SERVICES["topics"]["command"] == ["topics", "create"]
    for name in ("stream", "aggregate", "dashboard", "producer"):
        deps = SERVICES[name]["depends_on"]
        assert deps["topics"]["condition"] == "service_completed_successfully", name


def test_a_three_broker_kraft_quorum():
    ids, cluster_ids = set(), set()
    for name in KAFKA:
        service = SERVICES[name]
        assert service["image"] == "apache/kafka:4.1.1"
        e = env(service)
        ids.add(e["KAFKA_NODE_ID"])
        cluster_ids.add(e["CLUSTER_ID"])
        assert set(e["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
        voters = e["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
        assert sorted(v.split("@")[1].split(":")[0] for v in voters) == list(KAFKA)
        assert f"INTERNAL://{name}:19092" in e["KAFKA_ADVERTISED_LISTENERS"]
        assert e["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
        assert e["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3"
        assert any(v.endswith(":/var/lib/kafka/data") for v in service["volumes"])
    assert ids == {"1", "2", "3"} and len(cluster_ids) == 1


def test_the_dashboard_listens_where_its_port_is_published():
    service = SERVICES["dashboard"]
    e = env(service)
    assert e["RECSYS_DASHBOARD_HOST"] == "0.0.0.0"
    port = e["RECSYS_DASHBOARD_PORT"]
    assert any(p.endswith(f":{port}:{port}") for p in service["ports"])
    origins = e["RECSYS_DASHBOARD_ALLOW_WEBSOCKET_ORIGIN"].split(",")
    assert f"localhost:{port}" in origins


# --- the loopback cluster (recsys/cluster.py) runs the compose file's broker settings ----------------
# Keys that describe where a node lives (hosts, listeners, folders, heap), not how it behaves.
PLACEMENT = {"NODE_ID", "CONTROLLER_QUORUM_VOTERS", "LISTENERS", "ADVERTISED_LISTENERS",
             "INTER_BROKER_LISTENER_NAME", "LISTENER_SECURITY_PROTOCOL_MAP", "LOG_DIRS",
             "HEAP_OPTS"}


def test_the_loopback_cluster_brokers_use_the_compose_broker_settings(tmp_path):
    from recsys.cluster import LocalCluster

    cluster = LocalCluster(tmp_path, free_ports=True)
    assert len(cluster.brokers) == len(KAFKA)
    for name, broker in zip(KAFKA, cluster.brokers, strict=True):
        e = env(SERVICES[name])
        props = broker.properties()
        behaviour = {k.removeprefix("KAFKA_"): v for k, v in e.items()
                     if k.startswith("KAFKA_") and k.removeprefix("KAFKA_") not in PLACEMENT}
        assert behaviour, name
        for key, value in behaviour.items():
            prop = key.lower().replace("_", ".")
            assert props.get(prop) == value, f"{name}: {prop}={props.get(prop)!r}, compose {value!r}"
        assert props["node.id"] == e["KAFKA_NODE_ID"]
        voters = props["controller.quorum.voters"].split(",")
        assert len(voters) == len(e["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(","))
        # what compose leaves to Kafka's defaults (3 and 2) is set to the same explicitly
        assert props["share.coordinator.state.topic.replication.factor"] == "3"
        assert props["share.coordinator.state.topic.min.isr"] == "2"


def test_the_loopback_cluster_points_the_product_like_the_compose_services(tmp_path):
    from recsys.cluster import LocalCluster

    cluster = LocalCluster(tmp_path, free_ports=True)
    s = cluster.settings()
    stream = env(SERVICES["stream"])
    assert s.topic_replication == int(stream["RECSYS_TOPIC_REPLICATION"])
    assert len(s.kafka_bootstrap.split(",")) == len(stream["RECSYS_KAFKA_BOOTSTRAP"].split(","))
    assert s.spark_master.startswith("spark://")
    for path in (s.store, s.checkpoints, s.models, str(s.export_dir)):
        assert Path(path).is_relative_to(cluster.shared_dir), path
