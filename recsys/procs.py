"""What the launcher and the supervisor ask about a process by its pid, and what the daemons we
start (the local broker, Spark's master and workers) share: finding their process again, waiting
for it to end, signalling it, forgetting it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def alive(pid: int) -> bool:
    """Running and not a zombie: an unreaped child that exited must not count as running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, but it exists
    stat = Path(f"/proc/{pid}/stat")
    if not stat.parent.exists():
        return True  # no /proc to ask (not Linux): the signal check is all there is
    try:
        state = stat.read_text().rsplit(")", 1)[1].split()[0]  # the name may hold spaces
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def cmdline(pid: int) -> str | None:
    """The process's command line; None where there is no /proc to ask (then trust the pid)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None


def pid_from_file(path: Path, *marks: str) -> int | None:
    """The live pid a pid file names, else None: no file, a dead process, or (where /proc can
    tell) a process whose command line lacks one of `marks`, i.e. a stale file whose pid now
    belongs to another process."""
    try:
        pid = int(Path(path).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    if not alive(pid):
        return None
    cmd = cmdline(pid)
    if cmd is not None and not all(mark in cmd for mark in marks):
        return None
    return pid


def wait_exit(pid: int, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    """Whether `pid` ended within `timeout` seconds; `proc` (our child with that pid) is reaped,
    so it does not linger as a zombie that still counts as alive."""
    if proc is not None and proc.pid == pid:
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def send(pid: int, sig: signal.Signals) -> None:
    """`sig` to `pid`; a process already gone is no error."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class Daemon:
    """A process started by us or by another process, found again through its pid file: a pid
    counts only while its command line carries every one of `marks()` (a stale file's pid may
    belong to another process by now). Subclasses set `pid_path` and `_proc` (their child, when
    this process started it)."""

    pid_path: Path
    _proc: subprocess.Popen[bytes] | None = None

    def marks(self) -> tuple[str, ...]:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        """The pid of the running process (started here or by another process)."""
        if self._proc is not None:
            if self._proc.poll() is None and alive(self._proc.pid):
                return self._proc.pid
            self._proc = None
        return pid_from_file(self.pid_path, *self.marks())

    def is_running(self) -> bool:
        return self.pid is not None

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        return wait_exit(pid, timeout, self._proc)

    def _forget(self) -> None:
        """Reap our child, if any, and drop the pid file."""
        if self._proc is not None:
            self._proc.poll()
            self._proc = None
        self.pid_path.unlink(missing_ok=True)
