"""PostgreSQL goes away mid-stream and comes back: the services pause and retry, then finish
with exactly replay's visits. Nothing lost, nothing crashed."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer

from services.common import db
from services.common.embedded import EmbeddedPostgres, free_port
from services.common.kafka import BatchProducer
from services.common.metrics import DB_RETRIES
from services.dosage.service import DosageService, DosageSettings
from services.geofence.service import GeofenceService, GeofenceSettings
from services.ingest.service import IngestService, IngestSettings
from tests.pipeline_helpers import TZ, db_visits, keyed, prepare_database, replay_expected


def test_database_outage(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    expected = replay_expected(tmp_path)

    async def scenario() -> list[dict[str, Any]]:
        root = Path(tempfile.mkdtemp(prefix="dosewatch-outage-"))
        root.chmod(0o755)
        server = EmbeddedPostgres(root / "data", free_port())
        await server.start()
        url = server.url.rsplit("/", 1)[0] + "/dw"
        await db.ensure_database(url)
        await prepare_database(url)
        common: dict[str, Any] = {"kafka_bootstrap": kafka_bootstrap, "database_url": url,
                                  "topic_prefix": topic_prefix, "db_retry_max_s": 0.5,
                                  **TZ}  # fmt: skip
        ingest = IngestService(IngestSettings(**common))
        services: list[IngestService | GeofenceService | DosageService] = [
            ingest,
            GeofenceService(GeofenceSettings(**common, wall_clock=False)),
            DosageService(DosageSettings(**common, wall_clock=False)),
        ]
        tasks = []
        for s in services:
            await s.start()
            tasks.append(asyncio.create_task(s.run()))
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
        await producer.start()
        sender = BatchProducer(producer)
        retries_before = sum(DB_RETRIES.labels(n)._value.get() for n in ("geofence", "dosage"))
        try:
            records = keyed(expected.lines)
            half = len(records) // 2
            await sender.send(ingest.settings.topic_raw, records[:half])
            await asyncio.sleep(1.0)
            await server.stop()  # the database goes away...
            await sender.send(ingest.settings.topic_raw, records[half:])
            await asyncio.sleep(3.0)
            assert all(not t.done() for t in tasks)  # ...and nobody crashed
            await server.start()  # ...and comes back
            conn = await asyncpg.connect(url)
            try:
                async with asyncio.timeout(90):
                    while await conn.fetchval("SELECT count(*) FROM visits") < len(expected.visits):
                        await asyncio.sleep(0.2)
                await asyncio.sleep(1.0)
                rows = await conn.fetch("SELECT * FROM visits")
            finally:
                await conn.close()
        finally:
            await producer.stop()
            for t in tasks:
                t.cancel()
            for s in services:
                await s.stop()
            await server.stop()
        retries = sum(DB_RETRIES.labels(n)._value.get() for n in ("geofence", "dosage"))
        assert retries > retries_before  # it really was away while they worked
        return db_visits(list(rows))

    got = asyncio.run(scenario())
    assert got == expected.visits
