"""Contracts shared by every process: Avro schemas, the topic list, the framing codec."""
