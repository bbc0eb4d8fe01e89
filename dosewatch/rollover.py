"""Rolling `dosewatch up` over to a fresh embedded broker, before its history slows it down.

The embedded broker (Tansu, in memory) lists every batch a partition has held on each fetch,
so its hops slow as topics grow, and past about 90,000 batches it delivers nothing
(docs/performance.md, "Tenth round"). It keeps no retention and refuses DeleteRecords, so
the only way to a short log is a new broker. `stack.Stack.roll_over` starts one beside it
and moves the stages over one by one, each with its state in hand, to read the new topics
from their start.

These are its broker-side steps. A partition's end offset counts its records, and a batch
holds at least one, so the largest end offset bounds the batches any fetch has to list.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiokafka import TopicPartition

from services.common import kafka
from services.common.settings import CommonSettings


def largest(ends: Mapping[TopicPartition, int]) -> tuple[TopicPartition | None, int]:
    """The partition holding the most records, and how many (None, 0 for no partitions)."""
    if not ends:
        return None, 0
    tp = max(ends, key=lambda t: (ends[t], t.topic, t.partition))
    return tp, ends[tp]


async def end_offsets(settings: CommonSettings, topics: list[str]) -> dict[TopicPartition, int]:
    """Each partition's end offset, for the topics that exist."""
    consumer = kafka.reader(settings)
    try:
        await consumer.start()
        await consumer.topics()
        parts = [
            TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()
        ]
        return dict(await consumer.end_offsets(parts)) if parts else {}
    finally:
        await kafka.stop_client(consumer)
