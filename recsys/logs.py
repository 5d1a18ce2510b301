"""Logging set-up shared by every process: one format, greppable, to stderr."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format=FORMAT, stream=sys.stderr, force=True)
    # Client libraries are chatty at INFO; their warnings still show.
    for noisy in ("py4j", "kafka", "aiokafka", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
