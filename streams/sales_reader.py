"""The `sales` reader: whole fetches of `sales` handed to `Aggregation.on_sales`, outside Faust's
per-event stream.

Why. Faust's per-message path (fetcher, conductor, stream iteration, one ack per event) held the
aggregator near 3,000 sales/s while our own code used about 5 % of the worker's time. `sales` is
the one input with volume, so it is read here with a plain aiokafka consumer, thousands of records
per fetch; the other inputs stay on Faust agents (streams/agents.py). Everything done with a sale
is still `Aggregation.on_sales`, the same code the agents' tests drive.

Order per fetch, in `handle` (at-least-once):

    decode -> on_sales per partition, in chunks of BATCH (dead letters sent, tables written,
    views updated) -> drain Faust's producer buffer and flush the producer (changelog writes and
    dead letters acked by the broker) -> commit the next offset of each partition read.

A worker killed before the commit reads the fetch again, and table updates are idempotent on the
event id (streams/tables.py), so nothing is lost and nothing is counted twice.

When. Reading starts once Faust has recovered the tables and the views are derived from them
(`resume`, called by the sales_batches on_recover callback in streams/app.py) and pauses whenever
Faust rebalances (`pause`, on Faust's on_partitions_revoked): the fetch being handled finishes
and commits, a fetch that arrives meanwhile waits until the recovery is over, and no table is
written while Faust restores them. After each resume it first lets Faust's (slower) agent read
the recommendation lists already published, served and shadow (`wait_for_lists`), so a backlog
of sales is judged against them. On stop, the fetch being handled finishes and commits; the rest is read again at
the next start.

Partitions. One worker holds every partition (streams/tables.py, README "Limits"): the reader
assigns itself every partition of `sales` (no group membership, so a restart does not wait for
a dead member's session to time out) and commits under its own group, `<app id>-sales`. Its
table writes need no Faust event: the tables are `KeyedTable`s, whose changelog partition is a
hash of the key, where Faust's default `partition_for_key` would take the partition of the
current stream event (a contextvar only a Faust stream sets).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import mode

from recsys.kafka import CONSUMER_DEFAULTS, aiokafka_security
from recsys.settings import Settings
from streams.agents import BATCH, Aggregation
from streams.faust_codec import AvroCodec

log = logging.getLogger(__name__)

FETCH = 10_000  # records per fetch at most: one flush and one commit each
FETCH_WAIT_MS = 500  # how long an empty fetch waits for records
LISTS_WAIT = 120.0  # seconds sales wait at most for Faust to read the lists already published
LISTS_POLL = 0.5


class SaleMessage(NamedTuple):
    """What `Aggregation` reads of a Faust message, taken from an aiokafka record."""

    topic: str
    partition: int
    offset: int
    timestamp: float  # seconds, as Faust's


class SaleEvent(NamedTuple):
    message: SaleMessage
    value: Any  # the decoded dict, None (a tombstone) or Undecodable (-> dead letter)


def consumer_options(settings: Settings, group_id: str) -> dict[str, Any]:
    """aiokafka options with the project's consumer defaults (recsys/kafka.py)."""
    return {
        "bootstrap_servers": settings.kafka_bootstrap,
        "group_id": group_id,
        "client_id": group_id,
        "enable_auto_commit": CONSUMER_DEFAULTS["enable.auto.commit"],  # commit after the work
        "auto_offset_reset": CONSUMER_DEFAULTS["auto.offset.reset"],
        **aiokafka_security(settings),  # TLS, SASL: recsys/kafka.py
    }


def aiokafka_consumer(settings: Settings, group_id: str) -> Callable[[], Any]:
    def make() -> Any:
        from aiokafka import AIOKafkaConsumer

        return AIOKafkaConsumer(**consumer_options(settings, group_id))

    return make


def aiokafka_admin(settings: Settings, client_id: str) -> Callable[[], Any]:
    def make() -> Any:
        from aiokafka.admin import AIOKafkaAdminClient

        return AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap,
                                   client_id=client_id, **aiokafka_security(settings))

    return make


@dataclass(frozen=True)
class Lists:
    """Where Faust reads the recommendation lists sales are judged against."""

    topic: str
    partitions: int
    group_id: str  # Faust's consumer group (the app id)
    admin: Callable[[], Any]  # an AIOKafkaAdminClient, to read that group's committed offsets
    shadow: tuple[str, int] | None = None  # recommendations-shadow and its partitions

    def partitions_read(self) -> list[tuple[str, int]]:
        more = [(self.shadow[0], p) for p in range(self.shadow[1])] if self.shadow else []
        return [(self.topic, p) for p in range(self.partitions)] + more


class SalesReader(mode.Service):
    """Reads `sales` in fetches and hands them to `Aggregation.on_sales` (see the module doc)."""

    def __init__(
        self,
        aggregation: Aggregation,
        *,
        topic: str,
        partitions: int,
        consumer: Callable[[], Any],
        crash: Callable[[BaseException], Awaitable[None]],
        lists: Lists | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.aggregation = aggregation
        self.topic = topic
        self.partitions = partitions
        self.make_consumer = consumer  # built at start, so building the app connects nowhere
        self.crash_app = crash
        self.lists = lists
        self.codec = AvroCodec("Sale")
        self.consumer: Any = None
        self.admin: Any = None
        self._open = asyncio.Event()  # set while the tables are recovered and not rebalancing
        self._busy = asyncio.Lock()  # held while a fetch is handled, up to its commit
        self._lists_read = False  # the lists published before the last resume have been read

    # --- control, from Faust's callbacks and the service's life -----------------------------------
    def resume(self) -> None:
        """Faust recovered the tables and the views were derived from them: read on."""
        self._open.set()

    async def pause(self) -> None:
        """Stop handling fetches; returns once the fetch being handled has been committed."""
        self._open.clear()
        self._lists_read = False
        async with self._busy:
            pass

    async def on_start(self) -> None:
        from aiokafka import TopicPartition

        self.consumer = self.make_consumer()
        await self.consumer.start()
        self.consumer.assign([TopicPartition(self.topic, p) for p in range(self.partitions)])
        if self.lists is not None:
            self.admin = self.lists.admin()
            await self.admin.start()

    async def on_stop(self) -> None:
        await self.pause()  # mode cancels `_read` next, then calls on_shutdown

    async def on_shutdown(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()  # commits nothing: auto commit is off
        if self.admin is not None:
            await self.admin.close()

    # --- the loop ---------------------------------------------------------------------------------
    @mode.Service.task
    async def _read(self) -> None:
        fetched: Mapping[Any, Sequence[Any]] = {}
        try:
            while not self.should_stop:
                await self._open.wait()
                if not self._lists_read:
                    read = await self.wait_for_lists()
                    self._lists_read = read and self._open.is_set()
                    continue  # read on, or paused meanwhile
                if not fetched:
                    fetched = await self.consumer.getmany(timeout_ms=FETCH_WAIT_MS,
                                                          max_records=FETCH)
                async with self._busy:
                    if not self._open.is_set():
                        continue  # a rebalance began during the fetch: handle it after recovery
                    if fetched:
                        await self.handle(fetched)
                    fetched = {}
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a commit refused, a bug: stop the worker; it reads again
            log.critical("%s: the sales reader failed (%s: %s); stopping the worker",
                         self.topic, type(exc).__name__, exc)
            await self.crash_app(exc)

    async def wait_for_lists(self) -> bool:
        """Let Faust read the recommendation lists already published before reading sales.

        A sale is judged against the lists read so far, and this reader is several times faster
        than Faust's agent: after a start or a rebalance with a backlog of both, sales would be
        judged before their user's list is read. So wait, at most LISTS_WAIT seconds, until
        Faust's group has committed (read, applied, flushed) `recommendations` up to its end
        offsets as of now. Live, later lists race with the sales as before. False when paused
        or stopped meanwhile.
        """
        if self.lists is None:
            return True
        from aiokafka import TopicPartition
        from aiokafka.errors import KafkaError

        tps = [TopicPartition(t, p) for t, p in self.lists.partitions_read()]
        ends = await self.consumer.end_offsets(tps)
        firsts = await self.consumer.beginning_offsets(tps)
        deadline = asyncio.get_running_loop().time() + LISTS_WAIT
        told = False
        while self._open.is_set() and not self.should_stop:
            try:
                done = await self.admin.list_consumer_group_offsets(self.lists.group_id,
                                                                    partitions=tps)
            except KafkaError as exc:
                if not exc.retriable:
                    raise
                log.debug("%s: committed offsets of %s: %s", self.lists.topic,
                          self.lists.group_id, exc)
                await asyncio.sleep(LISTS_POLL)
                continue
            behind = {f"{tp.topic}[{tp.partition}]": end for tp, end in ends.items()
                      if end > max(firsts[tp], done[tp].offset if tp in done else -1)}
            if not behind:
                if told:
                    log.info("%s: lists read; reading sales", self.lists.topic)
                return True
            if not told:
                log.info("%s: sales wait until Faust has read the lists up to %s",
                         self.lists.topic, behind)
                told = True
            if asyncio.get_running_loop().time() > deadline:
                log.warning("%s: reading sales although Faust has not read the lists up to "
                            "%s after %.0f s", self.lists.topic, behind, LISTS_WAIT)
                return True
            await asyncio.sleep(LISTS_POLL)
        return False

    async def handle(self, fetched: Mapping[Any, Sequence[Any]]) -> int:
        """One fetch: returns the sales counted. Write DLQ + tables -> flush -> commit."""
        counted = 0
        for records in fetched.values():
            for i in range(0, len(records), BATCH):
                # One partition per call: a sales_batches record holds one partition's sales.
                counted += await self.aggregation.on_sales(
                    [self.event(r) for r in records[i:i + BATCH]])
                await asyncio.sleep(0)  # let the read API answer between chunks
        await self.aggregation.flush()  # changelog writes and dead letters acked: now commit
        await self.consumer.commit({tp: records[-1].offset + 1
                                    for tp, records in fetched.items() if records})
        return counted

    def event(self, record: Any) -> SaleEvent:
        value = None if record.value is None else self.codec.loads(record.value)
        return SaleEvent(SaleMessage(record.topic, record.partition, record.offset,
                                     record.timestamp / 1000), value)
