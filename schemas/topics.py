"""The topic list: every topic the system uses, declared once.

Processes name topics only through these constants; `recsys topics create` creates exactly this
list, idempotently.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

SALES = "sales"
SALES_DLQ = "sales.dlq"
MODEL_READY = "model-ready"
RECOMMENDATIONS = "recommendations"
GRAPH_EDGES = "graph-edges"
FEEDBACK = "feedback"
RECOMMENDATIONS_SHADOW = "recommendations-shadow"
MODEL_FACTORS = "model-factors"
SPEED_STATE = "speed-state"

WEEK_MS = 7 * 24 * 3600 * 1000


@dataclass(frozen=True)
class Topic:
    name: str
    value_schema: str | None  # Avro record name of the value, None while the topic has no schema
    key: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


TOPICS: tuple[Topic, ...] = (
    Topic(SALES, "Sale", "user_id", 2, {"cleanup.policy": "delete"}),
    Topic(SALES_DLQ, "DeadLetter", "source", 1, {"cleanup.policy": "delete"}),
    Topic(
        MODEL_READY,
        "ModelReady",
        "model_version",
        1,
        {"cleanup.policy": "delete", "retention.ms": str(52 * WEEK_MS)},
    ),
    Topic(
        RECOMMENDATIONS,
        "Recommendation",
        "user_id",
        2,
        {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"},
    ),
    # A rejected challenger's lists: judged online beside the champion's, never served.
    Topic(
        RECOMMENDATIONS_SHADOW,
        "Recommendation",
        "user_id",
        2,
        {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"},
    ),
    Topic(GRAPH_EDGES, "GraphEdge", "model_version:user_id:product_id", 2,
          {"cleanup.policy": "delete"}),
    Topic(FEEDBACK, "Feedback", "model_version", 1, {"cleanup.policy": "delete"}),
    # What a fold-in needs from a model, in chunks; one partition, so a reader sees a version's
    # chunks in order. Spark tombstones the chunks of the version before once a new one is out.
    Topic(MODEL_FACTORS, "ModelFactors", "model_version:chunk", 1, {"cleanup.policy": "compact"}),
    # The speed layer's changelog: one record per user, in the partition of the user's sales.
    Topic(SPEED_STATE, "SpeedState", "user_id", 2, {"cleanup.policy": "compact"}),
)

BY_NAME = {t.name: t for t in TOPICS}


class Names:
    """Base of a process's frozen dataclass of the topic names it uses (the declared names as
    defaults): `with_prefix` gives every name a prefix (tests: `t1.sales`, ...)."""

    @classmethod
    def with_prefix(cls, prefix: str):  # -> the subclass
        base = cls()
        return cls(**{f.name: prefix + getattr(base, f.name) for f in fields(cls)})


def topic(name: str) -> Topic:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown topic {name!r}; known: {', '.join(BY_NAME)}") from None


# `ModelReady.status`: did the gate put the model in service?
PROMOTED = "promoted"
REJECTED = "rejected"

# `Recommendation.source`: where a list came from.
RETRAIN = "retrain"  # a model's own list, published by Spark after each retrain
FOLD_IN = "fold-in"  # the speed layer's list after a sale, between retrains
