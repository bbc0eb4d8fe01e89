"""Per-zone live status, driven only by visit events and the stream clock.

Status is a function of time (a zone turns `met` fifteen minutes after it became occupied, and
`due` again `revisit_s` after its last dosed presence), so the board keeps one deadline per zone
and reports each change at the instant it happened, not when somebody next looked.

A zone with a schedule is `inactive` outside its windows, whatever else holds; its window edges
are deadlines too. Visits go on being counted there: only the live status is affected.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from services.dosage.core.params import DosageParams, ZoneRules
from services.dosage.core.periods import ShiftCalendar, ZonePeriod, merge_intervals, shift_period
from services.dosage.core.tracker import VisitEvent, VisitEventKind

_DAY_MS = 86_400_000


class ZoneStatusKind(StrEnum):
    ACTIVE = "active"
    MET = "met"
    OVERSTAY = "overstay"
    DUE = "due"
    SATISFIED = "satisfied"
    INACTIVE = "inactive"


@dataclass(slots=True)
class ZoneLive:
    zone_id: str
    rules: ZoneRules
    present: dict[str, int] = field(default_factory=dict)  # unit -> visit started_at
    occupied_since: int | None = None
    qualified: list[tuple[int, int]] = field(default_factory=list)  # recent visits, sorted
    last_dosed_end: int | None = None
    status: ZoneStatusKind = ZoneStatusKind.DUE
    generation: int = 0  # invalidates stale deadlines
    # "unit started_at" -> furthest stage seen: a redelivered event never moves a visit back.
    stages: dict[str, int] = field(default_factory=dict)
    # No ended visit in `stages` started before this (None: not known), so an end that prunes
    # nothing need not look at them all.
    ended_since: int | None = None


_STAGE = {
    VisitEventKind.STARTED: 0,
    VisitEventKind.TARGET_MET: 1,
    VisitEventKind.OVERSTAY: 2,
    VisitEventKind.ENDED: 3,
}


@dataclass(frozen=True, slots=True)
class ZoneSnapshot:
    """Everything a console or an MDT needs about one zone at one instant."""

    zone_id: str
    status: ZoneStatusKind
    as_of: int
    occupied_since: int | None
    elapsed_ms: int
    remaining_ms: int
    target_ms: int
    units_present: tuple[str, ...]
    present_since: tuple[int, ...]  # when each of units_present arrived (same order)
    last_dosed_end: int | None
    shift: ZonePeriod


@dataclass(frozen=True, slots=True)
class StatusChange:
    zone_id: str
    time: int
    previous: ZoneStatusKind
    status: ZoneStatusKind
    snapshot: ZoneSnapshot  # the zone as it stood at that instant


class ZoneBoard:
    def __init__(
        self, zones: Mapping[str, ZoneRules], params: DosageParams, calendar: ShiftCalendar
    ) -> None:
        self.params = params
        self.calendar = calendar
        self.clock: int | None = None
        self.zones: dict[str, ZoneLive] = {zid: ZoneLive(zid, r) for zid, r in zones.items()}
        self._revisit = params.revisit_ms
        self._deadlines: list[tuple[int, str, int]] = []
        # Zones whose state changed since the owner last saved it.
        self.dirty: set[str] = set()
        # Scheduled zones to judge once the board has a clock (see `rules_changed`).
        self._unjudged: set[str] = set()

    # -- input -------------------------------------------------------------------------------

    def apply(self, event: VisitEvent) -> list[StatusChange]:
        """One visit event; the clock first moves to its stream clock."""
        clock = max(event.time, event.clock)
        out = self.advance(clock) if self.clock is None or clock > self.clock else []
        zone = self.zones.get(event.zone_id)
        if zone is None:  # a zone this board does not own (or one deleted meanwhile)
            return out
        key = f"{event.unit_id} {event.started_at}"
        kind = event.kind
        stage = _STAGE[kind]
        if zone.stages.get(key, -1) >= stage:
            return out  # a repeat (at-least-once delivery upstream): already applied
        zone.stages[key] = stage
        zone.rules = event.rules
        if kind is VisitEventKind.STARTED:
            zone.present[event.unit_id] = event.started_at
            if zone.occupied_since is None or event.started_at < zone.occupied_since:
                zone.occupied_since = event.started_at
        elif kind is VisitEventKind.ENDED:
            zone.present.pop(event.unit_id, None)
            if not zone.present:
                zone.occupied_since = None
            if event.qualified:
                self._add_qualified(zone, event.started_at, event.last_in)
            horizon = event.last_in - 2 * _DAY_MS
            since = zone.ended_since
            if since is None or since < horizon or event.started_at < horizon:
                zone.stages = {
                    k: v
                    for k, v in zone.stages.items()
                    if v < stage or int(k.rsplit(" ", 1)[1]) >= horizon
                }
                zone.ended_since = min(
                    (int(k.rsplit(" ", 1)[1]) for k, v in zone.stages.items() if v >= stage),
                    default=None,
                )
            elif event.started_at < since:
                zone.ended_since = event.started_at
        self._refresh(zone, self._now(event.time), out)
        return out

    def advance(self, clock: int) -> list[StatusChange]:
        """Move the clock and report the time-driven changes up to it, each at its own instant."""
        out: list[StatusChange] = []
        if self.clock is not None and clock <= self.clock:
            return out
        while self._deadlines and self._deadlines[0][0] <= clock:
            at, zone_id, generation = heapq.heappop(self._deadlines)
            zone = self.zones.get(zone_id)
            if zone is not None and zone.generation == generation:
                self.clock = max(at, self.clock or at)
                self._refresh(zone, at, out)
        self.clock = clock
        if self._unjudged:
            for zone_id in sorted(self._unjudged):
                zone = self.zones.get(zone_id)
                if zone is not None:
                    self._refresh(zone, clock, out)
            self._unjudged.clear()
        return out

    def upsert_zone(self, zone_id: str, rules: ZoneRules) -> None:
        zone = self.zones.get(zone_id)
        if zone is None:
            self.zones[zone_id] = ZoneLive(zone_id, rules)
        else:
            zone.rules = rules

    def rules_changed(self, zone_id: str) -> list[StatusChange]:
        """For the board that owns the zone (its events come here), after `upsert_zone`.

        A zone with a schedule, or still `inactive` from one it no longer has, is judged now
        and gets its window edges as deadlines, visited or not. Other edits take effect at the
        zone's next event, as they always have."""
        out: list[StatusChange] = []
        zone = self.zones.get(zone_id)
        if zone is None or (
            zone.rules.schedule is None and zone.status is not ZoneStatusKind.INACTIVE
        ):
            return out
        if self.clock is None:
            self._unjudged.add(zone_id)  # judged at the first clock, never as of the epoch
        else:
            self._refresh(zone, self.clock, out)
        return out

    def remove_zone(self, zone_id: str) -> None:
        self.zones.pop(zone_id, None)
        self._unjudged.discard(zone_id)

    # -- output ------------------------------------------------------------------------------

    def snapshot(self, zone_id: str, at: int | None = None) -> ZoneSnapshot:
        zone = self.zones[zone_id]
        now = self._now(at)
        return self._snapshot(zone, now, self._status(zone, now))

    def _snapshot(self, zone: ZoneLive, now: int, status: ZoneStatusKind) -> ZoneSnapshot:
        zone_id = zone.zone_id
        rules = zone.rules
        present = zone.present
        elapsed = now - zone.occupied_since if zone.occupied_since is not None else 0
        start, end = self.calendar.shift_of(now)
        intervals = zone.qualified
        if present:  # ongoing visits count once they qualify
            ongoing = [(s, now) for s in present.values() if now - s >= rules.min_visit_ms]
            if ongoing:
                intervals = intervals + ongoing
        units = tuple(sorted(present))
        return ZoneSnapshot(
            zone_id=zone_id,
            status=status,
            as_of=now,
            occupied_since=zone.occupied_since,
            elapsed_ms=max(0, elapsed),
            remaining_ms=max(0, rules.target_ms - elapsed) if present else 0,
            target_ms=rules.target_ms,
            units_present=units,
            present_since=tuple(present[u] for u in units),
            last_dosed_end=zone.last_dosed_end,
            # Only this shift's row: zone_periods would total every shift the intervals touch.
            shift=shift_period(zone_id, intervals, rules.target_ms, start, end),
        )

    # -- rules -------------------------------------------------------------------------------

    def _status(self, zone: ZoneLive, now: int) -> ZoneStatusKind:
        schedule = zone.rules.schedule
        if schedule is not None and not schedule.is_active(now):
            return ZoneStatusKind.INACTIVE
        if zone.present and zone.occupied_since is not None:
            elapsed = now - zone.occupied_since
            if elapsed > zone.rules.max_visit_ms:
                return ZoneStatusKind.OVERSTAY
            if elapsed >= zone.rules.target_ms:
                return ZoneStatusKind.MET
            return ZoneStatusKind.ACTIVE
        if zone.last_dosed_end is None or now - zone.last_dosed_end > self._revisit:
            return ZoneStatusKind.DUE
        return ZoneStatusKind.SATISFIED

    def _next_change(self, zone: ZoneLive, now: int) -> int | None:
        schedule = zone.rules.schedule
        if schedule is None:
            return self._next_dosage_change(zone, now)
        edge = schedule.next_boundary(now)
        if not schedule.is_active(now):
            return edge  # inactive until then, whatever the visits do
        deadline = self._next_dosage_change(zone, now)
        return edge if deadline is None else min(edge, deadline)

    def _next_dosage_change(self, zone: ZoneLive, now: int) -> int | None:
        if zone.present and zone.occupied_since is not None:
            if now - zone.occupied_since < zone.rules.target_ms:
                return zone.occupied_since + zone.rules.target_ms
            if now - zone.occupied_since <= zone.rules.max_visit_ms:
                return zone.occupied_since + zone.rules.max_visit_ms + 1
            return None
        if zone.last_dosed_end is not None and now - zone.last_dosed_end <= self._revisit:
            return zone.last_dosed_end + self._revisit + 1
        return None

    def _refresh(self, zone: ZoneLive, now: int, out: list[StatusChange]) -> None:
        self.dirty.add(zone.zone_id)
        status = self._status(zone, now)
        if status is not zone.status:
            previous, zone.status = zone.status, status
            # As snapshot(zone_id, now) sees it: the status just found, unless the board's
            # clock is already past now.
            seen = self._now(now)
            seen_status = status if seen == now else self._status(zone, seen)
            snapshot = self._snapshot(zone, seen, seen_status)
            out.append(StatusChange(zone.zone_id, now, previous, status, snapshot))
        zone.generation += 1
        deadline = self._next_change(zone, now)
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, zone.zone_id, zone.generation))

    def _add_qualified(self, zone: ZoneLive, start: int, end: int) -> None:
        bisect.insort(zone.qualified, (start, end))
        for s, e in merge_intervals(zone.qualified):
            if e - s >= zone.rules.target_ms and (
                zone.last_dosed_end is None or e > zone.last_dosed_end
            ):
                zone.last_dosed_end = e
        # Keep what today's shift totals, late merges and repeats can still touch.
        horizon = end - 2 * _DAY_MS
        zone.qualified = [iv for iv in zone.qualified if iv[1] >= horizon]

    def _now(self, at: int | None) -> int:
        """Never before the board's clock: a lagging unit's event is applied as of now."""
        clock = self.clock if self.clock is not None else 0
        return clock if at is None else max(at, clock)

    # -- persistence (the dosage service saves this next to its consumer offsets) ------------

    def export_zone(self, zone_id: str) -> dict[str, Any]:
        z = self.zones[zone_id]
        # Copies: the owner writes this snapshot while the next batch changes the live zone.
        return {
            "present": dict(z.present),
            "occupied_since": z.occupied_since,
            "qualified": [list(iv) for iv in z.qualified],
            "last_dosed_end": z.last_dosed_end,
            "status": str(z.status),
            "stages": dict(z.stages),
        }

    def restore_zone(self, zone_id: str, data: dict[str, Any]) -> None:
        zone = self.zones.get(zone_id)
        if zone is None:
            return  # deleted since it was saved
        zone.present = dict(data["present"])
        zone.occupied_since = data["occupied_since"]
        zone.qualified = [(s, e) for s, e in data["qualified"]]
        zone.last_dosed_end = data["last_dosed_end"]
        zone.status = ZoneStatusKind(data["status"])
        zone.stages = dict(data.get("stages", {}))
        zone.ended_since = None
        if zone.rules.schedule is not None and self.clock is None:
            self._unjudged.add(zone_id)
            return
        deadline = self._next_change(zone, self._now(None))
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, zone_id, zone.generation))

    def export_meta(self) -> dict[str, Any]:
        return {"clock": self.clock}

    def restore_meta(self, data: dict[str, Any]) -> None:
        self.clock = data.get("clock")
