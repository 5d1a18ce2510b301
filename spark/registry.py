"""The saved models and which one serves: `<models>/<version>/` (the ALS model), `LATEST` (the
newest version trained, for numbering) and `SERVING` (the version in service and its factor
chunks on model-factors). Shared by `recsys stream`, `recsys train` and `recsys models`."""

from __future__ import annotations

import json
from typing import Any

from pyspark.sql import SparkSession

from spark.files import list_names, read_text, write_text


class Models:
    """The monotonic model version and the one in service.

    `LATEST` holds the last version trained and published (promoted or rejected); without it (a
    first run, or the file lost), the highest numbered model folder counts. A cycle re-run after a
    crash before LATEST was written reuses its version: the pipeline overwrites the folder and the
    published ids are the same. `SERVING` holds the version in service; without it, LATEST's
    (every model served before the gate existed).
    """

    def __init__(self, spark: SparkSession, root: str) -> None:
        self.spark = spark
        self.root = root.rstrip("/")
        self.latest_path = f"{self.root}/LATEST"
        self.serving_path = f"{self.root}/SERVING"

    def path(self, version: int) -> str:
        return f"{self.root}/{version}"

    def latest(self) -> int:
        recorded = self.recorded()
        if recorded is not None:
            return int(recorded["model_version"])
        return max(self.saved(), default=0)

    def saved(self) -> list[int]:
        """The versions with a model folder."""
        return sorted(int(n) for n in list_names(self.spark, self.root) if n.isdigit())

    def recorded(self) -> dict[str, Any] | None:
        """What `record` wrote last (None without LATEST)."""
        text = read_text(self.spark, self.latest_path)
        return None if text is None else json.loads(text)

    def next_version(self) -> int:
        return self.latest() + 1

    def record(self, model_ready: dict[str, Any], factor_chunks: int = 0) -> None:
        shown = {k: model_ready[k] for k in ("model_version", "model_id", "trigger", "events")}
        shown["factor_chunks"] = factor_chunks
        write_text(self.spark, self.latest_path, json.dumps(shown))

    def serving(self) -> dict[str, Any] | None:
        """{"model_version", "factor_chunks"} of the model in service, or None before the first."""
        text = read_text(self.spark, self.serving_path)
        if text is not None:
            return json.loads(text)
        return self.recorded()

    def serve(self, model_version: int, factor_chunks: int) -> None:
        write_text(self.spark, self.serving_path, json.dumps(
            {"model_version": model_version, "factor_chunks": factor_chunks}))
