"""Write a model version's graph (`spark.graph.Graph`) to `<export_dir>/<model_version>/`:

- vertices.csv: id, type (user|product), original_id, description, degree, then GraphX's
  pagerank, component, community of the recommendation graph and the same of the purchase graph
  (purchase_pagerank, purchase_component, purchase_community); component and community are
  numbered by size (1 the largest), 0 for a vertex without an edge in that graph
- edges.csv: user_id, product_id, score, rank, model_version, because (ids joined with '|')
- degree_distribution.csv: graph (recommendations|purchases), degree, products
- top_products.csv: graph, rank, product_id, description, users, pagerank
- summary.json: the figures of both graphs (NaN written as null)

One header line, one row per record, rows sorted, so the same graph always gives the same bytes.
Each file is written beside its final name and renamed into place (atomic per file); summary.json
goes last and marks a complete folder. The graph is small (one row per recommendation), so the
files are written from the driver. pandas reads them as they are; Spark with
`spark.read.csv(path, header=True, escape='"')` (quotes inside a text are doubled, RFC 4180).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from spark.graph import MEASURE_COLUMNS, Graph

VERTEX_COLUMNS = ("id", "type", "original_id", "description", "degree", *MEASURE_COLUMNS)
EDGE_COLUMNS = ("user_id", "product_id", "score", "rank", "model_version", "because")
DISTRIBUTION_COLUMNS = ("graph", "degree", "products")
TOP_COLUMNS = ("graph", "rank", "product_id", "description", "users", "pagerank")
BECAUSE_SEPARATOR = "|"


def folder(export_dir: Path | str, model_version: int) -> Path:
    """Where a version's files go."""
    return Path(export_dir) / str(model_version)


def _replace(path: Path, write: Any) -> None:
    """Call write(file) on `path`.tmp, then rename it over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as out:
        write(out)
    os.replace(tmp, path)


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A header and the rows; None is an empty field."""
    def write(out: Any) -> None:
        w = csv.writer(out, lineterminator="\n")
        w.writerow(columns)
        w.writerows(rows)

    _replace(path, write)


def _plain(value: Any) -> Any:
    """NaN and infinities as None, recursively: summary.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def edge_rows(graph: Graph) -> list[tuple[Any, ...]]:
    """Edges sorted by user, rank, product; `because` joined with '|'."""
    rows = graph.edges.select(*EDGE_COLUMNS).collect()
    out = [
        (r["user_id"], r["product_id"], float(r["score"]), int(r["rank"]),
         int(r["model_version"]), BECAUSE_SEPARATOR.join(r["because"] or []))
        for r in rows
    ]
    return sorted(out, key=lambda r: (r[0], r[3], r[1]))


def vertex_rows(graph: Graph) -> list[tuple[Any, ...]]:
    """Vertices sorted by id (products `p:...` before users `u:...`)."""
    rows = graph.vertices.select(*VERTEX_COLUMNS).collect()
    return sorted((tuple(r) for r in rows), key=lambda r: r[0])


def export(graph: Graph, export_dir: Path | str) -> Path:
    """Write the five files of `graph` under `<export_dir>/<model_version>/`; returns the folder."""
    where = folder(export_dir, graph.model_version)
    where.mkdir(parents=True, exist_ok=True)
    write_csv(where / "vertices.csv", VERTEX_COLUMNS, vertex_rows(graph))
    write_csv(where / "edges.csv", EDGE_COLUMNS, edge_rows(graph))
    write_csv(where / "degree_distribution.csv", DISTRIBUTION_COLUMNS,
              ([r[c] for c in DISTRIBUTION_COLUMNS] for r in graph.degree_distribution))
    write_csv(where / "top_products.csv", TOP_COLUMNS,
              ([r[c] for c in TOP_COLUMNS] for r in graph.top_products))
    text = json.dumps(_plain(graph.summary), indent=2, sort_keys=True) + "\n"
    _replace(where / "summary.json", lambda out: out.write(text))
    return where
