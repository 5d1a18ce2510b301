"""The benchmarks' throwaway broker answers, and leaves nothing behind."""

from __future__ import annotations

import pytest

from bench._broker import scratch_broker
from recsys import topics
from recsys.settings import load

pytestmark = pytest.mark.integration


def test_scratch_broker_serves_topics_and_removes_its_folder():
    with scratch_broker("selftest") as (broker, tmp):
        settings = load(kafka_bootstrap=broker.bootstrap, data_dir=str(tmp))
        topics.create_topics(settings)
        assert "sales" in {name for name, _, _ in topics.describe(settings)}
        assert tmp.is_dir()
    assert not tmp.exists()
    assert not broker.is_running()
