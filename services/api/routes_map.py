"""What the console draws: every live zone as one GeoJSON FeatureCollection, and every unit's
last fix. Served from memory, with ETags, so a console reloading them costs a 304."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Response

from services.api.auth import require
from services.api.context import ApiContext, Caller, Ctx, cached_json

router = APIRouter(prefix="/v1/map", tags=["map"])


def zones_collection(ctx: ApiContext) -> dict[str, Any]:
    features = []
    for zone_id, info in sorted(ctx.zones.items()):
        f = info.feature
        props = dict(f.get("properties") or {})
        props["zone_id"] = zone_id
        features.append({"type": "Feature", "id": zone_id, "properties": props,
                         "geometry": f["geometry"]})  # fmt: skip
    return {"type": "FeatureCollection", "features": features}


@router.get(
    "/zones",
    summary="Every live zone as a GeoJSON FeatureCollection (for maps)",
    responses={304: {"description": "unchanged since the ETag sent in If-None-Match"}},
)
async def map_zones(
    ctx: Ctx, caller: Caller, if_none_match: Annotated[str | None, Header()] = None
) -> Response:
    require(caller, "dispatcher", "auditor")
    return cached_json(orjson.dumps(zones_collection(ctx)), if_none_match)


@router.get(
    "/units",
    summary="Every unit's last fix and the zones it is in",
    responses={304: {"description": "unchanged since the ETag sent in If-None-Match"}},
)
async def map_units(
    ctx: Ctx, caller: Caller, if_none_match: Annotated[str | None, Header()] = None
) -> Response:
    require(caller, "dispatcher")
    units = [
        {"unit_id": unit, "lat": fix.lat, "lon": fix.lon, "ts": fix.ts,
         "zones": sorted(ctx.book.unit_zones.get(unit, {}))}
        for unit, fix in sorted(ctx.fixes.items())
    ]  # fmt: skip
    return cached_json(orjson.dumps({"units": units}), if_none_match)
