"""The `model-factors` contract: a model's item factors in chunks, and how a reader knows that a
version is complete.

Spark cuts a model into `ModelFactors` records of at most `CHUNK_BYTES` of factors each (so a
catalogue of 1,000,000 products x rank 64, 256 MB of float32, goes out as ~520 records well under
Kafka's 1 MB default record limit). Chunk 0 carries the parameters, the offsets of `sales` the
model was trained on and YᵀY; every chunk says how many chunks its version has. A reader
(`Assembler`) keeps the chunks per version and hands out a `Factors` only when chunks
0..chunks-1 have all arrived and their products add up to the version's `products`. The key is
`model_version:chunk`, so a re-publish of the same version replaces its chunks (compacted topic)
and a tombstone (a null value) under a key retires it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Factor bytes per chunk; with ids and framing a record stays near half of Kafka's 1 MB default.
CHUNK_BYTES = 512 * 1024


@dataclass(frozen=True)
class Factors:
    """One complete model version, as a fold-in reads it."""

    model_version: int
    params: dict[str, str]
    offsets: list[dict[str, Any]]  # OffsetRange records: topic, partition, from/to (inclusive)
    product_ids: list[str]
    item_factors: np.ndarray  # products x rank, float32 (as Spark keeps them)
    yty: np.ndarray  # rank x rank, float64
    index: dict[str, int] = field(repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        if not self.index:
            self.index.update((p, i) for i, p in enumerate(self.product_ids))

    @property
    def rank(self) -> int:
        return int(self.item_factors.shape[1])

    def trained_to(self, partition: int, topic: str | None = None) -> int:
        """The last offset of `sales` partition `partition` the model was trained on (-1: none)."""
        last = -1
        for r in self.offsets:
            if int(r["partition"]) == partition and (topic is None or r["topic"] == topic):
                last = max(last, int(r["to_offset"]))
        return last


def key(model_version: int, chunk: int) -> bytes:
    return f"{model_version}:{chunk}".encode()


def products_per_chunk(rank: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // (4 * rank))


def chunks(
    model_version: int,
    product_ids: Sequence[str],
    item_factors: np.ndarray,
    params: dict[str, str],
    offsets: list[dict[str, Any]],
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[dict[str, Any]]:
    """The `ModelFactors` records of one version, chunk 0 first. YᵀY is computed here, in
    float64 from the float32 factors, as Spark's ALS computes it for the implicit solve."""
    y = np.ascontiguousarray(item_factors, dtype=np.float32)
    n, rank = y.shape
    if n != len(product_ids):
        raise ValueError(f"{len(product_ids)} product ids for {n} factor rows")
    y64 = y.astype(np.float64)
    yty = y64.T @ y64
    step = products_per_chunk(rank, chunk_bytes)
    total = max(1, -(-n // step))
    for c in range(total):
        lo, hi = c * step, min(n, (c + 1) * step)
        yield {
            "model_version": int(model_version),
            "chunk": c,
            "chunks": total,
            "products": n,
            "rank": rank,
            "params": dict(params) if c == 0 else {},
            "offsets": list(offsets) if c == 0 else [],
            "yty": yty.astype("<f8").tobytes() if c == 0 else b"",
            "product_ids": [str(p) for p in product_ids[lo:hi]],
            "factors": y[lo:hi].astype("<f4").tobytes(),
        }


class Assembler:
    """Collects `ModelFactors` records; `add` returns a version's `Factors` the moment it is
    complete. The version completed last, in the topic's order, is the one in service: Spark
    publishes factors only for a promoted model, and again for an older one that is promoted by
    hand (a rollback). A tombstone drops the chunk it names."""

    def __init__(self) -> None:
        self.pending: dict[int, dict[int, dict[str, Any]]] = {}

    def add(self, record: dict[str, Any]) -> Factors | None:
        version, chunk = int(record["model_version"]), int(record["chunk"])
        parts = self.pending.setdefault(version, {})
        parts[chunk] = record
        total = int(record["chunks"])
        if len(parts) < total or any(c not in parts for c in range(total)):
            return None
        del self.pending[version]
        return assemble(version, [parts[c] for c in range(total)])

    def tombstone(self, record_key: bytes | str | None) -> None:
        text = record_key.decode() if isinstance(record_key, bytes) else (record_key or "")
        version, _, chunk = text.partition(":")
        if version.isdigit() and chunk.isdigit():
            self.pending.get(int(version), {}).pop(int(chunk), None)


def assemble(version: int, parts: list[dict[str, Any]]) -> Factors:
    """The `Factors` of a version from its chunks in order; ValueError when they disagree."""
    head = parts[0]
    rank, total = int(head["rank"]), int(head["products"])
    ids: list[str] = []
    blocks = []
    for p in parts:
        block = np.frombuffer(p["factors"], dtype="<f4")
        if block.size != len(p["product_ids"]) * rank:
            raise ValueError(f"model {version} chunk {p['chunk']}: {block.size} floats for "
                             f"{len(p['product_ids'])} products of rank {rank}")
        ids.extend(p["product_ids"])
        blocks.append(block.reshape(-1, rank))
    if len(ids) != total:
        raise ValueError(f"model {version}: {len(ids)} products in its chunks, {total} announced")
    y = np.concatenate(blocks).astype(np.float32) if blocks else np.zeros((0, rank), np.float32)
    yty = np.frombuffer(head["yty"], dtype="<f8").reshape(rank, rank).copy()
    return Factors(version, dict(head["params"]), list(head["offsets"]), ids, y, yty)
