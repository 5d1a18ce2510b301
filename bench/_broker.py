"""A throwaway local broker for one benchmark: free port, temporary folder, removed afterwards."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from recsys.broker import LocalBroker, free_port


@contextmanager
def scratch_broker(name: str, timeout: float = 120.0) -> Iterator[tuple[LocalBroker, Path]]:
    """(started broker, temporary folder); the broker dies with this process if it is killed."""
    tmp = Path(tempfile.mkdtemp(prefix=f"recsys-bench-{name}-"))
    broker = LocalBroker(tmp / "kafka", free_port(), die_with_parent=True)
    try:
        broker.start(timeout=timeout)
        yield broker, tmp
    finally:
        try:
            broker.stop()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
