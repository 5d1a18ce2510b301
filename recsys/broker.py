"""The local single-node Apache Kafka broker (KRaft, broker and controller in one JVM).

`recsys broker start` and the test fixtures both run a REAL broker from the jars `make setup`
fetched, so what the tests exercise is what users run. Everything it owns lives in one folder:

    <data_dir>/server.properties   written at every start (ports may change between starts)
    <data_dir>/logs/               Kafka's log.dirs (meta.properties, partitions, metadata log)
    <data_dir>/broker.log          the JVM's stdout and stderr (rotated once past 20 MiB)
    <data_dir>/broker.pid          so `recsys broker stop|status` from another process finds it

Readiness is a metadata request that answers with our own cluster id, never a log line: a log
line can lie, and another broker already listening on the port would answer too.

Start time: the launcher keeps a class-data-sharing archive of the broker's classes beside the
jars (jvm/lib/cds/); the first clean stop writes it, and later starts map it instead of loading
and verifying ~8,000 classes again. With C1 only and the serial collector this halves the cold
start on a laptop (see the README's figures); throughput stays bound by the Python clients.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from recsys import paths
from recsys.procs import Daemon, send
from recsys.settings import Settings

log = logging.getLogger(__name__)

LOG4J_CONFIG = Path(__file__).with_name("log4j2.properties")
LOG_ROTATE_BYTES = 20 * 1024 * 1024
NODE_ID = 1
# Fast start for a laptop broker: C1 compiles sooner, the serial GC starts no GC threads, and
# both are plenty for one node fed by Python clients (measured in the module docstring's note).
DEFAULT_JVM_OPTS: tuple[str, ...] = (
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-Djava.awt.headless=true",
    "-Dfile.encoding=UTF-8",
)


class BrokerError(RuntimeError):
    """The broker could not start or stop; str() names why and quotes broker.log."""


# --- configuration --------------------------------------------------------------------------------


def server_properties(
    data_dir: Path,
    port: int,
    controller_port: int,
    *,
    node_id: int = NODE_ID,
    voters: str | None = None,
    replicas: int = 1,
) -> dict[str, str]:
    """The broker's server.properties: loopback only; by default one node with every replication
    factor 1. A node of the loopback cluster (recsys/cluster.py) passes its `node_id`, the static
    quorum `voters` ("1@127.0.0.1:p1,2@...") and `replicas` 3 (then min ISR 2, as in
    docker-compose.yml).

    Kept a pure function so a unit test can check the safety-relevant keys without a JVM.
    """
    data_dir = Path(data_dir).absolute()
    rf, min_isr = str(replicas), str(max(1, replicas - 1))
    return {
        # --- one JVM is broker and controller; a static quorum survives port changes
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "controller.quorum.voters": voters or f"{node_id}@127.0.0.1:{controller_port}",
        "controller.listener.names": "CONTROLLER",
        # --- loopback only: a laptop broker is never reachable from the network
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        # --- topics exist only when `recsys topics create` declares them
        "auto.create.topics.enable": "false",
        "delete.topic.enable": "true",
        "num.partitions": "1",
        # --- one node: every replication factor and min ISR is 1 (a cluster: 3 and 2), internal
        # topics stay small
        "default.replication.factor": rf,
        "min.insync.replicas": min_isr,
        "offsets.topic.replication.factor": rf,
        "offsets.topic.num.partitions": "4",
        "transaction.state.log.replication.factor": rf,
        "transaction.state.log.min.isr": min_isr,
        "transaction.state.log.num.partitions": "4",
        "share.coordinator.state.topic.replication.factor": rf,
        "share.coordinator.state.topic.min.isr": min_isr,
        "share.coordinator.state.topic.num.partitions": "4",
        "group.initial.rebalance.delay.ms": "0",
        # --- after a SIGKILL the restarted controller waits out the dead broker's session before
        # it lets the new one register: 3 s instead of 9 s (heartbeats are local, so cheap)
        "broker.session.timeout.ms": "3000",
        "broker.heartbeat.interval.ms": "500",
        # --- storage sized for a laptop
        "log.dirs": str(data_dir / "logs"),
        "log.segment.bytes": str(64 * 1024 * 1024),
        "log.index.size.max.bytes": str(1024 * 1024),
        "log.retention.hours": "168",
        "log.cleaner.dedupe.buffer.size": str(32 * 1024 * 1024),
        # --- fewer threads: the machine is shared with Spark and the Python processes
        "num.network.threads": "2",
        "num.io.threads": "4",
        "background.threads": "4",
        "num.recovery.threads.per.data.dir": "2",
    }


def render_properties(props: dict[str, str]) -> str:
    lines = ["# Written by recsys/broker.py at every start; edits here are overwritten."]
    lines += [f"{k}={v}" for k, v in props.items()]
    return "\n".join(lines) + "\n"


def read_properties(path: Path) -> dict[str, str]:
    """A Java .properties file as a dict (enough for the files Kafka and we write)."""
    out: dict[str, str] = {}
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


# --- ports and processes ------------------------------------------------------------------------


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether the broker could not bind `port` (SO_REUSEADDR like the JVM, so TIME_WAIT is fine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port(exclude: Sequence[int] = ()) -> int:
    """A port nobody listens on right now (bind port 0 and let the kernel choose)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in exclude:
            return port


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def new_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, base64url without padding, never starting with '-'."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


# --- the broker ------------------------------------------------------------------------------------


class LocalBroker(Daemon):
    """A real single-node KRaft broker in a child JVM, owning one data folder.

    Several instances may point at the same folder (the CLI's `stop` in another process does):
    the pid file and the process's command line tell which JVM belongs to the folder.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int,
        controller_port: int | None = None,
        heap_mb: int = 512,
        *,
        jvm_opts: Sequence[str] = DEFAULT_JVM_OPTS,
        class_sharing: bool = True,
        die_with_parent: bool = False,
        node_id: int = NODE_ID,
        voters: str | None = None,
        replicas: int = 1,
        format_cluster_id: str | None = None,
        secure: bool = False,
    ) -> None:
        """`die_with_parent`: the kernel kills the JVM when the thread that started it ends
        (Linux, PR_SET_PDEATHSIG via setpriv), so an aborted test run leaves no broker behind.
        Honoured only when starting from the main thread; other threads end too soon.

        A node of a cluster (recsys/cluster.py): `node_id`, the quorum `voters`, `replicas` 3
        and the cluster id all its nodes are formatted with (`format_cluster_id`).

        `secure`: TLS + SASL/SCRAM only, an ACL per role (recsys/security.py holds the how)."""
        self.secure = secure
        self.node_id = node_id
        self.voters = voters
        self.replicas = replicas
        self.format_cluster_id = format_cluster_id
        self.data_dir = Path(data_dir).absolute()
        self.port = int(port)
        self._explicit_controller_port = controller_port is not None
        self.controller_port = (
            controller_port or self._previous_controller_port() or free_port(exclude=(self.port,))
        )
        self.heap_mb = heap_mb
        self.jvm_opts = tuple(jvm_opts)
        self.class_sharing = class_sharing
        self.die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None
        self._started, self._log_offset = time.monotonic(), 0

    def __repr__(self) -> str:
        return f"LocalBroker({self.bootstrap}, {self.data_dir}, pid={self.pid})"

    # --- where things are
    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "broker.log"

    @property
    def pid_path(self) -> Path:
        return self.data_dir / "broker.pid"

    @property
    def properties_path(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def cluster_id(self) -> str | None:
        """Set once the folder is formatted."""
        return read_properties(self.log_dir / "meta.properties").get("cluster.id")

    def properties(self) -> dict[str, str]:
        props = server_properties(self.data_dir, self.port, self.controller_port,
                                  node_id=self.node_id, voters=self.voters, replicas=self.replicas)
        if self.secure:
            from recsys import security

            props.update(security.broker_properties(self.data_dir, self.port,
                                                    self.controller_port))
        return props

    # --- state
    def marks(self) -> tuple[str, ...]:
        """What this folder's broker has on its command line (`Daemon.pid` checks them)."""
        return "kafka.Kafka", str(self.properties_path)

    def is_ready(self, timeout: float = 2.0) -> bool:
        """A metadata request answers with this folder's cluster id within `timeout`."""
        cid = self.cluster_id
        return cid is not None and self._probe(timeout) == cid

    # --- lifecycle
    def start(self, timeout: float = 60.0, *, wait: bool = True) -> LocalBroker:
        """Start the JVM (formatting the folder the first time) and return once it answers.

        Raises BrokerError naming the cause and quoting broker.log; a JVM that did not become
        ready in time is killed, so a failed start leaves nothing running. `wait=False` returns
        once the JVM runs: a cluster's nodes answer only once a quorum of them runs, so the
        cluster launches all, then calls `wait_ready` on each.
        """
        if (pid := self.pid) is not None:
            raise BrokerError(f"a broker for {self.data_dir} is already running (pid {pid})")
        java = shutil.which("java")
        if java is None:
            raise BrokerError("no `java` on PATH: install a JDK 17 or newer")
        try:
            classpath = paths.kafka_classpath()
        except FileNotFoundError as exc:
            raise BrokerError(str(exc)) from None
        self._check_ports()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.secure:  # certificates, passwords; the properties then hold secrets: 0600
            from recsys import security

            try:
                security.prepare(self.data_dir)
                security.check_formatted(self.data_dir, self.cluster_id is not None)
            except security.SecurityError as exc:
                raise BrokerError(str(exc)) from None
            security.write_private(self.properties_path, render_properties(self.properties()))
        else:
            self.properties_path.write_text(render_properties(self.properties()))
        self._rotate_log()
        self._promote_class_archive()
        if self.cluster_id is None:
            self._format(java, classpath)
        cmd = [
            java,
            f"-Xmx{self.heap_mb}m",
            *self.jvm_opts,
            *self._class_sharing_opts(),
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
            "-cp",
            classpath,
            "kafka.Kafka",
            str(self.properties_path),
        ]
        if (
            self.die_with_parent
            and threading.current_thread() is threading.main_thread()
            and (setpriv := shutil.which("setpriv"))
        ):
            cmd = [setpriv, "--pdeathsig", "KILL", *cmd]
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        started = time.monotonic()
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,  # outlives `recsys broker start`, ignores terminal ^C
            )
        self.pid_path.write_text(f"{self._proc.pid}\n")
        log.info("broker pid %d starting on %s (%s)", self._proc.pid, self.bootstrap, self.data_dir)
        self._started, self._log_offset = started, offset
        return self.wait_ready(timeout) if wait else self

    def wait_ready(self, timeout: float = 60.0) -> LocalBroker:
        """Return once the JVM `start` launched answers; killed (BrokerError) when it does not."""
        try:
            self._wait_ready(timeout, self._log_offset)
        except BrokerError:
            self._force_kill()
            raise
        if self.secure:  # every role's ACLs, idempotently, before any client comes
            from recsys import security

            try:
                security.apply_acls(self.data_dir, self.bootstrap)
            except security.SecurityError as exc:
                self._force_kill()
                raise BrokerError(str(exc)) from None
        log.info("broker ready on %s in %.1fs", self.bootstrap, time.monotonic() - self._started)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM and wait: Kafka's clean shutdown flushes and marks the logs clean, so the
        next start skips log recovery. Killed (and BrokerError raised) after `timeout`."""
        pid = self.pid
        if pid is None:
            self._forget()
            return
        log.info("stopping broker pid %d (%s)", pid, self.bootstrap)
        send(pid, signal.SIGTERM)
        if not self._wait_exit(pid, timeout):
            self._force_kill()
            raise BrokerError(
                f"broker pid {pid} did not stop within {timeout:.0f}s and was killed"
                + self._log_excerpt(0)
            )
        self._forget()
        self._promote_class_archive()

    def kill(self) -> None:
        """SIGKILL, as a crash would: the next start recovers the logs."""
        self._force_kill()

    def restart(self, timeout: float = 60.0) -> LocalBroker:
        self.stop(timeout)
        return self.start(timeout)

    # --- internals
    def _previous_controller_port(self) -> int | None:
        voters = read_properties(self.properties_path).get("controller.quorum.voters", "")
        mine = [v for v in voters.split(",") if v.startswith(f"{self.node_id}@")] or [voters]
        try:
            return int(mine[0].rsplit(":", 1)[1])
        except (IndexError, ValueError):
            return None

    def _check_ports(self) -> None:
        if port_in_use(self.port):
            raise BrokerError(
                f"port {self.port} on 127.0.0.1 is in use (another broker? `recsys broker "
                f"status`, or choose another with --port / RECSYS_KAFKA_BOOTSTRAP)"
            )
        if self.controller_port == self.port or port_in_use(self.controller_port):
            if self._explicit_controller_port:
                raise BrokerError(f"controller port {self.controller_port} is in use")
            self.controller_port = free_port(exclude=(self.port,))

    def _format(self, java: str, classpath: str) -> None:
        """Format the storage once, with a cluster id of our own (skipped once formatted)."""
        cid = self.format_cluster_id or new_cluster_id()
        cmd = [
            java, "-Xmx256m", *self.jvm_opts, *self._class_sharing_opts(dump=False),
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
            "-cp", classpath, "kafka.tools.StorageTool", "format",
            "--cluster-id", cid, "--config", str(self.properties_path),
        ]  # fmt: skip
        if self.secure:  # SCRAM users at format time, through a 0600 argument file
            from recsys import security

            at = cmd.index("-cp")
            cmd = [*cmd[:at], f"@{security.format_argfile(self.data_dir, cmd[at:])}"]
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as out:
            rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out).returncode
        if self.secure:
            from recsys import security

            security.mark_formatted(self.data_dir, ok=rc == 0)  # the argument file goes
        if rc != 0 or self.cluster_id != cid:
            raise BrokerError(
                f"formatting {self.log_dir} failed (exit {rc})" + self._log_excerpt(offset)
            )
        log.info("formatted %s with cluster id %s", self.log_dir, cid)

    def _probe(self, timeout: float) -> str | None:
        """The cluster id a metadata request on our port returns, None when nothing answers."""
        if not _accepts(self.port):
            return None
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        # log_level 0: connection refusals while the JVM starts are expected, not errors.
        conf = {"bootstrap.servers": self.bootstrap, "log_level": 0}
        if self.secure:  # the launcher's own admin login
            from recsys import security

            conf = {**security.admin_client_config(self.data_dir, self.bootstrap), "log_level": 0}
        admin = AdminClient(conf)
        try:
            md = admin.list_topics(timeout=timeout)
        except KafkaException:
            return None
        return md.cluster_id if md.brokers else None

    def _wait_ready(self, timeout: float, offset: int) -> None:
        assert self._proc is not None
        cid = self.cluster_id
        deadline = time.monotonic() + timeout
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise BrokerError(
                    f"broker exited with code {rc} while starting" + self._log_excerpt(offset)
                )
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerError(
                    f"broker did not answer on {self.bootstrap} within {timeout:.0f}s"
                    + self._log_excerpt(offset)
                )
            answered = self._probe(min(2.0, max(left, 0.1)))
            if answered == cid:
                return
            if answered is not None:
                raise BrokerError(f"another Kafka cluster ({answered}) answers on {self.bootstrap}")
            time.sleep(0.1)

    def _force_kill(self) -> None:
        pid = self.pid
        if pid is not None:
            log.info("killing broker pid %d (%s)", pid, self.bootstrap)
            send(pid, signal.SIGKILL)
            if not self._wait_exit(pid, 30):
                raise BrokerError(f"broker pid {pid} survived SIGKILL for 30s")
        self._forget()

    def _rotate_log(self) -> None:
        if self.log_path.exists() and self.log_path.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(self.log_path, self.log_path.with_suffix(".log.1"))

    def _log_excerpt(self, offset: int, tail: int = 15) -> str:
        """The first errors and the last lines this run wrote to broker.log."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                lines = f.read().decode(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        errors = [
            ln for ln in lines
            if (" ERROR " in ln or " FATAL " in ln or ln.startswith(("Error", "Exception")))
        ][:3]  # fmt: skip
        causes = [ln for ln in lines if ln.startswith("Caused by:")][:2]
        shown = [*errors, *causes, "...", *lines[-tail:]] if errors or causes else lines[-tail:]
        return f"\n--- {self.log_path} ---\n" + "\n".join(s[:400] for s in shown)

    # --- class-data sharing archive (start time)
    def _class_archive(self) -> tuple[Path, Path] | None:
        """(archive, this folder's pending dump); None when sharing is off or impossible."""
        if not self.class_sharing:
            return None
        folder = paths.JVM_LIB / "cds"
        java = shutil.which("java")
        jars = sorted(paths.KAFKA_JARS.glob("*.jar"))
        if java is None or not jars:
            return None
        key = hashlib.sha1()
        java = os.path.realpath(java)  # an upgraded JDK (new mtime) needs a new archive
        for part in (java, str(os.stat(java).st_mtime_ns), *self.jvm_opts, *map(str, jars)):
            key.update(part.encode())
        for jar in jars:
            key.update(str(jar.stat().st_mtime_ns).encode())
        name = f"kafka-{key.hexdigest()[:12]}"
        owner = hashlib.sha1(str(self.data_dir).encode()).hexdigest()[:10]
        return folder / f"{name}.jsa", folder / f"{name}.{owner}.part"

    def _class_sharing_opts(self, dump: bool = True) -> list[str]:
        """Map the archive when there is one; else (`dump`) write it when this JVM exits."""
        archive = self._class_archive()
        if archive is None:
            return []
        final, pending = archive
        if final.exists():
            return [f"-XX:SharedArchiveFile={final}", "-Xlog:cds*=error"]
        if not dump:
            return []
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            return []
        if not os.access(final.parent, os.W_OK):
            return []
        return [f"-XX:ArchiveClassesAtExit={pending}", "-Xlog:cds*=error"]

    def _promote_class_archive(self) -> None:
        """Once the JVM that dumps the archive has exited, make it the shared one (atomically)."""
        archive = self._class_archive()
        if archive is None or self.pid is not None:
            return
        final, pending = archive
        try:
            if pending.exists() and pending.stat().st_size > 0:
                os.replace(pending, final)
                log.info("class-data sharing archive ready: %s", final)
                for stale in final.parent.glob("kafka-*.jsa"):  # older jars or JDK
                    if stale != final:
                        stale.unlink(missing_ok=True)
            for orphan in final.parent.glob("kafka-*.part"):  # dumps of deleted folders
                if time.time() - orphan.stat().st_mtime > 3600:
                    orphan.unlink(missing_ok=True)
        except OSError as exc:
            log.debug("class archive not promoted: %s", exc)


# --- CLI -------------------------------------------------------------------------------------------


def bootstrap_port(bootstrap: str) -> int:
    """The port of the first host:port in a bootstrap list."""
    return int(bootstrap.split(",")[0].rsplit(":", 1)[1])


def cli(settings: Settings, args: argparse.Namespace) -> int:
    """`recsys broker start|stop|status` on <data_dir>/kafka."""
    port = args.port or bootstrap_port(settings.kafka_bootstrap)
    broker = LocalBroker(settings.data_dir / "kafka", port, heap_mb=settings.broker_heap_mb,
                         secure=settings.broker_secure)
    running = broker.pid
    # The running broker may listen elsewhere than asked: report what its properties say.
    actual = read_properties(broker.properties_path).get("advertised.listeners", "")
    actual = actual.split("://", 1)[-1] or broker.bootstrap
    if args.action == "start":
        if running is not None:
            print(f"broker already running: pid {running}, {actual} ({broker.data_dir})")
            return 0
        began = time.monotonic()
        try:
            broker.start(timeout=args.timeout)
        except BrokerError as exc:
            print(f"recsys: {exc}", file=sys.stderr)
            return 1
        print(
            f"broker ready: pid {broker.pid}, {broker.bootstrap} in "
            f"{time.monotonic() - began:.1f}s (data {broker.data_dir}, log {broker.log_path})"
        )
        return 0
    if args.action == "stop":
        if running is None:
            print(f"broker not running ({broker.data_dir})")
            return 0
        try:
            broker.stop(timeout=args.timeout)
        except BrokerError as exc:
            print(f"recsys: {exc}", file=sys.stderr)
            return 1
        print(f"broker stopped: pid {running}")
        return 0
    # status
    if running is None:
        print(f"broker stopped ({broker.data_dir})")
        return 1
    answering = LocalBroker(broker.data_dir, bootstrap_port(actual),
                            secure=broker.secure).is_ready(timeout=5)
    print(
        f"broker running: pid {running}, {actual}, "
        f"{'answering' if answering else 'NOT answering'} ({broker.data_dir})"
    )
    return 0
