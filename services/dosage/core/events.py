"""Records and CloudEvents 1.0 (JSON structured mode) built from core results.

Event ids are derived from what the event says, so a redelivered or recomputed event carries
the same id and consumers can de-duplicate.
"""

from __future__ import annotations

import hashlib
from typing import Any

from schemas.timefmt import format_ts, parse_ts
from services.dosage.core.board import StatusChange, ZoneSnapshot
from services.dosage.core.params import ZoneRules
from services.dosage.core.periods import ZonePeriod
from services.dosage.core.tracker import VisitEvent, VisitEventKind
from services.dosage.core.visit import EndReason

SPEC_VERSION = "1.0"
VISIT_TYPES = {
    VisitEventKind.STARTED: "dosewatch.visit.started",
    VisitEventKind.TARGET_MET: "dosewatch.visit.target_met",
    VisitEventKind.OVERSTAY: "dosewatch.visit.overstay",
    VisitEventKind.ENDED: "dosewatch.visit.ended",
}
STATUS_CHANGED = "dosewatch.zone.status_changed"
ZONE_CHANGED = "dosewatch.zone.changed"


def event_id(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:32]


def seconds(ms: int) -> float:
    return ms / 1000.0


def visit_row(e: VisitEvent) -> dict[str, Any]:
    """A closed visit exactly as `visits.jsonl` and the `visit.ended` event data carry it."""
    return {
        "unit_id": e.unit_id,
        "zone_id": e.zone_id,
        "started_at": format_ts(e.started_at),
        "ended_at": format_ts(e.last_in),
        "duration_s": seconds(e.duration_ms),
        "end_reason": str(e.end_reason),
        "qualified": e.qualified,
        "target_met": e.target_met,
        "overstay": e.overstay,
    }


def period_row(p: ZonePeriod) -> dict[str, Any]:
    return {
        "zone_id": p.zone_id,
        "period_start": format_ts(p.period_start),
        "period_end": format_ts(p.period_end),
        "presence_s": seconds(p.presence_ms),
        "officer_s": seconds(p.officer_ms),
        "visits": p.visits,
        "dosed_visits": p.dosed_visits,
    }


def status_row(s: ZoneSnapshot) -> dict[str, Any]:
    return {
        "zone_id": s.zone_id,
        "status": str(s.status),
        "as_of": format_ts(s.as_of),
        "occupied_since": None if s.occupied_since is None else format_ts(s.occupied_since),
        "elapsed_s": seconds(s.elapsed_ms),
        "remaining_s": seconds(s.remaining_ms),
        "target_s": seconds(s.target_ms),
        "units_present": list(s.units_present),
        "units": [
            {"unit_id": u, "since": format_ts(t)}
            for u, t in zip(s.units_present, s.present_since, strict=True)
        ],
        "last_dosed_end": None if s.last_dosed_end is None else format_ts(s.last_dosed_end),
        "shift": period_row(s.shift),
    }


def visit_cloudevent(e: VisitEvent, source: str) -> dict[str, Any]:
    if e.kind is VisitEventKind.ENDED:
        data = visit_row(e)
    else:
        data = {
            "unit_id": e.unit_id,
            "zone_id": e.zone_id,
            "started_at": format_ts(e.started_at),
            "last_in": format_ts(e.last_in),
            "duration_s": seconds(e.duration_ms),
            "target_s": seconds(e.rules.target_ms),
            "max_visit_s": seconds(e.rules.max_visit_ms),
        }
    kind = VISIT_TYPES[e.kind]
    doc = envelope(
        kind, event_id(kind, e.unit_id, e.zone_id, e.started_at), source, e.time, e.zone_id, data
    )
    doc["streamclock"] = format_ts(e.clock)  # CloudEvents extension: downstream clocks follow
    return doc


_KIND_OF_TYPE = {v: k for k, v in VISIT_TYPES.items()}


def visit_event_from_cloudevent(doc: dict[str, Any], rules: ZoneRules) -> VisitEvent:
    """The inverse of `visit_cloudevent`, for the dosage service's input."""
    data = doc["data"]
    kind = _KIND_OF_TYPE[doc["type"]]
    last_in = data["ended_at"] if kind is VisitEventKind.ENDED else data["last_in"]
    return VisitEvent(
        kind=kind,
        time=parse_ts(doc["time"]),
        unit_id=data["unit_id"],
        zone_id=data["zone_id"],
        started_at=parse_ts(data["started_at"]),
        last_in=parse_ts(last_in),
        rules=rules,
        end_reason=EndReason(data["end_reason"]) if kind is VisitEventKind.ENDED else None,
        clock=parse_ts(doc.get("streamclock", doc["time"])),
    )


def status_cloudevent(change: StatusChange, source: str) -> dict[str, Any]:
    data = status_row(change.snapshot) | {"previous_status": str(change.previous)}
    eid = event_id(STATUS_CHANGED, change.zone_id, change.time, change.previous, change.status)
    return envelope(STATUS_CHANGED, eid, source, change.time, change.zone_id, data)


def zone_changed_cloudevent(
    zone_id: str,
    version: int,
    change: str,
    rules: ZoneRules | None,
    at: int,
    source: str,
    schedule: list[Any] | None = None,
) -> dict[str, Any]:
    """A zone edit (`created`, `updated` or `deleted`), with the rules now in force. The
    schedule goes as drawn (the zone property): the dosage service reads it in its timezone."""
    data: dict[str, Any] = {"zone_id": zone_id, "version": version, "change": change}
    if rules is not None:
        data |= {
            "target_s": seconds(rules.target_ms),
            "min_visit_s": seconds(rules.min_visit_ms),
            "max_visit_s": seconds(rules.max_visit_ms),
        }
    if schedule is not None:
        data["schedule"] = schedule
    eid = event_id(ZONE_CHANGED, zone_id, version, change)
    return envelope(ZONE_CHANGED, eid, source, at, zone_id, data)


def envelope(
    kind: str, eid: str, source: str, at: int, subject: str, data: dict[str, Any]
) -> dict[str, Any]:
    return {
        "specversion": SPEC_VERSION,
        "id": eid,
        "source": source,
        "type": kind,
        "time": format_ts(at),
        "subject": subject,
        "datacontenttype": "application/json",
        "data": data,
    }
