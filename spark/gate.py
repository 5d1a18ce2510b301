"""The promotion gate: does a newly trained model (the challenger) replace the one in service (the
champion)? A pure function of the figures; the job acts on its decision."""

from __future__ import annotations

import math
from dataclasses import dataclass

from recsys.settings import Settings
from schemas.metrics import PRECISION_AT_K as METRIC


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(challenger: dict[str, float], popularity: dict[str, float],
           champion: dict[str, float] | None, settings: Settings,
           champion_version: int = 0) -> Decision:
    """Promote when the challenger's precision@k beats popularity's and reaches
    (1 - promote_tolerance) x the champion's, all on the challenger's test window. The first model
    faces popularity alone; without a test window (no figures) only a first model is promoted."""
    ours = challenger.get(METRIC, math.nan)
    pop = popularity.get(METRIC, math.nan)
    theirs = None if champion is None else champion.get(METRIC, math.nan)
    figures = f"precision@k {ours:.4f}, popularity {pop:.4f}" + (
        "" if theirs is None else f", champion {champion_version} {theirs:.4f}")
    if not settings.promote_gate:
        return Decision(True, f"gate off ({figures})")
    if math.isnan(ours):
        if theirs is None:
            return Decision(True, "no test window to judge; the first model serves")
        return Decision(False, f"no test window to judge; champion {champion_version} stays")
    if not ours > pop:
        return Decision(False, f"not above popularity ({figures})")
    if theirs is not None and not math.isnan(theirs):
        floor = (1 - settings.promote_tolerance) * theirs
        if ours < floor:
            return Decision(False, f"below {1 - settings.promote_tolerance:.2f} x the champion "
                                   f"({figures}; floor {floor:.4f})")
    return Decision(True, f"passed ({figures})")
