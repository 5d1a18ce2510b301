"""The whole stack as real processes for fault injection: the roles started by the product's own
supervisor (`recsys.supervisor.start_role`, the code behind `recsys up`), killed with real
signals, fed from the bundled file by the product's producer.

Shared by the reliability tier (tests/reliability/) and `bench soak` (bench/soak.py). Every role
runs in a session of its own (the supervisor starts it so), so a SIGKILL of its process group
takes the Spark JVM with the Python driver, as a crash would.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from recsys import supervisor
from recsys.broker import free_port
from recsys.paths import BUNDLED_DATA
from recsys.procs import alive
from recsys.settings import Settings, load
from schemas import topics as T
from tests.waiting import wait_for

log = logging.getLogger(__name__)

# Small, fast models: the faults are the point, not the model's quality.
SMALL_ALS = {"als_rank": 4, "als_max_iter": 3, "top_n": 5, "eval_k": 5, "promote_gate": False,
             "spark_shuffle_partitions": 2, "spark_driver_memory": "1g", "warm_up": False}


class Stack:
    """The roles of `recsys up` on one Kafka cluster (`bootstrap`), with their state in
    `data_dir` and the store at `store_path` (default `<data_dir>/store`)."""

    def __init__(self, bootstrap: str, data_dir: Path, store_path: str = "",
                 spark_master: str = "local[2]", prefix: str = "", **overrides: Any) -> None:
        """`prefix`: every topic `<prefix><declared name>` (and the speed layer's group), so a
        stack can share a cluster with other tests; "" uses the declared names."""
        data_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.args: dict[str, list[str]] = {role: [] for role in supervisor.ROLES}
        if prefix:
            for role in ("stream", "speed", "aggregate"):
                self.args[role] = ["--topic-prefix", prefix]
            self.args["speed"] += ["--group", f"{prefix}recsys-speed"]
        self.overrides = {**SMALL_ALS, "store_path": store_path, "spark_master": spark_master,
                          "export_dir": data_dir / "exports",
                          "aggregate_web_port": free_port(), "dashboard_port": free_port(),
                          "trigger_seconds": 1.0, **overrides}
        self.settings: Settings = load(kafka_bootstrap=bootstrap, data_dir=data_dir,
                                       **self.overrides)
        self.env = {f"RECSYS_{k.upper()}": str(v) for k, v in self.overrides.items()}
        self.env.update(RECSYS_LOG_LEVEL="INFO", PYTHONUNBUFFERED="1")
        self.fed = 0  # bundled rows fed so far (the next feed starts after them)

    # -- processes --
    def start(self, *roles: str) -> None:
        for role in roles:
            supervisor.start_role(self.settings, role, self.env, self.args[role])

    def pid(self, role: str) -> int | None:
        return supervisor.service(self.settings, role).pid()

    def signal(self, role: str, sig: signal.Signals) -> int:
        """Send `sig` to the role's whole process group (its Spark JVM too); the pid."""
        pid = self.pid(role)
        assert pid is not None, f"{role} is not running:\n{self.log(role)}"
        os.killpg(pid, sig)
        return pid

    def kill(self, role: str) -> None:
        """SIGKILL, as a crash: nothing is flushed or committed."""
        pid = self.signal(role, signal.SIGKILL)
        wait_for(f"{role} (pid {pid}) to die", lambda: not alive(pid) or _reap(pid), 30, 0.1)
        _reap(pid)
        supervisor.service(self.settings, role).pid_file.unlink(missing_ok=True)

    def stop(self, *roles: str) -> None:
        for role in roles:
            supervisor.stop_role(self.settings, role, grace=60)

    def stop_all(self) -> None:
        """SIGTERM every role (SIGKILL after the grace); for the end of a test or a bench."""
        for role in reversed(list(supervisor.ROLES)):
            try:
                supervisor.stop_role(self.settings, role, grace=30)
            except ProcessLookupError:
                pass

    def exited(self, *roles: str) -> str | None:
        """'<role> exited: <log tail>' for the first of `roles` that is not running, else None."""
        for role in roles:
            if self.pid(role) is None:
                return f"{role} exited:\n{self.log(role)}"
        return None

    def log_path(self, role: str) -> Path:
        return supervisor.service(self.settings, role).log_file

    def log(self, role: str, tail: int = 40) -> str:
        try:
            lines = self.log_path(role).read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(ln[:300] for ln in lines if not ln.startswith("\tat "))[-tail * 200:]

    # -- input --
    def feed(self, rows: int, rate: float | None = None) -> Any:
        """The next `rows` rows of the bundled file through `SalesProducer` (acks=all); the
        summary (rows without a customer go to sales.dlq as the producer's dead letters)."""
        from streams.csv_source import CsvSource

        summary = self.produce(CsvSource(BUNDLED_DATA, skip=self.fed, limit=rows), rate)
        self.fed += rows
        return summary

    def produce(self, items: Any, rate: float | None = None,
                stop: threading.Event | None = None) -> Any:
        """`items` (the producer's item shape) through `SalesProducer`, paced at `rate`; `stop`
        ends it early (the producer's own SIGTERM path: acks awaited, summary kept)."""
        from streams.producer import SalesProducer

        producer = SalesProducer(self.settings, topic=f"{self.prefix}{T.SALES}",
                                 dlq_topic=f"{self.prefix}{T.SALES_DLQ}")
        if stop is not None:
            threading.Thread(target=lambda: stop.wait() and producer.stop(), daemon=True).start()
        summary = producer.run(items, rate=rate)
        assert summary.ok, summary.line()
        return summary

    # -- the aggregator's read API --
    def api(self, path: str, port: int | None = None) -> tuple[int, Any]:
        url = f"http://127.0.0.1:{port or self.settings.aggregate_web_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return 0, None

    def stats(self) -> dict[str, Any] | None:
        status, body = self.api("/stats")
        return body if status == 200 else None


def _reap(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return False
