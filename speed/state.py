"""Each user's state in the speed layer: net quantity per product and what was applied already.
Pure logic; the changelog record is `SpeedState` (schemas/speed_state.avsc).

Two guards make a sale count once. A record of `sales` at or below the user's last applied offset
(same partition) is a replay after a restart (the changelog was written before the input offsets
were committed); a sale whose event_id was applied before, at whatever offset, is a duplicate
(a file produced twice, a producer retry): its 8-byte BLAKE2b digest is in the user's set.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from schemas.millis import from_ms, to_ms

APPLIED, REPLAYED, DUPLICATE = "applied", "replayed", "duplicate"


def digest(event_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "little")


@dataclass
class UserState:
    user_id: str
    quantities: dict[str, int] = field(default_factory=dict)
    hashes: set[int] = field(default_factory=set)
    partition: int = -1
    offset: int = -1
    event_id: str = ""
    sale_timestamp: int = 0  # ms

    def apply(self, sale: dict[str, Any], partition: int, offset: int, timestamp_ms: int) -> str:
        """Fold one sale into the net quantities: APPLIED, REPLAYED or DUPLICATE (unchanged)."""
        if partition == self.partition and offset <= self.offset:
            return REPLAYED
        h = digest(sale["event_id"])
        self.partition, self.offset = partition, offset  # seen, whatever comes next
        if h in self.hashes:
            return DUPLICATE
        self.hashes.add(h)
        product = sale["product_id"]
        net = self.quantities.get(product, 0) + int(sale["quantity"])
        if net:
            self.quantities[product] = net
        else:
            self.quantities.pop(product, None)
        self.event_id = sale["event_id"]
        self.sale_timestamp = int(timestamp_ms)
        return APPLIED

    def record(self) -> dict[str, Any]:
        """The `SpeedState` record."""
        return {
            "user_id": self.user_id,
            "quantities": dict(self.quantities),
            # one C loop: a Python join of to_bytes cost ~0.1 ms per 1,000 events of the user
            "event_hashes": np.fromiter(self.hashes, "<u8", len(self.hashes)).tobytes(),
            "partition": self.partition,
            "offset": self.offset,
            "event_id": self.event_id,
            "sale_timestamp": from_ms(self.sale_timestamp),
        }

    @classmethod
    def of(cls, record: dict[str, Any]) -> UserState:
        raw = record["event_hashes"]
        hashes = set(np.frombuffer(raw, "<u8").tolist())
        ts = record["sale_timestamp"]
        ms = to_ms(ts)
        return cls(record["user_id"], {k: int(v) for k, v in record["quantities"].items()},
                   hashes, int(record["partition"]), int(record["offset"]), record["event_id"], ms)
