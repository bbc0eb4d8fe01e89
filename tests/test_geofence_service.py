"""The geofence service on a real broker and PostgreSQL matches replay, visit for visit."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from services.geofence.service import GeofenceService, GeofenceSettings
from tests.pipeline_helpers import (
    collect,
    flush_fixes,
    prepare_database,
    replay_expected,
    sample_fixes,
    send_fixes,
)


def key(row: dict[str, Any]) -> tuple[str, str, str]:
    return (row["started_at"], row["unit_id"], row["zone_id"])


def test_geofence_matches_replay(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    settings = GeofenceSettings(kafka_bootstrap=kafka_bootstrap, database_url=database_url,
                                topic_prefix=topic_prefix, wall_clock=False)  # fmt: skip
    expected = replay_expected(tmp_path).visits  # the sample plus one flush ping per partition
    assert all(r["end_reason"] != "end_of_input" for r in expected)
    fixes = sample_fixes()
    fixes += flush_fixes(max(f.ts for f in fixes), settings.partitions)

    async def scenario() -> list[dict[str, Any]]:
        await prepare_database(database_url)
        service = GeofenceService(settings)
        await service.start()
        task = asyncio.create_task(service.run())
        try:
            await send_fixes(kafka_bootstrap, settings.topic_pings, fixes)
            events = await collect(
                kafka_bootstrap, settings.topic_visits,
                lambda v: sum(e["type"] == "dosewatch.visit.ended" for e in v) >= len(expected),
            )  # fmt: skip
        finally:
            task.cancel()
            await service.stop()
        return [e["data"] for e in events if e["type"] == "dosewatch.visit.ended"]

    assert sorted(asyncio.run(scenario()), key=key) == expected
