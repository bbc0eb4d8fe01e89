"""The whole pipeline on a real broker and PostgreSQL equals `dosewatch replay` of the same pings:
raw pings -> ingest -> geofence -> dosage -> visits, zone periods and the audit log."""

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
from tests.pipeline_helpers import (
    TZ,
    db_periods,
    db_visits,
    keyed,
    prepare_database,
    replay_expected,
    wait_for,
)


def test_pipeline_equals_replay(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    common: dict[str, Any] = {"kafka_bootstrap": kafka_bootstrap, "database_url": database_url,
                              "topic_prefix": topic_prefix, **TZ}  # fmt: skip
    expected = replay_expected(tmp_path)
    visit_event_ids = {e["id"] for e in expected.events if e["type"].startswith("dosewatch.visit.")}

    async def scenario() -> tuple[list[Any], list[Any], set[str]]:
        await prepare_database(database_url)
        ingest = IngestService(IngestSettings(**common))
        services: list[IngestService | GeofenceService | DosageService] = [
            ingest,
            GeofenceService(GeofenceSettings(**common, wall_clock=False)),
            DosageService(DosageSettings(**common, wall_clock=False)),
        ]
        for s in services:
            await s.start()
        tasks = [asyncio.create_task(s.run()) for s in services]
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
        await producer.start()
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        try:
            await BatchProducer(producer).send(ingest.settings.topic_raw, keyed(expected.lines))
            await wait_for(pool, "SELECT count(*) FROM visits", len(expected.visits))
            await wait_for(pool, "SELECT count(*) FROM zone_periods", len(expected.periods))
            await asyncio.sleep(1.0)  # anything extra would show up now
            got_visits = await pool.fetch("SELECT * FROM visits")
            got_periods = await pool.fetch("SELECT * FROM zone_periods")
            audit = {r["event_id"] for r in await pool.fetch("SELECT event_id FROM audit_log")}
        finally:
            await pool.close()
            await producer.stop()
            for t in tasks:
                t.cancel()
            for s in services:
                await s.stop()
        return list(got_visits), list(got_periods), audit

    got_visits, got_periods, audit = asyncio.run(scenario())
    assert db_visits(got_visits) == expected.visits
    assert db_periods(got_periods) == expected.periods
    assert visit_event_ids <= audit
