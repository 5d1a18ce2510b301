"""strptime formats as the CSV reader's Java date patterns."""

from __future__ import annotations

import pytest

from spark.csv_input import java_pattern

pytestmark = pytest.mark.unit


def test_strptime_formats_become_java_patterns() -> None:
    # one letter (one or two digits, as strptime reads them) unless a directive follows
    assert java_pattern("%Y-%m-%d %H:%M:%S") == "yyyy-M-d H:m:s"
    assert java_pattern("%d/%m/%Y %H:%M") == "d/M/yyyy H:m"
    assert java_pattern("%Y-%m-%dT%H:%M") == "yyyy-M-d'T'H:m"
    assert java_pattern("%Y%m%d%H%M") == "yyyyMMddHHm"
    with pytest.raises(ValueError):
        java_pattern("%Q")
