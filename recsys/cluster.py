"""The loopback cluster: three KRaft brokers and a Spark standalone master with two workers.

docker-compose.yml describes the topology for real hosts; machines without a container engine
(ours, CI) run the same topology as processes on 127.0.0.1, from the jars `make setup` fetched
and the pyspark distribution, so what only a cluster exercises (replication with
`min.insync.replicas=2`, leader failover, executors in other JVMs running the driver's closures
and Python workers, paths every node must see) is tested for real. `recsys cluster up|down|status`
and the test tier's `cluster` fixture both go through `LocalCluster`.

Everything lives under one folder (`<data_dir>/cluster` for the CLI):

    cluster.json           ports and the Kafka cluster id, so `down`/`status` in another shell and
                           a later `up` find the same cluster
    kafka-<n>/             each broker's LocalBroker folder (server.properties, logs/, broker.log)
    spark-master/          master.log, master.pid
    spark-worker-<n>/      worker.log, worker.pid, work/ (executors' folders and logs)
    shared/                what every node sees: store, checkpoints, models, exports
                           (`settings()` points the product there)

Brokers: combined broker+controller nodes with ids 1..3 and a static quorum of all three;
replication factor 3 and min ISR 2 (the keys docker-compose.yml sets; a unit test checks they
agree). A node answers only once a quorum runs, so all three JVMs are launched before any is
awaited. Spark: `org.apache.spark.deploy.master.Master` and `...worker.Worker` from pyspark's own
jars, one core and 2g each; ready means the master's JSON status lists the worker ALIVE, never a
log line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from recsys.broker import BrokerError, LocalBroker, free_port, new_cluster_id, port_in_use
from recsys.procs import Daemon, send
from recsys.settings import Settings, load

log = logging.getLogger(__name__)

BROKERS = 3
WORKERS = 2
WORKER_CORES = 1
WORKER_MEMORY = "2g"
DAEMON_HEAP_MB = 256  # the master and worker daemons only schedule; executors get their own JVMs
REPLICAS = 3
BROKER_STOP_GRACE = 20.0  # seconds `stop` gives the brokers before it kills the stragglers
# `recsys cluster up` listens where docker-compose.yml publishes the same services on the host,
# so the same client settings reach either (tests take free ports instead).
DEFAULT_BROKER_PORTS = (29092, 39092, 49092)
DEFAULT_CONTROLLER_PORTS = (29093, 39093, 49093)
DEFAULT_MASTER_PORTS = (7077, 8080)  # rpc, web UI (its /json/ is the readiness probe)
DEFAULT_WORKER_PORTS = ((7078, 8081), (7079, 8082))


class ClusterError(RuntimeError):
    """A part of the cluster could not start or stop; str() names it and quotes its log."""


def pyspark_home() -> Path:
    """The pyspark distribution (`jars/`, the launcher scripts): SPARK_HOME for the daemons."""
    spec = importlib.util.find_spec("pyspark")
    if spec is None or not spec.submodule_search_locations:
        raise ClusterError("pyspark is not installed in this Python: run `make setup`")
    home = Path(list(spec.submodule_search_locations)[0])
    if not (home / "jars").is_dir():
        raise ClusterError(f"no jars/ in the pyspark distribution at {home}")
    return home


# --- Spark daemons ----------------------------------------------------------------------------------


class SparkDaemon(Daemon):
    """A Spark standalone daemon (master or worker) in a child JVM, owning one folder.

    The command line carries `-Drecsys.daemon=<folder>`, so a pid file left by a dead daemon is
    never mistaken for a live process that reused the pid.
    """

    main_class = ""
    name = ""

    def __init__(self, folder: Path, port: int, webui_port: int, *,
                 die_with_parent: bool = False) -> None:
        self.folder = Path(folder).absolute()
        self.port = int(port)
        self.webui_port = int(webui_port)
        self.die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None
        self._offset = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(127.0.0.1:{self.port}, {self.folder}, pid={self.pid})"

    @property
    def log_path(self) -> Path:
        return self.folder / f"{self.name}.log"

    @property
    def pid_path(self) -> Path:
        return self.folder / f"{self.name}.pid"

    def arguments(self) -> list[str]:  # the daemon's own flags
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        home = str(pyspark_home())
        return {
            **os.environ,
            "SPARK_HOME": home,  # executors' classpath is built from <SPARK_HOME>/jars
            "SPARK_SCALA_VERSION": "2.13",  # a pip distribution has no build folders to tell
            "SPARK_LOCAL_IP": "127.0.0.1",
            "PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON", sys.executable),
        }

    def is_ready(self) -> bool:
        raise NotImplementedError

    # --- state
    def marks(self) -> tuple[str, ...]:
        return (f"-Drecsys.daemon={self.folder}",)

    # --- lifecycle
    def start(self, timeout: float = 60.0, *, wait: bool = True) -> SparkDaemon:
        if (pid := self.pid) is not None:
            raise ClusterError(f"{self.name} for {self.folder} is already running (pid {pid})")
        java = shutil.which("java")
        if java is None:
            raise ClusterError("no `java` on PATH: install a JDK 17 or newer")
        for port in (self.port, self.webui_port):
            if port_in_use(port):
                raise ClusterError(f"{self.name}: port {port} on 127.0.0.1 is in use")
        home = pyspark_home()
        self.folder.mkdir(parents=True, exist_ok=True)
        cmd = [
            java, f"-Xmx{DAEMON_HEAP_MB}m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
            f"-Drecsys.daemon={self.folder}", "-cp", f"{home}/conf:{home}/jars/*",
            self.main_class, *self.arguments(),
        ]  # fmt: skip
        if (
            self.die_with_parent
            and threading.current_thread() is threading.main_thread()
            and (setpriv := shutil.which("setpriv"))
        ):
            cmd = [setpriv, "--pdeathsig", "KILL", *cmd]
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.folder, env=self.environment(), start_new_session=True,
            )  # fmt: skip
        self.pid_path.write_text(f"{self._proc.pid}\n")
        log.info("spark %s pid %d starting on 127.0.0.1:%d", self.name, self._proc.pid, self.port)
        return self.wait_ready(timeout) if wait else self

    def wait_ready(self, timeout: float = 60.0) -> SparkDaemon:
        started = time.monotonic()
        deadline = started + timeout
        while not self.is_ready():
            if self._proc is not None and (rc := self._proc.poll()) is not None:
                self._forget()
                raise ClusterError(f"spark {self.name} exited with code {rc} while starting"
                                   + self._log_excerpt())
            if time.monotonic() > deadline:
                self.kill()
                raise ClusterError(f"spark {self.name} on 127.0.0.1:{self.port} not ready within "
                                   f"{timeout:.0f}s" + self._log_excerpt())
            time.sleep(0.2)
        log.info("spark %s ready on 127.0.0.1:%d in %.1fs", self.name, self.port,
                 time.monotonic() - started)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a worker's executors end with it); SIGKILL after `timeout`."""
        pid = self.pid
        if pid is not None:
            log.info("stopping spark %s pid %d", self.name, pid)
            send(pid, signal.SIGTERM)
            if not self._wait_exit(pid, timeout):
                self.kill()
                return
        self._forget()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        pid = self.pid
        if pid is not None:
            log.info("killing spark %s pid %d", self.name, pid)
            send(pid, signal.SIGKILL)
            if not self._wait_exit(pid, 30):
                raise ClusterError(f"spark {self.name} pid {pid} survived SIGKILL for 30s")
        self._forget()

    def restart(self, timeout: float = 60.0) -> SparkDaemon:
        self.stop()
        return self.start(timeout)

    # --- internals
    def _log_excerpt(self, tail: int = 15) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._offset)
                lines = f.read().decode(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        errors = [ln for ln in lines if " ERROR " in ln or ln.startswith(("Exception", "Caused"))]
        shown = [*errors[:3], "...", *lines[-tail:]] if errors else lines[-tail:]
        return f"\n--- {self.log_path} ---\n" + "\n".join(s[:400] for s in shown)


def master_status(webui_port: int, timeout: float = 2.0) -> dict[str, Any] | None:
    """The master's JSON status (`/json/`: status, workers with state and web UI address)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{webui_port}/json/", timeout=timeout) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


class SparkMaster(SparkDaemon):
    main_class = "org.apache.spark.deploy.master.Master"
    name = "master"

    @property
    def url(self) -> str:
        return f"spark://127.0.0.1:{self.port}"

    def arguments(self) -> list[str]:
        return ["--host", "127.0.0.1", "--port", str(self.port),
                "--webui-port", str(self.webui_port)]

    def is_ready(self) -> bool:
        status = master_status(self.webui_port)
        return status is not None and status.get("status") == "ALIVE"


class SparkWorker(SparkDaemon):
    main_class = "org.apache.spark.deploy.worker.Worker"
    name = "worker"

    def __init__(self, folder: Path, port: int, webui_port: int, master: SparkMaster, *,
                 cores: int = WORKER_CORES, memory: str = WORKER_MEMORY,
                 die_with_parent: bool = False) -> None:
        super().__init__(folder, port, webui_port, die_with_parent=die_with_parent)
        self.master = master
        self.cores = cores
        self.memory = memory

    def arguments(self) -> list[str]:
        return ["--host", "127.0.0.1", "--port", str(self.port),
                "--webui-port", str(self.webui_port), "--cores", str(self.cores),
                "--memory", self.memory, "--work-dir", str(self.folder / "work"), self.master.url]

    def is_ready(self) -> bool:
        """The master lists this worker (by its web UI address) as ALIVE."""
        status = master_status(self.master.webui_port)
        mine = f"127.0.0.1:{self.webui_port}"
        return status is not None and any(
            w.get("state") == "ALIVE" and str(w.get("webuiaddress", "")).endswith(mine)
            for w in status.get("workers", [])
        )


# --- the cluster ------------------------------------------------------------------------------------


class LocalCluster:
    """Three brokers, a Spark master and two workers on loopback, under `base`.

    `free_ports`: choose free ports (tests); otherwise the defaults above (`recsys cluster up`).
    A folder that already holds a cluster.json keeps its ports and Kafka cluster id.
    """

    def __init__(self, base: Path, brokers: int = BROKERS, workers: int = WORKERS, *,
                 free_ports: bool = False, die_with_parent: bool = False,
                 broker_heap_mb: int = 512) -> None:
        self.base = Path(base).absolute()
        state = self._load_state() or self._new_state(brokers, workers, free_ports)
        self.cluster_id: str = state["cluster_id"]
        voters = ",".join(f"{b['node_id']}@127.0.0.1:{b['controller_port']}"
                          for b in state["brokers"])
        replicas = min(REPLICAS, len(state["brokers"]))
        self.brokers: list[LocalBroker] = [
            LocalBroker(self.base / f"kafka-{b['node_id']}", b["port"], b["controller_port"],
                        heap_mb=broker_heap_mb, die_with_parent=die_with_parent,
                        node_id=b["node_id"], voters=voters, replicas=replicas,
                        format_cluster_id=self.cluster_id)
            for b in state["brokers"]
        ]
        m = state["master"]
        self.master = SparkMaster(self.base / "spark-master", m["port"], m["webui_port"],
                                  die_with_parent=die_with_parent)
        self.workers: list[SparkWorker] = [
            SparkWorker(self.base / f"spark-worker-{i + 1}", w["port"], w["webui_port"],
                        self.master, die_with_parent=die_with_parent)
            for i, w in enumerate(state["workers"])
        ]
        self._state = state

    def __repr__(self) -> str:
        return f"LocalCluster({self.bootstrap}, {self.spark_master}, {self.base})"

    # --- where things are
    @property
    def bootstrap(self) -> str:
        return ",".join(b.bootstrap for b in self.brokers)

    @property
    def spark_master(self) -> str:
        return self.master.url

    @property
    def shared_dir(self) -> Path:
        """Store, checkpoints, models and exports: the path every node sees (on real hosts, a
        shared file system or hdfs:/s3a:)."""
        return self.base / "shared"

    @property
    def state_path(self) -> Path:
        return self.base / "cluster.json"

    def settings(self, **overrides: Any) -> Settings:
        """recsys Settings pointed at this cluster (environment, then `overrides` on top)."""
        shared = self.shared_dir
        return load(**{
            "kafka_bootstrap": self.bootstrap,
            "spark_master": self.spark_master,
            "topic_replication": min(REPLICAS, len(self.brokers)),
            "data_dir": shared,
            "store_path": str(shared / "store"),
            "checkpoint_path": str(shared / "checkpoints"),
            "models_path": str(shared / "models"),
            "export_dir": shared / "exports",
            **overrides,
        })

    # --- lifecycle
    def start(self, timeout: float = 120.0) -> LocalCluster:
        """Brokers (all launched, then each awaited), then the master, then the workers. On a
        failure everything started here is killed and ClusterError names the part and why."""
        began = time.monotonic()
        self.base.mkdir(parents=True, exist_ok=True)
        self.shared_dir.mkdir(parents=True, exist_ok=True)
        self.state_path.write_text(json.dumps(self._state, indent=2) + "\n")
        try:
            launched = [b for b in self.brokers if b.pid is None]
            for broker in launched:
                broker.start(timeout, wait=False)
            for broker in self.brokers:
                left = max(1.0, timeout - (time.monotonic() - began))
                if broker in launched:
                    broker.wait_ready(left)
                elif not broker.is_ready(timeout=min(left, 30.0)):  # running, not started here
                    raise ClusterError(f"broker {broker.bootstrap} (pid {broker.pid}) runs but "
                                       f"does not answer; see {broker.log_path}")
            if self.master.pid is None:
                self.master.start(timeout)
            else:
                self.master.wait_ready(timeout)
            for worker in self.workers:
                if worker.pid is None:
                    worker.start(timeout, wait=False)
            for worker in self.workers:
                worker.wait_ready(max(1.0, timeout - (time.monotonic() - began)))
        except (BrokerError, ClusterError) as exc:
            self.kill()
            raise ClusterError(str(exc)) from None
        log.info("cluster ready in %.1fs: kafka %s, spark %s", time.monotonic() - began,
                 self.bootstrap, self.spark_master)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Workers, master, then the brokers, all with SIGTERM.

        A KRaft broker's controlled shutdown waits for the active controller to let it go (up
        to five minutes); once the other nodes are gone the last one has no quorum to ask, so
        the whole cluster cannot stop cleanly node by node. All brokers get SIGTERM at once, and
        a node still running after BROKER_STOP_GRACE seconds is killed: its acknowledged records
        are on the others' disks too, and its next start recovers its logs."""
        for part in [*self.workers, self.master]:
            part.stop(timeout)
        for broker in self.brokers:
            if (pid := broker.pid) is not None:
                send(pid, signal.SIGTERM)
        deadline = time.monotonic() + min(timeout, BROKER_STOP_GRACE)
        for broker in self.brokers:
            try:
                broker.stop(max(1.0, deadline - time.monotonic()))
            except BrokerError:
                log.warning("broker %s did not stop within %.0fs (no controller quorum left to "
                            "approve its shutdown) and was killed", broker.bootstrap,
                            BROKER_STOP_GRACE)

    def kill(self) -> None:
        """SIGKILL everything (tests' teardown, a failed start)."""
        for part in [*self.workers, self.master, *self.brokers]:
            try:
                part.kill()
            except (BrokerError, ClusterError) as exc:  # keep killing the others
                log.error("could not kill %r: %s", part, exc)

    def status(self) -> list[dict[str, Any]]:
        """One row per process: name, pid (None: not running), address, answering."""
        rows = []
        for i, broker in enumerate(self.brokers):
            pid = broker.pid
            rows.append({"name": f"kafka-{i + 1}", "pid": pid, "address": broker.bootstrap,
                         "answering": pid is not None and broker.is_ready(timeout=3)})
        status = master_status(self.master.webui_port)
        rows.append({"name": "spark-master", "pid": self.master.pid, "address": self.spark_master,
                     "answering": status is not None and status.get("status") == "ALIVE"})
        for i, worker in enumerate(self.workers):
            rows.append({"name": f"spark-worker-{i + 1}", "pid": worker.pid,
                         "address": f"127.0.0.1:{worker.port}",
                         "answering": worker.pid is not None and worker.is_ready()})
        return rows

    # --- internals
    def _load_state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise ClusterError(f"{self.state_path} is not valid JSON ({exc}): delete the "
                               "cluster folder to start afresh") from None

    @staticmethod
    def _new_state(brokers: int, workers: int, free_ports: bool) -> dict[str, Any]:
        if not 1 <= brokers <= len(DEFAULT_BROKER_PORTS) and not free_ports:
            raise ClusterError(f"brokers={brokers}: allowed 1-{len(DEFAULT_BROKER_PORTS)} "
                               "on the default ports")
        if not 1 <= workers <= len(DEFAULT_WORKER_PORTS) and not free_ports:
            raise ClusterError(f"workers={workers}: allowed 1-{len(DEFAULT_WORKER_PORTS)} "
                               "on the default ports")
        taken: list[int] = []

        def pick(default: int) -> int:
            port = free_port(exclude=taken) if free_ports else default
            taken.append(port)
            return port

        return {
            "cluster_id": new_cluster_id(),
            "brokers": [{"node_id": i + 1, "port": pick(DEFAULT_BROKER_PORTS[i % 3]),
                         "controller_port": pick(DEFAULT_CONTROLLER_PORTS[i % 3])}
                        for i in range(brokers)],
            "master": {"port": pick(DEFAULT_MASTER_PORTS[0]),
                       "webui_port": pick(DEFAULT_MASTER_PORTS[1])},
            "workers": [{"port": pick(DEFAULT_WORKER_PORTS[i % 2][0]),
                         "webui_port": pick(DEFAULT_WORKER_PORTS[i % 2][1])}
                        for i in range(workers)],
        }


# --- CLI --------------------------------------------------------------------------------------------


def cluster_env(cluster: LocalCluster) -> list[str]:
    """The variables that point the product's processes at `cluster` (printed by `up`)."""
    s = cluster.settings()
    return [f"RECSYS_KAFKA_BOOTSTRAP={s.kafka_bootstrap}", f"RECSYS_SPARK_MASTER={s.spark_master}",
            f"RECSYS_TOPIC_REPLICATION={s.topic_replication}", f"RECSYS_DATA_DIR={s.data_dir}",
            f"RECSYS_STORE_PATH={s.store_path}", f"RECSYS_CHECKPOINT_PATH={s.checkpoint_path}",
            f"RECSYS_MODELS_PATH={s.models_path}", f"RECSYS_EXPORT_DIR={s.export_dir}"]


def cli(settings: Settings, args: argparse.Namespace) -> int:
    """`recsys cluster up|down|status` on <data_dir>/cluster."""
    cluster = LocalCluster(settings.data_dir / "cluster", broker_heap_mb=settings.broker_heap_mb)
    if args.action == "up":
        began = time.monotonic()
        try:
            cluster.start(timeout=args.timeout)
            from recsys.topics import TopicError, create_topics

            created = create_topics(cluster.settings())
        except (ClusterError, TopicError) as exc:
            print(f"recsys: {exc}", file=sys.stderr)
            return 1
        print(f"cluster ready in {time.monotonic() - began:.1f}s ({cluster.base}); "
              f"{len(created)} topics created, replication {cluster.settings().topic_replication}")
        _print_status(cluster)
        print("\npoint the product at it (e.g. `export` these, then `recsys stream`, "
              "`recsys speed`, `recsys aggregate`, `recsys dashboard`):")
        for line in cluster_env(cluster):
            print(f"  export {line}")
        print(f"stop it from any shell with `recsys --data-dir {settings.data_dir} cluster down`")
        return 0
    if args.action == "down":
        try:
            cluster.stop(timeout=args.timeout)
        except ClusterError as exc:
            print(f"recsys: {exc}", file=sys.stderr)
            return 1
        print(f"cluster stopped ({cluster.base})")
        return 0
    return 0 if _print_status(cluster) else 1


def _print_status(cluster: LocalCluster) -> bool:
    rows = cluster.status()
    for row in rows:
        state = ("stopped" if row["pid"] is None
                 else "running" if row["answering"] else "running, NOT answering")
        pid = "" if row["pid"] is None else f"pid {row['pid']}"
        print(f"{row['name']:<16} {state:<24} {pid:<12} {row['address']}")
    return all(row["pid"] is not None and row["answering"] for row in rows)
