"""The geofence service on a real broker and PostgreSQL matches replay, visit for visit."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaProducer

from dosewatch.replay import load_zones
from services.common.kafka import BatchProducer
from services.dosage.core.events import visit_row
from services.dosage.core.params import DosageParams
from services.dosage.core.tracker import VisitEventKind, VisitTracker
from services.geofence.core.index import ZoneIndex
from services.geofence.service import GeofenceService, GeofenceSettings
from tests.pipeline_helpers import (
    SAMPLE,
    collect,
    flush_fixes,
    ping_bytes,
    prepare_database,
    sample_fixes,
)


def replay_rows(fixes: list[Any]) -> list[dict[str, Any]]:
    tracker = VisitTracker(
        ZoneIndex(load_zones(SAMPLE / "zones.geojson"), DosageParams()), DosageParams()
    )
    events = tracker.process(fixes) + tracker.finish()
    return [visit_row(e) for e in events if e.kind is VisitEventKind.ENDED]


def key(row: dict[str, Any]) -> tuple[str, str, str]:
    return (row["started_at"], row["unit_id"], row["zone_id"])


def test_geofence_matches_replay(
    kafka_bootstrap: str, database_url: str, topic_prefix: str
) -> None:
    settings = GeofenceSettings(kafka_bootstrap=kafka_bootstrap, database_url=database_url,
                                topic_prefix=topic_prefix, wall_clock=False)  # fmt: skip
    fixes = sample_fixes()
    fixes += flush_fixes(max(f.ts for f in fixes), settings.partitions)
    expected = sorted(replay_rows(fixes), key=key)
    assert all(r["end_reason"] != "end_of_input" for r in expected)

    async def scenario() -> list[dict[str, Any]]:
        await prepare_database(database_url)
        service = GeofenceService(settings)
        await service.start()
        task = asyncio.create_task(service.run())
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
        await producer.start()
        try:
            await BatchProducer(producer).send(
                settings.topic_pings, ((f.unit_id.encode(), ping_bytes(f)) for f in fixes)
            )
            events = await collect(
                kafka_bootstrap, settings.topic_visits,
                lambda v: sum(e["type"] == "dosewatch.visit.ended" for e in v) >= len(expected),
            )  # fmt: skip
        finally:
            await producer.stop()
            task.cancel()
            await service.stop()
        return [e["data"] for e in events if e["type"] == "dosewatch.visit.ended"]

    got = sorted(asyncio.run(scenario()), key=key)
    assert got == expected
