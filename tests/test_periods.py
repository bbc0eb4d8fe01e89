"""Shifts across DST, merged presence and per-shift zone dosage (dosage/core/periods.py)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from services.dosage.core.periods import (
    ShiftCalendar,
    ZonePeriod,
    merge_intervals,
    parse_shift_starts,
    zone_periods,
)

NY = ZoneInfo("America/New_York")
STARTS = (time(7), time(15), time(23))
CAL = ShiftCalendar("America/New_York", STARTS)
H = 3_600_000
MIN = 60_000


def utc(text: str) -> int:
    """'2026-03-08T04:00' (UTC) -> epoch ms."""
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def local(text: str) -> int:
    """'2026-06-15 14:00' in New York (unambiguous times only) -> epoch ms."""
    return int(datetime.fromisoformat(text).replace(tzinfo=NY).timestamp() * 1000)


def local_text(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, NY).strftime("%Y-%m-%d %H:%M %Z")


# -- shift calendar --------------------------------------------------------------------------------

SHIFT_OF = {
    # spring forward 2026-03-08 02:00 EST -> 03:00 EDT: the night shift is 7 h
    "spring: the day before, 8 h": ("2026-03-07T20:00", "2026-03-07T20:00", "2026-03-08T04:00"),
    "spring: the night shift, after the jump": (
        "2026-03-08T08:00",
        "2026-03-08T04:00",
        "2026-03-08T11:00",
    ),
    "spring: the night shift, 1 ms before the jump": (
        "2026-03-08T06:59:59.999",
        "2026-03-08T04:00",
        "2026-03-08T11:00",
    ),
    "spring: the next day shift starts at 07:00 EDT": (
        "2026-03-08T11:00",
        "2026-03-08T11:00",
        "2026-03-08T19:00",
    ),
    "spring: 1 ms before 07:00 EDT": (
        "2026-03-08T10:59:59.999",
        "2026-03-08T04:00",
        "2026-03-08T11:00",
    ),
    # fall back 2026-11-01 02:00 EDT -> 01:00 EST: the night shift is 9 h
    "fall: the evening before, 8 h": ("2026-10-31T22:00", "2026-10-31T19:00", "2026-11-01T03:00"),
    "fall: first 01:30 (EDT)": ("2026-11-01T05:30", "2026-11-01T03:00", "2026-11-01T12:00"),
    "fall: second 01:30 (EST)": ("2026-11-01T06:30", "2026-11-01T03:00", "2026-11-01T12:00"),
    "fall: the next day shift starts at 07:00 EST": (
        "2026-11-01T12:00",
        "2026-11-01T12:00",
        "2026-11-01T20:00",
    ),
    "summer day (EDT)": ("2026-06-15T12:00", "2026-06-15T11:00", "2026-06-15T19:00"),
    "winter, exactly at 07:00 EST": ("2026-01-15T12:00", "2026-01-15T12:00", "2026-01-15T20:00"),
    "winter night across midnight": ("2026-01-16T05:00", "2026-01-16T04:00", "2026-01-16T12:00"),
}


@pytest.mark.parametrize(("ts", "start", "end"), list(SHIFT_OF.values()), ids=list(SHIFT_OF))
def test_shift_of(ts: str, start: str, end: str) -> None:
    assert CAL.shift_of(utc(ts)) == (utc(start), utc(end))


@pytest.mark.parametrize(
    ("day", "odd_start", "odd_hours"),
    [("2026-03-08", "2026-03-07 23:00", 7), ("2026-11-01", "2026-10-31 23:00", 9)],
    ids=["spring-forward", "fall-back"],
)
def test_only_the_shift_containing_the_change_changes_length(
    day: str, odd_start: str, odd_hours: int
) -> None:
    centre = local(f"{day} 12:00")
    bounds = CAL.boundaries(centre - 4 * 24 * H, centre + 4 * 24 * H)
    assert bounds == sorted(set(bounds))
    for b in bounds:  # every boundary is a configured local start time
        t = datetime.fromtimestamp(b / 1000, NY)
        assert (t.hour, t.minute, t.second) in {(7, 0, 0), (15, 0, 0), (23, 0, 0)}
    lengths = {local_text(a): b - a for a, b in itertools.pairwise(bounds)}
    odd = {k: v for k, v in lengths.items() if v != 8 * H}
    assert odd == {local_text(local(odd_start)): odd_hours * H}
    assert len(lengths) >= 3 * 7


def test_boundaries_cover_the_requested_range() -> None:
    start, end = utc("2026-03-08T06:00"), utc("2026-03-09T06:00")
    bounds = CAL.boundaries(start, end)
    assert min(bounds) <= start and max(bounds) > end
    inside = [b for b in bounds if start <= b <= end]
    assert inside == [utc("2026-03-08T11:00"), utc("2026-03-08T19:00"), utc("2026-03-09T03:00")]


@pytest.mark.parametrize(
    ("day", "hours"), [("2026-03-08", 23), ("2026-11-01", 25), ("2026-06-15", 24)]
)
def test_starts_in_the_changing_hours_stay_ordered(day: str, hours: int) -> None:
    cal = ShiftCalendar("America/New_York", parse_shift_starts("00:00,01:30,02:30,12:00"))
    midnight = local(f"{day} 00:00")
    nxt = datetime.fromisoformat(day) + timedelta(days=1)
    next_midnight = local(nxt.strftime("%Y-%m-%d 00:00"))
    bounds = [b for b in cal.boundaries(midnight, next_midnight) if midnight <= b <= next_midnight]
    assert bounds[0] == midnight and bounds[-1] == next_midnight
    assert all(b > a for a, b in itertools.pairwise(bounds))
    assert len(bounds) == 5
    assert sum(b - a for a, b in itertools.pairwise(bounds)) == hours * H


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("07:00,15:00,23:00", (time(7), time(15), time(23))),
        ("23:00, 07:00,15:00", (time(7), time(15), time(23))),
        ("06:30", (time(6, 30),)),
    ],
)
def test_parse_shift_starts(text: str, expected: tuple[time, ...]) -> None:
    assert parse_shift_starts(text) == expected


@pytest.mark.parametrize("text", ["", "7:00", "24:00", "07:60", "07-00", "07:00,,15:00"])
def test_parse_shift_starts_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_shift_starts(text)


# -- merging ---------------------------------------------------------------------------------------

MERGE = {
    "empty": ([], []),
    "single": ([(0, 10)], [(0, 10)]),
    "overlap merges": ([(0, 10), (5, 15)], [(0, 15)]),
    "touching merges": ([(0, 10), (10, 20)], [(0, 20)]),
    "a gap of 1 ms does not merge": ([(0, 10), (11, 20)], [(0, 10), (11, 20)]),
    "contained": ([(0, 100), (10, 20)], [(0, 100)]),
    "unsorted input": ([(30, 40), (0, 10), (5, 12)], [(0, 12), (30, 40)]),
    "chain of touching": ([(20, 30), (0, 10), (10, 20)], [(0, 30)]),
    "zero-length at an end touches": ([(0, 10), (10, 10)], [(0, 10)]),
    "zero-length alone stays": ([(5, 5), (7, 9)], [(5, 5), (7, 9)]),
    "duplicates": ([(0, 10), (0, 10)], [(0, 10)]),
    "later long one swallows": ([(0, 5), (3, 50), (10, 20), (60, 70)], [(0, 50), (60, 70)]),
}


@pytest.mark.parametrize(("given", "merged"), list(MERGE.values()), ids=list(MERGE))
def test_merge_intervals(given: list[tuple[int, int]], merged: list[tuple[int, int]]) -> None:
    assert merge_intervals(given) == merged


# -- per-shift dosage ------------------------------------------------------------------------------

# start, end (local), presence s, officer s, visits, dosed visits
Row = tuple[str, str, float, float, int, int]

PERIODS: dict[str, tuple[list[tuple[str, str]], int, list[Row]]] = {
    "one visit inside one shift": (
        [("2026-06-15 08:00", "2026-06-15 08:20")],
        15 * MIN,
        [("2026-06-15 07:00", "2026-06-15 15:00", 1200, 1200, 1, 1)],
    ),
    "clipped across a shift boundary": (
        [("2026-06-15 14:00", "2026-06-15 16:00")],
        15 * MIN,
        [
            ("2026-06-15 07:00", "2026-06-15 15:00", 3600, 3600, 1, 1),
            ("2026-06-15 15:00", "2026-06-15 23:00", 3600, 3600, 0, 0),
        ],
    ),
    "overlapping units: presence merges, officer-minutes add": (
        [("2026-06-15 16:00", "2026-06-15 17:00"), ("2026-06-15 16:30", "2026-06-15 17:30")],
        15 * MIN,
        [("2026-06-15 15:00", "2026-06-15 23:00", 5400, 7200, 1, 1)],
    ),
    "three units stacked": (
        [
            ("2026-06-15 16:00", "2026-06-15 16:10"),
            ("2026-06-15 16:00", "2026-06-15 16:10"),
            ("2026-06-15 16:05", "2026-06-15 16:15"),
        ],
        15 * MIN,
        [("2026-06-15 15:00", "2026-06-15 23:00", 900, 1800, 1, 1)],
    ),
    "touching visits merge into one dosed period": (
        [("2026-06-15 16:00", "2026-06-15 16:10"), ("2026-06-15 16:10", "2026-06-15 16:20")],
        15 * MIN,
        [("2026-06-15 15:00", "2026-06-15 23:00", 1200, 1200, 1, 1)],
    ),
    "separate visits are separate periods": (
        [("2026-06-15 16:00", "2026-06-15 16:10"), ("2026-06-15 16:11", "2026-06-15 16:30")],
        15 * MIN,
        [("2026-06-15 15:00", "2026-06-15 23:00", 1740, 1740, 2, 1)],
    ),
    "counted in the shift where the merged period starts": (
        [("2026-06-15 14:30", "2026-06-15 15:30"), ("2026-06-15 15:10", "2026-06-15 16:00")],
        15 * MIN,
        [
            ("2026-06-15 07:00", "2026-06-15 15:00", 1800, 1800, 1, 1),
            ("2026-06-15 15:00", "2026-06-15 23:00", 3600, 1800 + 3000, 0, 0),
        ],
    ),
    "dosed uses the whole, unclipped length": (
        [("2026-06-15 14:50", "2026-06-15 15:10")],
        15 * MIN,
        [
            ("2026-06-15 07:00", "2026-06-15 15:00", 600, 600, 1, 1),
            ("2026-06-15 15:00", "2026-06-15 23:00", 600, 600, 0, 0),
        ],
    ),
    "exactly target is dosed, 1 s short is not": (
        [("2026-06-15 08:00", "2026-06-15 08:15"), ("2026-06-15 09:00", "2026-06-15 09:14:59")],
        15 * MIN,
        [("2026-06-15 07:00", "2026-06-15 15:00", 900 + 899, 900 + 899, 2, 1)],
    ),
    "no row for a shift with nothing": (
        [("2026-06-15 08:00", "2026-06-15 08:30"), ("2026-06-16 08:00", "2026-06-16 08:30")],
        15 * MIN,
        [
            ("2026-06-15 07:00", "2026-06-15 15:00", 1800, 1800, 1, 1),
            ("2026-06-16 07:00", "2026-06-16 15:00", 1800, 1800, 1, 1),
        ],
    ),
    "a shift with presence but no start still has a row": (
        [("2026-06-15 14:00", "2026-06-16 00:00")],
        15 * MIN,
        [
            ("2026-06-15 07:00", "2026-06-15 15:00", 3600, 3600, 1, 1),
            ("2026-06-15 15:00", "2026-06-15 23:00", 8 * 3600, 8 * 3600, 0, 0),
            ("2026-06-15 23:00", "2026-06-16 07:00", 3600, 3600, 0, 0),
        ],
    ),
    "ending exactly at a boundary: no empty row after it": (
        [("2026-06-15 14:00", "2026-06-15 15:00")],
        15 * MIN,
        [("2026-06-15 07:00", "2026-06-15 15:00", 3600, 3600, 1, 1)],
    ),
    "starting exactly at a boundary belongs to the new shift": (
        [("2026-06-15 15:00", "2026-06-15 16:00")],
        15 * MIN,
        [("2026-06-15 15:00", "2026-06-15 23:00", 3600, 3600, 1, 1)],
    ),
    "a zero-length qualified visit still counts as a start": (
        [("2026-06-15 08:00", "2026-06-15 08:00")],
        15 * MIN,
        [("2026-06-15 07:00", "2026-06-15 15:00", 0, 0, 1, 0)],
    ),
    "the zone's own target": (
        [("2026-06-15 08:00", "2026-06-15 08:20")],
        30 * MIN,
        [("2026-06-15 07:00", "2026-06-15 15:00", 1200, 1200, 1, 0)],
    ),
    "across fall-back: the night shift holds 9 h": (
        [("2026-10-31 22:00", "2026-11-01 08:00")],
        15 * MIN,
        [
            ("2026-10-31 15:00", "2026-10-31 23:00", 3600, 3600, 1, 1),
            ("2026-10-31 23:00", "2026-11-01 07:00", 9 * 3600, 9 * 3600, 0, 0),
            ("2026-11-01 07:00", "2026-11-01 15:00", 3600, 3600, 0, 0),
        ],
    ),
    "across spring-forward: the night shift holds 7 h": (
        [("2026-03-07 22:00", "2026-03-08 08:00")],
        15 * MIN,
        [
            ("2026-03-07 15:00", "2026-03-07 23:00", 3600, 3600, 1, 1),
            ("2026-03-07 23:00", "2026-03-08 07:00", 7 * 3600, 7 * 3600, 0, 0),
            ("2026-03-08 07:00", "2026-03-08 15:00", 3600, 3600, 0, 0),
        ],
    ),
}


@pytest.mark.parametrize(("visits", "target", "rows"), list(PERIODS.values()), ids=list(PERIODS))
def test_zone_periods(visits: list[tuple[str, str]], target: int, rows: list[Row]) -> None:
    intervals = [(local(a), local(b)) for a, b in visits]
    got = zone_periods("Z1", intervals, target, CAL)
    expected = [
        ZonePeriod("Z1", local(s), local(e), round(p * 1000), round(o * 1000), v, d)
        for s, e, p, o, v, d in rows
    ]
    assert got == expected
    # Input order does not matter.
    assert zone_periods("Z1", list(reversed(intervals)), target, CAL) == expected


def test_zone_periods_with_no_visits() -> None:
    assert zone_periods("Z1", [], 15 * MIN, CAL) == []


def test_zone_periods_in_utc_shifts() -> None:
    cal = ShiftCalendar("UTC", [time(0), time(12)])
    rows = zone_periods("Z", [(utc("2026-03-08T11:00"), utc("2026-03-08T13:00"))], H, cal)
    assert [(r.period_start, r.period_end, r.presence_ms, r.visits) for r in rows] == [
        (utc("2026-03-08T00:00"), utc("2026-03-08T12:00"), H, 1),
        (utc("2026-03-08T12:00"), utc("2026-03-09T00:00"), H, 0),
    ]
