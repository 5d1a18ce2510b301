"""Bokeh server lifecycle hooks: one Kafka feed per server process, shared by every session."""

from __future__ import annotations

import logging
from typing import Any

from visualizer import feed

log = logging.getLogger(__name__)


def on_server_loaded(server_context: Any) -> None:
    """Start reading the topics from the beginning, before the first page is asked for."""
    f = feed.start()
    log.info("dashboard feed started on %s", f.settings.kafka_bootstrap)


def on_server_unloaded(server_context: Any) -> None:
    feed.stop()
