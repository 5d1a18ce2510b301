"""What the launcher and the supervisor ask about a process by its pid."""

from __future__ import annotations

import os
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
