"""Zone edits reach a running geofence live (LISTEN/NOTIFY): open visits in a reshaped zone
end with `zone_changed`, and the edit is announced as `dosewatch.zone.changed`."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import asyncpg
import orjson

from services.common.zonestore import import_zones
from services.dosage.core.tracker import Fix
from services.geofence.service import GeofenceService, GeofenceSettings
from tests.pipeline_helpers import SAMPLE, collect, prepare_database, send_fixes

T0 = 1_778_781_600_000


def test_reshaping_a_zone_closes_its_open_visits(
    kafka_bootstrap: str, database_url: str, topic_prefix: str
) -> None:
    doc = orjson.loads((SAMPLE / "zones.geojson").read_bytes())
    z3 = next(f for f in doc["features"] if f["id"] == "Z003")
    ring = z3["geometry"]["coordinates"][0]
    lon = sum(p[0] for p in ring[:-1]) / (len(ring) - 1)
    lat = sum(p[1] for p in ring[:-1]) / (len(ring) - 1)
    settings = GeofenceSettings(kafka_bootstrap=kafka_bootstrap, database_url=database_url,
                                topic_prefix=topic_prefix, wall_clock=False)  # fmt: skip

    async def scenario() -> list[dict[str, Any]]:
        await prepare_database(database_url)
        service = GeofenceService(settings)
        await service.start()
        task = asyncio.create_task(service.run())
        try:
            fixes = [Fix("car-7", T0 + i * 15_000, lon, lat) for i in range(5)]
            await send_fixes(kafka_bootstrap, settings.topic_pings, fixes)
            started = "dosewatch.visit.started"
            await collect(
                kafka_bootstrap,
                settings.topic_visits,
                lambda v: any(e["type"] == started for e in v),
            )
            edited = copy.deepcopy(doc)
            for f in edited["features"]:
                if f["id"] == "Z003":  # move it 0.001 degrees east: a new shape
                    f["geometry"]["coordinates"] = [
                        [[x + 0.001, y] for x, y in r] for r in f["geometry"]["coordinates"]
                    ]
            conn = await asyncpg.connect(database_url)
            try:
                written, errors = await import_zones(conn, edited)
            finally:
                await conn.close()
            assert (written, errors) == (1, [])
            return await collect(
                kafka_bootstrap, settings.topic_visits,
                lambda v: any(e["type"] == "dosewatch.visit.ended" for e in v)
                and any(e["type"] == "dosewatch.zone.changed" and e["data"]["change"] == "updated"
                        for e in v),
            )  # fmt: skip
        finally:
            task.cancel()
            await service.stop()

    events = asyncio.run(scenario())
    ended = [e["data"] for e in events if e["type"] == "dosewatch.visit.ended"]
    assert [(d["unit_id"], d["zone_id"], d["end_reason"]) for d in ended] == [
        ("car-7", "Z003", "zone_changed")
    ]
    assert ended[0]["duration_s"] == 60.0  # ended at its last inside ping
    changed = [e for e in events if e["type"] == "dosewatch.zone.changed"]
    assert {(e["subject"], e["data"]["change"]) for e in changed} >= {("Z003", "updated")}
    assert next(e for e in changed if e["data"]["change"] == "updated")["data"]["version"] == 2
