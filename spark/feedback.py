"""Early retraining from the online feedback loop: the aggregator publishes, per model version,
how often users bought what they were recommended (`feedback`); when the newest model's online
precision@k falls below `feedback_retrain_share` x its offline precision@k, the streaming job
trains again without waiting for the threshold (trigger "feedback" in model-ready).

The watch is a plain Kafka consumer thread on the small `feedback` topic, read from the
beginning so a restarted job knows the latest verdict at once; it keeps the newest record per
model version. The rule is pure (`underperforms`) and unit-tested.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

from recsys.settings import Settings

log = logging.getLogger(__name__)

# Online precision over fewer users than this is noise, not a verdict.
MIN_FEEDBACK_USERS = 20


def underperforms(record: dict[str, Any], share: float,
                  min_users: int = MIN_FEEDBACK_USERS) -> str | None:
    """Why this `Feedback` record calls for a new model, or None.

    It does when the rule is on (`share` > 0), the window saw enough users, the model's offline
    precision@k is known and positive, and the online precision@k is below share x offline.
    """
    offline = record.get("offline_precision_at_k")
    if share <= 0 or not offline or offline <= 0 or record["users"] < min_users:
        return None
    online = record["precision_at_k"]
    if online >= share * offline:
        return None
    return (f"model {record['model_version']}: online precision@{record['k']} {online:.4f} < "
            f"{share:g} x offline {offline:.4f} ({record['users']} users, {record['sales']} "
            f"sales, hit-rate {record['hit_rate']:.4f})")


class FeedbackWatch:
    """The newest `Feedback` record per model version, kept up to date by a daemon thread."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.settings = settings
        self.topic = topic
        self._latest: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feedback-watch", daemon=True)

    def start(self) -> FeedbackWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def latest(self, model_version: int) -> dict[str, Any] | None:
        with self._lock:
            return self._latest.get(model_version)

    def _run(self) -> None:
        from confluent_kafka import Consumer

        from recsys.kafka import consumer_config
        from schemas import codec

        # A fresh group each start: no committed offset, so it reads from the earliest record.
        consumer = Consumer(
            consumer_config(self.settings, f"recsys-stream-feedback-{uuid.uuid4().hex[:8]}")
        )
        try:
            consumer.subscribe([self.topic])
            while not self._stop.is_set():
                for msg in consumer.consume(num_messages=500, timeout=1.0):
                    if msg.error() is not None or msg.value() is None:
                        continue
                    try:
                        _, record = codec.decode(msg.value(), "Feedback")
                    except codec.DecodeError as exc:  # the aggregator dead-letters; we skip
                        log.warning("%s[%d]@%d: not a Feedback record: %s", msg.topic(),
                                    msg.partition(), msg.offset(), exc)
                        continue
                    with self._lock:
                        self._latest[int(record["model_version"])] = record
        except Exception:  # the watch is advisory: the threshold trigger keeps working
            log.exception("feedback watch stopped")
        finally:
            consumer.close()
