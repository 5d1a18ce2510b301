"""The streaming job's early retrain from online feedback: the rule and the trigger."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from recsys.settings import load
from spark.feedback import underperforms
from spark.job import StreamJob
from spark.store import StoreState

pytestmark = pytest.mark.unit


def feedback(version=3, users=50, online=0.01, offline=0.064, **kw):
    return {"model_version": version, "users": users, "sales": 4 * users, "hits": 3,
            "precision_at_k": online, "offline_precision_at_k": offline, "k": 10,
            "hit_rate": 0.02, **kw}


def test_the_rule_fires_below_the_share_of_offline_precision_only():
    assert underperforms(feedback(online=0.01), 0.5).startswith("model 3: online precision@10")
    assert underperforms(feedback(online=0.032), 0.5) is None  # exactly the share: not below
    assert underperforms(feedback(online=0.01), 0.0) is None  # off
    assert underperforms(feedback(users=19), 0.5) is None  # too few users to judge
    assert underperforms(feedback(offline=None), 0.5) is None  # offline precision unknown
    assert underperforms(feedback(offline=0.0), 0.5) is None


class Watch:
    def __init__(self, records):
        self.records = {r["model_version"]: r for r in records}

    def latest(self, version):
        return self.records.get(version)


def test_feedback_triggers_once_per_model_and_only_with_new_events(tmp_path):
    job = StreamJob(None, load(data_dir=tmp_path, train_threshold=1000,
                               feedback_retrain_share=0.5))
    job.feedback = Watch([feedback(version=3)])
    job.model_version = 3
    job.state = StoreState(events=500, events_at_model=500)
    assert job.due(now=0.0) is None  # nothing new since model 3
    job.state.events = 501
    assert job.due(now=0.0) == "feedback"
    job._feedback_fired.add(3)  # what _maybe_train records when it fires
    assert job.due(now=0.0) is None
    job.model_version = 4  # the new model has no feedback yet
    assert job.due(now=0.0) is None

    healthy = StreamJob(None, load(data_dir=tmp_path, feedback_retrain_share=0.5))
    healthy.feedback = Watch([feedback(version=3, online=0.05)])
    healthy.model_version = 3
    healthy.state = StoreState(events=10)
    assert healthy.due(now=0.0) is None


def test_the_reason_goes_into_model_ready_params(monkeypatch, tmp_path):
    from spark import job as job_mod

    calls = {}

    def fake_train_and_publish(spark, settings, topics, sales, trigger, started, reason):
        calls.update(trigger=trigger, reason=reason)
        return SimpleNamespace(model_ready={"model_version": 4, "serving": 4})

    job = StreamJob(None, load(data_dir=tmp_path, feedback_retrain_share=0.5))
    job.feedback = Watch([feedback(version=3)])
    job.model_version = 3
    job.state = StoreState(events=10)
    monkeypatch.setattr(job_mod, "train_and_publish", fake_train_and_publish)
    monkeypatch.setattr(job.store, "read", lambda: None)
    monkeypatch.setattr(job.store, "save_state", lambda state: None)
    job._maybe_train(now=0.0)
    assert calls["trigger"] == "feedback" and "online precision@10 0.0100" in calls["reason"]
    assert job.model_version == 4 and 3 in job._feedback_fired
