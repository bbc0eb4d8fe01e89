"""The tracker's tables (services/dosage/core/tables.py) as they grow, free and refill rows:
many units at once, visits opened and ended in every order, units restored over themselves.
The rules' outcomes are held to the Python reference; the tables' own bookkeeping to what the
units hold."""

from __future__ import annotations

import random

from services.dosage.core import tables as tb
from services.dosage.core.params import DosageParams
from services.dosage.core.tracker import Fix, VisitTracker
from services.geofence.core.index import ZoneIndex
from tests.reference_tracker import ReferenceTracker
from tests.test_tracker_rules import LOST, POS, T0, make_tracker, zones

PLACES = ["A", "B", "AB", "A_near", "A_out", "H", "H_hole", "far"]


def patrol(units: int, pings: int, seed: int) -> list[Fix]:
    """Units wandering between overlapping zones, holes and the street, 10-200 s apart, some
    silent long enough for the watchdog."""
    rng = random.Random(seed)
    clock = {f"car-{u:03d}": T0 + rng.randrange(60_000) for u in range(units)}
    out = []
    for _ in range(pings):
        unit = rng.choice(sorted(clock))
        clock[unit] += rng.choice([10_000, 30_000, 60_000, 200_000])
        out.append(Fix(unit, clock[unit], *POS[rng.choice(PLACES)]))
    return sorted(out, key=lambda f: f.ts)


def test_hundreds_of_units_grow_the_tables_and_match_the_reference() -> None:
    params = DosageParams()
    fixes = patrol(units=300, pings=6_000, seed=7)
    compiled = make_tracker(params)
    reference = ReferenceTracker(ZoneIndex(zones(), params), params)
    runs = []
    for tracker in (compiled, reference):
        events = []
        for i in range(0, len(fixes), 500):
            events += tracker.process(fixes[i : i + 500])
        saved = tracker.export_units(sorted(tracker.units))
        events += tracker.finish()
        runs.append((events, tracker.stats, saved))
    assert runs[0] == runs[1]
    assert len(runs[0][0]) > 1_000  # the patrol does open and end visits
    assert compiled.open_visits == 0


def free_rows(tracker: VisitTracker) -> int:
    """The visit rows on the free list, followed from its head."""
    rows, v = 0, int(tracker._meta[tb.M_FREE])
    while v != -1:
        rows += 1
        v = int(tracker._visits[v, tb.V_NEXT])
    return rows


def test_every_visit_row_is_open_or_free() -> None:
    tracker = make_tracker()
    fixes = patrol(units=80, pings=2_000, seed=3)
    for i in range(0, len(fixes), 97):
        tracker.process(fixes[i : i + 97])
        held = sum(len(unit.open) for unit in tracker.units.values())
        assert tracker.open_visits == held
        assert free_rows(tracker) + held == len(tracker._visits)
    assert tracker.open_visits > 0
    tracker.finish()
    assert free_rows(tracker) == len(tracker._visits)


def test_restoring_a_unit_again_replaces_what_it_held() -> None:
    tracker = make_tracker()
    tracker.process([Fix("u1", T0, *POS["AB"]), Fix("u2", T0, *POS["A"])])
    assert set(tracker.units["u1"].open) == {"A", "B"}
    only_h = make_tracker()
    only_h.process([Fix("u1", T0 + 5_000, *POS["H"])])
    tracker.restore_unit("u1", only_h.export_unit("u1"))
    assert set(tracker.units["u1"].open) == {"H"}
    assert tracker.export_unit("u1") == only_h.export_unit("u1")
    assert tracker.open_visits == 2  # u1's H and u2's A: the rows of A and B were freed
    events = tracker.finish()
    assert sorted((e.unit_id, e.zone_id) for e in events) == [("u1", "H"), ("u2", "A")]


def test_a_unit_restored_over_and_over_is_watched_without_overflow() -> None:
    """Each restore watches the unit afresh (as a restart would); the watch heap makes room
    for the repeats, and the watchdog still ends each visit once."""
    saved = make_tracker()
    saved.process([Fix("u1", T0, *POS["AB"])])
    state = saved.export_unit("u1")
    tracker = make_tracker()
    tracker.restore_meta(saved.export_meta())
    for _ in range(300):
        tracker.restore_unit("u1", state)
    assert tracker.process([Fix("u2", T0 + 1_000, *POS["far"])]) == []
    events = tracker.advance(T0 + 3_600_000)
    assert [(e.zone_id, e.end_reason) for e in events] == [("A", LOST), ("B", LOST)]
    assert tracker.open_visits == 0
