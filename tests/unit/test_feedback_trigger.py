"""The streaming job's early retrain from online feedback: the rule (when the trigger fires on it:
tests/unit/test_trigger.py)."""

from __future__ import annotations

import pytest

from spark.feedback import underperforms

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
