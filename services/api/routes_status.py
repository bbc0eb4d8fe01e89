"""Zone status for consoles and MDTs: GET /v1/zones/status and /v1/zones/{zone_id}/status."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query

from services.api.auth import Principal
from services.api.context import ApiContext, Caller, Ctx, ZoneInfo, allow_poll

router = APIRouter(prefix="/v1", tags=["status"])

STATUSES = ("active", "met", "overstay", "due", "satisfied", "inactive")


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    try:
        parts = [float(p) for p in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 4:
        raise HTTPException(422, "bbox must be 'min_lon,min_lat,max_lon,max_lat' (4 numbers)")
    w, s, e, n = parts
    if not (-180 <= w <= e <= 180 and -90 <= s <= n <= 90):
        raise HTTPException(422, "bbox must have min <= max, within WGS84 bounds")
    return w, s, e, n


def status_filter(
    ctx: ApiContext,
    statuses: list[str] | None,
    bbox: tuple[float, float, float, float] | None,
    district: str | None,
) -> Any:
    """A predicate over (zone_id, status) for the given filters (None: no filtering)."""
    wanted = set(statuses or ())
    bad = wanted - set(STATUSES)
    if bad:
        raise HTTPException(422, f"unknown status {sorted(bad)}; use one of {', '.join(STATUSES)}")

    def keep(zone_id: str, status: dict[str, Any]) -> bool:
        if wanted and status.get("status") not in wanted:
            return False
        if bbox is None and district is None:
            return True
        info: ZoneInfo | None = ctx.zones.get(zone_id)
        if info is None:
            return False
        if district is not None and info.district != district:
            return False
        if bbox is not None:
            w, s, e, n = bbox
            zw, zs, ze, zn = info.bbox
            if ze < w or zw > e or zn < s or zs > n:
                return False
        return True

    return keep


@router.get("/zones/status", summary="Current status of every zone, filtered")
async def list_status(
    ctx: Ctx,
    caller: Caller,
    status: Annotated[list[str] | None, Query(description="repeatable: due, active, …")] = None,
    bbox: Annotated[str | None, Query(description="min_lon,min_lat,max_lon,max_lat")] = None,
    district: Annotated[str | None, Query(max_length=200)] = None,
) -> dict[str, Any]:
    allow_poll(ctx, caller, "dispatcher", "mdt", "auditor")
    keep = status_filter(ctx, status, parse_bbox(bbox) if bbox else None, district)
    snap = ctx.book.snapshot(keep)
    # With the epoch, a websocket can resume from this listing (?since=<epoch>:<seq>).
    return {"epoch": ctx.book.epoch, "seq": snap.seq,
            "zones": [seen_by(caller, s) for s in snap.statuses]}  # fmt: skip


@router.get("/zones/{zone_id}/status", summary="Current status of one zone")
async def zone_status(zone_id: str, ctx: Ctx, caller: Caller) -> dict[str, Any]:
    allow_poll(ctx, caller, "dispatcher", "mdt", "auditor")
    status = ctx.book.zones.get(zone_id)
    if status is None:
        if zone_id in ctx.zones:
            raise HTTPException(404, f"zone {zone_id!r} has no status yet")
        raise HTTPException(404, f"no zone {zone_id!r}")
    return seen_by(caller, status)


def seen_by(caller: Principal, status: dict[str, Any]) -> dict[str, Any]:
    """An MDT sees whether a zone is occupied, not which other units are where."""
    if caller.role != "mdt":
        return status
    own = [u for u in status.get("units", []) if u["unit_id"] == caller.unit_id]
    return status | {
        "units": own,
        "units_present": [u["unit_id"] for u in own],
        "units_count": len(status.get("units", [])),
    }
