"""Fixtures shared by every tier: a factory of REAL Kafka brokers and a lazy Spark session.

Nothing starts at import or collection; a service starts only when a test asks for its fixture,
so `pytest -m unit` runs without a broker. A broker that cannot start FAILS the tests that need
it (never a skip): a silently skipped integration suite looks green and proves nothing.
"""

from __future__ import annotations

import gc
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from recsys import settings as settings_mod
from recsys.broker import BrokerError, LocalBroker, free_port

log = logging.getLogger(__name__)

BROKER_START_TIMEOUT = 120.0  # generous: the machine is shared, a cold JVM can be slow
CLUSTER_START_TIMEOUT = 240.0  # five JVMs (three brokers, master, two workers) on two cores


class BrokerFactory:
    """Starts brokers on free ports in the session's temporary folder; kills any left at the end.

    Fault tests take their own broker (`broker_factory.start()`) and stop, kill or restart it
    freely; tests that only produce and consume share the session's `broker`.
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        self.brokers: list[LocalBroker] = []

    def start(self, heap_mb: int = 512, timeout: float = BROKER_START_TIMEOUT,
              secure: bool = False) -> LocalBroker:
        """`secure`: TLS + SASL/SCRAM only, an ACL per role (RECSYS_BROKER_SECURE's broker)."""
        for attempt in range(3):  # a free port can be taken between choosing and binding it
            port = free_port()
            data_dir = self.base / f"broker-{len(self.brokers)}-{port}"
            broker = LocalBroker(data_dir, port, heap_mb=heap_mb, die_with_parent=True,
                                 secure=secure)
            self.brokers.append(broker)
            try:
                return broker.start(timeout=timeout)
            except BrokerError as exc:
                if "in use" not in str(exc) or attempt == 2:
                    pytest.fail(f"the Kafka broker did not start: {exc}", pytrace=False)
                log.warning("port clash, retrying on another port: %s", exc)
        raise AssertionError("unreachable")

    def close(self) -> None:
        for broker in self.brokers:
            try:
                broker.kill()
            except BrokerError as exc:  # keep killing the others
                log.error("could not kill %r: %s", broker, exc)


@pytest.fixture(scope="session")
def broker_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerFactory]:
    factory = BrokerFactory(tmp_path_factory.mktemp("kafka"))
    yield factory
    factory.close()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """The loopback cluster (recsys/cluster.py, as `recsys cluster up`): three KRaft brokers,
    a Spark master and two workers on free ports, every declared topic created with replication
    3. One per session; fault tests kill and restart its parts (`cluster.brokers[i].kill()`,
    `cluster.workers[i].restart()`); `cluster.start()` again starts whatever a test left
    stopped and waits for it. A cluster that cannot start FAILS the tests, never skips."""
    from recsys.cluster import ClusterError, LocalCluster
    from recsys.topics import TopicError, create_topics

    # <data_dir>/cluster, as `recsys cluster up` lays it out: `recsys --data-dir <data_dir>
    # cluster status` answers for this one too.
    started = LocalCluster(tmp_path_factory.mktemp("cluster-data") / "cluster", free_ports=True,
                           die_with_parent=True)
    try:
        started.start(timeout=CLUSTER_START_TIMEOUT)
        create_topics(started.settings())
    except (ClusterError, TopicError) as exc:
        started.kill()
        pytest.fail(f"the loopback cluster did not start: {exc}", pytrace=False)
    yield started
    started.kill()


@pytest.fixture(scope="session")
def broker(broker_factory: BrokerFactory, tmp_path_factory: pytest.TempPathFactory) -> LocalBroker:
    """One broker for the session, with every declared topic created."""
    from recsys.topics import create_topics

    started = broker_factory.start()
    create_topics(
        settings_mod.load(
            kafka_bootstrap=started.bootstrap, data_dir=tmp_path_factory.mktemp("topics")
        )
    )
    return started


@pytest.fixture
def settings(broker: LocalBroker, tmp_path: Path) -> settings_mod.Settings:
    """Settings pointing at the session broker, with state (and graph exports) in this test's
    folder."""
    return settings_mod.load(kafka_bootstrap=broker.bootstrap, data_dir=tmp_path,
                             export_dir=tmp_path / "exports")


@pytest.fixture
def unique() -> str:
    """A short suffix for topic and group names, so tests sharing a broker never meet."""
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def spark(tmp_path_factory: pytest.TempPathFactory):
    """A local[2] SparkSession for the whole session, started by the first test that asks."""
    from spark import session

    conf = settings_mod.load(data_dir=tmp_path_factory.mktemp("spark"), spark_shuffle_partitions=2,
                             spark_driver_memory="6g")
    spark_session = session.build(conf, app_name="recsys-tests")
    _SPARK.append(spark_session)
    yield spark_session
    _SPARK.clear()
    spark_session.stop()


_SPARK: list = []  # the session's SparkSession once a test has asked for it


@pytest.fixture(autouse=True, scope="module")
def _spark_memory_released_after_each_module():
    """One SparkSession serves hundreds of tests: what a module cached (and the Python handles
    that keep broadcasts and checkpoints alive on the JVM) is dropped when it ends, so the heap
    does not fill up over the run (it did: OutOfMemoryError some 4,000 stages in)."""
    yield
    if _SPARK:
        _SPARK[0].catalog.clearCache()
        gc.collect()  # Python proxies released -> Spark's ContextCleaner frees their JVM side
        _SPARK[0].sparkContext._jvm.System.gc()


# --- Tiers --------------------------------------------------------------------------------------
# Each test belongs to exactly one tier, and a tier's name is a promise about what it starts:
# `make test-unit` must run with no JVM and no broker, `make test-spark` with no broker.
TIERS = ("unit", "spark", "integration", "browser", "reliability")
_SERVICES = {  # fixtures that start something, and the tiers allowed to ask for them
    "spark": {"spark", "integration", "browser", "reliability"},
    "broker": {"integration", "browser", "reliability"},
    "broker_factory": {"integration", "browser", "reliability"},
    "cluster": {"reliability"},
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    errors = []
    for item in items:
        tiers = [m.name for m in item.iter_markers() if m.name in TIERS]
        if len(tiers) != 1:
            errors.append(f"{item.nodeid}: needs exactly one tier marker of {TIERS}, has {tiers}")
            continue
        for fixture in sorted(set(getattr(item, "fixturenames", ())) & _SERVICES.keys()):
            if tiers[0] not in _SERVICES[fixture]:
                errors.append(f"{item.nodeid}: a {tiers[0]} test may not use the {fixture!r} "
                              f"fixture (allowed in: {', '.join(sorted(_SERVICES[fixture]))})")
    if errors:
        raise pytest.UsageError("tests in the wrong tier:\n  " + "\n  ".join(errors))
