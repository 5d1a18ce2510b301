"""Process liveness as the launcher and the supervisor see it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from recsys.procs import alive, cmdline

pytestmark = pytest.mark.unit


def test_this_process_is_alive_and_has_a_command_line():
    assert alive(os.getpid())
    assert "python" in (cmdline(os.getpid()) or "python")


def test_an_exited_unreaped_child_is_not_alive():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while alive(child.pid) and time.monotonic() < deadline:  # a zombie until waited for
        time.sleep(0.05)
    assert not alive(child.pid)
    child.wait()
    assert not alive(child.pid)
