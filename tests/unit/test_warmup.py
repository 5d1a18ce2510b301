"""The streaming job's warm-up: when it runs (once, while a model is near but not due), and that
the throw-away cycle runs every step on Spark and leaves nothing behind."""

from __future__ import annotations

import logging

import pytest

from recsys.settings import load
from spark import warmup
from spark.job import StreamJob
from spark.store import StoreState

pytestmark = pytest.mark.unit


def _job(tmp_path, monkeypatch, **settings):
    job = StreamJob(None, load(data_dir=tmp_path, **settings))
    calls = []
    monkeypatch.setattr(warmup, "warm_up", lambda spark, s: calls.append(s) or 1.0)
    return job, calls


def test_warms_up_once_from_half_the_threshold_and_not_when_a_model_is_due(tmp_path, monkeypatch):
    job, calls = _job(tmp_path, monkeypatch, train_threshold=1000)
    job.state = StoreState(events=499)
    job._maybe_warm_up(now=0.0)
    assert calls == []  # not near yet
    job.state.events = 500
    job._maybe_warm_up(now=0.0)
    job.state.events = 700
    job._maybe_warm_up(now=0.0)
    assert len(calls) == 1  # once per job

    due, calls = _job(tmp_path, monkeypatch, train_threshold=1000)
    due.state = StoreState(events=1000)
    due._maybe_warm_up(now=0.0)
    assert calls == []  # the model trains at once: no warm-up to wait for

    off, calls = _job(tmp_path, monkeypatch, train_threshold=1000, warm_up=False)
    off.state = StoreState(events=600)
    off._maybe_warm_up(now=0.0)
    assert calls == []


def test_half_the_max_wait_with_a_new_event_is_near(tmp_path, monkeypatch):
    job, _ = _job(tmp_path, monkeypatch, train_threshold=10**9, train_max_wait_seconds=100)
    job.state = StoreState(events=1, pending_since=1000.0)
    assert not job.near(now=1049.0)
    assert job.near(now=1050.0)
    job.state = StoreState(events=0)
    assert not job.near(now=5000.0)  # nothing new: no model will come


def test_a_failed_warm_up_is_logged_and_ingest_goes_on(tmp_path, monkeypatch, caplog):
    job = StreamJob(None, load(data_dir=tmp_path, train_threshold=10))
    job.state = StoreState(events=6)

    def broken(spark, settings):
        raise RuntimeError("no luck")

    monkeypatch.setattr(warmup, "warm_up", broken)
    with caplog.at_level(logging.ERROR, logger="spark.job"):
        job._maybe_warm_up(now=0.0)
    assert "warm-up failed" in caplog.text and job._warmed


