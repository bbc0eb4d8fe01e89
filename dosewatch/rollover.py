"""Rolling `dosewatch up` over to a fresh embedded broker, before its history slows it down.

The embedded broker (Tansu, in memory) lists every batch a partition has held on each fetch,
so its hops slow as topics grow, and past about 90,000 batches it delivers nothing
(docs/performance.md, "Tenth round"). It keeps no retention and refuses DeleteRecords, so
the only way to a short log is a new broker. `stack.Stack.roll_over` drains the stages,
starts one, and resumes every stage where it was: state stays in PostgreSQL, and saved
offsets restart at 0 because the new topics are empty.

These are its broker-side steps. A partition's end offset counts its records, and a batch
holds at least one, so the largest end offset bounds the batches any fetch has to list.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass

import asyncpg
from aiokafka import TopicPartition

from services.common import kafka
from services.common.settings import CommonSettings

TAIL_FETCH_MAX_WAIT_MS = 5


@dataclass(frozen=True, slots=True)
class TailRecord:
    """A record that was on the old broker and no stage had read: it is produced again."""

    partition: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    headers: tuple[tuple[str, bytes], ...]


def largest(ends: Mapping[TopicPartition, int]) -> tuple[TopicPartition | None, int]:
    """The partition holding the most records, and how many (None, 0 for no partitions)."""
    if not ends:
        return None, 0
    tp = max(ends, key=lambda t: (ends[t], t.topic, t.partition))
    return tp, ends[tp]


async def end_offsets(settings: CommonSettings, topics: list[str]) -> dict[TopicPartition, int]:
    """Each partition's end offset, for the topics that exist."""
    consumer = kafka.reader(settings)
    await consumer.start()
    try:
        await consumer.topics()
        parts = [
            TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()
        ]
        return dict(await consumer.end_offsets(parts)) if parts else {}
    finally:
        await kafka.stop_client(consumer)


async def read_tail(
    settings: CommonSettings, group_id: str, topic: str, timeout_s: float = 30.0, rounds: int = 10
) -> list[TailRecord]:
    """What `group_id` has not committed on `topic`, in order per partition. What it did
    commit was consumed; anything past its last commit may have been too, and is read again
    (the rules drop repeated pings).

    `dosewatch up` shuts producers outside the process out first (`EmbeddedProxy`), so one
    round is enough. One that reached the broker by another way may still be writing:
    reading goes on while a round finds more, up to `rounds`, and the caller replaces the
    broker at once; what such a producer gets acknowledged after the last fetch is lost."""
    # Each round ends with a fetch that finds nothing, which waits out the fetch wait:
    # at `dosewatch up`'s 50 ms that was most of the read.
    quick = settings.model_copy(
        update={"fetch_max_wait_ms": min(settings.fetch_max_wait_ms, TAIL_FETCH_MAX_WAIT_MS)}
    )
    consumer = kafka.group_reader(quick, group_id)
    await consumer.start()
    try:
        await consumer.topics()
        found = sorted(consumer.partitions_for_topic(topic) or ())
        parts = [TopicPartition(topic, p) for p in found]
        if not parts:
            return []
        # Asked before assigning: partitions assigned with no position yet have the
        # consumer look up their offsets itself, and our seek then waited out its backoff.
        committed = {tp: await consumer.committed(tp) for tp in parts}
        consumer.assign(parts)
        for tp in parts:
            offset = committed[tp]
            if offset is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, offset)
        tail: list[TailRecord] = []
        async with asyncio.timeout(timeout_s):
            for _ in range(rounds):
                since_ms, before = time.time() * 1000, len(tail)
                while not await kafka.caught_up(consumer, since_ms):
                    # getmany returns only when records come or its timeout runs out; the
                    # end is judged after each, so it must not wait long for nothing.
                    for tp, records in (await consumer.getmany(timeout_ms=10)).items():
                        tail += [
                            TailRecord(tp.partition, r.key, r.value, r.timestamp,
                                       tuple(r.headers))
                            for r in records
                        ]  # fmt: skip
                if len(tail) == before:
                    break
        return tail
    finally:
        await kafka.stop_client(consumer)


async def write_tail(settings: CommonSettings, topic: str, tail: list[TailRecord]) -> None:
    """Produce the tail to the same partitions, in the same order, and wait for the acks."""
    if not tail:
        return
    producer = kafka.producer(settings)
    await producer.start()
    try:
        out = kafka.BatchProducer(producer)
        for partition in sorted({r.partition for r in tail}):
            rows = [(r.key, r.value, r.timestamp_ms, list(r.headers)) for r in tail
                    if r.partition == partition]  # fmt: skip
            await out.send_rows(topic, partition, rows)
    finally:
        await kafka.stop_client(producer)


async def restart_offsets(conn: asyncpg.Connection) -> None:
    """Saved offsets point into the old broker's topics; the new ones start at 0."""
    await conn.execute("UPDATE consumer_offsets SET next_offset = 0")
