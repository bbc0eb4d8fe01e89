"""Zone periods kept current in PostgreSQL as visits close, through the same pure rules."""

from __future__ import annotations

import asyncpg

from schemas.timefmt import datetime_to_ms, ms_to_datetime
from services.dosage.core.periods import ShiftCalendar, merge_intervals, zone_periods


async def refresh_zone_periods(
    conn: asyncpg.Connection,
    zone_id: str,
    start_ms: int,
    end_ms: int,
    target_ms: int,
    calendar: ShiftCalendar,
) -> None:
    """Recompute the rows a new qualified visit [start, end] can change.

    A row depends on whole presence periods (their starts and full lengths), and a new visit
    can join periods into one that reaches into other shifts. So the window grows, in whole
    shifts, until no chain of touching visits crosses its edges; every row in it is rewritten."""
    lo = calendar.shift_of(start_ms)[0]
    hi = calendar.shift_of(end_ms)[1]
    while True:
        rows = await conn.fetch(
            "SELECT started_at, ended_at FROM visits WHERE zone_id = $1 AND qualified "
            "AND ended_at >= $2 AND started_at <= $3",
            zone_id, ms_to_datetime(lo), ms_to_datetime(hi),
        )  # fmt: skip
        intervals = [(datetime_to_ms(r["started_at"]), datetime_to_ms(r["ended_at"])) for r in rows]
        merged = merge_intervals(intervals)
        new_lo = min([lo, *(calendar.shift_of(s)[0] for s, _ in merged[:1])])
        new_hi = max([hi, *(calendar.shift_of(e)[1] for _, e in merged[-1:])])
        if (new_lo, new_hi) == (lo, hi):
            break
        lo, hi = new_lo, new_hi
    periods = [
        p
        for p in zone_periods(zone_id, intervals, target_ms, calendar)
        if lo <= p.period_start < hi
    ]
    await conn.execute(
        "DELETE FROM zone_periods WHERE zone_id = $1 AND period_start >= $2 AND period_start < $3",
        zone_id, ms_to_datetime(lo), ms_to_datetime(hi),
    )  # fmt: skip
    await conn.executemany(
        "INSERT INTO zone_periods (zone_id, period_start, period_end, presence_s, officer_s, "
        "visits, dosed_visits) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        [
            (p.zone_id, ms_to_datetime(p.period_start), ms_to_datetime(p.period_end),
             p.presence_ms / 1000, p.officer_ms / 1000, p.visits, p.dosed_visits)
            for p in periods
        ],
    )  # fmt: skip
