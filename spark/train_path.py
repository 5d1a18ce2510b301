"""Where a training cycle runs its steps: on the driver or distributed. Decided once per cycle.

Every step of a cycle apart from ALS.fit (which is Spark's on both) has two variants with the same
answers (tests/spark/test_paths.py runs the same cases through both):

- prepare (`spark.prepare.prepare`): events collected once (Arrow), indexed, split and netted
  with numpy | Spark aggregations;
- evaluate (`spark.evaluate.model_and_baseline`): matrices and factors collected, numpy | joins
  and aggregations;
- recommend (`spark.recommend.published`, `top_items`): factors collected, users scored in blocks
  (matrix products) | ALS's blocked `recommendForUserSubset`;
- explain (`spark.graph.because`): per user, one matrix product against their history | one row
  per (edge, bought product).

The driver variants save Spark jobs (each costs ~0.1-1 s of scheduling on two cores) and hold
what they collect in the driver's memory; the distributed ones hold nothing big there. Which one
pays is a matter of size only, so the rule is one number: `auto` runs on the driver up to
`settings.train_driver_max_events` events. `bench scale` measured both paths from 0.4 M to 20 M
events on one 2-core machine (README: The training path): the driver path was the faster at
every size (two to three times), and at 20 M its Python peaked at 2.4 GiB (ids stay Arrow
strings, pairs are netted on a sorted 64-bit key, users are scored by `implicit`'s top-k in
blocks). There is no crossover up to 20 M, so the default is the largest size measured: above
it the distributed path, which needs no driver memory to speak of, takes over. On a cluster,
where Spark's jobs spread over more cores than the driver has, set the number from a `bench
scale` run there.
The decision is a small frozen object that the cycle passes along (`TrainResult.path` carries it
on to the graph), so no step re-decides from its own idea of "large".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from recsys.settings import Settings

log = logging.getLogger(__name__)

Where = Literal["driver", "distributed"]


@dataclass(frozen=True)
class TrainPath:
    """The path a cycle follows, and why (for its log line and `model-ready`'s params)."""

    where: Where
    reason: str = ""

    @property
    def driver(self) -> bool:
        return self.where == "driver"


DRIVER = TrainPath("driver", "chosen by the caller")
DISTRIBUTED = TrainPath("distributed", "chosen by the caller")


def decide(events: int, settings: Settings) -> TrainPath:
    """The path of a cycle over `events` sales events: `settings.train_path`, or for `auto` the
    driver while `events` <= `settings.train_driver_max_events`. Pure: no Spark, no I/O."""
    if settings.train_path != "auto":
        return TrainPath(settings.train_path, f"RECSYS_TRAIN_PATH={settings.train_path}")
    limit = settings.train_driver_max_events
    if events <= limit:
        return TrainPath("driver", f"auto: {events:,} events <= {limit:,}")
    return TrainPath("distributed", f"auto: {events:,} events > {limit:,}")
