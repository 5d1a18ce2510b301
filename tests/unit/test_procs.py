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


def test_a_pid_file_counts_only_for_a_live_process_with_the_marks(tmp_path):
    from recsys.procs import pid_from_file

    path = tmp_path / "x.pid"
    assert pid_from_file(path) is None  # no file
    path.write_text("not a pid\n")
    assert pid_from_file(path) is None
    path.write_text(f"{os.getpid()}\n")
    assert pid_from_file(path, "python") == os.getpid()
    assert pid_from_file(path, "python", "kafka.Kafka") is None  # a reused pid: stale file
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    path.write_text(f"{child.pid}\n")
    assert pid_from_file(path) is None  # exited


def test_wait_exit_reaps_our_child_and_times_out_on_a_live_one():
    from recsys.procs import wait_exit

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not wait_exit(child.pid, 0.2, child)
        child.kill()
        assert wait_exit(child.pid, 10, child) and child.returncode is not None
    finally:
        child.kill()
        child.wait()
