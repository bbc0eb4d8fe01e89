"""kill -9 of a service mid-stream, then a restart: visits, zone periods and the audit log end
up exactly as replay computes them. No loss, no double counting."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from services.common.kafka import BatchProducer
from tests.pipeline_helpers import (
    TZ,
    Proc,
    db_periods,
    db_visits,
    keyed,
    prepare_database,
    replay_expected,
)

SERVICES = ("ingest", "geofence", "dosage")


@pytest.mark.parametrize(
    ("victim", "assignment"),
    # "all": partitions taken by hand, as `dosewatch up` runs the stages; a restarted
    # instance resumes from its saved state and offsets (or ingest's commits) at once.
    [(name, "group") for name in SERVICES] + [(name, "all") for name in SERVICES],
)
def test_kill9_and_restart(
    victim: str,
    assignment: str,
    kafka_bootstrap: str,
    database_url: str,
    topic_prefix: str,
    tmp_path: Path,
) -> None:
    expected = replay_expected(tmp_path)

    env = dict(os.environ) | {
        "DOSEWATCH_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "DOSEWATCH_DATABASE_URL": database_url,
        "DOSEWATCH_TOPIC_PREFIX": topic_prefix,
        "DOSEWATCH_TZ": TZ["tz"],
        "DOSEWATCH_SHIFTS": TZ["shifts"],
        "DOSEWATCH_WALL_CLOCK": "false",  # clocks follow the data alone: runs are comparable
        "DOSEWATCH_LOG_LEVEL": "WARNING",
        "DOSEWATCH_CONSUMER_ASSIGNMENT": assignment,
    }
    asyncio.run(prepare_database(database_url))
    procs = {name: Proc(name, env, tmp_path / f"{name}.log") for name in SERVICES}
    for p in procs.values():
        p.start()
    try:
        for p in procs.values():
            p.wait_ready()

        async def feed() -> None:
            producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
            await producer.start()
            out = BatchProducer(producer)
            try:
                records = keyed(expected.lines)
                chunks = [records[i : i + 1500] for i in range(0, len(records), 1500)]
                for n, chunk in enumerate(chunks):
                    await out.send(topic_prefix + "avl.pings.raw", chunk)
                    await asyncio.sleep(0.3)
                    if n in (3, 7):  # twice, mid-stream, whatever it was doing
                        procs[victim].kill9()
                        procs[victim].start()
            finally:
                await producer.stop()

        asyncio.run(feed())
        got_visits, got_periods, audit = asyncio.run(_results(database_url, len(expected.visits)))
    finally:
        for p in procs.values():
            p.stop()

    assert db_visits(got_visits) == expected.visits
    assert db_periods(got_periods) == expected.periods
    ended = [a for a in audit if a["type"] == "dosewatch.visit.ended"]
    assert len(ended) == len(expected.visits)  # each visit's end recorded once, despite the repeats


async def _results(url: str, want: int) -> tuple[list[Any], list[Any], list[Any]]:
    conn = await asyncpg.connect(url)
    try:
        async with asyncio.timeout(120):
            while await conn.fetchval("SELECT count(*) FROM visits") < want:
                await asyncio.sleep(0.3)
        await asyncio.sleep(2.0)  # let the last periods and audit rows land
        visits = list(await conn.fetch("SELECT * FROM visits"))
        periods = list(await conn.fetch("SELECT * FROM zone_periods"))
        audit = [
            json.loads(r["event"]) for r in await conn.fetch("SELECT event::text FROM audit_log")
        ]
        return visits, periods, audit
    finally:
        await conn.close()
