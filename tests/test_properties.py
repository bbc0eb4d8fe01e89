"""Hypothesis properties of the dosage core on generated ping streams.

A few units random-walk around three small zones (two overlapping, one with a hole) with random
gaps, duplicates, low-accuracy fixes and late deliveries.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, time
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import Polygon, box

from services.dosage.core.params import DosageParams, seconds_to_ms
from services.dosage.core.periods import ShiftCalendar, merge_intervals, zone_periods
from services.dosage.core.tracker import (
    Fix,
    TrackerStats,
    VisitEvent,
    VisitEventKind,
    VisitTracker,
)
from services.dosage.core.visit import EndReason, VisitState
from services.geofence.core.index import ZoneIndex
from services.geofence.core.zone import ZoneSpec
from tests.reference_tracker import ReferenceTracker

LON0, LAT0 = -74.00, 40.71
M_PER_DEG_LAT = 111_030.0
M_PER_DEG_LON = 111_320.0 * math.cos(math.radians(LAT0))


def lonlat(x: float, y: float) -> tuple[float, float]:
    """Metres east/north of (LON0, LAT0) -> lon/lat (a local approximation is enough here)."""
    return LON0 + x / M_PER_DEG_LON, LAT0 + y / M_PER_DEG_LAT


def square(cx: float, cy: float, half: float) -> Polygon:
    w, s = lonlat(cx - half, cy - half)
    e, n = lonlat(cx + half, cy + half)
    return box(w, s, e, n)


Z3_SHELL = square(0, 170, 70)
Z3 = Polygon(Z3_SHELL.exterior.coords, [square(0, 170, 25).exterior.coords])
ZONES = [
    ZoneSpec("Z1", square(-100, 0, 80)),
    ZoneSpec("Z2", square(30, 0, 70), min_visit_s=15.0, target_s=45.0, max_visit_s=60.0),
    ZoneSpec("Z3", Z3),
]
OVERRIDES = {"Z2": (15.0, 45.0, 60.0)}  # min_visit_s, target_s, max_visit_s

PARAM_SETS = [
    DosageParams(),
    DosageParams(exit_confirm_s=20, max_gap_s=60, min_visit_s=30, target_s=60, max_visit_s=120),
    DosageParams(
        exit_buffer_m=10,
        exit_confirm_s=0,
        max_gap_s=30,
        max_accuracy_m=30,
        min_visit_s=0,
        target_s=10,
        max_visit_s=20,
    ),
]


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


BASES = [
    ms("2026-06-15T18:50:00"),  # 14:50 EDT, ten minutes before a shift change
    ms("2026-03-08T06:45:00"),  # 01:45 EST, fifteen minutes before spring-forward
    ms("2026-11-01T05:40:00"),  # 01:40 EDT, twenty minutes before fall-back
]
CALENDARS = [
    ShiftCalendar("America/New_York", [time(7), time(15), time(23)]),
    ShiftCalendar("America/New_York", [time(h, m) for h in range(24) for m in range(0, 60, 5)]),
    ShiftCalendar("UTC", [time(h, m) for h in range(24) for m in (0, 7, 30)]),
]


@dataclass(frozen=True)
class Scenario:
    params: DosageParams
    fixes: list[Fix]
    calendar: ShiftCalendar


step = st.tuples(
    st.integers(0, 15),  # 0: a long silence, otherwise a normal interval
    st.integers(200, 20_000),  # normal interval, ms
    st.integers(25_000, 400_000),  # silence, ms
    st.integers(-30, 30),  # dx, m
    st.integers(-30, 30),  # dy, m
    st.sampled_from([None, None, None, 5.0, 20.0, 30.0, 50.0, 80.0, 300.0]),  # accuracy_m
)
START = st.sampled_from([(-100, 0), (30, 0), (0, 170), (-30, 0), (0, 120), (200, -200)])


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    params = draw(st.sampled_from(PARAM_SETS))
    base = draw(st.sampled_from(BASES))
    fixes: list[Fix] = []
    for u in range(draw(st.integers(1, 3))):
        x, y = draw(START)
        t = base + draw(st.integers(0, 60_000))
        for kind, dt, gap, dx, dy, acc in draw(st.lists(step, min_size=3, max_size=80)):
            t += gap if kind == 0 else dt
            x = max(-350, min(350, x + dx))
            y = max(-350, min(350, y + dy))
            lon, lat = lonlat(x, y)
            fixes.append(Fix(f"unit-{u}", t, lon, lat, acc))
    arrival = sorted(fixes, key=lambda f: (f.ts, f.unit_id))
    # Redeliveries (same ts, maybe a different position), single late deliveries, and bursts:
    # a run of one unit's pings held back and delivered later (an MDT flushing its buffer).
    ops = st.tuples(
        st.sampled_from(["dup", "late", "burst"]),
        st.integers(0, 10_000),
        st.integers(1, 60),
        st.booleans(),
    )
    for op, i, k, shifted in draw(st.lists(ops, max_size=12)):
        i %= len(arrival)
        f = arrival[i]
        if op == "dup":
            copy = Fix(f.unit_id, f.ts, f.lon + (2e-4 if shifted else 0.0), f.lat, f.accuracy_m)
            arrival.insert(min(len(arrival), i + k), copy)
        elif op == "late":
            arrival.insert(min(len(arrival), i + k % 20), arrival.pop(i))
        else:
            held = [j for j in range(i, len(arrival)) if arrival[j].unit_id == f.unit_id][:k]
            burst = [arrival[j] for j in held]
            for j in reversed(held):
                del arrival[j]
            at = min(len(arrival), i + k)
            arrival[at:at] = burst
    return Scenario(params, arrival, draw(st.sampled_from(CALENDARS)))


def tracker_for(params: DosageParams) -> VisitTracker:
    return VisitTracker(ZoneIndex(ZONES, params), params)


def replay(
    fixes: list[Fix], params: DosageParams, batch: int
) -> tuple[list[VisitEvent], TrackerStats]:
    tracker = tracker_for(params)
    events: list[VisitEvent] = []
    for i in range(0, len(fixes), batch):
        events += tracker.process(fixes[i : i + batch])
    events += tracker.finish()
    return events, tracker.stats


def thresholds(params: DosageParams, zone_id: str) -> tuple[int, int, int]:
    """(min_visit, target, max_visit) in ms, computed independently of ZoneIndex.rules."""
    lo, target, hi = OVERRIDES.get(
        zone_id, (params.min_visit_s, params.target_s, params.max_visit_s)
    )
    return seconds_to_ms(lo), seconds_to_ms(target), seconds_to_ms(hi)


def visit_key(e: VisitEvent) -> tuple[str, str, int]:
    return e.unit_id, e.zone_id, e.started_at


PROPS = settings(max_examples=60, deadline=None)


@PROPS
@given(scenarios())
def test_visits_are_well_formed(sc: Scenario) -> None:
    params = sc.params
    events, _ = replay(sc.fixes, params, len(sc.fixes))
    usable = {
        (f.unit_id, f.ts)
        for f in sc.fixes
        if f.accuracy_m is None or f.accuracy_m <= params.max_accuracy_m
    }
    last_usable: dict[str, int] = {}
    for unit_id, ts in usable:
        last_usable[unit_id] = max(ts, last_usable.get(unit_id, ts))
    final_clock = max(f.ts for f in sc.fixes)
    by_visit: dict[tuple[str, str, int], list[VisitEvent]] = {}
    for e in events:
        by_visit.setdefault(visit_key(e), []).append(e)
    for key, evs in by_visit.items():
        kinds = [e.kind for e in evs]
        # Every visit starts once, ends once, and everything else happens in between.
        assert kinds[0] is VisitEventKind.STARTED and kinds.count(VisitEventKind.STARTED) == 1
        assert kinds[-1] is VisitEventKind.ENDED and kinds.count(VisitEventKind.ENDED) == 1
        end = evs[-1]
        assert end.end_reason is not None
        duration = end.last_in - end.started_at
        assert duration >= 0 and end.duration_ms == duration
        assert end.started_at <= end.last_in <= end.time
        assert (end.unit_id, end.started_at) in usable and (end.unit_id, end.last_in) in usable
        lo, target, hi = thresholds(params, end.zone_id)
        assert (end.rules.min_visit_ms, end.rules.target_ms, end.rules.max_visit_ms) == (
            lo,
            target,
            hi,
        )
        assert end.qualified is (duration >= lo)
        assert end.target_met is (duration >= target)
        assert end.overstay is (duration > hi)
        # The live moments fire exactly when the final flags say so, never more than once.
        assert (VisitEventKind.TARGET_MET in kinds) is end.target_met
        assert (VisitEventKind.OVERSTAY in kinds) is end.overstay
        assert len(kinds) == len(set(kinds))
        for e in evs[1:-1]:
            if e.kind is VisitEventKind.TARGET_MET:
                assert e.last_in - e.started_at >= target and e.time == e.last_in
            if e.kind is VisitEventKind.OVERSTAY:
                assert e.last_in - e.started_at > hi and e.time == e.last_in
        # Each end reason leaves its trace in the times.
        silence = end.time - end.last_in
        if end.end_reason is EndReason.EXITED:
            assert silence >= max(params.exit_confirm_ms, 1)
        elif end.end_reason is EndReason.SIGNAL_LOST:
            assert silence > params.max_gap_ms
        else:
            assert end.end_reason is EndReason.END_OF_INPUT
            # Only a unit still within max_gap of the final clock ends by end of input.
            assert end.time == final_clock
            assert final_clock - last_usable[end.unit_id] <= params.max_gap_ms
        assert key[2] == end.started_at


@PROPS
@given(scenarios())
def test_at_most_one_open_visit_per_unit_and_zone(sc: Scenario) -> None:
    tracker = tracker_for(sc.params)
    open_now: set[tuple[str, str]] = set()
    last_end: dict[tuple[str, str], int] = {}
    for fix in sc.fixes:
        for e in tracker.process([fix]):
            pair = (e.unit_id, e.zone_id)
            if e.kind is VisitEventKind.STARTED:
                assert pair not in open_now, f"second open visit for {pair}"
                # Visits of one unit in one zone never overlap or touch.
                assert e.started_at > last_end.get(pair, -1)
                open_now.add(pair)
            elif e.kind is VisitEventKind.ENDED:
                assert pair in open_now
                open_now.remove(pair)
                last_end[pair] = e.last_in
            else:
                assert pair in open_now
        held = {(u, z) for u, unit in tracker.units.items() for z in unit.open}
        assert held == open_now
        assert tracker.clock is not None
        for unit_id, unit in tracker.units.items():
            if unit.open:  # rule 4: nobody stays open past the watchdog's horizon
                assert unit.last_usable is not None
                assert tracker.clock - unit.last_usable <= sc.params.max_gap_ms
            for zone_id, visit in unit.open.items():
                assert (visit.unit_id, visit.zone_id) == (unit_id, zone_id)
                assert visit.state is not VisitState.CLOSED
                assert visit.started_at <= visit.last_in <= visit.last_seen
                assert visit.last_seen == unit.last_usable
    tracker.finish()
    assert all(not unit.open for unit in tracker.units.values())


@PROPS
@given(scenarios())
def test_replay_is_deterministic_and_independent_of_batch_size(sc: Scenario) -> None:
    reference, ref_stats = replay(sc.fixes, sc.params, max(1, len(sc.fixes)))
    for batch in (1, 7, max(1, len(sc.fixes))):
        events, stats = replay(sc.fixes, sc.params, batch)
        assert events == reference
        assert stats == ref_stats
    counts = Counter(e.kind for e in reference)
    assert counts[VisitEventKind.STARTED] == counts[VisitEventKind.ENDED]


@PROPS
@given(scenarios(), st.sampled_from([1, 7, 64]))
def test_the_compiled_rules_match_the_python_reference(sc: Scenario, batch: int) -> None:
    """The tracker walks its tables in compiled code; `ReferenceTracker` is the same rules in
    plain Python objects. Same events, stats and saved state, whatever the batch size."""
    runs: list[tuple[list[VisitEvent], TrackerStats, dict[str, list[Any]]]] = []
    reference = ReferenceTracker(ZoneIndex(ZONES, sc.params), sc.params)
    for tracker in (tracker_for(sc.params), reference):
        events: list[VisitEvent] = []
        for i in range(0, len(sc.fixes), batch):
            events += tracker.process(sc.fixes[i : i + batch])
        saved = tracker.export_units(sorted(tracker.units))
        events += tracker.finish()
        runs.append((events, tracker.stats, saved))
    assert runs[0] == runs[1]


@PROPS
@given(scenarios())
def test_stats_account_for_every_ping(sc: Scenario) -> None:
    _, stats = replay(sc.fixes, sc.params, 5)
    params = sc.params
    good = [f for f in sc.fixes if f.accuracy_m is None or f.accuracy_m <= params.max_accuracy_m]
    last: dict[str, int] = {}
    usable = duplicate = late = 0
    for f in good:
        prev = last.get(f.unit_id)
        if prev is None or f.ts > prev:
            usable += 1
            last[f.unit_id] = f.ts
        elif f.ts == prev:
            duplicate += 1
        else:
            late += 1
    assert stats.valid == len(sc.fixes)
    assert stats.low_accuracy == len(sc.fixes) - len(good)
    assert (stats.usable, stats.duplicate, stats.late) == (usable, duplicate, late)


@PROPS
@given(scenarios())
def test_presence_never_exceeds_officer_time(sc: Scenario) -> None:
    events, _ = replay(sc.fixes, sc.params, 64)
    qualified: dict[str, list[tuple[int, int]]] = {}
    for e in events:
        if e.kind is VisitEventKind.ENDED and e.qualified:
            qualified.setdefault(e.zone_id, []).append((e.started_at, e.last_in))
    for zone_id, intervals in qualified.items():
        target = thresholds(sc.params, zone_id)[1]
        rows = zone_periods(zone_id, intervals, target, sc.calendar)
        assert rows, "qualified visits always produce at least one row"
        merged = merge_intervals(intervals)
        for r in rows:
            assert 0 <= r.presence_ms <= r.officer_ms
            assert r.presence_ms <= r.period_end - r.period_start
            assert 0 <= r.dosed_visits <= r.visits
            assert r.presence_ms > 0 or r.visits > 0
            assert sc.calendar.shift_of(r.period_start) == (r.period_start, r.period_end)
        starts = [r.period_start for r in rows]
        assert starts == sorted(set(starts))
        # Nothing is lost or invented by clipping to shifts.
        assert sum(r.presence_ms for r in rows) == sum(e - s for s, e in merged)
        assert sum(r.officer_ms for r in rows) == sum(e - s for s, e in intervals)
        assert sum(r.visits for r in rows) == len(merged)
        assert sum(r.dosed_visits for r in rows) == sum(e - s >= target for s, e in merged)
