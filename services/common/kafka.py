"""Kafka clients tuned for low latency, topic creation, and batched, keyed produce."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import murmur2

from services.common import fetched
from services.common.runner import cancelling
from services.common.settings import CommonSettings

log = logging.getLogger(__name__)
COMPACTED = {"cleanup.policy": "compact"}
_TOPIC_EXISTS = 36


def _security(settings: CommonSettings) -> dict[str, Any]:
    opts: dict[str, Any] = {"security_protocol": settings.kafka_security_protocol}
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        ctx = ssl.create_default_context(
            cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
        )
        if settings.kafka_ssl_certfile:
            ctx.load_cert_chain(
                str(settings.kafka_ssl_certfile),
                str(settings.kafka_ssl_keyfile) if settings.kafka_ssl_keyfile else None,
            )
        opts["ssl_context"] = ctx
    if settings.kafka_sasl_mechanism:
        opts["sasl_mechanism"] = settings.kafka_sasl_mechanism
        opts["sasl_plain_username"] = settings.kafka_sasl_username
        if settings.kafka_sasl_password is not None:
            opts["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return opts


def producer(settings: CommonSettings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        linger_ms=settings.linger_ms,
        max_batch_size=settings.max_batch_bytes,
        acks="all",
        **_security(settings),
    )


def consumer(settings: CommonSettings, group_id: str) -> AIOKafkaConsumer:
    """A consumer for a group, started by `start_consumer`; it hands out records as fetched
    (`fetched.FetchedRecord`)."""
    fetched.install()
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        # The topic prefix namespaces the groups too: two deployments on one cluster never
        # share a group (or rebalance each other).
        group_id=settings.topic_prefix + group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        # 0 would never return data on some brokers; a few ms is the latency floor anyway.
        fetch_max_wait_ms=max(1, settings.fetch_max_wait_ms),
        max_poll_records=settings.max_poll_records,
        value_deserializer=fetched.RAW_VALUES,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        **_security(settings),
    )


async def start_consumer(
    client: AIOKafkaConsumer,
    settings: CommonSettings,
    topic: str,
    listener: ConsumerRebalanceListener | None = None,
) -> None:
    """Start a consumer of `topic` (from `consumer`) by `settings.consumer_assignment`: as a
    member of its group, which hands it partitions through `listener`; or taking every
    partition itself and handing them to `listener` the same way, with no group to join.
    Taken by hand, partitions resume from the group's committed offsets unless the listener
    seeks elsewhere."""
    if settings.consumer_assignment == "group":
        client.subscribe([topic], listener=listener)
        await client.start()
        return
    await client.start()
    try:
        parts = await all_partitions(client, topic)
        client.assign(parts)
        if listener is not None:
            # Not fetched until the listener has placed them (a stateful stage seeks to the
            # offsets saved with its state).
            client.pause(*parts)
            await listener.on_partitions_assigned(parts)
            client.resume(*parts)
    except BaseException:
        await stop_client(client)
        raise


async def all_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Every partition of `topic`, as the cluster has it now (the consumer has started)."""
    await consumer.topics()  # fresh metadata: the topic may have just been made
    found = consumer.partitions_for_topic(topic)
    if not found:
        raise RuntimeError(
            f"topic {topic} does not exist: create it, or let the services do so "
            "(DOSEWATCH_CREATE_TOPICS)"
        )
    return [TopicPartition(topic, p) for p in sorted(found)]


def reader(settings: CommonSettings) -> AIOKafkaConsumer:
    """A consumer outside any group, for readers that take every partition (`assign`); it
    hands out records as fetched (`fetched.FetchedRecord`)."""
    fetched.install()
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=None,
        enable_auto_commit=False,
        fetch_max_wait_ms=max(1, settings.fetch_max_wait_ms),
        max_poll_records=settings.max_poll_records,
        value_deserializer=fetched.RAW_VALUES,
        **_security(settings),
    )


ANSWER_MARGIN_MS = 20


async def stop_client(client: AIOKafkaConsumer | AIOKafkaProducer) -> None:
    """Stop a client. A consumer whose broker has gone raises from `stop` the CancelledError
    of a fetch it cancels while that waits to retry (aiokafka 0.14); that one is not ours, and
    must not cut short the rest of a service's stop (its database pool stayed open)."""
    try:
        await client.stop()
    except asyncio.CancelledError:
        if cancelling():
            raise


async def caught_up(consumer: AIOKafkaConsumer, since_ms: float) -> bool:
    """Whether the consumer has handed out every record of its partitions, as fetches answered
    after `since_ms` (wall clock) see the log's end. False while it holds no partition.

    The end is the fetch's high watermark, not a ListOffsets answer: the embedded broker
    answers that with the last batch's first offset + 1. An answer received within
    `ANSWER_MARGIN_MS` after `since_ms` may have been made before it, so it does not count."""
    assigned = list(consumer.assignment())
    if not assigned:
        return False
    for tp in assigned:
        end, polled = consumer.highwater(tp), consumer.last_poll_timestamp(tp)
        if end is None or polled is None or polled < since_ms + ANSWER_MARGIN_MS:
            return False
        if await consumer.position(tp) < end:
            return False
    return True


async def reached(consumer: AIOKafkaConsumer, ends: Mapping[int, int]) -> bool:
    """Whether the consumer has handed out every record before `ends` (partition -> offset) of
    the partitions it holds: where the stage before it left its outputs, from its acks."""
    for tp in consumer.assignment():
        if await consumer.position(tp) < ends.get(tp.partition, 0):
            return False
    return True


async def ensure_topics(settings: CommonSettings, topics: dict[str, dict[str, str]]) -> None:
    """Create what is missing (when allowed); an existing topic is left as it is."""
    if not settings.create_topics:
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, **_security(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(name, settings.partitions, settings.replication_factor, topic_configs=cfg)
            for name, cfg in topics.items()
            if name not in existing
        ]
        if new:
            response = await admin.create_topics(new)
            for topic, code, *_ in response.topic_errors:
                if code not in (0, _TOPIC_EXISTS):
                    raise RuntimeError(f"cannot create topic {topic}: error code {code}")
            log.info("topics created", extra={"topics": [t.name for t in new]})
    finally:
        await admin.close()


def partition_for(key: bytes, partitions: int) -> int:
    """The Java client's default partitioner: every producer agrees where a key lives."""
    hashed = _HASHES.get(key)
    if hashed is None:
        # aiokafka's murmur2 is pure Python (about 2 us); keys (units, zones) repeat all day.
        if len(_HASHES) >= _HASHES_MAX:
            _HASHES.clear()
        hashed = _HASHES[key] = int(murmur2(key) & 0x7FFFFFFF)
    return hashed % partitions


_HASHES: dict[bytes, int] = {}
_HASHES_MAX = 200_000


class Held(ConsumerRebalanceListener):  # type: ignore[misc]
    """The listener of a consumer opened ahead of a move to another broker (a stage's
    `prepare_move`): its partitions are paused as they are handed over, so it fetches
    nothing, and costs that broker nothing, until the move `release`s them. They are read from
    offset 0: the topics there are new. Ingest once took its position from the group's commits
    there (none) and now and then read nothing until the next move, most likely from past
    the end (docs/performance.md, "Fifteenth round").
    Once released, partitions handed over or taken away go to `after`, the listener the
    stage has had all along (state saved and loaded with the offsets on that broker)."""

    def __init__(self, after: ConsumerRebalanceListener | None = None) -> None:
        self.after = after
        self.held = True
        self.consumer: AIOKafkaConsumer | None = None

    def bind(self, consumer: AIOKafkaConsumer) -> Held:
        """For `open_clients`' `listener_for`."""
        self.consumer = consumer
        return self

    def hold(self) -> None:
        """Pause what is assigned already (taken by hand, the start resumed it)."""
        assert self.consumer is not None
        self.consumer.pause(*self.consumer.assignment())

    def release(self) -> None:
        assert self.consumer is not None
        self.held = False
        self.consumer.resume(*self.consumer.assignment())

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        assert self.consumer is not None
        if not self.held:
            if self.after is not None:
                await self.after.on_partitions_assigned(assigned)
            return
        for tp in assigned:
            self.consumer.seek(tp, 0)
        self.consumer.pause(*assigned)

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        if not self.held and self.after is not None:
            await self.after.on_partitions_revoked(revoked)


@dataclass(frozen=True, slots=True)
class Clients:
    """A stage's producer and consumer on one broker."""

    producer: AIOKafkaProducer
    consumer: AIOKafkaConsumer

    async def close(self) -> None:
        await stop_client(self.consumer)
        await stop_client(self.producer)


async def open_clients(
    settings: CommonSettings,
    group_id: str,
    topic: str,
    listener_for: Callable[[AIOKafkaConsumer], ConsumerRebalanceListener] | None = None,
    outputs: Sequence[str] = (),
) -> Clients:
    """A started producer, and a consumer of `topic` started by `start_consumer` with the
    listener `listener_for` makes for it; the producer is stopped should the consumer fail.
    The producer knows the partitions of `outputs` already (at a move, its first sends would
    otherwise wait for that)."""
    producer_ = producer(settings)
    await producer_.start()
    consumer_ = consumer(settings, group_id)
    try:
        for output in outputs:
            await producer_.partitions_for(output)
        listener = listener_for(consumer_) if listener_for is not None else None
        await start_consumer(consumer_, settings, topic, listener)
    except BaseException:
        await stop_client(producer_)
        raise
    return Clients(producer_, consumer_)


@dataclass(frozen=True, slots=True)
class MovedFrom:
    """What a stage left on the broker it moved from (`dosewatch up`'s broker handover): its
    clients there, to be stopped, and its producer's record of where its outputs end."""

    clients: Clients
    out: BatchProducer


# key, value, timestamp (ms; None: now), headers
Row = tuple[bytes | None, bytes | None, int | None, list[tuple[str, bytes]]]


class BatchProducer:
    """Produce a whole batch with one `send_batch` per partition.

    `send` waits for the acks by default. With `wait=False` it returns once the batches are
    queued, so the caller can fetch and apply its next batch while these are in flight; it
    must then await `acked()` (or the futures from `take_unacked()`) before it commits the
    offsets these records came from. Batches are closed before they are queued: they are
    complete, and an open one would wait out `linger_ms` for records that never come."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._partitions: dict[str, list[int]] = {}
        self._unacked: list[asyncio.Future[Any]] = []
        self._in_flight: set[asyncio.Future[Any]] = set()
        # (topic, partition) -> the offset after the last record acked there: where a reader
        # of what this producer wrote has read it all (`dosewatch.stack`'s broker handover).
        self.ends: dict[tuple[str, int], int] = {}

    async def _count(self, topic: str) -> list[int]:
        parts = self._partitions.get(topic)
        if parts is None:
            found = await self._producer.partitions_for(topic)
            parts = self._partitions[topic] = sorted(found)
        return parts

    async def send(
        self,
        topic: str,
        records: Iterable[tuple[bytes | None, bytes | None]],
        headers: Sequence[tuple[str, bytes]] = (),
        *,
        wait: bool = True,
    ) -> int:
        parts = await self._count(topic)
        by_partition: dict[int, list[tuple[bytes | None, bytes | None]]] = defaultdict(list)
        n = 0
        for key, value in records:
            p = parts[partition_for(key, len(parts))] if key is not None else parts[n % len(parts)]
            by_partition[p].append((key, value))
            n += 1
        futures = []
        listed = list(headers)
        for p, items in by_partition.items():
            futures += await self._fill(topic, p, ((k, v, None, listed) for k, v in items))
        if wait:
            if futures:
                await asyncio.gather(*futures)
        else:
            self._unacked.extend(futures)
        return n

    async def send_rows(self, topic: str, partition: int, rows: Iterable[Row]) -> None:
        """Whole records (key, value, timestamp in ms, headers) to one partition, in order, as
        they were on another broker; waits for the acks."""
        futures = await self._fill(topic, partition, rows)
        if futures:
            await asyncio.gather(*futures)

    async def _fill(self, topic: str, partition: int, rows: Iterable[Row]) -> list[Any]:
        """Queue rows to a partition in as few batches as they fit."""
        futures = []
        batch = self._producer.create_batch()
        for key, value, timestamp, headers in rows:
            if batch.append(key=key, value=value, timestamp=timestamp, headers=headers) is None:
                futures.append(await self._queue(batch, topic, partition))
                batch = self._producer.create_batch()
                if batch.append(key=key, value=value, timestamp=timestamp, headers=headers) is None:
                    size = len(value or b"")
                    raise ValueError(f"a record of {size} bytes exceeds the batch size")
        futures.append(await self._queue(batch, topic, partition))
        return futures

    async def _queue(self, batch: Any, topic: str, partition: int) -> asyncio.Future[Any]:
        batch.close()
        count = batch.record_count()
        future: asyncio.Future[Any] = await self._producer.send_batch(
            batch, topic, partition=partition
        )
        self._in_flight.add(future)
        future.add_done_callback(partial(self._acked, (topic, partition), count))
        return future

    def _acked(self, where: tuple[str, int], count: int, future: asyncio.Future[Any]) -> None:
        self._in_flight.discard(future)
        if not future.cancelled() and future.exception() is None:
            end = future.result().offset + count  # a batch's acked offset is its first record's
            if end > self.ends.get(where, 0):
                self.ends[where] = end

    async def settled(self) -> None:
        """Wait until everything sent so far is answered (acked or failed), whether or not
        its sender waits for it."""
        while self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    def ends_of(self, topic: str) -> dict[int, int]:
        """Partition -> the offset after the last record acked there, for `topic`."""
        return {p: end for (t, p), end in self.ends.items() if t == topic}

    def take_unacked(self) -> list[asyncio.Future[Any]]:
        """The acks of everything sent with `wait=False` since the last take."""
        out, self._unacked = self._unacked, []
        return out

    async def acked(self) -> None:
        """Wait until everything sent with `wait=False` so far is acknowledged."""
        futures = self.take_unacked()
        if futures:
            await asyncio.gather(*futures)


__all__ = [
    "COMPACTED",
    "BatchProducer",
    "Clients",
    "ConsumerRebalanceListener",
    "MovedFrom",
    "consumer",
    "ensure_topics",
    "open_clients",
    "partition_for",
    "producer",
]
