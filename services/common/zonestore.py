"""Zones in PostgreSQL: load them, write them (with history and audit), and announce changes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg
import orjson

from schemas.timefmt import datetime_to_ms, ms_to_datetime
from schemas.zone import PolygonGeometry, ZoneFeature, parse_zone_collection
from services.common.auditlog import append_event
from services.geofence.core.zone import ZoneSpec

CHANNEL = "dosewatch_zones"
ZONE_EDITED = "dosewatch.zone.edited"
CLI_SOURCE = "dosewatch/cli"


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


class ZoneStoreError(Exception):
    """A write refused for the zone's current state; `detail` says why."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class ZoneExists(ZoneStoreError):
    pass


class ZoneNotFound(ZoneStoreError):
    pass


class VersionMismatch(ZoneStoreError):
    def __init__(self, zone_id: str, current: int | None) -> None:
        super().__init__(f"zone {zone_id!r} is at version {current}, not the one given")
        self.current = current


Op = Literal["create", "update", "delete"]
Want = Literal["create", "update", "delete", "upsert"]


@dataclass(frozen=True, slots=True)
class ZoneWrite:
    zone_id: str
    version: int
    op: Op
    feature: dict[str, Any]  # as stored
    at_ms: int  # when (zones.updated_at, zone_versions.changed_at, the audit event's time)


async def write_zone(
    conn: asyncpg.Connection,
    zone_id: str,
    feature: ZoneFeature | None,
    want: Want,
    actor: str,
    source: str,
    if_version: int | None = None,
) -> ZoneWrite | None:
    """One zone edit in one transaction (the caller's, if it has one): the zones row, its
    version in zone_versions, a `dosewatch.zone.edited` audit event and a NOTIFY that the
    geofence and the API follow. `feature` is None only to delete. Returns None when an
    upsert or update leaves the zone as it is: no version is made for nothing."""
    async with conn.transaction():
        row = await conn.fetchrow(
            "SELECT version, deleted, feature::text AS feature, "
            "(SELECT max(changed_at) FROM zone_versions v WHERE v.zone_id = z.zone_id) AS last "
            "FROM zones z WHERE zone_id = $1 FOR UPDATE",
            zone_id,
        )
        live = row is not None and not row["deleted"]
        if want == "create" and live:
            raise ZoneExists(f"zone {zone_id!r} exists; PUT /v1/zones/{zone_id} changes it")
        if want in ("update", "delete") and not live:
            raise ZoneNotFound(f"no zone {zone_id!r}")
        if if_version is not None and (row is None or row["version"] != if_version):
            raise VersionMismatch(zone_id, row["version"] if live and row else None)
        op: Op
        if feature is None:
            assert row is not None
            body, op = row["feature"], "delete"
        else:
            body, op = feature.model_dump_json(exclude_none=True), "update" if live else "create"
            if live and row is not None and orjson.loads(row["feature"]) == orjson.loads(body):
                return None
        if row is None:
            # A zone id used before and removed by hand keeps counting from its history.
            last_version = await conn.fetchval(
                "SELECT max(version) FROM zone_versions WHERE zone_id = $1", zone_id
            )
            version = (last_version or 0) + 1
        else:
            version = row["version"] + 1
        # Strictly after the last edit: the audit event id includes its time.
        now_ms = int(time.time() * 1000)
        at = (
            now_ms
            if row is None or row["last"] is None
            else max(now_ms, datetime_to_ms(row["last"]) + 1)
        )
        changed_at = ms_to_datetime(at)
        deleted = op == "delete"
        if row is None:
            try:
                await conn.execute(
                    "INSERT INTO zones (zone_id, feature, version, deleted, updated_at) "
                    "VALUES ($1, $2::jsonb, $3, $4, $5)",
                    zone_id, body, version, deleted, changed_at,
                )  # fmt: skip
            except asyncpg.UniqueViolationError:
                # Another request created it between our look and our write.
                raise ZoneExists(f"zone {zone_id!r} was just created by another request") from None
        else:
            await conn.execute(
                "UPDATE zones SET feature = $2::jsonb, version = $3, deleted = $4, "
                "updated_at = $5 WHERE zone_id = $1",
                zone_id, body, version, deleted, changed_at,
            )  # fmt: skip
        await conn.execute(
            "INSERT INTO zone_versions (zone_id, version, op, feature, changed_by, changed_at) "
            "VALUES ($1, $2, $3, $4::jsonb, $5, $6)",
            zone_id, version, op, body, actor, changed_at,
        )  # fmt: skip
        data = {"zone_id": zone_id, "version": version, "op": op}
        await append_event(conn, ZONE_EDITED, zone_id, data, actor, source, at)
        await conn.execute("SELECT pg_notify($1, 'changed')", CHANNEL)
    return ZoneWrite(zone_id, version, op, orjson.loads(body), at)


async def import_features(
    conn: asyncpg.Connection, features: list[ZoneFeature], actor: str, source: str
) -> list[ZoneWrite]:
    """Upsert valid features all or nothing; unchanged ones get no new version."""
    written: list[ZoneWrite] = []
    async with conn.transaction():
        for f in features:
            done = await write_zone(conn, f.zone_id, f, "upsert", actor, source)
            if done is not None:
                written.append(done)
    return written


async def import_zones(
    conn: asyncpg.Connection, doc: Any, actor: str = "cli", source: str = CLI_SOURCE
) -> tuple[int, list[str]]:
    """Validate and upsert a FeatureCollection; a changed feature gets a new version.
    Returns (zones written, errors); nothing is written when any feature is invalid."""
    features, errors = parse_zone_collection(doc)
    if errors:
        return 0, [f"feature {e.index} ({e.zone_id}): {e.reason}" for e in errors]
    return len(await import_features(conn, features, actor, source)), []


def vertex_count(feature: ZoneFeature) -> int:
    """Positions as drawn, each ring's closing one included."""
    g = feature.geometry
    polygons = [g.coordinates] if isinstance(g, PolygonGeometry) else g.coordinates
    return sum(len(ring) for rings in polygons for ring in rings)
