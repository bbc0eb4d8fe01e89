"""The visit rules as they were written before they were compiled: one Python object per
unit and per visit, each usable ping through a Python `observe`. Kept as the oracle that
`tests/test_properties.py` and `tests/test_tracker_tables.py` hold the compiled tracker
(services/dosage/core/tables.py) to, event for event, count for count and saved unit for
saved unit. Only what they call is kept: pings in, end of input, and the saved form; the
watchdog at a live clock, zone changes and restores are the rule tables' to test.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from services.dosage.core.params import DosageParams, ZoneRules
from services.dosage.core.tracker import (
    Fix,
    TrackerStats,
    UnitState,
    VisitEvent,
    VisitEventKind,
    fix_columns,
)
from services.dosage.core.visit import (
    EndReason,
    IllegalTransition,
    Moment,
    Visit,
    VisitState,
    Where,
)
from services.geofence.core.index import ZoneIndex

_WHERE = {True: Where.INSIDE, False: Where.NEAR, None: Where.OUTSIDE}
_MOMENT_KIND = {
    Moment.TARGET_MET: VisitEventKind.TARGET_MET,
    Moment.OVERSTAY: VisitEventKind.OVERSTAY,
    Moment.ENDED: VisitEventKind.ENDED,
}


# (state, where) -> state, as visit.py's table says.
_TRANSITIONS: dict[tuple[VisitState, Where], VisitState] = {
    (VisitState.OPEN, Where.INSIDE): VisitState.OPEN,
    (VisitState.OPEN, Where.NEAR): VisitState.OPEN,
    (VisitState.OPEN, Where.OUTSIDE): VisitState.EXIT_PENDING,
    (VisitState.EXIT_PENDING, Where.INSIDE): VisitState.OPEN,
    (VisitState.EXIT_PENDING, Where.NEAR): VisitState.OPEN,
    (VisitState.EXIT_PENDING, Where.OUTSIDE): VisitState.EXIT_PENDING,
}


def _observe(
    visit: Visit, where: Where, ts: int, rules: ZoneRules, exit_confirm_ms: int
) -> list[Moment]:
    """`Visit.observe` as written in Python before `visit.step` compiled it."""
    if visit.state is VisitState.CLOSED:
        raise IllegalTransition(f"visit {visit.unit_id}/{visit.zone_id} is closed")
    if ts <= visit.last_seen:
        raise IllegalTransition(f"ping at {ts} is not after the visit's previous ping")
    state = visit.state = _TRANSITIONS[(visit.state, where)]
    visit.last_seen = ts
    if state is VisitState.OPEN:
        visit.last_in = ts
        visit.out_since = None
        moments: list[Moment] = []
        duration = ts - visit.started_at
        if not visit.target_reported and duration >= rules.target_ms:
            visit.target_reported = True
            moments.append(Moment.TARGET_MET)
        if not visit.overstay_reported and duration > rules.max_visit_ms:
            visit.overstay_reported = True
            moments.append(Moment.OVERSTAY)
        return moments
    if visit.out_since is None:
        visit.out_since = ts
    if ts - visit.out_since >= exit_confirm_ms:
        visit.close(EndReason.EXITED)
        return [Moment.ENDED]
    return []


class ReferenceTracker:
    def __init__(self, index: ZoneIndex, params: DosageParams) -> None:
        self.index = index
        self.params = params
        self.clock: int | None = None
        self.units: dict[str, UnitState] = {}
        self.stats = TrackerStats()
        self._max_gap = params.max_gap_ms
        self._confirm = params.exit_confirm_ms
        self._max_accuracy = params.max_accuracy_m
        # (ts, unit): each unit with open visits has one entry at or before its last usable ping;
        # an entry found behind that ping moves up to it when it comes out (not on every ping).
        self._watch: list[tuple[int, str]] = []
        self._watched: set[str] = set()
        # Units whose state changed since the owner last saved it (live services persist these).
        self.dirty: set[str] = set()

    # -- input -------------------------------------------------------------------------------

    def process(self, fixes: Sequence[Fix]) -> list[VisitEvent]:
        return self.process_columns(*fix_columns(fixes))

    def process_columns(
        self,
        unit_ids: Sequence[str],
        ts: Sequence[int],
        lon: Sequence[float],
        lat: Sequence[float],
        accuracy_m: Sequence[float | None],
    ) -> list[VisitEvent]:
        out: list[VisitEvent] = []
        n = len(unit_ids)
        if n == 0:
            return out
        hits = self.index.classify(np.array(lon, dtype=np.float64), np.array(lat, dtype=np.float64))
        # Ping i's hits are hit_*[first[i] : first[i + 1]].
        first = np.searchsorted(hits.point, np.arange(n + 1)).tolist()
        hit_zone = hits.zone.tolist()
        hit_inside = hits.inside.tolist()
        zone_ids = self.index.zone_ids
        nowhere: dict[str, bool] = {}
        units = self.units
        mark_dirty = self.dirty.add
        watch = self._watch
        max_gap, max_accuracy = self._max_gap, self._max_accuracy
        usable = low_accuracy = duplicate = late = i = 0  # counted here, added up at the end
        try:
            for i in range(n):
                unit_id, t, acc = unit_ids[i], ts[i], accuracy_m[i]
                clock = self.clock
                if clock is None or t > clock:
                    self.clock = t
                    if watch and watch[0][0] < t - max_gap:
                        self._watchdog(out, t)
                unit = units.get(unit_id)
                if unit is None:
                    unit = units[unit_id] = UnitState()
                mark_dirty(unit_id)
                if unit.seen_ts is None or t >= unit.seen_ts:
                    unit.seen_ts, unit.seen_lon, unit.seen_lat = t, lon[i], lat[i]
                    unit.seen_accuracy_m = acc
                if acc is not None and acc > max_accuracy:
                    low_accuracy += 1
                    continue
                prev = unit.last_usable
                if prev is not None and t <= prev:
                    if t == prev:
                        duplicate += 1
                    else:
                        late += 1
                    continue
                usable += 1
                lo, hi = first[i], first[i + 1]
                if lo == hi:
                    here = nowhere
                elif hi - lo == 1:  # a display, not a comprehension (a frame of its own)
                    here = {zone_ids[hit_zone[lo]]: hit_inside[lo]}
                else:
                    here = {zone_ids[hit_zone[k]]: hit_inside[k] for k in range(lo, hi)}
                self._usable(unit_id, unit, t, prev, here, out)
        finally:
            stats = self.stats
            stats.valid += i + 1  # pings taken, the one that raised included
            stats.usable += usable
            stats.low_accuracy += low_accuracy
            stats.duplicate += duplicate
            stats.late += late
        return out

    def finish(self) -> list[VisitEvent]:
        """End of input: close what is still open."""
        out: list[VisitEvent] = []
        clock = self.clock if self.clock is not None else 0
        for unit_id in sorted(self.units):
            unit = self.units[unit_id]
            if not unit.open:
                continue
            lost = unit.last_usable is not None and clock - unit.last_usable > self._max_gap
            reason = EndReason.SIGNAL_LOST if lost else EndReason.END_OF_INPUT
            self._close_all(unit, reason, clock, out)
        self._watch.clear()
        self._watched.clear()
        return out

    # -- rules -------------------------------------------------------------------------------

    def _usable(
        self,
        unit_id: str,
        unit: UnitState,
        ts: int,
        prev: int | None,
        here: dict[str, bool],
        out: list[VisitEvent],
    ) -> None:
        """A usable ping (in order, accurate enough) meets the unit's visits: `here` maps each
        zone the ping is inside of (True) or near (False)."""
        if prev is not None and ts - prev > self._max_gap and unit.open:
            self._close_all(unit, EndReason.SIGNAL_LOST, ts, out)
        index = self.index
        opened = unit.open
        if opened:
            rules_by_id, confirm = index.rules_by_id, self._confirm
            for zone_id, visit in tuple(opened.items()):
                inside = here.get(zone_id)
                moments = _observe(visit, _WHERE[inside], ts, rules_by_id[zone_id], confirm)
                if moments:
                    for moment in moments:
                        out.append(self._event(_MOMENT_KIND[moment], ts, visit, index))
                    if not visit.is_open:
                        del opened[zone_id]
        for zone_id, inside in here.items():
            if inside and zone_id not in opened:
                visit = Visit.open(unit_id, zone_id, ts)
                opened[zone_id] = visit
                out.append(self._event(VisitEventKind.STARTED, ts, visit, index))
        unit.last_usable = ts
        if unit.open:
            assert self.clock is not None
            if self.clock - ts > self._max_gap:
                # A unit already further behind the stream clock than max_gap: the watchdog
                # holds at once, whether or not another ping moves the clock before its next one.
                self._close_all(unit, EndReason.SIGNAL_LOST, self.clock, out)
            elif unit_id not in self._watched:
                self._watched.add(unit_id)
                heapq.heappush(self._watch, (ts, unit_id))

    def _watchdog(self, out: list[VisitEvent], clock: int) -> None:
        """Close the visits of units silent for more than max_gap at `clock`, in the order of
        their last usable ping (then unit id)."""
        horizon = clock - self._max_gap
        watch = self._watch
        while watch and watch[0][0] < horizon:
            ts, unit_id = heapq.heappop(watch)
            unit = self.units[unit_id]
            if unit.open and unit.last_usable is not None and unit.last_usable > ts:
                # Pinged since: its entry moves up to that ping, and comes out again here if
                # that ping is past the horizon too, in its place in the order.
                heapq.heappush(watch, (unit.last_usable, unit_id))
                continue
            self._watched.discard(unit_id)
            if unit.last_usable == ts and unit.open:
                self._close_all(unit, EndReason.SIGNAL_LOST, clock, out)

    def _close_all(
        self, unit: UnitState, reason: EndReason, at: int, out: list[VisitEvent]
    ) -> None:
        for zone_id in sorted(unit.open):
            self.dirty.add(unit.open[zone_id].unit_id)
            visit = unit.open[zone_id]
            visit.close(reason)
            out.append(self._event(VisitEventKind.ENDED, at, visit, self.index))
        unit.open.clear()

    def _event(self, kind: VisitEventKind, at: int, visit: Visit, index: ZoneIndex) -> VisitEvent:
        clock = self.clock
        # Positional: a call by keyword costs more, once per event on the hot path.
        return VisitEvent(
            kind,
            at,
            visit.unit_id,
            visit.zone_id,
            visit.started_at,
            visit.last_in,
            # A zone gone from the index is judged by the agency defaults.
            index.rules_by_id.get(visit.zone_id) or self.params.rules_for(),
            visit.end_reason,
            at if clock is None or at > clock else clock,  # the stream clock: never behind
        )

    # -- persistence (live services save this next to their consumer offsets) ----------------

    def export_units(self, unit_ids: Iterable[str]) -> dict[str, list[Any]]:
        """Each unit as a flat list. Saved for every unit a commit interval touched, so about
        once per ping: one loop, with no call per unit or per visit."""
        units, shapes = self.units, self.index.shape_ids
        out: dict[str, list[Any]] = {}
        for unit_id in unit_ids:
            unit = units[unit_id]
            row: list[Any] = [unit.last_usable, unit.seen_ts, unit.seen_lon, unit.seen_lat,
                              unit.seen_accuracy_m]  # fmt: skip
            for v in unit.open.values():
                row.append([v.zone_id, v.started_at, v.last_in, v.last_seen, int(v.state),
                            v.out_since, v.target_reported, v.overstay_reported,
                            shapes.get(v.zone_id)])  # fmt: skip
            out[unit_id] = row
        return out
