"""Zones in PostgreSQL: load them, import a FeatureCollection, and announce changes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from schemas.zone import ZoneFeature, parse_zone_collection
from services.geofence.core.zone import ZoneSpec

CHANNEL = "dosewatch_zones"


@dataclass(frozen=True, slots=True)
class StoredZone:
    spec: ZoneSpec
    version: int


def spec_of(feature: ZoneFeature) -> ZoneSpec:
    p = feature.properties
    return ZoneSpec(
        zone_id=feature.zone_id,
        geometry=feature.shape(),
        name=p.name,
        target_s=p.target_s,
        min_visit_s=p.min_visit_s,
        max_visit_s=p.max_visit_s,
        properties=p.model_dump(exclude_none=True),
    )


async def load_zones(conn: asyncpg.Connection) -> list[StoredZone]:
    rows = await conn.fetch(
        "SELECT zone_id, feature::text AS feature, version FROM zones "
        "WHERE NOT deleted ORDER BY zone_id"
    )
    out = []
    for row in rows:
        feature = ZoneFeature.model_validate(orjson.loads(row["feature"]))
        out.append(StoredZone(spec_of(feature), row["version"]))
    return out


async def import_zones(conn: asyncpg.Connection, doc: Any) -> tuple[int, list[str]]:
    """Validate and upsert a FeatureCollection; a changed feature gets a new version.
    Returns (zones written, errors); nothing is written when any feature is invalid."""
    features, errors = parse_zone_collection(doc)
    if errors:
        return 0, [f"feature {e.index} ({e.zone_id}): {e.reason}" for e in errors]
    async with conn.transaction():
        written = 0
        for f in features:
            body = f.model_dump_json(exclude_none=True)
            status = await conn.execute(
                "INSERT INTO zones (zone_id, feature) VALUES ($1, $2::jsonb) "
                "ON CONFLICT (zone_id) DO UPDATE SET feature = EXCLUDED.feature, "
                "version = zones.version + 1, deleted = false, updated_at = now() "
                "WHERE zones.feature IS DISTINCT FROM EXCLUDED.feature OR zones.deleted",
                f.zone_id,
                body,
            )
            written += status.endswith(" 1")
        if written:
            await conn.execute("SELECT pg_notify($1, 'changed')", CHANNEL)
    return written, []
