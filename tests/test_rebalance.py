"""Two geofence instances in one consumer group split the partitions; a rebalance hands state
over through PostgreSQL without losing or double-counting anything."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer

from services.common.kafka import BatchProducer
from services.dosage.service import DosageService, DosageSettings
from services.geofence.service import GeofenceService, GeofenceSettings
from services.ingest.service import IngestService, IngestSettings
from tests.pipeline_helpers import TZ, db_visits, keyed, prepare_database, replay_expected


def test_two_geofence_instances_and_a_rebalance(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    common: dict[str, Any] = {"kafka_bootstrap": kafka_bootstrap, "database_url": database_url,
                              "topic_prefix": topic_prefix, **TZ}  # fmt: skip
    expected = replay_expected(tmp_path)
    lines = keyed(expected.lines)

    async def scenario() -> tuple[list[dict[str, Any]], list[set[int]]]:
        await prepare_database(database_url)
        ingest = IngestService(IngestSettings(**common))
        dosage = DosageService(DosageSettings(**common, wall_clock=False))
        geo_a = GeofenceService(GeofenceSettings(**common, wall_clock=False, instance="a"))
        geo_b = GeofenceService(GeofenceSettings(**common, wall_clock=False, instance="b"))
        tasks = {}
        for s in (ingest, dosage, geo_a):
            await s.start()
            tasks[s] = asyncio.create_task(s.run())
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
        await producer.start()
        out = BatchProducer(producer)
        splits: list[set[int]] = []
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)

        async def send(chunk: list[tuple[bytes, bytes]]) -> None:
            await out.send(ingest.settings.topic_raw, chunk)

        try:
            third = len(lines) // 3
            await send(lines[:third])
            await asyncio.sleep(1.0)
            await geo_b.start()  # joins the group: partitions move from a to b
            tasks[geo_b] = asyncio.create_task(geo_b.run())
            async with asyncio.timeout(30):
                while not (geo_a.trackers and geo_b.trackers
                           and len(geo_a.trackers) + len(geo_b.trackers) == 4):  # fmt: skip
                    await asyncio.sleep(0.1)
            splits.append(set(geo_a.trackers))
            splits.append(set(geo_b.trackers))
            await send(lines[third : 2 * third])
            await asyncio.sleep(1.0)
            tasks.pop(geo_a).cancel()
            await geo_a.stop()  # leaves the group: b takes everything over
            await send(lines[2 * third :])
            async with asyncio.timeout(90):
                while await pool.fetchval("SELECT count(*) FROM visits") < len(expected.visits):
                    await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)
            splits.append(set(geo_b.trackers))
            rows = await pool.fetch("SELECT * FROM visits")
        finally:
            await pool.close()
            await producer.stop()
            for s, t in tasks.items():
                t.cancel()
                await s.stop()
        got = db_visits(list(rows))
        return got, splits

    got, splits = asyncio.run(scenario())
    a_share, b_share, b_after = splits
    assert a_share and b_share and not a_share & b_share  # the group split the partitions
    assert b_after == {0, 1, 2, 3}  # and b took all of them over when a left
    assert got == expected.visits
