"""Rolling `dosewatch up` over to a fresh embedded broker: a new broker starts beside the old
one and the stages move to it one by one, each between two batches and with its state in hand,
while pings keep coming; what comes out is what one broker would have made."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from dosewatch import rollover
from dosewatch.rollover import RolloverAbandoned
from dosewatch.stack import Stack
from services.api.settings import ApiSettings
from services.common import kafka
from services.common.embedded import EmbeddedKafka, EmbeddedProxy, free_port
from services.dosage.service import DosageSettings
from services.geofence.service import GeofenceService, GeofenceSettings
from services.ingest.service import IngestSettings
from tests.pipeline_helpers import (
    TZ,
    Expected,
    db_periods,
    db_visits,
    keyed,
    prepare_database,
    refused,
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


def _stack(broker: EmbeddedKafka, proxy: EmbeddedProxy, database_url: str,
           topic_prefix: str) -> Stack:  # fmt: skip
    """The stack on a broker of its own, the stages on event time, as replay runs."""
    common: dict[str, Any] = {"kafka_bootstrap": broker.bootstrap, "database_url": database_url,
                              "topic_prefix": topic_prefix, **TZ}  # fmt: skip
    return Stack(IngestSettings(**common), GeofenceSettings(**common, wall_clock=False),
                 DosageSettings(**common, wall_clock=False), ApiSettings(**common, api_port=0),
                 broker, proxy)  # fmt: skip


def test_rollover_midway_gives_what_one_broker_gives(
    database_url: str, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The evening shift, a quarter before a rollover, a quarter sent while it happens (by a
    producer outside the process, through the proxy) and the rest after, makes exactly the
    visits and zone periods `dosewatch replay` makes. The API's view survives, and the new
    status topic holds the same view, so a replica started afterwards would build it too."""
    expected = replay_expected(tmp_path)
    quarter, half = len(expected.lines) // 4, len(expected.lines) // 2
    # Dosage publishes its statuses again a few zones at a time, between batches.
    monkeypatch.setattr("services.dosage.service.REPUBLISH_SLICE", 3)

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with _running(database_url, topic_prefix) as (proxy, stack, pool):
            assert stack.broker is not None
            raw = stack.ingest_settings.topic_raw
            status_topic = stack.ingest_settings.topic_status
            await send_records(proxy.bootstrap, raw, keyed(expected.lines[:quarter]))
            await wait_for(pool, "SELECT count(*) FROM visits", 1)  # state to carry over
            old_broker = stack.broker.bootstrap
            lines = keyed(expected.lines[quarter:half])
            chunks = [lines[i : i + 200] for i in range(0, len(lines), 200)]

            sent = [0]

            async def during() -> None:
                for chunk in chunks:
                    await send_records(proxy.bootstrap, raw, chunk)
                    sent[0] += 1

            sending = asyncio.create_task(during())
            await asyncio.sleep(0.05)
            out["chunks_before"], out["chunks"] = sent[0], len(chunks)
            out["steps"] = await stack.roll_over()
            await sending
            out["moved"] = stack.broker.bootstrap != old_broker
            out["visits_at_rollover"] = await pool.fetchval("SELECT count(*) FROM visits")
            assert stack.api.ctx is not None
            out["book_at_rollover"] = _shown(stack.api.ctx.book.zones)
            await send_records(proxy.bootstrap, raw, keyed(expected.lines[half:]))
            out["visits"], out["periods"] = await _output(pool, expected)
            out["book"] = _shown(stack.api.ctx.book.zones)
            # Once more with nothing left to do: every status on the new topic comes from
            # dosage publishing them again, and a replica would build the view from them.
            # One zone as after a restart, never published by this process: built anew.
            del stack.stages["dosage"]._published[sorted(out["book"])[0]]
            await stack.roll_over()
            # Saved at the move: state with the new topics' start, for a restart to seek to.
            await asyncio.sleep(0.5)
            out["offsets"] = sorted(
                tuple(r)
                for r in await pool.fetch(
                    "SELECT consumer, partition, next_offset FROM consumer_offsets "
                    "WHERE topic = ANY($1::text[])",
                    [stack.ingest_settings.topic_pings, stack.ingest_settings.topic_visits],
                )
            )
            async with asyncio.timeout(20):
                while (topic := await _statuses(stack.broker.bootstrap, status_topic)) != _shown(
                    stack.api.ctx.book.zones
                ):
                    await asyncio.sleep(0.2)
            out["topic"] = topic
        return out

    out = asyncio.run(scenario())
    print(f"rollover steps: {out['steps']}; visits saved before: {out['visits_at_rollover']}")
    assert out["moved"]
    assert out["chunks_before"] < out["chunks"], "records were sent across the rollover, too"
    assert set(out["steps"]) == {
        "broker_s",
        "prepare_s",
        "ingest_s",
        "geofence_s",
        "dosage_s",
        "api_s",
    }
    assert 0 < out["visits_at_rollover"] < len(expected.visits)
    assert out["visits"] == expected.visits
    assert out["periods"] == expected.periods
    assert out["offsets"] and {o for _c, _p, o in out["offsets"]} == {0}
    assert {c for c, _p, _o in out["offsets"]} == {"geofence", "dosage"}
    # The view held across the rollover, and across the second one unchanged.
    assert out["book_at_rollover"]
    assert set(out["book_at_rollover"]) <= set(out["book"])
    # Republished as last published: what the old topic held, as_of included. The zone
    # taken out of the cache is built as it stands, which, nothing having come since, is
    # its last status too.
    assert out["topic"] == out["book"]


@contextlib.asynccontextmanager
async def _running(
    database_url: str, topic_prefix: str
) -> AsyncIterator[tuple[EmbeddedProxy, Stack, asyncpg.Pool]]:
    """The stack on a broker of its own, with the proxy that clients outside the process use
    in front of it (as `dosewatch up` runs it), started, and a pool to read its output; all
    stopped after."""
    await prepare_database(database_url)
    broker = EmbeddedKafka(free_port())
    await broker.start()
    proxy = EmbeddedProxy(free_port(), broker.bootstrap)
    await proxy.start()
    stack = _stack(broker, proxy, database_url, topic_prefix)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        await stack.start()
        yield proxy, stack, pool
    finally:
        await pool.close()
        await stack.stop()
        await proxy.stop()
        await broker.stop()


def _shown(book: dict[str, Any]) -> dict[str, Any]:
    """Statuses the API holds, less the placeholders of zones dosage never reported."""
    return {z: s for z, s in book.items() if not s["as_of"].startswith("1970")}


def test_rollover_abandoned_keeps_the_broker(
    database_url: str, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a stage cannot open clients on the new broker (made to fail here), nothing has
    moved: the others' clients there are closed, the rollover is abandoned, the new broker
    killed, and the stack goes on where it was, its output still replay's."""
    expected = replay_expected(tmp_path)
    half = len(expected.lines) // 2
    tried: list[str] = []

    async def failing(self: Any, bootstrap: str) -> None:
        tried.append(bootstrap)
        raise RuntimeError("no clients today")

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with _running(database_url, topic_prefix) as (proxy, stack, pool):
            assert stack.broker is not None and stack.broker.proc is not None
            raw = stack.ingest_settings.topic_raw
            before = stack.broker.proc.pid, stack.broker.bootstrap
            await send_records(proxy.bootstrap, raw, keyed(expected.lines[:half]))
            with monkeypatch.context() as patched:
                patched.setattr(GeofenceService, "prepare_move", failing)
                with pytest.raises(RolloverAbandoned, match="no clients today"):
                    await stack.roll_over()
            out["same_broker"] = (stack.broker.proc.pid, stack.broker.bootstrap) == before
            out["new_one_gone"] = await refused(tried[0])
            out["prepared"] = [n for n, stage in stack.stages.items() if stage.prepared]
            out["stages"] = sorted(stack.stages)
            await send_records(proxy.bootstrap, raw, keyed(expected.lines[half:]))
            out["visits"], out["periods"] = await _output(pool, expected)
            out["raw"] = len(await _read_all(stack.broker.bootstrap, raw))
        return out

    out = asyncio.run(scenario())
    assert out["same_broker"] and out["new_one_gone"]
    assert out["stages"] == ["dosage", "geofence", "ingest"]
    assert out["prepared"] == []
    assert out["raw"] == len(expected.lines)  # the old broker's topic, whole
    assert out["visits"] == expected.visits
    assert out["periods"] == expected.periods


def test_a_stage_that_cannot_read_to_the_end_stops_the_rollover_saying_which(
    database_url: str, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stages before it have moved, so there is no going back: the rollover fails, naming
    the stage (`dosewatch up` then stops, saying so), and the stack still stops cleanly."""
    monkeypatch.setattr("dosewatch.stack.MOVE_TIMEOUT_S", 0.5)

    async def never(self: Any, ends: dict[int, int]) -> bool:
        return False

    async def scenario() -> str:
        async with _running(database_url, topic_prefix) as (_proxy, stack, _pool):
            monkeypatch.setattr("services.geofence.service.GeofenceService.reached", never)
            with pytest.raises(RuntimeError) as failed:
                await stack.roll_over()
            return str(failed.value)

    message = asyncio.run(scenario())
    assert message.startswith("broker rollover stuck: geofence did not read its input on the")


def test_clients_opened_ahead_of_a_move_fetch_nothing_until_it(
    database_url: str, topic_prefix: str
) -> None:
    """A stage's consumer on the new broker holds its partitions paused while the stage still
    reads the old one (it would poll the new broker every few ms for nothing); the move
    resumes them."""

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with _running(database_url, topic_prefix) as (_proxy, stack, _pool):
            assert stack.broker is not None
            following = await stack.broker.successor()
            try:
                s = stack.ingest_settings.model_copy(
                    update={"kafka_bootstrap": following.bootstrap}
                )
                await kafka.ensure_topics(s, rollover.topics(s))
                for name in ("ingest", "geofence"):
                    stage = stack.stages[name]
                    await stage.prepare_move(following.bootstrap)
                    consumer = stage._next[1].consumer
                    out[name] = (consumer.assignment(), consumer.paused())
                    await stage.cancel_move()
            finally:
                await stack.broker.retire(following.proc)
        return out

    out = asyncio.run(scenario())
    for name in ("ingest", "geofence"):
        assigned, paused = out[name]
        assert assigned and paused == assigned, name
