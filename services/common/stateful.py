"""A consumer-group member whose per-partition state is saved with its offsets.

The commit order (after quix-streams): process a batch -> produce its outputs -> wait for their
acks -> save state and next offsets in ONE PostgreSQL transaction. The acks are awaited by the
background save rather than by the batch, so the next batch is fetched while they are in
flight. A crash anywhere repeats
work from the last saved offsets with the state saved alongside them; the core is
deterministic, so the repeats are identical records with identical event ids.

Where state and offsets live, and in what form, is `statestore.PartitionStateStore`'s.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from services.common import db, kafka
from services.common.fetched import FetchedRecord
from services.common.lag import LagWatch
from services.common.metrics import DB_RETRIES, SAVE_SECONDS, SAVE_WAIT
from services.common.moving import MovingParts
from services.common.settings import CommonSettings
from services.common.statestore import Change, PartitionStateStore

log = logging.getLogger(__name__)


class _Listener(kafka.ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: StatefulService) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        # The lock waits out a batch in flight: its state and offsets are saved before the
        # partition can move, so the next owner loads exactly what this one committed.
        async with self.owner.lock:
            await self.owner.flush()
            for tp in revoked:
                self.owner.partitions.pop(tp.partition, None)
                self.owner.drop_partition(tp.partition)
        log.info("partitions revoked", extra={"partitions": [tp.partition for tp in revoked]})

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        async with self.owner.lock:
            await self.owner.assign([tp.partition for tp in assigned])


class StatefulService(MovingParts, abc.ABC):
    name: str

    def __init__(self, settings: CommonSettings, topic: str, group_id: str, wall_clock: bool,
                 tick_s: float) -> None:  # fmt: skip
        self.settings = settings
        self.topic = topic
        self.group_id = group_id
        self.wall_clock = wall_clock
        self.tick_s = tick_s
        self.pool: asyncpg.Pool | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.out: kafka.BatchProducer | None = None
        # partition -> (newest event ts, monotonic time it arrived): the live clock's parts
        self.partitions: dict[int, tuple[int | None, float]] = {}
        # Held while a batch is applied; a rebalance takes it and waits for the saves in flight.
        self.lock = asyncio.Lock()
        self._saving: asyncio.Task[None] | None = None
        self._stepping: asyncio.Task[float] | None = None
        self.commit_interval_s = settings.commit_interval_ms / 1000
        self._pending_outputs: list[Any] = []
        self._pending_offsets: dict[int, int] = {}
        self._last_save = 0.0
        self.lag = LagWatch(self.name, settings.consumer_stall_s)
        self._next: tuple[CommonSettings, kafka.Clients, kafka.Held] | None = (
            None  # see `prepare_move`
        )
        self.store = PartitionStateStore(self.name, topic)
        self.ready = False

    # -- what a service supplies -------------------------------------------------------------

    @abc.abstractmethod
    def output_topics(self) -> list[str]:
        """The topics `publish` sends to."""

    @abc.abstractmethod
    def restore_partition(self, partition: int, rows: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    def drop_partition(self, partition: int) -> None: ...

    @abc.abstractmethod
    def partition_clock(self, partition: int) -> int | None:
        """The restored stream clock: wall time runs on from it until records arrive."""

    async def on_assign(self) -> None:
        """Refresh what partition state depends on (zones, rules) before restoring it."""
        return None

    @abc.abstractmethod
    def process(self, partition: int, records: list[FetchedRecord]) -> tuple[list[Any], int | None]:
        """Apply records; return outputs and the newest event time seen (ms)."""

    @abc.abstractmethod
    def tick(self, partition: int, clock: int) -> list[Any]: ...

    @abc.abstractmethod
    def dirty_state(self, partition: int) -> dict[str, Any]:
        """Keys changed since the last save -> their new value (None deletes the key)."""

    @abc.abstractmethod
    def full_state(self, partition: int) -> dict[str, Any]:
        """Every key of the partition's state (for a snapshot)."""

    @abc.abstractmethod
    async def publish(self, outputs: list[Any]) -> None:
        """Queue outputs with `self.out.send(..., wait=False)`; the next save awaits their acks."""

    async def write(self, conn: asyncpg.Connection, outputs: list[Any]) -> None:
        """Rows that go with the state (history, audit); same transaction. None by default."""
        return None

    # -- lifecycle ---------------------------------------------------------------------------

    async def open_database(self) -> None:
        self.pool = await db.open_pool(self.settings.database_url.get_secret_value(), 4)

    async def start_kafka(self) -> None:
        """After everything a partition's state needs is loaded: the group may assign
        partitions as soon as the consumer starts."""
        s = self.settings
        SAVE_WAIT.labels(self.name)  # exported at 0 from the start, not from the first wait
        self.producer = kafka.producer(s)
        await self.producer.start()
        self.out = kafka.BatchProducer(self.producer)
        # Set before it starts: the listener seeks it as the partitions are handed over.
        self.consumer = kafka.consumer(s, self.group_id)
        await kafka.start_consumer(self.consumer, s, self.topic, _Listener(self))

    async def stop_clients(self) -> None:
        self.ready = False
        with contextlib.suppress(Exception, asyncio.CancelledError):
            if self._stepping is not None:
                await asyncio.wait_for(self._stepping, 10)
            await asyncio.wait_for(self.flush(), 10)
        if self.consumer is not None:
            await kafka.stop_client(self.consumer)
        if self.producer is not None:
            await kafka.stop_client(self.producer)
        await self.cancel_move()
        if self.pool is not None:
            await self.pool.close()

    async def assign(self, partitions: list[int]) -> None:
        assert self.pool is not None and self.consumer is not None
        pool = self.pool

        async def load() -> dict[int, tuple[int | None, dict[str, Any]]]:
            async with pool.acquire() as conn:
                return {p: await self.store.load(conn, p) for p in partitions}

        await self.on_assign()
        loaded = await db.retrying(load, "load state", on_retry=self._retried)
        for p, (offset, rows) in loaded.items():
            self.restore_partition(p, rows)
            self.partitions[p] = (self.partition_clock(p), time.monotonic())
            tp = TopicPartition(self.topic, p)
            if offset is None:
                await self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, offset)
        log.info("partitions assigned", extra={"partitions": partitions})

    async def run(self) -> None:
        assert self.consumer is not None
        consumer = self.consumer
        next_tick = time.monotonic() + self.tick_s
        while True:
            wait_s = (
                min(self.tick_s, self.commit_interval_s) if self._pending_offsets else self.tick_s
            )
            batches = await consumer.getmany(timeout_ms=max(1, int(wait_s * 1000)))
            self.lag.fetched(consumer, batches, time.monotonic())
            # Shielded: a stop waits for the batch (see stop_clients) instead of cutting it
            # between changing state and queueing its offsets.
            self._stepping = asyncio.create_task(self._locked_step(batches, next_tick))
            next_tick = await asyncio.shield(self._stepping)

    async def _locked_step(
        self, batches: dict[TopicPartition, list[FetchedRecord]], next_tick: float
    ) -> float:
        async with self.lock:
            return await self._step(batches, next_tick)

    async def _step(
        self, batches: dict[TopicPartition, list[FetchedRecord]], next_tick: float
    ) -> float:
        """One batch: apply it, produce its outputs, save state with offsets (in that order)."""
        outputs: list[Any] = []
        offsets: dict[int, int] = {}
        now = time.monotonic()
        for tp, records in batches.items():
            if tp.partition not in self.partitions:
                continue  # revoked while fetching
            out, newest = self.process(tp.partition, records)
            outputs.extend(out)
            offsets[tp.partition] = records[-1].offset + 1
            old, _seen = self.partitions[tp.partition]
            if newest is not None and (old is None or newest > old):
                old = newest
            self.partitions[tp.partition] = (old, now)
        if self.wall_clock and now >= next_tick:
            next_tick = now + self.tick_s
            for p, (newest, seen_at) in self.partitions.items():
                if newest is not None:
                    outputs.extend(self.tick(p, newest + int((now - seen_at) * 1000)))
        if outputs:
            await self.publish(outputs)
        self._pending_outputs.extend(outputs)
        self._pending_offsets.update(offsets)
        if (self._pending_offsets or self._pending_outputs) and (
            now - self._last_save >= self.commit_interval_s
        ):
            # Saving per commit interval rather than per batch: a crash repeats at most an
            # interval's outputs, and repeats carry the same event ids.
            if self._saving is not None and not self._saving.done():
                waited_from = time.monotonic()
                await self._saving  # at most one save in flight
                SAVE_WAIT.labels(self.name).inc(time.monotonic() - waited_from)
            self._commit_pending(now)
        return next_tick

    def _commit_pending(self, now: float) -> None:
        outputs, offsets = self._pending_outputs, self._pending_offsets
        self._pending_outputs, self._pending_offsets = [], {}
        self._last_save = now
        acks = self.out.take_unacked() if self.out is not None else []
        self.start_save(outputs, offsets, acks)

    # -- moving to another broker (`dosewatch up`'s embedded one, renewed) --------------------

    async def prepare_move(self, bootstrap: str) -> None:
        """Open clients on another broker, one whose topics are new, reading its input from the
        start; `move` takes them up."""
        assert self.consumer is not None
        s = self.settings.model_copy(update={"kafka_bootstrap": bootstrap})
        held = kafka.Held(after=_Listener(self))
        clients = await self.open_next(s, self.group_id, self.topic, self.output_topics(), held)
        here = await kafka.all_partitions(self.consumer, self.topic)
        there = await kafka.all_partitions(clients.consumer, self.topic)
        if len(there) != len(here):
            await clients.close()
            # A key's partition is its hash modulo the count: the state held for a unit or a
            # zone would not be where its records arrive.
            raise RuntimeError(
                f"{self.topic} has {len(there)} partitions on {bootstrap} and {len(here)} here: "
                f"{self.name} keeps its state by partition, so it can move only to as many"
            )
        self._next = s, clients, held

    def input_consumer(self) -> AIOKafkaConsumer:
        assert self.consumer is not None
        return self.consumer

    async def move(self) -> kafka.MovedFrom:
        """Once `run` has stopped, having read its input on the old broker to the end: wait
        for its outputs' acks (the next stage reads up to them), then go on with the clients
        `prepare_move` opened. The save of what it did there runs on in the background, as
        saves do, and any save on the new broker comes after it: the move does not wait for
        the database."""
        assert self._next is not None and self.consumer is not None
        assert self.producer is not None and self.out is not None
        if self._stepping is not None:
            await self._stepping
        if self._pending_offsets or self._pending_outputs:
            self._commit_pending(time.monotonic())
        await self.out.settled()
        left = kafka.MovedFrom(kafka.Clients(self.producer, self.consumer), self.out)
        self.settings, clients, held = self._next
        self.producer, self.consumer = clients.producer, clients.consumer
        held.release()
        self.out = kafka.BatchProducer(self.producer)
        self._next = None
        # Saved at once (in the background), the state with the new topics' start as its
        # offsets: restarted before its next save, the stage would otherwise seek the new
        # topics to where the old ones ended, and the embedded broker answers a fetch past
        # the end with nothing, not with an error.
        self._pending_offsets = dict.fromkeys(self.partitions, 0)
        self._commit_pending(time.monotonic())
        return left

    async def save(self, outputs: list[Any], offsets: dict[int, int]) -> None:
        """Save now, with everything applied before (state never runs ahead of offsets)."""
        self._pending_outputs.extend(outputs)
        self._pending_offsets.update(offsets)
        await self.flush()

    def start_save(
        self, outputs: list[Any], offsets: dict[int, int], acks: list[asyncio.Future[Any]]
    ) -> None:
        """Snapshot the state now, write it in the background after the save before it.

        The next batch is fetched and processed while this one is written; the one after
        waits for it. Saves stay in order, and each holds the state that goes with its
        offsets, so the commit order is unchanged: outputs acked, then state and offsets."""
        changes = self.state_changes()
        previous = self._saving
        self._saving = asyncio.create_task(
            self._write_after(previous, changes, outputs, offsets, acks)
        )

    def state_changes(self) -> list[Change]:
        """Each partition's state to save now, encoded (taking the changes marked so far)."""
        out = []
        for p in list(self.partitions):
            change = self.store.encode(p, self.dirty_state(p), partial(self.full_state, p))
            if change is not None:
                out.append(change)
        return out

    async def flush(self) -> None:
        """Save everything applied so far and wait until it is written."""
        if self._pending_offsets or self._pending_outputs:
            self._commit_pending(time.monotonic())
        if self._saving is not None:
            await self._saving

    async def _write_after(
        self,
        previous: asyncio.Task[None] | None,
        changes: list[Change],
        outputs: list[Any],
        offsets: dict[int, int],
        acks: list[asyncio.Future[Any]],
    ) -> None:
        if previous is not None:
            await previous
        if acks:
            await asyncio.gather(*acks)
        assert self.pool is not None
        pool = self.pool

        async def tx() -> None:
            async with pool.acquire() as conn, conn.transaction():
                await self.write(conn, outputs)
                await self.store.write(conn, changes, offsets)

        started = time.monotonic()
        await db.retrying(tx, "save state", self.settings.db_retry_max_s, self._retried)
        SAVE_SECONDS.labels(self.name).observe(time.monotonic() - started)

    def _retried(self) -> None:
        DB_RETRIES.labels(self.name).inc()
