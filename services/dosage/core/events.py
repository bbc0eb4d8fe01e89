"""Records and CloudEvents 1.0 (JSON structured mode) built from core results.

Event ids are derived from what the event says, so a redelivered or recomputed event carries
the same id and consumers can de-duplicate.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from typing import Any

from schemas.timefmt import format_ts, parse_ts
from services.dosage.core.board import StatusChange, ZoneSnapshot
from services.dosage.core.eventtext import EventWriter
from services.dosage.core.params import ZoneRules
from services.dosage.core.periods import ZonePeriod
from services.dosage.core.tracker import (
    END_REASONS,
    EVENT_KINDS,
    EventRows,
    VisitEvent,
    VisitEventKind,
)
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
    return _digest("\x1f".join(str(p) for p in parts))


def _digest(text: str) -> str:
    # The hot paths below join their parts in an f-string (the same text: str() is format()
    # for str, int and StrEnum) and come here directly.
    hexdigest: str = _sha256(text.encode()).hexdigest()
    return hexdigest[:32]


def _builtin_sha256() -> Callable[[bytes], Any]:
    """CPython's own SHA-256 where it has one: the same digest as OpenSSL's, without an
    OpenSSL context to set up per call, which is most of the cost for an id's few bytes
    (0.54 against 1.24 us here)."""
    for module in ("_sha2", "_sha256"):  # 3.12 and later, 3.11
        try:
            return importlib.import_module(module).sha256  # type: ignore[no-any-return]
        except (ImportError, AttributeError):
            continue
    return hashlib.sha256


_sha256 = _builtin_sha256()


def seconds(ms: int) -> float:
    return ms / 1000.0


class _Stamps(dict[int, str]):
    """format_ts by instant: a visit's start, a stream clock or a shift edge is written again
    and again, and a hit is a plain dict lookup. Bounded: cleared when full."""

    def __missing__(self, ms: int) -> str:
        if len(self) >= 65_536:
            self.clear()
        text = self[ms] = format_ts(ms)
        return text


_STAMPS = _Stamps()
_stamp = _STAMPS.__getitem__


def visit_row(e: VisitEvent) -> dict[str, Any]:
    """A closed visit exactly as `visits.jsonl` and the `visit.ended` event data carry it."""
    # The VisitEvent properties, computed once here.
    duration = e.last_in - e.started_at
    rules = e.rules
    return {
        "unit_id": e.unit_id,
        "zone_id": e.zone_id,
        "started_at": _stamp(e.started_at),
        "ended_at": _stamp(e.last_in),
        "duration_s": duration / 1000.0,
        "end_reason": str(e.end_reason),
        "qualified": duration >= rules.min_visit_ms,
        "target_met": duration >= rules.target_ms,
        "overstay": duration > rules.max_visit_ms,
    }


def period_row(p: ZonePeriod) -> dict[str, Any]:
    return {
        "zone_id": p.zone_id,
        "period_start": _stamp(p.period_start),
        "period_end": _stamp(p.period_end),
        "presence_s": p.presence_ms / 1000.0,
        "officer_s": p.officer_ms / 1000.0,
        "visits": p.visits,
        "dosed_visits": p.dosed_visits,
    }


def status_row(s: ZoneSnapshot) -> dict[str, Any]:
    occupied, dosed = s.occupied_since, s.last_dosed_end
    return {
        "zone_id": s.zone_id,
        "status": str(s.status),
        "as_of": _stamp(s.as_of),
        "occupied_since": None if occupied is None else _stamp(occupied),
        "elapsed_s": s.elapsed_ms / 1000.0,
        "remaining_s": s.remaining_ms / 1000.0,
        "target_s": s.target_ms / 1000.0,
        "units_present": list(s.units_present),
        "units": [
            {"unit_id": u, "since": _stamp(t)}
            for u, t in zip(s.units_present, s.present_since, strict=True)
        ],
        "last_dosed_end": None if dosed is None else _stamp(dosed),
        "shift": period_row(s.shift),
    }


def visit_cloudevent(e: VisitEvent, source: str) -> dict[str, Any]:
    kind = VISIT_TYPES[e.kind]
    if e.kind is VisitEventKind.ENDED:
        data = visit_row(e)
    else:
        rules = e.rules
        data = {
            "unit_id": e.unit_id,
            "zone_id": e.zone_id,
            "started_at": _stamp(e.started_at),
            "last_in": _stamp(e.last_in),
            "duration_s": (e.last_in - e.started_at) / 1000.0,
            "target_s": rules.target_ms / 1000.0,
            "max_visit_s": rules.max_visit_ms / 1000.0,
        }
    # `envelope`, spelled out: this runs for every visit event of a replay.
    return {
        "specversion": SPEC_VERSION,
        "id": _digest(f"{kind}\x1f{e.unit_id}\x1f{e.zone_id}\x1f{e.started_at}"),
        "source": source,
        "type": kind,
        "time": _stamp(e.time),
        "subject": e.zone_id,
        "datacontenttype": "application/json",
        "data": data,
        "streamclock": _stamp(e.clock),  # CloudEvents extension: downstream clocks follow
    }


def visit_records(batch: EventRows, source: str) -> list[tuple[bytes, bytes]]:
    """`visit_cloudevent` for a batch of event rows, as the visits topic carries them: keyed
    by zone, the JSON orjson makes of the event (the same bytes, tested).

    Written by compiled code (`eventtext.EventWriter`), without an event, a dict or a string
    per row: on the geofence service's hot path a `VisitEvent`, its dict and its
    `orjson.dumps` cost about 6 us an event, an f-string per event 3-4 us."""
    values, keys, _data = _written(batch, source, lines=False)
    return list(zip(keys, values, strict=True))


def visit_lines(batch: EventRows, source: str) -> list[tuple[bytes, bytes | None]]:
    """Each event as a JSON line (`visit_records`' value and a newline) and, for an ended
    visit, its `visit_row` as one: what a replay writes to events.jsonl and visits.jsonl."""
    values, _keys, data = _written(batch, source, lines=True)
    return list(zip(values, data, strict=True))


_WRITER = EventWriter(
    tuple(VISIT_TYPES[k] for k in EVENT_KINDS),
    EVENT_KINDS.index(VisitEventKind.ENDED),
    tuple(f',"end_reason":"{r}"' for r in END_REASONS),  # as str() writes None
)


def _written(
    batch: EventRows, source: str, lines: bool
) -> tuple[list[bytes], list[bytes], list[bytes | None]]:
    return _WRITER.write(batch.rows, batch.unit_ids, batch.zone_ids, batch.rules, source, lines)


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


def status_cloudevent(
    change: StatusChange, source: str, row: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The change as an event: its status row (`row`, when the caller built it already) plus
    previous_status."""
    data = {**(status_row(change.snapshot) if row is None else row),
            "previous_status": str(change.previous)}  # fmt: skip
    zone_id, at = change.zone_id, change.time
    eid = _digest(f"{STATUS_CHANGED}\x1f{zone_id}\x1f{at}\x1f{change.previous}\x1f{change.status}")
    return envelope(STATUS_CHANGED, eid, source, at, zone_id, data)


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
        "time": _stamp(at),
        "subject": subject,
        "datacontenttype": "application/json",
        "data": data,
    }
