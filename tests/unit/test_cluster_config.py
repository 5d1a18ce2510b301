"""The loopback cluster's layout and its CLI, without starting a JVM (recsys/cluster.py)."""

from __future__ import annotations

import json

import pytest

from recsys import cli
from recsys.cluster import ClusterError, LocalCluster

pytestmark = pytest.mark.unit


def test_ports_are_distinct_and_the_nodes_share_one_quorum_and_cluster_id(tmp_path):
    cluster = LocalCluster(tmp_path, free_ports=True)
    ports = [p for b in cluster.brokers for p in (b.port, b.controller_port)]
    ports += [cluster.master.port, cluster.master.webui_port]
    ports += [p for w in cluster.workers for p in (w.port, w.webui_port)]
    assert len(ports) == len(set(ports)) == 3 * 2 + 2 + 2 * 2
    assert len({b.format_cluster_id for b in cluster.brokers}) == 1
    assert [b.node_id for b in cluster.brokers] == [1, 2, 3]
    voters = {b.properties()["controller.quorum.voters"] for b in cluster.brokers}
    assert voters == {",".join(f"{b.node_id}@127.0.0.1:{b.controller_port}"
                               for b in cluster.brokers)}
    assert cluster.spark_master == f"spark://127.0.0.1:{cluster.master.port}"
    assert cluster.bootstrap == ",".join(f"127.0.0.1:{b.port}" for b in cluster.brokers)
    assert all(w.cores == 1 and w.master is cluster.master for w in cluster.workers)


def test_the_default_ports_are_where_compose_publishes_kafka(tmp_path):
    cluster = LocalCluster(tmp_path)
    assert cluster.bootstrap == "127.0.0.1:29092,127.0.0.1:39092,127.0.0.1:49092"
    assert cluster.spark_master == "spark://127.0.0.1:7077"


def test_another_shell_finds_the_same_cluster(tmp_path):
    cluster = LocalCluster(tmp_path, free_ports=True)
    cluster.state_path.write_text(json.dumps(cluster._state))
    again = LocalCluster(tmp_path, free_ports=True)
    assert (again.bootstrap, again.spark_master, again.cluster_id) == (
        cluster.bootstrap, cluster.spark_master, cluster.cluster_id)


def test_a_broken_state_file_is_named(tmp_path):
    (tmp_path / "cluster.json").write_text("{")
    with pytest.raises(ClusterError, match="cluster.json is not valid JSON"):
        LocalCluster(tmp_path)


def test_settings_point_every_shared_path_into_the_shared_folder(tmp_path):
    cluster = LocalCluster(tmp_path, free_ports=True)
    s = cluster.settings(top_n=7)
    assert (s.kafka_bootstrap, s.spark_master, s.topic_replication, s.top_n) == (
        cluster.bootstrap, cluster.spark_master, 3, 7)
    for path in (s.data_dir, s.store, s.checkpoints, s.models, s.export_dir):
        assert str(path).startswith(str(cluster.shared_dir)), path


def test_status_of_a_cluster_that_is_not_running(tmp_path, capsys):
    assert cli.main(["--data-dir", str(tmp_path), "cluster", "status"]) == 1
    out = capsys.readouterr().out
    assert out.count("stopped") == 6 and "kafka-3" in out and "spark-worker-2" in out
    assert cli.main(["--data-dir", str(tmp_path), "cluster", "down"]) == 0  # harmless
