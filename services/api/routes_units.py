"""What an MDT polls: GET /v1/units/{unit_id}/status, small and cacheable (ETag -> 304).

The answer changes only when the unit's state does: times are given as of the zone status
(`since`, `as_of`) for the terminal to tick locally, and distances are rounded to 10 m."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, HTTPException, Response

from schemas.timefmt import parse_ts
from schemas.zone import ZoneFeature
from services.api.context import ApiContext, Caller, Ctx, allow_poll, cached_json
from services.api.core.nearby import Places, ZonePlace

router = APIRouter(prefix="/v1", tags=["units"])


def places(ctx: ApiContext) -> Places:
    # The very dict, not its id(): a reload replaces it, and a freed id can be reused.
    if ctx.places is None or ctx.places[0] is not ctx.zones:
        shapes = [ZonePlace(z, ZoneFeature.model_validate(i.feature).shape())
                  for z, i in ctx.zones.items()]  # fmt: skip
        ctx.places = (ctx.zones, Places(shapes))
    built: Places = ctx.places[1]
    return built


def unit_view(ctx: ApiContext, unit_id: str) -> dict[str, Any]:
    fix = ctx.fixes.get(unit_id)
    here = ctx.book.unit_zones.get(unit_id, {})
    zones = []
    for zone_id, since in sorted(here.items()):
        status = ctx.book.zones.get(zone_id)
        if status is None:
            continue
        info = ctx.zones.get(zone_id)
        as_of = status["as_of"]
        zones.append({
            "zone_id": zone_id,
            "name": info.name if info else None,
            "status": status["status"],
            "since": since,
            "as_of": as_of,
            "elapsed_s": max(0.0, (parse_ts(as_of) - parse_ts(since)) / 1000),
            "zone_elapsed_s": status["elapsed_s"],
            "remaining_s": status["remaining_s"],
            "target_s": status["target_s"],
        })  # fmt: skip
    nearest: list[dict[str, Any]] = []
    k = ctx.settings.nearest_due
    if fix is not None and k:
        due = {z for z, s in ctx.book.zones.items() if s["status"] == "due"}
        for zone_id, metres in places(ctx).nearest(fix.lon, fix.lat, k, due):
            info = ctx.zones.get(zone_id)
            nearest.append({"zone_id": zone_id, "name": info.name if info else None,
                            "distance_m": round(metres / 10) * 10})  # fmt: skip
    return {
        "unit_id": unit_id,
        "last_fix": None if fix is None else {"lat": fix.lat, "lon": fix.lon, "ts": fix.ts},
        "zones": zones,
        "nearest_due": nearest,
    }


@router.get(
    "/units/{unit_id}/status",
    summary="A unit's last fix, the zones it is in, and the nearest due zones",
    responses={304: {"description": "unchanged since the ETag sent in If-None-Match"}},
)
async def unit_status(
    unit_id: str,
    ctx: Ctx,
    caller: Caller,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    allow_poll(ctx, caller, "dispatcher", "mdt")
    if caller.role == "mdt" and caller.unit_id != unit_id:
        raise HTTPException(403, "an MDT key may only ask about its own unit")
    if unit_id not in ctx.fixes and unit_id not in ctx.book.unit_zones:
        raise HTTPException(404, f"no recent fix or presence for unit {unit_id!r}")
    return cached_json(orjson.dumps(unit_view(ctx, unit_id)), if_none_match)
