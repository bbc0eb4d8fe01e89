"""Rolling `dosewatch up` over to a fresh embedded broker: the stages drain, a new broker starts,
and they go on from their saved state, so what comes out is what one broker would have made."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from dosewatch import rollover
from dosewatch.stack import RolloverAbandoned, Stack
from services.api.settings import ApiSettings
from services.common import kafka
from services.common.embedded import EmbeddedKafka, free_port
from services.common.settings import CommonSettings
from services.dosage.service import DosageSettings
from services.geofence.service import GeofenceSettings
from services.ingest.service import IngestSettings
from tests.pipeline_helpers import (
    TZ,
    Expected,
    db_periods,
    db_visits,
    keyed,
    prepare_database,
    replay_expected,
    send_records,
    wait_for,
)

A, B = "a", "b"


@pytest.mark.parametrize(
    ("ends", "want"),
    [
        ({}, (None, 0)),
        ({TopicPartition(A, 0): 5}, (TopicPartition(A, 0), 5)),
        ({TopicPartition(A, 0): 5, TopicPartition(B, 1): 9}, (TopicPartition(B, 1), 9)),
        ({TopicPartition(A, 0): 0, TopicPartition(A, 1): 0}, (TopicPartition(A, 1), 0)),
    ],
)
def test_largest_partition(ends: dict[TopicPartition, int], want: tuple[Any, int]) -> None:
    assert rollover.largest(ends) == want


def test_tail_is_what_the_group_left_and_moves_whole(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Records past the group's commit, with keys, timestamps and headers, land on the same
    partitions of the new broker in the same order; committed ones stay behind."""

    async def scenario() -> tuple[list[Any], list[Any]]:
        old = CommonSettings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix,
                             partitions=2)  # fmt: skip
        topic = old.topic_raw
        await kafka.ensure_topics(old, {topic: {}})
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            for i in range(10):
                await producer.send_and_wait(topic, f"v{i}".encode(), key=f"k{i}".encode(),
                                             partition=i % 2, timestamp_ms=1_000 + i,
                                             headers=[("h", str(i).encode())])  # fmt: skip
        finally:
            await producer.stop()
        group = kafka.group_reader(old, "ingest")
        await group.start()
        try:  # partition 0 read up to offset 3 (v0, v2, v4), partition 1 nothing
            group.assign([TopicPartition(topic, 0)])
            await group.commit({TopicPartition(topic, 0): 3})
        finally:
            await group.stop()
        tail = await rollover.read_tail(old, "ingest", topic)

        fresh = EmbeddedKafka(free_port())
        await fresh.start()
        try:
            new = old.model_copy(update={"kafka_bootstrap": fresh.bootstrap})
            await kafka.ensure_topics(new, {topic: {}})
            await rollover.write_tail(new, topic, tail)
            reader = AIOKafkaConsumer(bootstrap_servers=fresh.bootstrap)
            await reader.start()
            moved: list[Any] = []
            try:
                parts = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
                reader.assign(parts)
                await reader.seek_to_beginning(*parts)
                async with asyncio.timeout(20):
                    while len(moved) < len(tail):
                        for records in (await reader.getmany(timeout_ms=200)).values():
                            moved += records
            finally:
                await reader.stop()
        finally:
            await fresh.stop()
        return tail, moved

    tail, moved = asyncio.run(scenario())
    assert sorted(r.value for r in tail) == [b"v1", b"v3", b"v5", b"v6", b"v7", b"v8", b"v9"]
    got = sorted((r.partition, r.offset, r.key, r.value, r.timestamp, tuple(r.headers))
                 for r in moved)  # fmt: skip
    want = [
        (0, 0, b"k6", b"v6", 1_006, (("h", b"6"),)),
        (0, 1, b"k8", b"v8", 1_008, (("h", b"8"),)),
    ]
    want += [(1, n, f"k{i}".encode(), f"v{i}".encode(), 1_000 + i, (("h", str(i).encode()),))
             for n, i in enumerate((1, 3, 5, 7, 9))]  # fmt: skip
    assert got == want


async def _read_all(bootstrap: str, topic: str) -> list[Any]:
    """Every record on `topic` now (to each partition's high watermark: the embedded broker's
    ListOffsets answers the last batch's first offset + 1)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    out: list[Any] = []
    try:
        await consumer.topics()
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        async with asyncio.timeout(20):
            while True:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    out += records
                ends = [consumer.highwater(tp) for tp in parts]
                if None not in ends and all(
                    [
                        await consumer.position(tp) >= end
                        for tp, end in zip(parts, ends, strict=True)
                    ]
                ):
                    return out
    finally:
        await consumer.stop()


async def _statuses(bootstrap: str, topic: str) -> dict[str, Any]:
    """The last status per zone on a status topic: what a new API replica would build."""
    last: dict[str, Any] = {}
    for r in await _read_all(bootstrap, topic):
        last[r.key.decode()] = None if r.value is None else orjson.loads(r.value)
    return {z: s for z, s in last.items() if s is not None}


async def _output(pool: asyncpg.Pool, expected: Expected) -> tuple[list[Any], list[Any]]:
    """Visits and zone periods once there are as many as replay made (and a second more, for
    anything extra to show up), in replay's form."""
    await wait_for(pool, "SELECT count(*) FROM visits", len(expected.visits))
    await wait_for(pool, "SELECT count(*) FROM zone_periods", len(expected.periods))
    await asyncio.sleep(1.0)
    visits = db_visits(list(await pool.fetch("SELECT * FROM visits")))
    return visits, db_periods(list(await pool.fetch("SELECT * FROM zone_periods")))


def _stack(broker: EmbeddedKafka, database_url: str, topic_prefix: str) -> Stack:
    """The stack on a broker of its own, the stages on event time, as replay runs."""
    common: dict[str, Any] = {"kafka_bootstrap": broker.bootstrap, "database_url": database_url,
                              "topic_prefix": topic_prefix, **TZ}  # fmt: skip
    return Stack(IngestSettings(**common), GeofenceSettings(**common, wall_clock=False),
                 DosageSettings(**common, wall_clock=False), ApiSettings(**common, api_port=0),
                 broker)  # fmt: skip


def test_rollover_midway_gives_what_one_broker_gives(
    database_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    """The evening shift, half of it before a rollover and half after, makes exactly the
    visits and zone periods `dosewatch replay` makes. The API's view survives, and the new
    status topic holds the same view, so a replica started afterwards would build it too."""
    expected = replay_expected(tmp_path)
    half, three_quarters = len(expected.lines) // 2, len(expected.lines) * 3 // 4

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with _running(database_url, topic_prefix) as (broker, stack, pool):
            raw = stack.ingest_settings.topic_raw
            status_topic = stack.ingest_settings.topic_status
            await send_records(broker.bootstrap, raw, keyed(expected.lines[:half]))
            await wait_for(pool, "SELECT count(*) FROM visits", 1)  # state to carry over
            # A producer outside the process writes while ingest is stopped for the rollover:
            # the records it leaves on the old broker have to move.
            await stack._halt("ingest")
            await send_records(broker.bootstrap, raw, keyed(expected.lines[half:three_quarters]))
            _paused, out["tail"] = await stack.roll_over()
            out["visits_at_rollover"] = await pool.fetchval("SELECT count(*) FROM visits")
            assert stack.api.ctx is not None
            out["book_at_rollover"] = _shown(stack.api.ctx.book.zones)
            out["raw_after"] = len(await _read_all(broker.bootstrap, raw))
            await send_records(broker.bootstrap, raw, keyed(expected.lines[three_quarters:]))
            out["visits"], out["periods"] = await _output(pool, expected)
            out["book"] = _shown(stack.api.ctx.book.zones)
            # Once more with nothing left to do: every status on the new topic comes from
            # dosage publishing them again, and a replica would build the view from them.
            _paused, out["second_tail"] = await stack.roll_over()
            async with asyncio.timeout(20):
                while (topic := await _statuses(broker.bootstrap, status_topic)) != _shown(
                    stack.api.ctx.book.zones
                ):
                    await asyncio.sleep(0.2)
            out["topic"] = topic
        return out

    out = asyncio.run(scenario())
    print(f"tail carried over: {out['tail']} records; visits saved before: "
          f"{out['visits_at_rollover']}")  # fmt: skip
    # The new broker's raw topic began with the carried records only: all that was sent
    # while ingest was stopped, and what it had read since its last commit (read again).
    assert out["raw_after"] == out["tail"] >= three_quarters - half
    assert 0 < out["visits_at_rollover"] < len(expected.visits)
    assert out["visits"] == expected.visits
    assert out["periods"] == expected.periods
    # The view held across the rollover, and across the second one unchanged.
    assert out["book_at_rollover"]
    assert set(out["book_at_rollover"]) <= set(out["book"])
    # Republished as of dosage's clock now, which changes nothing else.
    assert set(out["topic"]) == set(out["book"])
    assert {z: s | {"as_of": None} for z, s in out["topic"].items()} == {
        z: s | {"as_of": None} for z, s in out["book"].items()
    }


@contextlib.asynccontextmanager
async def _running(
    database_url: str, topic_prefix: str
) -> AsyncIterator[tuple[EmbeddedKafka, Stack, asyncpg.Pool]]:
    """The stack on a broker of its own, started, and a pool to read its output; all
    stopped after."""
    await prepare_database(database_url)
    broker = EmbeddedKafka(free_port())
    await broker.start()
    stack = _stack(broker, database_url, topic_prefix)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        await stack.start()
        yield broker, stack, pool
    finally:
        await pool.close()
        await stack.stop()
        await broker.stop()


def _shown(book: dict[str, Any]) -> dict[str, Any]:
    """Statuses the API holds, less the placeholders of zones dosage never reported."""
    return {z: s for z, s in book.items() if not s["as_of"].startswith("1970")}


def test_rollover_abandoned_resumes_on_the_old_broker(
    database_url: str, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that does not reach the end in time (here the API's feed, made to time out)
    abandons the rollover: the stages start again on the broker they had, nothing is lost,
    and the output is still replay's."""
    expected = replay_expected(tmp_path)
    half = len(expected.lines) // 2
    drain = Stack._drain

    async def stuck_feed(self: Stack, reader: Any) -> None:
        if reader is self.api.feed:
            raise TimeoutError
        await drain(self, reader)

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with _running(database_url, topic_prefix) as (broker, stack, pool):
            raw = stack.ingest_settings.topic_raw
            broker_pid = broker.proc.pid if broker.proc else None
            await send_records(broker.bootstrap, raw, keyed(expected.lines[:half]))
            monkeypatch.setattr(Stack, "_drain", stuck_feed)
            with pytest.raises(RolloverAbandoned):
                await stack.roll_over()
            monkeypatch.setattr(Stack, "_drain", drain)
            out["same_broker"] = broker.proc is not None and broker.proc.pid == broker_pid
            out["stages"] = sorted(stack.stages)
            await send_records(broker.bootstrap, raw, keyed(expected.lines[half:]))
            out["visits"], out["periods"] = await _output(pool, expected)
            out["raw"] = len(await _read_all(broker.bootstrap, raw))
        return out

    out = asyncio.run(scenario())
    assert out["same_broker"] and out["stages"] == ["dosage", "geofence", "ingest"]
    assert out["raw"] == len(expected.lines)  # the old broker's topic, whole
    assert out["visits"] == expected.visits
    assert out["periods"] == expected.periods
