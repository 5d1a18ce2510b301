"""Waiting on a condition that proves something (an offset reached, a count settled, a process
ready), shared by every tier that runs processes: never a sleep followed by an assert."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(
    what: str,
    check: Callable[[], Any],
    timeout: float,
    every: float = 0.5,
    dead: Callable[[], str | None] | None = None,
    tail: Callable[[], str] | None = None,
    tolerate: tuple[type[BaseException], ...] = (),
) -> Any:
    """`check()`'s first truthy value. AssertionError after `timeout` seconds, or as soon as
    `dead()` names a reason to stop waiting (a process that exited); `tail()` (a log's last
    lines) is added to either message. An exception of `tolerate` from `check` (a server not
    listening yet) counts as "not yet"."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        if dead is not None and (why := dead()):
            raise AssertionError(f"{why} while waiting for {what}" + _more(tail))
        try:
            last = check()
        except tolerate:
            last = None
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} "
                                 f"(last: {last!r})" + _more(tail))
        time.sleep(every)


def exited(proc: Any, name: str = "the process") -> Callable[[], str | None]:
    """A `dead` for `wait_for`: names `proc` (a Popen) once it has exited, with its code."""
    return lambda: None if proc.poll() is None else f"{name} exited ({proc.returncode})"


def _more(tail: Callable[[], str] | None) -> str:
    return "" if tail is None else ":\n" + tail()
