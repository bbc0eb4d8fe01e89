"""Live zone status, rule by rule: active, met, overstay, satisfied, due, and what each carries."""

from __future__ import annotations

import pytest

from services.dosage.core.board import StatusChange, ZoneBoard
from services.dosage.core.params import DosageParams
from services.dosage.core.periods import ShiftCalendar, parse_shift_starts
from services.dosage.core.tracker import VisitEvent, VisitEventKind
from services.dosage.core.visit import EndReason

PARAMS = DosageParams()  # min 120 s, target 900 s, max 1200 s, revisit 7200 s
RULES = PARAMS.rules_for()
T0 = 1_778_781_600_000  # 2026-05-14T18:00Z, 14:00 in New York
S = 1000


def board() -> ZoneBoard:
    cal = ShiftCalendar("America/New_York", parse_shift_starts("07:00,15:00,23:00"))
    return ZoneBoard({"Z": RULES}, PARAMS, cal)


def started(unit: str, at: int) -> VisitEvent:
    return VisitEvent(VisitEventKind.STARTED, at, unit, "Z", at, at, RULES, clock=at)


def ended(unit: str, start: int, last_in: int, at: int) -> VisitEvent:
    return VisitEvent(
        VisitEventKind.ENDED, at, unit, "Z", start, last_in, RULES, EndReason.EXITED, clock=at
    )


def statuses(changes: list[StatusChange]) -> list[tuple[int, str]]:
    return [(c.time - T0, str(c.status)) for c in changes]


def test_one_visit_through_every_status() -> None:
    b = board()
    assert statuses(b.apply(started("u1", T0))) == [(0, "active")]
    assert b.advance(T0 + 900 * S - 1) == []
    assert statuses(b.advance(T0 + 900 * S)) == [(900 * S, "met")]  # target reached: >=
    assert b.advance(T0 + 1200 * S) == []  # overstay is strictly more than max_visit_s
    assert statuses(b.advance(T0 + 1200 * S + 1)) == [(1200 * S + 1, "overstay")]
    # exit confirmed later; the visit ended at its last inside ping, 1300 s: a dosed presence
    assert statuses(b.apply(ended("u1", T0, T0 + 1300 * S, T0 + 1360 * S))) == [
        (1360 * S, "satisfied")
    ]
    due_at = 1300 * S + 7200 * S  # revisit_s after the dosed presence ended
    assert b.advance(T0 + due_at) == []
    assert statuses(b.advance(T0 + due_at + 1)) == [(due_at + 1, "due")]


def test_a_short_visit_leaves_the_zone_due() -> None:
    b = board()
    b.apply(started("u1", T0))
    changes = b.apply(ended("u1", T0, T0 + 300 * S, T0 + 360 * S))  # qualified, not dosed
    assert statuses(changes) == [(360 * S, "due")]
    assert b.snapshot("Z").last_dosed_end is None


def test_presence_merges_across_units_and_timers_run_from_the_first_arrival() -> None:
    b = board()
    b.apply(started("u1", T0))
    b.apply(started("u2", T0 + 500 * S))
    b.apply(ended("u1", T0, T0 + 600 * S, T0 + 660 * S))  # u2 still there: occupied
    snap = b.snapshot("Z", T0 + 700 * S)
    assert (snap.status, snap.occupied_since, snap.units_present) == ("active", T0, ("u2",))
    assert (snap.elapsed_ms, snap.remaining_ms) == (700 * S, 200 * S)
    assert statuses(b.advance(T0 + 900 * S)) == [(900 * S, "met")]
    b.apply(ended("u2", T0 + 500 * S, T0 + 1000 * S, T0 + 1060 * S))
    snap = b.snapshot("Z", T0 + 1100 * S)
    # two touching visits: one 1000 s presence, dosed; officer time counts both units
    assert snap.status == "satisfied" and snap.last_dosed_end == T0 + 1000 * S
    assert (snap.shift.presence_ms, snap.shift.officer_ms) == (1000 * S, 1100 * S)
    assert (snap.shift.visits, snap.shift.dosed_visits) == (1, 1)


@pytest.mark.parametrize("repeat", ["started", "ended"])
def test_a_repeated_event_changes_nothing(repeat: str) -> None:
    b = board()
    first = [started("u1", T0), ended("u1", T0, T0 + 1000 * S, T0 + 1060 * S)]
    for e in first:
        b.apply(e)
    before = b.snapshot("Z", T0 + 2000 * S)
    again = first[0] if repeat == "started" else first[1]
    assert b.apply(again) == []
    assert b.snapshot("Z", T0 + 2000 * S) == before


def test_state_survives_export_and_restore() -> None:
    b = board()
    b.apply(started("u1", T0))
    restored = board()
    restored.restore_meta(b.export_meta())
    restored.restore_zone("Z", b.export_zone("Z"))
    # the deadline is rebuilt: met arrives on time after a restart
    assert statuses(restored.advance(T0 + 900 * S)) == [(900 * S, "met")]
    assert statuses(b.advance(T0 + 900 * S)) == [(900 * S, "met")]
