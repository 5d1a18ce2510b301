"""Spark side: the session builder, pure DataFrame steps (prepare, train, evaluate, recommend,
graph) and the wiring that touches Kafka, files and checkpoints (ingest, store, publish, job)."""
