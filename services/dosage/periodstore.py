"""Zone periods kept current in PostgreSQL as visits close, through the same pure rules."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import asyncpg

from schemas.timefmt import datetime_to_ms, ms_to_datetime
from services.dosage.core.periods import ShiftCalendar, ZonePeriod, merge_intervals, zone_periods

# (zone_id, start_ms, end_ms, target_ms): one newly closed qualified visit
Closed = tuple[str, int, int, int]


async def refresh_periods(
    conn: asyncpg.Connection, closed: Sequence[Closed], calendar: ShiftCalendar
) -> None:
    """Recompute the rows newly closed qualified visits can change, in three statements for
    the lot (a commit interval's visits), not three per visit.

    A row depends on whole presence periods (their starts and full lengths), and a new visit
    can join periods into one that reaches into other shifts. So each zone's window grows, in
    whole shifts, until no chain of touching visits crosses its edges; every row in it is
    rewritten."""
    if not closed:
        return
    windows: dict[str, tuple[int, int]] = {}
    target: dict[str, int] = {}
    for zone_id, start, end, target_ms in closed:
        lo, hi = calendar.shift_of(start)[0], calendar.shift_of(end)[1]
        old = windows.get(zone_id)
        windows[zone_id] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
        target[zone_id] = target_ms
    intervals: dict[str, list[tuple[int, int]]] = {}
    pending = dict(windows)
    while pending:
        rows = await conn.fetch(
            "SELECT v.zone_id, v.started_at, v.ended_at FROM visits v "
            "JOIN unnest($1::text[], $2::timestamptz[], $3::timestamptz[]) AS w(z, lo, hi) "
            "ON v.zone_id = w.z WHERE v.qualified AND v.ended_at >= w.lo AND v.started_at <= w.hi",
            list(pending), [ms_to_datetime(lo) for lo, _ in pending.values()],
            [ms_to_datetime(hi) for _, hi in pending.values()],
        )  # fmt: skip
        found: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for r in rows:
            found[r["zone_id"]].append((datetime_to_ms(r["started_at"]),
                                        datetime_to_ms(r["ended_at"])))  # fmt: skip
        grown: dict[str, tuple[int, int]] = {}
        for zone_id, (lo, hi) in pending.items():
            merged = merge_intervals(found[zone_id])
            new_lo = min([lo, *(calendar.shift_of(s)[0] for s, _ in merged[:1])])
            new_hi = max([hi, *(calendar.shift_of(e)[1] for _, e in merged[-1:])])
            if (new_lo, new_hi) == (lo, hi):
                intervals[zone_id] = found[zone_id]
            else:
                grown[zone_id] = windows[zone_id] = (new_lo, new_hi)
        pending = grown
    periods: list[ZonePeriod] = []
    for zone_id, (lo, hi) in windows.items():
        periods += [
            p
            for p in zone_periods(zone_id, intervals[zone_id], target[zone_id], calendar)
            if lo <= p.period_start < hi
        ]
    await conn.execute(
        "DELETE FROM zone_periods p "
        "USING unnest($1::text[], $2::timestamptz[], $3::timestamptz[]) AS w(z, lo, hi) "
        "WHERE p.zone_id = w.z AND p.period_start >= w.lo AND p.period_start < w.hi",
        list(windows), [ms_to_datetime(lo) for lo, _ in windows.values()],
        [ms_to_datetime(hi) for _, hi in windows.values()],
    )  # fmt: skip
    if periods:
        await conn.execute(
            "INSERT INTO zone_periods (zone_id, period_start, period_end, presence_s, officer_s, "
            "visits, dosed_visits) SELECT * FROM unnest($1::text[], $2::timestamptz[], "
            "$3::timestamptz[], $4::float8[], $5::float8[], $6::int[], $7::int[])",
            [p.zone_id for p in periods], [ms_to_datetime(p.period_start) for p in periods],
            [ms_to_datetime(p.period_end) for p in periods],
            [p.presence_ms / 1000 for p in periods], [p.officer_ms / 1000 for p in periods],
            [p.visits for p in periods], [p.dosed_visits for p in periods],
        )  # fmt: skip
