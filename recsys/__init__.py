"""recsys: a real-time product recommender on Apache Kafka and Apache Spark."""

__version__ = "0.1.0"
