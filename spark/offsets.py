"""Offsets in a Structured Streaming progress report, made readable: which records a batch read
(`ranges`, for the log's `topic[partition]@first-last`) and how far the query is behind (`lag`).

PySpark hands a source's `startOffset`, `endOffset` and `latestOffset` as JSON or as a Python
dict's repr, depending on the version, and a first batch's start as "None"; both readers accept
every form and answer "?" / None rather than fail a progress line.
"""

from __future__ import annotations

import ast
import json
from typing import Any


def parse(value: Any) -> dict[str, dict[str, int]]:
    """A progress report's offsets as `{"topic": {"partition": offset}}`."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = ast.literal_eval(value)
    else:
        parsed = value
    return {t: {str(p): int(o) for p, o in parts.items()} for t, parts in parsed.items()}


def ranges(start: Any, end: Any) -> str:
    """`topic[partition]@first-last` of the offsets a batch read (from its progress report; a
    first batch has no start: PySpark hands "None")."""
    try:
        starts = {} if start in (None, "None", "null") else parse(start)
        ends = parse(end)
    except (TypeError, ValueError, AttributeError, SyntaxError):
        return "?"
    out = []
    for topic, parts in sorted(ends.items()):
        for part, end_offset in sorted(parts.items(), key=lambda kv: int(kv[0])):
            first = starts.get(topic, {}).get(part, 0)
            if end_offset > first:
                out.append(f"{topic}[{part}]@{first}-{end_offset - 1}")
    return ", ".join(out)


def lag(end: Any, latest: Any) -> int | None:
    """Records on the topic past the batch's end offsets; None when either side is unknown."""
    try:
        ends, latests = parse(end), parse(latest)
        return sum(
            max(0, off - ends[t].get(p, 0)) for t, parts in latests.items()
            for p, off in parts.items()
        )
    except (TypeError, ValueError, KeyError, AttributeError, SyntaxError):
        return None
