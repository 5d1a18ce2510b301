"""When the streaming job trains a model: a policy of (store counters, settings, feedback) that
returns a decision and its reason. The job only acts on it (spark/job.py `StreamJob`), so the
rules are tested without a job, a Spark session or a broker (tests/unit/test_trigger.py).

Triggers, checked in this order:
- "threshold": `train_threshold` new valid events since the last model;
- "max_wait": `train_max_wait_seconds` passed since the last model (before the first: since the
  first new event) with at least one new event;
- "feedback": the aggregator's `Feedback` for the model in service says it does worse online
  than offline (spark/feedback.py `underperforms`), at least one new event came, and that model
  has not been retrained for its feedback before (once per model version).

Every trigger but the threshold needs a new event: the same data would give the same model.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from recsys.settings import Settings
from spark.feedback import underperforms
from spark.store import StoreState

THRESHOLD, MAX_WAIT, FEEDBACK = "threshold", "max_wait", "feedback"


@dataclass(frozen=True)
class Decision:
    """`trigger` is None when no model is due; `reason` says more than its name (feedback)."""

    trigger: str | None = None
    reason: str | None = None

    def __bool__(self) -> bool:
        return self.trigger is not None


NOT_DUE = Decision()


def waited(state: StoreState, now: float) -> float:
    """Seconds since the last model (or, before the first, since the first new event)."""
    return now - (state.last_model_at or state.pending_since or now)


def decide(
    state: StoreState,
    settings: Settings,
    now: float,
    feedback: Mapping[str, Any] | None = None,
    fired: Collection[int] = (),
) -> Decision:
    """Should a model be trained now (epoch seconds `now`)?

    `feedback` is the newest `Feedback` record of the model in service (None when there is none
    or the loop is off); `fired` the model versions already retrained for their feedback.
    """
    since = state.since_model
    if since >= settings.train_threshold:
        return Decision(THRESHOLD)
    if settings.train_max_wait_seconds and since >= 1:
        if waited(state, now) >= settings.train_max_wait_seconds:
            return Decision(MAX_WAIT)
    if feedback is not None and since >= 1 and int(feedback["model_version"]) not in fired:
        reason = underperforms(dict(feedback), settings.feedback_retrain_share)
        if reason:
            return Decision(FEEDBACK, reason)
    return NOT_DUE


def near(state: StoreState, settings: Settings, now: float) -> bool:
    """Is a model coming soon: half the threshold reached, or half the max wait passed with a new
    event? (When the job warms up, see `spark.warmup`.)"""
    since = state.since_model
    if since >= settings.train_threshold / 2:
        return True
    if settings.train_max_wait_seconds and since >= 1:
        return waited(state, now) >= settings.train_max_wait_seconds / 2
    return False


def warm_up_now(state: StoreState, settings: Settings, now: float, due: Decision) -> bool:
    """Warm up (once per job, the job keeps count) while a model is near but not `due` yet: a
    due model trains at once, and waiting for a warm-up would only delay it."""
    return settings.warm_up and not due and near(state, settings, now)
