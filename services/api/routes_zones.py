"""Zone management: list, read, create, update, delete, import, and each zone's history.

Every write is one transaction (zones row, zone_versions row, audit event, NOTIFY), so the
geofence and every API replica pick it up live. Reads are open to every role; writes to admins.
Versions double as ETags: `If-Match: <version>` makes an update or delete conditional."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Body, Depends, Header, HTTPException, Path, Query, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.timefmt import datetime_to_ms, format_ts
from schemas.zone import (
    ZONE_ID_PATTERN,
    MultiPolygonGeometry,
    PolygonGeometry,
    ZoneError,
    ZoneFeature,
    ZoneProperties,
    check_visit_limits,
    parse_zone_collection,
)
from services.api.auth import Principal, require
from services.api.context import ApiContext, Caller, Ctx
from services.common import zonestore
from services.common.zonestore import (
    VersionMismatch,
    ZoneNotFound,
    ZoneStoreError,
    ZoneWrite,
)

router = APIRouter(prefix="/v1", tags=["zones"])

DEFAULT_PAGE = 100
MAX_OFFSET = 2**31 - 1
# Paths of their own under /v1/zones: a zone by these names could not be read back.
RESERVED_IDS = frozenset({"status", "import"})


async def admin(caller: Caller) -> Principal:
    # A dependency, so a refused role gets 403 before any 422 about its body.
    require(caller, "admin")
    return caller


async def reader(caller: Caller) -> Principal:
    require(caller, "dispatcher", "mdt", "auditor")
    return caller


Admin = Annotated[Principal, Depends(admin)]
Reader = Annotated[Principal, Depends(reader)]
ZoneId = Annotated[str, Path(pattern=ZONE_ID_PATTERN, description="the zone's id")]
Limit = Annotated[int | None, Query(ge=1, description="at most the server's max_page")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET)]
IfMatch = Annotated[
    str | None,
    Header(description="the version (ETag) the change is based on; another one gives 412"),
]


# -- wire models ---------------------------------------------------------------------------------


class ZoneBody(BaseModel):
    """A GeoJSON Feature as in schemas/json/zone.schema.json. On PUT the id may be left out:
    the path names the zone."""

    model_config = ConfigDict(extra="allow")
    type: Literal["Feature"]
    id: str | int | None = None
    properties: ZoneProperties = Field(default_factory=ZoneProperties)
    geometry: Annotated[PolygonGeometry | MultiPolygonGeometry, Field(discriminator="type")]


class ZoneCollection(BaseModel):
    type: Literal["FeatureCollection"]
    features: list[dict[str, Any]] = Field(description="GeoJSON Features, as for POST /v1/zones")


class ZoneOut(BaseModel):
    zone_id: str
    version: int
    updated_at: str = Field(description="RFC 3339 UTC")
    feature: dict[str, Any] = Field(description="the GeoJSON Feature as stored")


class ZonePage(BaseModel):
    zones: list[ZoneOut]
    total: int
    limit: int
    offset: int


class ZoneVersion(BaseModel):
    version: int
    op: Literal["create", "update", "delete"]
    changed_by: str = Field(description="the key id or JWT subject that made the change")
    changed_at: str = Field(description="RFC 3339 UTC")
    feature: dict[str, Any] = Field(description="the zone as of this version (deleted: the last)")


class ZoneHistory(BaseModel):
    zone_id: str
    versions: list[ZoneVersion]
    total: int
    limit: int
    offset: int


class ZoneWritten(BaseModel):
    zone_id: str
    version: int
    op: Literal["create", "update", "delete"]


class ImportResult(BaseModel):
    written: list[ZoneWritten]
    unchanged: int = Field(description="features already exactly so: no new version")


class ImportRefused(BaseModel):
    detail: str
    errors: list[ZoneError]


class Problem(BaseModel):
    detail: str


# -- checks beyond the wire contract -------------------------------------------------------------


def problems(ctx: ApiContext, feature: ZoneFeature) -> list[str]:
    """What this API refuses although the schema allows it."""
    out = []
    limit = ctx.settings.max_zone_vertices
    n = zonestore.vertex_count(feature)
    if n > limit:
        out.append(f"geometry: the zone has {n} vertices; at most {limit} are allowed")
    if feature.zone_id in RESERVED_IDS:
        out.append(f"zone id {feature.zone_id!r} is reserved by the API")
    p, d = feature.properties, ctx.settings.dosage
    try:
        check_visit_limits(
            d.min_visit_s if p.min_visit_s is None else p.min_visit_s,
            d.target_s if p.target_s is None else p.target_s,
            d.max_visit_s if p.max_visit_s is None else p.max_visit_s,
        )
    except ValueError as exc:
        out.append(f"properties: with the agency defaults for what is left out, {exc}")
    try:
        text = feature.model_dump_json()
    except ValueError:  # lone surrogates: JSON escapes allow them, UTF-8 does not
        out.append("text must be valid Unicode (no lone surrogates)")
    else:
        if "\\u0000" in text:  # PostgreSQL's jsonb cannot hold it
            out.append("text must not contain NUL (\\u0000)")
    return out


def validated(ctx: ApiContext, body: ZoneBody, zone_id: str | None = None) -> ZoneFeature:
    """The body as a ZoneFeature (rings, validity, id), or 422 in the app's error shape."""
    doc = body.model_dump(exclude_none=True, by_alias=True)
    if zone_id is not None:
        given = {str(doc["id"])} if "id" in doc else set()
        given |= {doc["properties"]["zone_id"]} if "zone_id" in doc["properties"] else set()
        if given - {zone_id}:
            raise HTTPException(422, f"the body names zone {sorted(given)[0]!r}, the path "
                                f"{zone_id!r}: leave the id out or make them agree")  # fmt: skip
        doc["id"] = zone_id
    try:
        feature = ZoneFeature.model_validate(doc)
    except ValidationError as exc:
        errors = [dict(e, loc=("body", *e["loc"])) for e in exc.errors()]
        raise RequestValidationError(errors) from None
    found = problems(ctx, feature)
    if found:
        raise HTTPException(422, "; ".join(found))
    return feature


def expected_version(if_match: str | None) -> int | None:
    """`If-Match: 3`, `"3"` or `W/"3"` -> 3; `*` -> None (any); anything else can match no
    version: -1, so the write gets 412."""
    if if_match is None or if_match.strip() == "*":
        return None
    tag = if_match.strip().removeprefix("W/").strip('"')
    return int(tag) if tag.isascii() and tag.isdigit() and len(tag) < 10 else -1


def refused(exc: ZoneStoreError) -> HTTPException:
    status = 409
    if isinstance(exc, ZoneNotFound):
        status = 404
    elif isinstance(exc, VersionMismatch):
        status = 412
    return HTTPException(status, exc.detail)


def _zone_out(zone_id: str, version: int, updated_at: datetime, feature: str) -> ZoneOut:
    return ZoneOut(zone_id=zone_id, version=version,
                   updated_at=format_ts(datetime_to_ms(updated_at)),
                   feature=orjson.loads(feature))  # fmt: skip


def _written(w: ZoneWrite) -> ZoneWritten:
    return ZoneWritten(zone_id=w.zone_id, version=w.version, op=w.op)


async def _current(ctx: ApiContext, zone_id: str) -> ZoneOut:
    async with ctx.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT version, deleted, updated_at, feature::text AS feature FROM zones "
            "WHERE zone_id = $1",
            zone_id,
        )
    if row is None:
        raise HTTPException(404, f"no zone {zone_id!r}")
    if row["deleted"]:
        raise HTTPException(404, f"zone {zone_id!r} was deleted (version {row['version']}); "
                            f"its history is at /v1/zones/{zone_id}/versions")  # fmt: skip
    return _zone_out(zone_id, row["version"], row["updated_at"], row["feature"])


def _etag(response: Response, version: int) -> None:
    response.headers["ETag"] = f'"{version}"'


# -- reads ---------------------------------------------------------------------------------------

_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "no such zone (or deleted)"},
}


@router.get("/zones", summary="Zones, by id", response_model=ZonePage)
async def list_zones(ctx: Ctx, _: Reader, limit: Limit = None, offset: Offset = 0) -> ZonePage:
    n = min(limit or DEFAULT_PAGE, ctx.settings.max_page)
    async with ctx.pool.acquire() as conn:
        total = await conn.fetchval("SELECT count(*) FROM zones WHERE NOT deleted")
        rows = await conn.fetch(
            "SELECT zone_id, version, updated_at, feature::text AS feature FROM zones "
            "WHERE NOT deleted ORDER BY zone_id LIMIT $1 OFFSET $2",
            n, offset,
        )  # fmt: skip
    zones = [_zone_out(r["zone_id"], r["version"], r["updated_at"], r["feature"]) for r in rows]
    return ZonePage(zones=zones, total=total, limit=n, offset=offset)


@router.get("/zones/{zone_id}", summary="One zone and its version", response_model=ZoneOut,
            responses=_ERRORS)  # fmt: skip
async def get_zone(zone_id: ZoneId, ctx: Ctx, _: Reader, response: Response) -> ZoneOut:
    zone = await _current(ctx, zone_id)
    _etag(response, zone.version)
    return zone


@router.get("/zones/{zone_id}/versions", summary="Every version of a zone, oldest first",
            response_model=ZoneHistory, responses=_ERRORS)  # fmt: skip
async def zone_versions(
    zone_id: ZoneId, ctx: Ctx, _: Reader, limit: Limit = None, offset: Offset = 0
) -> ZoneHistory:
    n = min(limit or DEFAULT_PAGE, ctx.settings.max_page)
    async with ctx.pool.acquire() as conn:
        total = await conn.fetchval("SELECT count(*) FROM zone_versions WHERE zone_id = $1",
                                    zone_id)  # fmt: skip
        rows = await conn.fetch(
            "SELECT version, op, changed_by, changed_at, feature::text AS feature "
            "FROM zone_versions WHERE zone_id = $1 ORDER BY version LIMIT $2 OFFSET $3",
            zone_id, n, offset,
        )  # fmt: skip
    if not total:
        raise HTTPException(404, f"no history for zone {zone_id!r}")
    versions = [
        ZoneVersion(
            version=r["version"],
            op=r["op"],
            changed_by=r["changed_by"],
            changed_at=format_ts(datetime_to_ms(r["changed_at"])),
            feature=orjson.loads(r["feature"]),
        )
        for r in rows
    ]
    return ZoneHistory(zone_id=zone_id, versions=versions, total=total, limit=n, offset=offset)


# -- writes --------------------------------------------------------------------------------------

_STALE: dict[int | str, dict[str, Any]] = {
    412: {"model": Problem, "description": "If-Match names another version"}
}


def _stored(done: ZoneWrite) -> ZoneOut:
    return ZoneOut(zone_id=done.zone_id, version=done.version, updated_at=format_ts(done.at_ms),
                   feature=done.feature)  # fmt: skip


@router.post(
    "/zones",
    summary="Create a zone",
    status_code=201,
    response_model=ZoneOut,
    responses={409: {"model": Problem, "description": "a zone with this id exists"}},
)
async def create_zone(ctx: Ctx, caller: Admin, body: ZoneBody, response: Response) -> ZoneOut:
    feature = validated(ctx, body)
    async with ctx.pool.acquire() as conn:
        try:
            done = await zonestore.write_zone(
                conn, feature.zone_id, feature, "create", caller.subject, ctx.settings.source
            )
        except ZoneStoreError as exc:
            raise refused(exc) from None
    assert done is not None  # a create always writes
    _etag(response, done.version)
    response.headers["Location"] = f"/v1/zones/{done.zone_id}"
    return _stored(done)


@router.put(
    "/zones/{zone_id}",
    summary="Replace a zone (a new version)",
    response_model=ZoneOut,
    responses={**_ERRORS, **_STALE},
)
async def update_zone(
    zone_id: ZoneId,
    ctx: Ctx,
    caller: Admin,
    body: ZoneBody,
    response: Response,
    if_match: IfMatch = None,
) -> ZoneOut:
    feature = validated(ctx, body, zone_id)
    version = expected_version(if_match)
    async with ctx.pool.acquire() as conn:
        try:
            done = await zonestore.write_zone(
                conn, zone_id, feature, "update", caller.subject, ctx.settings.source, version
            )
        except ZoneStoreError as exc:
            raise refused(exc) from None
    # None: the zone was exactly this already, so it keeps its version
    zone = _stored(done) if done is not None else await _current(ctx, zone_id)
    _etag(response, zone.version)
    return zone


@router.delete(
    "/zones/{zone_id}",
    summary="Delete a zone (its history stays)",
    response_model=ZoneWritten,
    responses={**_ERRORS, **_STALE},
)
async def delete_zone(
    zone_id: ZoneId, ctx: Ctx, caller: Admin, if_match: IfMatch = None
) -> ZoneWritten:
    version = expected_version(if_match)
    async with ctx.pool.acquire() as conn:
        try:
            done = await zonestore.write_zone(
                conn, zone_id, None, "delete", caller.subject, ctx.settings.source, version
            )
        except ZoneStoreError as exc:
            raise refused(exc) from None
    assert done is not None  # a delete always writes
    return _written(done)


@router.post(
    "/zones/import",
    summary="Create or update many zones from a FeatureCollection, all or nothing",
    response_model=ImportResult,
    responses={422: {"model": ImportRefused, "description": "the features refused, and why"}},
)
async def import_zones(
    ctx: Ctx,
    caller: Admin,
    doc: Annotated[ZoneCollection, Body(description="a GeoJSON FeatureCollection")],
) -> Any:
    features, errors = parse_zone_collection(doc.model_dump())
    # Valid features come back in order, skipping the refused ones: their indices follow.
    refused_at = {e.index for e in errors}
    kept = [i for i in range(len(doc.features)) if i not in refused_at]
    for index, f in zip(kept, features, strict=True):
        found = problems(ctx, f)
        if found:
            errors.append(ZoneError(index=index, zone_id=f.zone_id, reason="; ".join(found)))
    if errors:
        errors.sort(key=lambda e: e.index)
        refusal = ImportRefused(
            detail=f"{len(errors)} of {len(doc.features)} features refused; nothing was written",
            errors=errors,
        )
        return Response(refusal.model_dump_json(), 422, media_type="application/json")
    async with ctx.pool.acquire() as conn:
        try:
            written = await zonestore.import_features(
                conn, features, caller.subject, ctx.settings.source
            )
        except ZoneStoreError as exc:
            raise refused(exc) from None
    return ImportResult(
        written=[_written(w) for w in written], unchanged=len(features) - len(written)
    )
