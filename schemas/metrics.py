"""The names of a model's figures in `ModelReady.metrics` / `baseline_metrics` /
`champion_metrics` (a map, so the names are part of the contract): Spark writes them
(spark/evaluate.py), the gate and the aggregator judge by precision@k, the dashboard draws them.
"""

from __future__ import annotations

RMSE = "rmse"
PRECISION_AT_K = "precision_at_k"
RECALL_AT_K = "recall_at_k"
NDCG_AT_K = "ndcg_at_k"
MAP_AT_K = "map_at_k"
COVERAGE = "coverage"

METRIC_NAMES = (RMSE, PRECISION_AT_K, RECALL_AT_K, NDCG_AT_K, MAP_AT_K, COVERAGE)
