"""`recsys stream` names a failed query's cause in one line (the reliability tier's R8: a full
disk), not the pages of trace Spark wraps it in."""

from __future__ import annotations

import pytest

from spark.job import failure_cause

pytestmark = pytest.mark.unit


def test_the_innermost_cause_of_a_wrapped_failure():
    text = ("An exception was raised by the Python Proxy. Return Message: Traceback (most recent"
            " call last):\n  File \"x.py\", line 1, in f\npy4j.protocol.Py4JJavaError: ...\n"
            "Caused by: org.apache.hadoop.fs.FSError: java.io.IOException: No space left on "
            "device\n\tat org.apache.hadoop.fs.X(X.java:1)\n"
            "\tCaused by: java.io.IOException: No space left on device\n\tat y\n")
    assert failure_cause(text) == "java.io.IOException: No space left on device"


def test_a_failure_without_a_cause_gives_its_first_line():
    assert failure_cause("Timed out waiting for a node assignment\nmore") == (
        "Timed out waiting for a node assignment")
    assert failure_cause("") == "?"
