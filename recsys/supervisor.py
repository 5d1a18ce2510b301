"""Start, stop and list the local stack: the broker and one process per `recsys` role.

`recsys up` starts everything in the background (logs under `var/log/`, pid files under `var/run/`),
`recsys down` stops it with SIGTERM (SIGKILL only after a grace period), `recsys status` shows what
runs. `recsys demo` uses the same functions in the foreground.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from recsys.procs import alive
from recsys.security import role_env
from recsys.settings import Settings

log = logging.getLogger(__name__)

# The roles, in start order; each is a `recsys` subcommand (docker-compose runs the same ones).
ROLES: dict[str, list[str]] = {
    "stream": ["stream"],
    "speed": ["speed"],
    "aggregate": ["aggregate"],
    "dashboard": ["dashboard"],
}


@dataclass(frozen=True)
class Service:
    name: str
    pid_file: Path
    log_file: Path

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if alive(pid) else None


def service(settings: Settings, name: str) -> Service:
    return Service(
        name,
        settings.data_dir / "run" / f"{name}.pid",
        settings.data_dir / "log" / f"{name}.log",
    )


def role_available(name: str) -> bool:
    """A role is available once its code exists (the product grows role by role)."""
    from recsys.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return ROLES[name][0] in sub.choices  # type: ignore[union-attr]


def start_role(settings: Settings, name: str, extra_env: dict[str, str] | None = None,
               extra_args: list[str] | None = None) -> Service:
    """Start role `name` in the background; `extra_args` follow its subcommand (the fault tier
    passes `--topic-prefix` to run a stack beside others on one cluster)."""
    svc = service(settings, name)
    if svc.pid():
        log.info("%s already running (pid %d)", name, svc.pid())
        return svc
    svc.pid_file.parent.mkdir(parents=True, exist_ok=True)
    svc.log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "RECSYS_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "RECSYS_DATA_DIR": str(settings.data_dir),
        "PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON", sys.executable),
        "SPARK_LOCAL_IP": "127.0.0.1",
        **role_env(settings, name),  # the secured local broker: this role's own principal
        **(extra_env or {}),
    }
    with open(svc.log_file, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "recsys.cli", *ROLES[name], *(extra_args or [])],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # Ctrl-C in the demo's terminal reaches us, not them
        )
    svc.pid_file.write_text(str(proc.pid))
    log.info("started %s (pid %d), log %s", name, proc.pid, svc.log_file)
    return svc


def stop_role(settings: Settings, name: str, grace: float = 60.0) -> None:
    svc = service(settings, name)
    pid = svc.pid()
    if pid is None:
        svc.pid_file.unlink(missing_ok=True)
        return
    log.info("stopping %s (pid %d)", name, pid)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and alive(pid):
        _reap(pid)
        time.sleep(0.2)
    if alive(pid):
        log.warning("%s did not stop within %.0f s: SIGKILL", name, grace)
        os.kill(pid, signal.SIGKILL)
    _reap(pid)
    svc.pid_file.unlink(missing_ok=True)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def local_broker(settings: Settings):
    from recsys.broker import LocalBroker

    port = int(settings.kafka_bootstrap.split(",")[0].rpartition(":")[2])
    return LocalBroker(settings.data_dir / "kafka", port=port, heap_mb=settings.broker_heap_mb,
                       secure=settings.broker_secure)


def up(settings: Settings, roles: list[str] | None = None) -> list[str]:
    """Broker, topics, then every available role; returns the roles started."""
    from recsys.topics import create_topics

    broker = local_broker(settings)
    if not broker.is_running():
        broker.start()
    create_topics(settings)
    started = []
    for name in roles or list(ROLES):
        if role_available(name):
            start_role(settings, name)
            started.append(name)
        else:
            log.info("role %s is not part of this build yet; skipped", name)
    return started


def down(settings: Settings) -> None:
    for name in reversed(list(ROLES)):
        stop_role(settings, name)
    broker = local_broker(settings)
    broker.stop()


def status(settings: Settings) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    broker = local_broker(settings)
    out["broker"] = broker.pid if broker.is_ready() else None
    for name in ROLES:
        out[name] = service(settings, name).pid()
    return out


def cli(settings: Settings, args) -> int:
    if args.command == "up":
        started = up(settings)
        print(f"up: broker on {settings.kafka_bootstrap}; {', '.join(started) or 'no roles'}")
        print(f"logs: {settings.data_dir / 'log'}/")
        if settings.broker_secure:
            print(f"secured: SASL_SSL, a user per role; credentials and the tokens of the read "
                  f"API and the dashboard in {settings.data_dir / 'kafka' / 'security'}/")
        return 0
    if args.command == "down":
        down(settings)
        print("down: stopped")
        return 0
    running = status(settings)
    for name, pid in running.items():
        print(f"{name:10s} {'running pid ' + str(pid) if pid else 'stopped'}")
    return 0 if running.get("broker") else 1
