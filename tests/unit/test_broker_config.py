"""The local broker's configuration and the launcher's refusals, without starting a JVM."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest

from recsys import paths
from recsys.broker import (
    BrokerError,
    LocalBroker,
    bootstrap_port,
    free_port,
    new_cluster_id,
    port_in_use,
    read_properties,
    render_properties,
    server_properties,
)
from recsys.settings import load
from recsys.topics import partition_count, renamed
from schemas.topics import TOPICS, topic

pytestmark = pytest.mark.unit


@pytest.fixture
def props(tmp_path: Path) -> dict[str, str]:
    return server_properties(tmp_path, 19092, 19093)


def test_listens_on_loopback_only(props):
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19093"
    hosts = re.findall(r"//([^:]+):", props["listeners"] + props["advertised.listeners"])
    assert set(hosts) == {"127.0.0.1"}


def test_one_node_combined_kraft(props):
    assert props["process.roles"] == "broker,controller"
    assert props["controller.listener.names"] == "CONTROLLER"
    assert props["node.id"] == "1"


def test_topics_are_never_created_by_accident(props):
    assert props["auto.create.topics.enable"] == "false"


def test_every_replication_factor_and_min_isr_is_one(props):
    # Kafka's defaults are 3 and 2: on one node the internal topics could never be created.
    expected = {
        "default.replication.factor",
        "min.insync.replicas",
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
        "share.coordinator.state.topic.replication.factor",
        "share.coordinator.state.topic.min.isr",
    }
    found = {k for k in props if k.endswith(("replication.factor", ".min.isr", ".insync.replicas"))}
    assert found == expected
    assert {props[k] for k in expected} == {"1"}


def test_no_rebalance_delay_and_small_segments(props):
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert int(props["log.segment.bytes"]) <= 128 * 1024 * 1024


def test_log_dirs_under_the_data_folder(tmp_path, props):
    assert Path(props["log.dirs"]) == tmp_path.absolute() / "logs"


def test_properties_file_round_trips(tmp_path, props):
    path = tmp_path / "server.properties"
    path.write_text(render_properties(props))
    assert read_properties(path) == props
    assert read_properties(tmp_path / "missing.properties") == {}


def test_restart_keeps_the_controller_port(tmp_path):
    first = LocalBroker(tmp_path, 19092, controller_port=19555)
    first.properties_path.write_text(render_properties(first.properties()))
    assert LocalBroker(tmp_path, 19092).controller_port == 19555


def test_cluster_id_is_kafka_shaped():
    for _ in range(50):
        cid = new_cluster_id()
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{21}", cid), cid


def test_bootstrap_port():
    assert bootstrap_port("127.0.0.1:9092") == 9092
    assert bootstrap_port("a:1,b:2") == 1


def test_port_in_use_sees_a_listener():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port_in_use(port)
        assert free_port() != port


def test_start_refuses_a_taken_port_before_launching(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        broker = LocalBroker(tmp_path / "kafka", s.getsockname()[1])
        with pytest.raises(BrokerError, match="in use"):
            broker.start(timeout=5)
    assert not (tmp_path / "kafka" / "broker.pid").exists()


def test_start_without_jars_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "KAFKA_JARS", tmp_path / "nothing")
    with pytest.raises(BrokerError, match="make setup"):
        LocalBroker(tmp_path / "kafka", free_port()).start(timeout=5)


def test_stopping_a_broker_that_is_not_running_is_harmless(tmp_path):
    broker = LocalBroker(tmp_path, free_port())
    broker.pid_path.parent.mkdir(parents=True, exist_ok=True)
    broker.pid_path.write_text("999999999\n")  # stale
    assert broker.pid is None
    broker.pid_path.write_text(f"{os.getpid()}\n")  # reused by a process that is no broker
    assert broker.pid is None
    broker.stop()
    broker.kill()
    assert not broker.pid_path.exists()


def test_partitions_follow_the_declaration_and_the_setting():
    assert partition_count(load(), topic("sales")) == 2
    assert partition_count(load(), topic("sales.dlq")) == 1
    assert partition_count(load(topic_partitions=6), topic("sales")) == 6
    assert partition_count(load(topic_partitions=6), topic("model-ready")) == 1


def test_renamed_covers_every_declared_topic():
    names = renamed(suffix="-x1")
    assert names["sales"] == "sales-x1"
    assert set(names) == {t.name for t in TOPICS}


# --- a node of the loopback cluster (recsys/cluster.py) ------------------------------------------------
def test_a_cluster_node_replicates_three_times_with_min_isr_two(tmp_path):
    voters = "1@127.0.0.1:19093,2@127.0.0.1:29093,3@127.0.0.1:39093"
    props = server_properties(tmp_path, 29092, 29093, node_id=2, voters=voters, replicas=3)
    assert props["node.id"] == "2"
    assert props["controller.quorum.voters"] == voters
    for key, value in props.items():
        if key.endswith("replication.factor"):
            assert value == "3", key
        if key.endswith((".min.isr", ".insync.replicas")):
            assert value == "2", key


def test_a_cluster_node_restarts_on_its_own_controller_port(tmp_path):
    voters = "1@127.0.0.1:19555,2@127.0.0.1:19556,3@127.0.0.1:19557"
    first = LocalBroker(tmp_path, 19092, controller_port=19556, node_id=2, voters=voters)
    first.properties_path.write_text(render_properties(first.properties()))
    assert LocalBroker(tmp_path, 19092, node_id=2).controller_port == 19556
