"""`recsys speed`: the speed layer's process. Between retrains, every sale is folded into its
user's vector against the current model and the user's list is republished on `recommendations`
(source "fold-in", with the model version and the Kafka timestamp of the sale that caused it).

It reads `sales` in the consumer group `recsys-speed` (keyed by user: more instances serve more
partitions), `model-factors` whole (every instance holds the current model, rebuilt from the topic
alone) and keeps each user's net quantities in a changelog (`speed-state`, compacted, one record per
user in the partition of the user's sales), restored on assignment instead of re-reading `sales`.

Commit order of one batch (the sales that the client has already fetched, at most
`speed_max_batch`; nothing waits for more):

1. each sale -> its user's state (a replayed offset or a known event_id changes nothing)
2. every touched user whose sale is newer than the model's training offsets -> fold-in -> list
   -> `recommendations` (sent at once: the producer lingers 1 ms)

and every `RECSYS_SPEED_COMMIT_SECONDS` (and on a revoke or a stop), as Kafka Streams commits:

3. every user touched since the last commit -> its state -> `speed-state` (same partition as
   its sales), once however many sales it had
4. flush: wait for the broker's acks of 2 and 3
5. commit the input offsets, asynchronously (the next batch does not wait for the round trip).
   A crash before 5 is done replays the sales since the last commit: the states written in 3 say
   which records were applied already, so nothing counts twice; a crash before 3 loses nothing
   (those sales run again in full, and their users' lists are published again, same ids).

A new model is switched to only when all its chunks arrived (schemas/factors.py), between two
batches, so no list mixes versions; the users whose last sale is past the offsets the new model
was trained on are folded in again under it at once, so its retrain lists (published before its
factors) never stay in place of a fresher one.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from recsys import kafka
from recsys.settings import Settings
from schemas import codec, factors, topics
from schemas.millis import from_ms
from speed import foldin
from speed.state import APPLIED, UserState

log = logging.getLogger(__name__)

GROUP = "recsys-speed"
PROGRESS_SECONDS = 10.0
# Users' normal equations kept between sales (foldin.Normal: rank² floats each, 8 KB at rank 32),
# the most recently active first; a user beyond this is summed again from the state on a sale.
NORMALS_BYTES = 256 * 1024 * 1024
RESTORE_TIMEOUT = 600.0  # reading a changelog partition to its end


@dataclass(frozen=True)
class Topics(topics.Names):
    """The topics the speed layer reads and writes; tests give each run its own names."""

    sales: str = topics.SALES
    model_factors: str = topics.MODEL_FACTORS
    recommendations: str = topics.RECOMMENDATIONS
    state: str = topics.SPEED_STATE


def recommendation(model: foldin.Model, folded: foldin.Folded, state: UserState,
                   now: datetime | None = None) -> dict[str, Any]:
    """The `Recommendation` record of one fold-in."""
    return {
        "id": f"{model.version}:{folded.user_id}:{state.event_id}",
        "user_id": folded.user_id,
        "model_version": model.version,
        "generated_at": now or datetime.now(UTC),
        "items": [{"product_id": p, "score": s, "rank": r}
                  for r, (p, s) in enumerate(folded.items, start=1)],
        "source": topics.FOLD_IN,
        "sale_event_id": state.event_id or None,
        "sale_timestamp": from_ms(state.sale_timestamp),
    }


def newer_than_model(states: Iterable[UserState], model: factors.Factors, sales_topic: str
                     ) -> list[UserState]:
    """The users whose last applied sale is past the offsets `model` was trained on: their lists
    must come from a fold-in (the model's own list does not know that sale)."""
    return [s for s in states if s.offset > model.trained_to(s.partition, sales_topic)]


class SpeedLayer:
    """The consumer loop; usable from the CLI and in-process (tests, the freshness bench)."""

    def __init__(self, settings: Settings, topics_: Topics | None = None, group: str = GROUP
                 ) -> None:
        from confluent_kafka import Consumer, Producer

        self.settings = settings
        self.topics = topics_ or Topics()
        self.group = group
        self.states: dict[str, UserState] = {}
        self._folded: set[str] = set()  # users given a fold-in list under the current model
        self.model: foldin.Model | None = None
        self.normals: OrderedDict[str, foldin.Normal] = OrderedDict()  # of self.model, LRU
        self.assembler = factors.Assembler()
        self._complete: factors.Factors | None = None  # completed, not switched to yet
        self.counts: Counter[str] = Counter()
        self.producer = Producer(kafka.producer_config(settings, **{"linger.ms": 1}))
        self.sales = Consumer(kafka.consumer_config(
            settings, group, **{"fetch.wait.max.ms": 10, "max.poll.interval.ms": 300_000}))
        self.factor_reader = Consumer(kafka.consumer_config(settings, f"{group}-factors"))
        self._encode_rec = codec.Encoder("Recommendation")
        self._encode_state = codec.Encoder("SpeedState")
        self._errors: list[str] = []
        self._dirty: dict[str, UserState] = {}  # touched since the last commit
        self._uncommitted: dict[int, int] = {}  # partition -> last offset processed
        self._committed_at = time.monotonic()
        pattern = settings.non_product_pattern
        self._not_product = re.compile(pattern) if pattern else None
        self._last_progress = time.monotonic()
        self._progress_counts: Counter[str] = Counter()

    # -- model -------------------------------------------------------------------------------
    def load_factors(self, timeout: float = 60.0) -> None:
        """Read `model-factors` from the beginning to its end now, so the first batch already
        folds in against the current model; `poll_factors` goes on from there."""
        try:
            for m in kafka.iter_to_end(self.factor_reader, self.topics.model_factors,
                                       timeout=timeout):
                self._on_factor(m)
        except TimeoutError as exc:  # go on: `poll_factors` reads the rest as it comes
            log.warning("%s", exc)
        self._switch_if_complete()
        m = self.model
        log.info("model factors read: %s", "no complete model yet (lists start with the first "
                 "one)" if m is None else f"model {m.version}, {len(m.product_ids)} products, "
                 f"rank {m.rank}")

    def _on_factor(self, m: Any) -> None:
        if m.value() is None:
            self.assembler.tombstone(m.key())
            return
        try:
            _, record = codec.decode(m.value(), expect="ModelFactors")
        except codec.DecodeError as exc:
            log.warning("%s[%d]@%d: not a model-factors chunk: %s", m.topic(), m.partition(),
                        m.offset(), exc)
            return
        done = self.assembler.add(record)
        if done is not None:
            self._complete = done

    def poll_factors(self) -> None:
        for m in self.factor_reader.consume(num_messages=100, timeout=0):
            if m.error() is None:
                self._on_factor(m)
        self._switch_if_complete()

    def _switch_if_complete(self) -> None:
        """Switch to a newly complete model, then fold in again, under it, every user whose
        last sale came after the offsets it was trained on."""
        done, self._complete = self._complete, None
        if done is None or (self.model is not None and done.model_version == self.model.version):
            return  # nothing new, or the same version published again (a cycle re-run)
        try:
            model = foldin.Model(done)
        except ValueError as exc:
            log.error("model %d cannot be folded in with: %s", done.model_version, exc)
            return
        self.model = model
        self.normals.clear()
        stale = newer_than_model(self.states.values(), done, self.topics.sales)
        # The users folded in under the old model are folded in again too: a model's own lists
        # go out before its factors, so such a list may have been published after the new
        # model's and would stay the newest on the compacted topic (the reliability tier's
        # ledger found users left with the old model's list).
        newer = {s.user_id for s in stale}
        again = [self.states[u] for u in self._folded - newer if u in self.states]
        self._folded = set()
        self._publish(stale + again)
        self._flush()
        log.info("switched to model %d (%d products, rank %d); %d users with newer sales and %d "
                 "folded in under the old model folded in again under it", model.version,
                 len(model.product_ids), model.rank, len(stale), len(again))

    # -- state restore (consumer group callbacks) ---------------------------------------------
    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        started = time.perf_counter()
        before = len(self.states)
        self._restore([p.partition for p in partitions])
        log.info("assigned %s: %d users restored from %s in %.1f s",
                 ", ".join(f"{p.topic}[{p.partition}]" for p in partitions),
                 len(self.states) - before, self.topics.state, time.perf_counter() - started)

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        self.commit()
        gone = {p.partition for p in partitions}
        self.states = {u: s for u, s in self.states.items() if s.partition not in gone}
        for user in [u for u in self.normals if u not in self.states]:
            del self.normals[user]
        log.info("revoked %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions))

    def _restore(self, partitions: list[int]) -> None:
        """Each assigned partition's users from the changelog (read to its end; the last record
        of a user wins, as compaction would keep it)."""
        from confluent_kafka import Consumer

        reader = Consumer(kafka.consumer_config(self.settings, f"{self.group}-restore"))
        try:
            for m in kafka.iter_to_end(reader, self.topics.state, partitions,
                                       timeout=RESTORE_TIMEOUT):
                if m.value() is not None:
                    state = UserState.of(codec.decode(m.value(), expect="SpeedState")[1])
                    self.states[state.user_id] = state
                    self.normals.pop(state.user_id, None)
        finally:
            reader.close()

    # -- the loop ------------------------------------------------------------------------------
    def start(self) -> None:
        self._check_partitions()
        self.load_factors()
        self.sales.subscribe([self.topics.sales], on_assign=self._on_assign,
                             on_revoke=self._on_revoke)

    def _check_partitions(self) -> None:
        meta = self.sales.list_topics(timeout=15).topics
        need = len(meta[self.topics.sales].partitions)
        have = len(meta[self.topics.state].partitions)
        if have < need:
            raise RuntimeError(f"{self.topics.state} has {have} partitions, {self.topics.sales} "
                               f"{need}: the changelog needs at least as many")

    def run(self, stop: threading.Event) -> None:
        """Batches until `stop` is set; then the last batch is committed and the clients closed."""
        try:
            while not stop.is_set():
                self.step(0.2)
        finally:
            self.close()

    def step(self, timeout: float) -> int:
        """One batch: wait up to `timeout` for a sale, take what else is fetched, process and
        commit it; returns the number of records."""
        self.poll_factors()
        first = self.sales.poll(timeout)
        if first is None:
            if self._dirty or self._uncommitted:
                self.commit()  # quiet: nothing left uncommitted
            self._progress()
            return 0
        batch = [first, *self.sales.consume(num_messages=self.settings.speed_max_batch - 1,
                                            timeout=0)]
        self._batch(batch)
        self._progress()
        return len(batch)

    def _batch(self, messages: list[Any]) -> None:
        touched: dict[str, UserState] = {}
        last: dict[int, int] = {}
        for m in messages:
            if m.error() is not None:
                log.warning("consume error: %s", m.error())
                continue
            last[m.partition()] = m.offset()
            try:
                _, sale = codec.decode(m.value(), expect="Sale")
            except codec.DecodeError as exc:  # recsys stream dead-letters it, with the reason
                self.counts["bad"] += 1
                log.debug("%s[%d]@%d: skipped: %s", m.topic(), m.partition(), m.offset(), exc)
                continue
            if self._not_product is not None and self._not_product.match(sale["product_id"]):
                self.counts["not_a_product"] += 1  # postage, fees...: never in a list
                continue
            user = sale["user_id"]
            state = self.states.get(user)
            if state is None:
                state = self.states[user] = UserState(user)
            outcome = state.apply(sale, m.partition(), m.offset(), m.timestamp()[1])
            self.counts[outcome] += 1
            if outcome == APPLIED:
                touched[user] = state
                product = sale["product_id"]
                normal = self.normals.get(user)
                if normal is not None:
                    normal.update(product, state.quantities.get(product, 0))
                if self.model is not None and product not in self.model.index:
                    self.counts["unknown_product"] += 1
        fresh = [] if self.model is None else newer_than_model(
            touched.values(), self.model.factors, self.topics.sales)
        self._publish(fresh)  # (2)
        self._dirty.update(touched)
        self._uncommitted.update(last)
        self.counts["sales"] += len(messages)
        if time.monotonic() - self._committed_at >= self.settings.speed_commit_seconds:
            self.commit()

    def commit(self) -> None:
        """Steps 3-5: the states of the users touched since the last commit, flush, offsets."""
        for state in self._dirty.values():  # (3)
            self._produce(self.topics.state, state.user_id, self._encode_state(state.record()),
                          state.partition)
        self._flush()  # (4)
        if self._uncommitted:  # (5)
            from confluent_kafka import TopicPartition

            self.sales.commit(offsets=[TopicPartition(self.topics.sales, p, o + 1)
                                       for p, o in self._uncommitted.items()],
                              asynchronous=True)
        self._dirty, self._uncommitted = {}, {}
        self._committed_at = time.monotonic()

    def _publish(self, states: list[UserState]) -> None:
        if not states or self.model is None:
            return
        model, now = self.model, datetime.now(UTC)
        for folded, state in zip(
            foldin.fold_normals(model, ((s.user_id, self._normal(s)) for s in states),
                                self.settings.top_n, self.settings.filter_bought),
            states, strict=True,
        ):
            if not folded.items:  # nothing the model knows bought: the list in force stays
                self.counts["no_list"] += 1
                continue
            self._produce(self.topics.recommendations, folded.user_id,
                          self._encode_rec(recommendation(model, folded, state, now)))
            self._folded.add(folded.user_id)
            self.counts["lists"] += 1

    def _normal(self, state: UserState) -> foldin.Normal:
        """The user's normal equations under the current model: kept, or summed from the state
        (then kept; the least recently used dropped beyond NORMALS_BYTES)."""
        assert self.model is not None
        normal = self.normals.get(state.user_id)
        if normal is None:
            normal = self.normals[state.user_id] = foldin.Normal(self.model, state.quantities)
            while len(self.normals) > NORMALS_BYTES // (8 * self.model.rank ** 2):
                self.normals.popitem(last=False)
        else:
            self.normals.move_to_end(state.user_id)
        return normal

    def _produce(self, topic: str, key: str, value: bytes, partition: int | None = None) -> None:
        kwargs = {} if partition is None else {"partition": partition}
        while True:
            try:
                self.producer.produce(topic, key=key.encode(), value=value,
                                      on_delivery=self._on_delivery, **kwargs)
                return
            except BufferError:
                self.producer.poll(0.05)

    def _on_delivery(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self._errors.append(str(err))

    def _flush(self) -> None:
        left = self.producer.flush(60)
        if left or self._errors:
            from confluent_kafka import KafkaException

            raise KafkaException(self._errors[0] if self._errors else f"{left} unacknowledged")

    def _progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_SECONDS:
            return
        seconds = now - self._last_progress
        delta = self.counts - self._progress_counts
        self._progress_counts, self._last_progress = self.counts.copy(), now
        log.info(
            "progress: %.0f sales/s, %.0f lists/s (model %s); totals: %d sales, %d applied, "
            "%d replayed, %d duplicate, %d bad, %d not a product, %d lists, %d sales of "
            "products the model does not know yet, %d users", delta["sales"] / seconds,
            delta["lists"] / seconds, self.model.version if self.model else "none",
            self.counts["sales"], self.counts["applied"], self.counts["replayed"],
            self.counts["duplicate"], self.counts["bad"], self.counts["not_a_product"],
            self.counts["lists"], self.counts["unknown_product"], len(self.states),
        )

    def close(self) -> None:
        try:
            self.commit()
        finally:
            self._progress(force=True)
            self.sales.close()
            self.factor_reader.close()


# --- CLI ------------------------------------------------------------------------------------------
def cli(settings: Settings, args: argparse.Namespace) -> int:
    """`recsys speed`: run until SIGTERM/SIGINT."""
    from recsys.topics import missing_topics

    t = Topics.with_prefix(args.topic_prefix or "")
    problem = missing_topics(settings, [t.sales, t.model_factors, t.recommendations, t.state])
    if problem:
        print(f"recsys speed: {problem}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("%s: stopping after the batch in progress", signal.Signals(signum).name)
        stop.set()

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    layer = SpeedLayer(settings, t, args.group or GROUP)
    try:
        layer.start()
    except RuntimeError as exc:  # topics that do not fit together
        print(f"recsys speed: {exc}", file=sys.stderr)
        return 2
    layer.run(stop)
    return 0
