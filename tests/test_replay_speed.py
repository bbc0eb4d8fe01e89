"""The shortcuts replay takes through the dosage core give what the plain computations give.

The shift calendar remembers recent shifts, a live status totals only its own shift, the board
prunes its redelivery stages only when something is old enough, and the event builders format
ids and times through caches. Each is checked against the computation it replaced.
"""

from __future__ import annotations

import bisect
import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dosewatch.cli import main
from schemas.timefmt import format_ts
from services.dosage.core import events
from services.dosage.core.board import ZoneBoard
from services.dosage.core.events import (
    STATUS_CHANGED,
    event_id,
    status_cloudevent,
    visit_cloudevent,
    visit_row,
)
from services.dosage.core.params import DosageParams
from services.dosage.core.periods import (
    ShiftCalendar,
    ZonePeriod,
    parse_shift_starts,
    shift_period,
    zone_periods,
)
from services.dosage.core.tracker import VisitEvent, VisitEventKind
from services.dosage.core.visit import EndReason

H = 3_600_000
DAY = 24 * H
SAMPLE = Path(__file__).parent / "data" / "evening-shift"


def utc(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


# DST changes (and one zone without DST), with shift starts that fall into the skipped or the
# repeated hour, or land on a midnight that a change removes.
CALENDARS = {
    "America/New_York": (
        "07:00,15:00,23:00",
        ["2026-03-08T07:00", "2026-11-01T06:00"],
    ),
    "America/New_York odd": (
        "00:00,01:30,02:00,02:30,12:00",
        ["2026-03-08T07:00", "2026-11-01T06:00"],
    ),
    "Europe/London": ("01:30,09:00,17:00", ["2026-03-29T01:00", "2026-10-25T01:00"]),
    "Australia/Lord_Howe": ("01:45,02:15,12:00", ["2026-04-04T15:00", "2026-10-03T15:30"]),
    "America/Santiago": ("00:00,00:30,08:00,16:00", ["2026-04-05T03:00", "2026-09-06T04:00"]),
    "Asia/Kathmandu": ("06:00,14:00,22:00", ["2026-06-01T00:00"]),
}


def calendar(name: str) -> ShiftCalendar:
    return ShiftCalendar(name.split()[0], parse_shift_starts(CALENDARS[name][0]))


def computed_shift(cal: ShiftCalendar, ts: int) -> tuple[int, int]:
    """shift_of as it was: the boundaries around ts, every time."""
    bounds = cal.boundaries(ts, ts)
    i = bisect.bisect_right(bounds, ts) - 1
    return bounds[i], bounds[i + 1]


def near_changes(name: str) -> st.SearchStrategy[int]:
    changes = [utc(c) for c in CALENDARS[name][1]]
    return st.builds(
        lambda c, off: c + off, st.sampled_from(changes), st.integers(-2 * DAY, 2 * DAY)
    )


# -- shift calendar --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CALENDARS))
def test_shift_of_remembers_only_what_it_computes(name: str) -> None:
    """Every minute (and the ms around each boundary) for four days around each change, walked
    forwards and backwards: the remembered shift is always the computed one."""
    cal, fresh = calendar(name), calendar(name)
    for change in CALENDARS[name][1]:
        centre = utc(change)
        times = list(range(centre - 2 * DAY, centre + 2 * DAY, 60_000))
        for b in fresh.boundaries(centre - 2 * DAY, centre + 2 * DAY):
            times += [b - 1, b, b + 1]
        for ts in [*sorted(times), *sorted(times, reverse=True)]:
            assert cal.shift_of(ts) == computed_shift(fresh, ts), (name, format_ts(ts))
            assert len(cal._recent) <= 4


@settings(max_examples=200, deadline=None)
@given(data=st.data(), name=st.sampled_from(list(CALENDARS)))
def test_shift_of_in_any_order(data: st.DataObject, name: str) -> None:
    cal, fresh = calendar(name), calendar(name)
    for ts in data.draw(st.lists(near_changes(name), min_size=1, max_size=30)):
        start, end = cal.shift_of(ts)
        assert (start, end) == computed_shift(fresh, ts)
        assert start <= ts < end


def test_the_calendar_remembers_a_bounded_number_of_days() -> None:
    cal = calendar("America/New_York")
    start = utc("2020-01-01T00:00")
    for day in range(2000):
        cal.shift_of(start + day * DAY)
    assert 0 < len(cal._days) <= 512
    assert cal.boundaries(start, start + 3 * DAY) == calendar("America/New_York").boundaries(
        start, start + 3 * DAY
    )


# -- one shift's totals ----------------------------------------------------------------------------


def periods_row(
    cal: ShiftCalendar, intervals: list[tuple[int, int]], target: int, start: int, end: int
) -> ZonePeriod:
    """The snapshot's shift as it was: every shift's totals, then the one wanted."""
    rows = [p for p in zone_periods("Z", intervals, target, cal) if p.period_start == start]
    return rows[0] if rows else ZonePeriod("Z", start, end, 0, 0, 0, 0)


def intervals_near(name: str) -> st.SearchStrategy[list[tuple[int, int]]]:
    # Durations from nothing to over a day; starts on a coarse grid, so that visits touch and
    # overlap often, and on the ms.
    length = st.one_of(
        st.sampled_from([0, 1, 120_000, 900_000, 899_999, 8 * H]), st.integers(0, 30 * H)
    )
    start = st.one_of(
        st.builds(lambda t: t - t % 300_000, near_changes(name)),
        near_changes(name),
    )
    return st.lists(st.builds(lambda s, n: (s, s + n), start, length), max_size=12)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), name=st.sampled_from(list(CALENDARS)))
def test_shift_period_is_the_row_zone_periods_gives(data: st.DataObject, name: str) -> None:
    cal = calendar(name)
    intervals = data.draw(intervals_near(name))
    target = data.draw(st.sampled_from([1, 900_000, 3 * H]))
    probes = data.draw(st.lists(near_changes(name), min_size=1, max_size=5))
    probes += [s for s, _ in intervals] + [e for _, e in intervals]
    for ts in probes:
        start, end = cal.shift_of(ts)
        expected = periods_row(cal, intervals, target, start, end)
        assert shift_period("Z", intervals, target, start, end) == expected


# -- the board -------------------------------------------------------------------------------------

PARAMS = DosageParams()
RULES = PARAMS.rules_for()


def visit_events(visits: list[tuple[str, int, int]], lag: int) -> list[tuple[int, VisitEvent]]:
    """STARTED and ENDED events of (unit, start, duration) visits in stream order; a unit's
    ended events may reach the board `lag` late (a lagging unit), or twice (redelivery)."""
    out: list[tuple[int, VisitEvent]] = []
    for i, (unit, start, duration) in enumerate(visits):
        last_in = start + duration
        out.append(
            (
                start,
                VisitEvent(
                    VisitEventKind.STARTED, start, unit, "Z", start, start, RULES, clock=start
                ),
            )
        )
        at = last_in + 60_000 + (lag if i % 3 == 0 else 0)
        ended = VisitEvent(
            VisitEventKind.ENDED, at, unit, "Z", start, last_in, RULES, EndReason.EXITED, clock=at
        )
        out.append((at, ended))
        if i % 5 == 0:
            out.append((at + 1, ended))
    out.sort(key=lambda p: p[0])
    return out


def pruned(stages: dict[str, int], last_in: int) -> dict[str, int]:
    """The board's stages after an end, as it always pruned them."""
    horizon = last_in - 2 * DAY
    return {k: v for k, v in stages.items() if v < 3 or int(k.rsplit(" ", 1)[1]) >= horizon}


@settings(max_examples=150, deadline=None)
@given(
    visits=st.lists(
        st.tuples(
            st.sampled_from(["u1", "u2", "car 3"]),
            st.integers(utc("2026-10-28T00:00"), utc("2026-11-05T00:00")),
            st.one_of(st.integers(0, 3 * H), st.sampled_from([2 * DAY, 2 * DAY + 1, 3 * DAY])),
        ),
        max_size=25,
    ),
    lag=st.sampled_from([0, 5 * 60_000, 3 * DAY]),
    restore_at=st.integers(0, 60),
)
def test_board_snapshots_and_stages_are_as_computed(
    visits: list[tuple[str, int, int]], lag: int, restore_at: int
) -> None:
    """Across the fall-back night: each status change's shift is the zone_periods row of the
    zone's intervals then, and the stages kept for redelivery are exactly those pruning by the
    rule keeps (a restore on the way forgets what the board knew about them)."""
    cal = calendar("America/New_York")
    board = ZoneBoard({"Z": RULES}, PARAMS, cal)
    expected: dict[str, int] = {}
    stage = {VisitEventKind.STARTED: 0, VisitEventKind.ENDED: 3}
    for n, (_, e) in enumerate(visit_events(visits, lag)):
        if n == restore_at:
            restored = ZoneBoard({"Z": RULES}, PARAMS, cal)
            restored.restore_meta(board.export_meta())
            restored.restore_zone("Z", board.export_zone("Z"))
            board = restored
        key = f"{e.unit_id} {e.started_at}"
        if expected.get(key, -1) < stage[e.kind]:
            expected[key] = stage[e.kind]
            if e.kind is VisitEventKind.ENDED:
                expected = pruned(expected, e.last_in)
        for change in board.apply(e):
            snap = change.snapshot
            assert change.status == snap.status and change.time == snap.as_of
        assert board.zones["Z"].stages == expected
        zone = board.zones["Z"]
        assert board.clock is not None
        for now in (board.clock, board.clock + 7 * H):
            intervals = list(zone.qualified) + [
                (s, now) for s in zone.present.values() if now - s >= RULES.min_visit_ms
            ]
            start, end = computed_shift(cal, now)
            got = board.snapshot("Z", now).shift
            assert got == periods_row(cal, intervals, RULES.target_ms, start, end)


# -- events ----------------------------------------------------------------------------------------


def test_event_ids_are_the_digest_of_their_parts() -> None:
    cal = calendar("America/New_York")
    board = ZoneBoard({"Z": RULES}, PARAMS, cal)
    t0 = utc("2026-05-14T18:00")
    stream = [
        VisitEvent(VisitEventKind.STARTED, t0, "car 7", "Z", t0, t0, RULES, clock=t0),
        VisitEvent(
            VisitEventKind.TARGET_MET,
            t0 + 900_000,
            "car 7",
            "Z",
            t0,
            t0 + 899_000,
            RULES,
            clock=t0 + 900_001,
        ),
        VisitEvent(
            VisitEventKind.ENDED,
            t0 + 2_000_000,
            "car 7",
            "Z",
            t0,
            t0 + 1_900_000,
            RULES,
            EndReason.SIGNAL_LOST,
            clock=t0 + 2_000_000,
        ),
    ]
    changes = 0
    for e in stream:
        doc = visit_cloudevent(e, "urn:test")
        assert doc["id"] == event_id(doc["type"], e.unit_id, e.zone_id, e.started_at)
        assert doc["time"] == format_ts(e.time) and doc["streamclock"] == format_ts(e.clock)
        for c in board.apply(e):
            doc = status_cloudevent(c, "urn:test")
            assert doc["id"] == event_id(STATUS_CHANGED, c.zone_id, c.time, c.previous, c.status)
            assert doc["data"]["previous_status"] == str(c.previous)
            changes += 1
    assert changes == 4  # active, met, overstay, satisfied
    row = visit_row(stream[-1])
    assert (row["qualified"], row["target_met"], row["overstay"]) == (True, True, True)
    assert row["duration_s"] == 1900.0 and row["end_reason"] == "signal_lost"


def test_formatted_times_are_format_ts_and_bounded() -> None:
    t0 = utc("2026-05-14T18:00")
    for ms in range(t0, t0 + 70_000 * 997, 997):
        assert events._stamp(ms) == format_ts(ms)
    assert events._stamp(-1) == format_ts(-1)
    assert 0 < len(events._STAMPS) <= 65_536


def test_sample_events_are_byte_for_byte_as_before(tmp_path: Path) -> None:
    """events.jsonl of the evening-shift sample as replay wrote it before these shortcuts."""
    args = ["--tz", "America/New_York", "--shifts", "07:00,15:00,23:00"]
    out = ["--out", str(tmp_path)]
    files = ["--zones", str(SAMPLE / "zones.geojson"), "--pings", str(SAMPLE / "pings.jsonl")]
    assert main(["replay", *files, *out, *args]) == 0
    digest = hashlib.sha256((tmp_path / "events.jsonl").read_bytes()).hexdigest()
    assert digest == "7bb4168dfdf77c5c6f6b32a8e3f81be110253bf53c96ccc3b9a2bd023a533294"
