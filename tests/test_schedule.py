"""Activation schedules: weekly windows in the agency timezone (DST included), and the live
status they drive: `inactive` outside the windows, flipping exactly at each edge."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.timefmt import datetime_to_ms
from services.dosage.core.board import StatusChange, ZoneBoard
from services.dosage.core.params import DosageParams, ZoneRules
from services.dosage.core.periods import ShiftCalendar, parse_shift_starts
from services.dosage.core.schedule import WeeklySchedule
from services.dosage.core.tracker import VisitEvent, VisitEventKind
from services.dosage.core.visit import EndReason

NY = "America/New_York"
MIN = 60_000
WEEKNIGHTS = [{"days": ["mon", "tue", "wed", "thu", "fri"], "start": "18:00", "end": "02:00"}]


def ny(y: int, mo: int, d: int, h: int, mi: int, s: int = 0, fold: int = 0) -> int:
    """Epoch ms of a New York wall time (2026-05-14 is a Thursday)."""
    return datetime_to_ms(datetime(y, mo, d, h, mi, s, tzinfo=ZoneInfo(NY), fold=fold))


def utc(y: int, mo: int, d: int, h: int, mi: int) -> int:
    return datetime_to_ms(datetime(y, mo, d, h, mi, tzinfo=ZoneInfo("UTC")))


# -- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ([], "at least one window"),
        ([{"days": [], "start": "18:00", "end": "02:00"}], "at least 1 item"),
        ([{"days": ["mon"], "start": "25:00", "end": "02:00"}], "should match pattern"),
        ([{"days": ["monday"], "start": "18:00", "end": "02:00"}], "'mon'"),
        ([{"days": ["mon"], "start": "18:00", "end": "18:00"}], "00:00 to 24:00"),
        ([{"days": ["mon", "mon"], "start": "18:00", "end": "19:00"}], "listed twice"),
        ([{"days": ["mon"], "start": "18:00"}], "end: Field required"),
        ([{"days": ["mon"], "start": "18:00", "end": "19:00", "x": 1}], "x: Extra inputs"),
        ({"days": ["mon"]}, "valid list"),
    ],
)
def test_bad_schedules_are_refused_with_a_reason(raw: Any, problem: str) -> None:
    with pytest.raises(ValueError, match="schedule") as exc:
        WeeklySchedule.parse(raw, NY)
    assert problem in str(exc.value)


def test_unknown_timezone() -> None:
    with pytest.raises(ValueError, match="unknown timezone"):
        WeeklySchedule.parse(WEEKNIGHTS, "Mars/Olympus_Mons")


# -- is_active and next_boundary, table by table ------------------------------------------------

ACTIVE_CASES = [
    # weeknights 18:00-02:00: the window opening on Friday runs into Saturday morning
    (WEEKNIGHTS, ny(2026, 5, 14, 17, 59), False),
    (WEEKNIGHTS, ny(2026, 5, 14, 18, 0), True),
    (WEEKNIGHTS, ny(2026, 5, 15, 1, 59, 59), True),
    (WEEKNIGHTS, ny(2026, 5, 15, 2, 0), False),
    (WEEKNIGHTS, ny(2026, 5, 16, 1, 0), True),  # Saturday 01:00: Friday's window
    (WEEKNIGHTS, ny(2026, 5, 17, 1, 0), False),  # Sunday 01:00: Saturday has none
    (WEEKNIGHTS, ny(2026, 5, 18, 1, 0), False),  # Monday 01:00: Sunday has none
    (WEEKNIGHTS, ny(2026, 5, 18, 23, 0), True),
    # a whole day, to 24:00
    ([{"days": ["sat"], "start": "00:00", "end": "24:00"}], ny(2026, 5, 16, 0, 0), True),
    ([{"days": ["sat"], "start": "00:00", "end": "24:00"}], ny(2026, 5, 16, 23, 59), True),
    ([{"days": ["sat"], "start": "00:00", "end": "24:00"}], ny(2026, 5, 17, 0, 0), False),
    # spring forward (Sun 2026-03-08, 02:00 EST -> 03:00 EDT): 02:30 is read as 03:30 EDT
    ([{"days": ["sun"], "start": "02:30", "end": "04:00"}], utc(2026, 3, 8, 7, 29), False),
    ([{"days": ["sun"], "start": "02:30", "end": "04:00"}], utc(2026, 3, 8, 7, 30), True),
    ([{"days": ["sun"], "start": "02:30", "end": "04:00"}], utc(2026, 3, 8, 7, 59), True),
    ([{"days": ["sun"], "start": "02:30", "end": "04:00"}], utc(2026, 3, 8, 8, 0), False),
    # fall back (Sun 2026-11-01, 02:00 EDT -> 01:00 EST): 01:30 is its first pass
    ([{"days": ["sun"], "start": "00:00", "end": "01:30"}], ny(2026, 11, 1, 1, 29), True),
    ([{"days": ["sun"], "start": "00:00", "end": "01:30"}], ny(2026, 11, 1, 1, 30), False),
    ([{"days": ["sun"], "start": "00:00", "end": "01:30"}], ny(2026, 11, 1, 1, 10, fold=1), False),
    # overnight across the fall-back night: 22:00 EDT to 06:00 EST is nine hours
    ([{"days": ["sat"], "start": "22:00", "end": "06:00"}], utc(2026, 11, 1, 2, 0), True),
    ([{"days": ["sat"], "start": "22:00", "end": "06:00"}], utc(2026, 11, 1, 10, 59), True),
    ([{"days": ["sat"], "start": "22:00", "end": "06:00"}], utc(2026, 11, 1, 11, 0), False),
]


@pytest.mark.parametrize(("raw", "at", "active"), ACTIVE_CASES)
def test_is_active(raw: Any, at: int, active: bool) -> None:
    assert WeeklySchedule.parse(raw, NY).is_active(at) is active


BOUNDARY_CASES = [
    (WEEKNIGHTS, ny(2026, 5, 14, 12, 0), ny(2026, 5, 14, 18, 0)),
    (WEEKNIGHTS, ny(2026, 5, 14, 18, 0), ny(2026, 5, 15, 2, 0)),
    (WEEKNIGHTS, ny(2026, 5, 15, 2, 0), ny(2026, 5, 15, 18, 0)),
    (WEEKNIGHTS, ny(2026, 5, 16, 2, 0), ny(2026, 5, 18, 18, 0)),  # over the weekend
    # back-to-back windows are one stretch: no boundary where one hands over to the next
    (
        [
            {"days": ["mon"], "start": "08:00", "end": "12:00"},
            {"days": ["mon"], "start": "12:00", "end": "17:00"},
        ],
        ny(2026, 5, 18, 9, 0),
        ny(2026, 5, 18, 17, 0),
    ),
    (
        [{"days": ["sun"], "start": "02:30", "end": "04:00"}],
        ny(2026, 3, 8, 0, 0),
        utc(2026, 3, 8, 7, 30),
    ),
    (
        [{"days": ["sat"], "start": "22:00", "end": "06:00"}],
        utc(2026, 11, 1, 3, 0),
        utc(2026, 11, 1, 11, 0),
    ),
]


@pytest.mark.parametrize(("raw", "at", "boundary"), BOUNDARY_CASES)
def test_next_boundary(raw: Any, at: int, boundary: int) -> None:
    assert WeeklySchedule.parse(raw, NY).next_boundary(at) == boundary


def test_a_schedule_that_is_always_active_is_asked_again_later() -> None:
    every = WeeklySchedule.parse([{"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
                                   "start": "00:00", "end": "24:00"}], NY)  # fmt: skip
    t = ny(2026, 3, 7, 12, 0)
    later = every.next_boundary(t)
    assert later - t > 7 * 86_400_000
    assert all(every.is_active(t + k * 3_600_000) for k in range((later - t) // 3_600_000))


# -- the property -------------------------------------------------------------------------------

ZONES = ["America/New_York", "Europe/London", "Australia/Lord_Howe", "Pacific/Chatham", "UTC"]
HHMM = st.integers(0, 1439).map(lambda m: f"{m // 60:02d}:{m % 60:02d}")
WINDOW = st.fixed_dictionaries(
    {
        "days": st.lists(
            st.sampled_from(["mon", "tue", "wed", "thu", "fri", "sat", "sun"]),
            min_size=1,
            max_size=7,
            unique=True,
        ),
        "start": HHMM,
        "end": st.one_of(HHMM, st.just("24:00")),
    }
).filter(lambda w: w["start"] != w["end"])
# 2026 with its DST changes in both hemispheres
WHEN = st.integers(utc(2026, 1, 1, 0, 0), utc(2027, 1, 1, 0, 0))


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(ZONES), st.lists(WINDOW, min_size=1, max_size=3), WHEN)
def test_next_boundary_is_later_and_nothing_changes_before_it(
    tz: str, windows: list[dict[str, Any]], t: int
) -> None:
    schedule = WeeklySchedule.parse(windows, tz)
    active = schedule.is_active(t)
    edge = schedule.next_boundary(t)
    assert edge > t
    # Edges are whole local minutes, and every offset here is whole minutes: checking each
    # minute (for a day and a half; sampled beyond) finds any change.
    first_minute = -(-t // MIN) * MIN
    points = [t, edge - 1, *range(first_minute, min(edge, t + 36 * 60 * MIN), MIN)]
    points += [t + (edge - t) * k // 97 for k in range(97)]
    assert all(schedule.is_active(p) is active for p in points)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(ZONES), st.lists(WINDOW, min_size=1, max_size=3), WHEN)
def test_the_next_boundary_is_a_change_unless_nothing_changes(
    tz: str, windows: list[dict[str, Any]], t: int
) -> None:
    schedule = WeeklySchedule.parse(windows, tz)
    edge = schedule.next_boundary(t)
    if schedule.is_active(edge) == schedule.is_active(t):
        # Only a schedule with no change for two weeks answers with a plain re-check.
        assert edge - t > 14 * 86_400_000


# -- the board -----------------------------------------------------------------------------------

PARAMS = DosageParams()  # min 120 s, target 900 s, max 1200 s, revisit 7200 s


def board(rules: ZoneRules) -> ZoneBoard:
    return ZoneBoard(
        {"Z": rules}, PARAMS, ShiftCalendar(NY, parse_shift_starts("07:00,15:00,23:00"))
    )


def weeknights() -> ZoneRules:
    return PARAMS.rules_for(schedule=WeeklySchedule.parse(WEEKNIGHTS, NY))


def started(unit: str, at: int, rules: ZoneRules) -> VisitEvent:
    return VisitEvent(VisitEventKind.STARTED, at, unit, "Z", at, at, rules, clock=at)


def ended(unit: str, start: int, last_in: int, at: int, rules: ZoneRules) -> VisitEvent:
    return VisitEvent(VisitEventKind.ENDED, at, unit, "Z", start, last_in, rules,
                      EndReason.EXITED, clock=at)  # fmt: skip


def flips(changes: list[StatusChange]) -> list[tuple[int, str, str]]:
    return [(c.time, str(c.previous), str(c.status)) for c in changes]


def test_inactive_outside_the_window_and_flipping_at_each_edge() -> None:
    rules = weeknights()
    b = board(rules)
    assert b.rules_changed("Z") == []  # no clock yet: judged at the first one
    thursday_2pm = ny(2026, 5, 14, 14, 0)
    assert flips(b.advance(thursday_2pm)) == [(thursday_2pm, "due", "inactive")]

    opens = ny(2026, 5, 14, 18, 0)
    assert b.advance(opens - 1) == []
    assert flips(b.advance(opens)) == [(opens, "inactive", "due")]

    closes = ny(2026, 5, 15, 2, 0)
    assert b.advance(closes - 1) == []
    changes = b.advance(closes)
    assert flips(changes) == [(closes, "due", "inactive")]
    assert changes[0].snapshot.status == "inactive" and changes[0].snapshot.as_of == closes
    assert flips(b.advance(ny(2026, 5, 16, 2, 0) + 1)) == [
        (ny(2026, 5, 15, 18, 0), "inactive", "due"),  # Friday night, each at its own instant
        (ny(2026, 5, 16, 2, 0), "due", "inactive"),
    ]
    # the weekend: nothing until Monday evening
    assert b.advance(ny(2026, 5, 18, 17, 59)) == []
    assert flips(b.advance(ny(2026, 5, 18, 18, 0))) == [(ny(2026, 5, 18, 18, 0), "inactive", "due")]


def test_presence_outside_the_window_is_recorded_and_counts_once_it_opens() -> None:
    rules = weeknights()
    b = board(rules)
    arrives = ny(2026, 5, 14, 17, 50)
    assert flips(b.apply(started("u1", arrives, rules))) == [(arrives, "due", "inactive")]
    snap = b.snapshot("Z")
    assert (snap.status, snap.units_present, snap.occupied_since) == ("inactive", ("u1",), arrives)

    opens = ny(2026, 5, 14, 18, 0)
    assert flips(b.advance(opens)) == [(opens, "inactive", "active")]
    assert b.snapshot("Z").elapsed_ms == 10 * MIN  # the ten minutes before it opened count
    met = arrives + 900_000
    assert flips(b.advance(met)) == [(met, "active", "met")]

    # A dosed visit that ends while the zone is inactive still counts as dosage.
    b2 = board(rules)
    night = ny(2026, 5, 15, 1, 45)
    b2.apply(started("u2", night, rules))
    closes = ny(2026, 5, 15, 2, 0)
    assert flips(b2.advance(closes)) == [(closes, "active", "inactive")]
    left = night + 1000_000
    assert b2.apply(ended("u2", night, left, left + MIN, rules)) == []  # still inactive
    snap = b2.snapshot("Z")
    assert snap.status == "inactive" and snap.last_dosed_end == left
    assert (snap.shift.visits, snap.shift.dosed_visits) == (1, 1)
    # at the next opening the visit ~16 h ago is long past revisit: due
    assert flips(b2.advance(ny(2026, 5, 15, 18, 0))) == [
        (ny(2026, 5, 15, 18, 0), "inactive", "due")
    ]


def test_schedule_edits_take_effect_at_once_and_survive_a_restore() -> None:
    plain = PARAMS.rules_for()
    b = board(plain)
    t = ny(2026, 5, 14, 14, 0)
    b.advance(t)
    # a schedule added while outside its window: inactive now
    b.upsert_zone("Z", weeknights())
    assert flips(b.rules_changed("Z")) == [(t, "due", "inactive")]
    # restored elsewhere: the edge is a deadline there too
    saved, meta = b.export_zone("Z"), b.export_meta()
    again = board(weeknights())
    again.restore_meta(meta)
    again.restore_zone("Z", saved)
    opens = ny(2026, 5, 14, 18, 0)
    assert flips(again.advance(opens)) == [(opens, "inactive", "due")]
    # the schedule removed while inactive: judged now, back to the dosage rules
    b.upsert_zone("Z", plain)
    assert flips(b.rules_changed("Z")) == [(t, "inactive", "due")]
    # an edit of a zone with no schedule changes nothing now, as before schedules existed
    b.upsert_zone("Z", PARAMS.rules_for(target_s=60))
    assert b.rules_changed("Z") == []
