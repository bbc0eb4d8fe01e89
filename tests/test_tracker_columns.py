"""VisitTracker.process_columns (the replay's entry: one list per field) does what process does
with Fix objects, and the watchdog's queue (one entry per watched unit, moved up lazily) closes
silent units in the order of their last usable ping, then unit id."""

from __future__ import annotations

from pathlib import Path

import pytest

from dosewatch.replay import decode_lines, load_zones
from services.dosage.core.params import DosageParams
from services.dosage.core.tracker import Fix, VisitEvent, VisitEventKind, VisitTracker
from services.dosage.core.visit import EndReason
from services.geofence.core.index import ZoneIndex
from tests.test_tracker_rules import T0, P, make_tracker

SAMPLE = Path(__file__).parent / "data" / "evening-shift"


def sample_fixes() -> list[Fix]:
    lines = enumerate((SAMPLE / "pings.jsonl").read_bytes().splitlines(), start=1)
    return [f for f, _ in decode_lines(lines) if f is not None]


def columns(
    fixes: list[Fix],
) -> tuple[list[str], list[int], list[float], list[float], list[float | None]]:
    return (
        [f.unit_id for f in fixes],
        [f.ts for f in fixes],
        [f.lon for f in fixes],
        [f.lat for f in fixes],
        [f.accuracy_m for f in fixes],
    )


@pytest.mark.parametrize("batch", [1, 37, 100_000])
def test_columns_and_fixes_give_the_same_events_and_state(batch: int) -> None:
    fixes = sample_fixes()
    index = ZoneIndex(load_zones(SAMPLE / "zones.geojson"), DosageParams())
    by_fix, by_column = VisitTracker(index, DosageParams()), VisitTracker(index, DosageParams())
    a: list[VisitEvent] = []
    b: list[VisitEvent] = []
    for start in range(0, len(fixes), batch):
        a += by_fix.process(fixes[start : start + batch])
        b += by_column.process_columns(*columns(fixes[start : start + batch]))
    a += by_fix.finish()
    b += by_column.finish()
    assert len(a) > 600 and a == b
    assert by_fix.stats == by_column.stats
    assert {u: by_fix.export_unit(u) for u in by_fix.units} == {
        u: by_column.export_unit(u) for u in by_column.units
    }
    assert by_column.process_columns([], [], [], [], []) == []


def test_silent_units_close_in_the_order_of_their_last_ping_then_unit_id() -> None:
    tracker = make_tracker()
    # Four units enter A; u3 and u1 ping again later (their queue entries move up lazily).
    tracker.process(
        [
            P("u4", 0, "A").fix(),
            P("u3", 1, "A").fix(),
            P("u2", 1, "A").fix(),
            P("u1", 2, "A").fix(),
            P("u3", 20, "A").fix(),
            P("u1", 30, "A").fix(),
            P("u1", 40, "A").fix(),
        ]
    )
    events = tracker.process([P("far", 500, "far").fix()])
    assert [(e.unit_id, e.last_in - T0, e.end_reason) for e in events] == [
        ("u4", 0, EndReason.SIGNAL_LOST),
        ("u2", 1_000, EndReason.SIGNAL_LOST),
        ("u3", 20_000, EndReason.SIGNAL_LOST),
        ("u1", 40_000, EndReason.SIGNAL_LOST),
    ]
    assert all(e.kind is VisitEventKind.ENDED and e.time == T0 + 500_000 for e in events)


def test_a_unit_that_keeps_pinging_is_never_closed_by_the_watchdog() -> None:
    tracker = make_tracker()
    events: list[VisitEvent] = []
    for k in range(42):  # 20.5 minutes, a ping every 30 s, the clock pushed on by another unit
        events += tracker.process([P("u1", 30 * k, "A").fix(), P("u2", 30 * k + 1, "far").fix()])
    assert [e.kind for e in events] == [
        VisitEventKind.STARTED,
        VisitEventKind.TARGET_MET,
        VisitEventKind.OVERSTAY,
    ]
    # It falls silent; then the clock passes its last ping by more than max_gap.
    late = tracker.process([P("u2", 30 * 41 + 121, "far").fix()])
    assert [(e.unit_id, e.end_reason, e.last_in - T0) for e in late] == [
        ("u1", EndReason.SIGNAL_LOST, 30 * 41 * 1000)
    ]
    # It comes back, opens a new visit and is watched again.
    tracker.process([P("u1", 2000, "A").fix()])
    again = tracker.advance(T0 + 2000_000 + 120_001)
    assert [(e.unit_id, e.started_at - T0) for e in again] == [("u1", 2000_000)]
