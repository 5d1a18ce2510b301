"""When the streaming job trains: the trigger policy (spark/trigger.py) on plain counters,
settings and feedback records; no job, no Spark, no broker."""

from __future__ import annotations

import pytest

from recsys.settings import load
from spark.store import StoreState
from spark.trigger import (
    FEEDBACK,
    MAX_WAIT,
    NOT_DUE,
    THRESHOLD,
    Decision,
    decide,
    near,
    warm_up_now,
)

pytestmark = pytest.mark.unit


def feedback(version=3, users=50, online=0.01, offline=0.064):
    return {"model_version": version, "users": users, "sales": 4 * users, "hits": 3,
            "precision_at_k": online, "offline_precision_at_k": offline, "k": 10,
            "hit_rate": 0.02}


def test_due_at_the_threshold_or_after_max_wait(tmp_path):
    s = load(data_dir=tmp_path, train_threshold=100)
    state = StoreState(events=99, pending_since=1000.0)
    assert decide(state, s, now=5000.0) == NOT_DUE  # max-wait is off by default
    assert not decide(state, s, now=5000.0)
    state.events = 100
    assert decide(state, s, now=1000.0) == Decision(THRESHOLD)

    s = load(data_dir=tmp_path, train_threshold=100, train_max_wait_seconds=60)
    state = StoreState(events=5, pending_since=1000.0)
    assert not decide(state, s, now=1059.0)
    assert decide(state, s, now=1060.0) == Decision(MAX_WAIT)
    trained = StoreState(events=5, events_at_model=5, last_model_at=0.0)
    assert not decide(trained, s, now=1e9)  # nothing new since the last model
    # after a model, the wait runs from that model, not from the first new event
    again = StoreState(events=6, events_at_model=5, last_model_at=2000.0, pending_since=2050.0)
    assert not decide(again, s, now=2059.0)
    assert decide(again, s, now=2060.0).trigger == MAX_WAIT


def test_feedback_fires_once_per_model_and_only_with_new_events(tmp_path):
    s = load(data_dir=tmp_path, train_threshold=1000, feedback_retrain_share=0.5)
    worse = feedback(version=3)
    assert not decide(StoreState(events=500, events_at_model=500), s, 0.0, worse)  # nothing new
    due = decide(StoreState(events=501, events_at_model=500), s, 0.0, worse)
    assert due.trigger == FEEDBACK
    assert due.reason.startswith("model 3: online precision@10 0.0100 < 0.5 x offline 0.0640")
    assert not decide(StoreState(events=501, events_at_model=500), s, 0.0, worse, fired={3})
    assert not decide(StoreState(events=10), s, 0.0, None)  # the new model has no feedback yet
    assert not decide(StoreState(events=10), s, 0.0, feedback(version=3, online=0.05))  # healthy
    off = load(data_dir=tmp_path, train_threshold=1000, feedback_retrain_share=0.0)
    assert not decide(StoreState(events=10), off, 0.0, worse)  # the loop is off


def test_threshold_and_max_wait_come_before_feedback(tmp_path):
    s = load(data_dir=tmp_path, train_threshold=10, feedback_retrain_share=0.5)
    assert decide(StoreState(events=10), s, 0.0, feedback()) == Decision(THRESHOLD)


def test_warm_up_from_half_the_threshold_and_not_when_a_model_is_due(tmp_path):
    s = load(data_dir=tmp_path, train_threshold=1000)

    def warm(events):
        state = StoreState(events=events)
        return warm_up_now(state, s, 0.0, decide(state, s, 0.0))

    assert not warm(499)  # not near yet
    assert warm(500) and warm(700)  # the job warms up once: it keeps count
    assert not warm(1000)  # the model trains at once: no warm-up to wait for
    off = load(data_dir=tmp_path, train_threshold=1000, warm_up=False)
    assert not warm_up_now(StoreState(events=600), off, 0.0, NOT_DUE)


def test_half_the_max_wait_with_a_new_event_is_near(tmp_path):
    s = load(data_dir=tmp_path, train_threshold=10**9, train_max_wait_seconds=100)
    state = StoreState(events=1, pending_since=1000.0)
    assert not near(state, s, now=1049.0)
    assert near(state, s, now=1050.0)
    assert not near(StoreState(events=0), s, now=5000.0)  # nothing new: no model will come
