"""How a `DeadLetter` (schemas/dead_letter.avsc) is counted: one short label per kind of mistake.

A dead letter's `reason` is "<what>: <details>" (the codec's, the producer's and Spark's reasons
alike); counting by the whole text would make one bucket per row. The aggregator's /stats and the
dashboard both count by `reason_label`, so they show the same buckets.
"""

from __future__ import annotations

MAX_REASON_CHARS = 60  # a label longer than this is cut, with "…" (a dashboard bar's width)


def reason_label(stage: str, reason: str) -> str:
    """A short, low-cardinality label: the stage and the reason's text before the first ':'."""
    head = reason.split(":", 1)[0].strip() or "unknown"
    label = f"{stage}: {head}" if stage else head
    return label if len(label) <= MAX_REASON_CHARS else label[: MAX_REASON_CHARS - 1] + "…"
