"""Zone periods kept in PostgreSQL as visits close equal the pure computation over all visits,
whatever order the visits close in."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from time import time as _time

import asyncpg

from schemas.timefmt import ms_to_datetime
from services.common import db
from services.dosage.core.periods import ShiftCalendar, parse_shift_starts, zone_periods
from services.dosage.periodstore import refresh_periods

CAL = ShiftCalendar("America/New_York", parse_shift_starts("07:00,15:00,23:00"))
T = int(datetime(2026, 5, 14, 18, 50, tzinfo=UTC).timestamp() * 1000)  # 14:50 in New York
MIN = 60_000
TARGET = 15 * MIN


def dt(ms: int) -> datetime:
    return ms_to_datetime(ms)


async def close_visits(url: str, visits: list[tuple[int, int]]) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(url)
    try:
        await db.migrate(conn)
        for n, (start, end) in enumerate(visits):
            await conn.execute(
                "INSERT INTO visits VALUES ($1, 'Z', $2, $3, $4, 'exited', true, false, false)",
                f"u{n}", dt(start), dt(end), (end - start) / 1000,
            )  # fmt: skip
            await refresh_periods(conn, [("Z", start, end, TARGET)], CAL)
        rows = await conn.fetch(
            "SELECT period_start, presence_s, officer_s, visits, dosed_visits FROM zone_periods "
            "WHERE zone_id = 'Z' ORDER BY period_start"
        )
        return [tuple(r) for r in rows]
    finally:
        await conn.close()


def pure(visits: list[tuple[int, int]]) -> list[tuple[object, ...]]:
    return [
        (dt(p.period_start), p.presence_ms / 1000, p.officer_ms / 1000, p.visits, p.dosed_visits)
        for p in zone_periods("Z", visits, TARGET, CAL)
    ]


def test_a_touching_visit_makes_the_earlier_shift_dosed(database_url: str) -> None:
    # 14:50-15:02, then 15:02-15:10: one 20-minute presence that starts in the 07-15 shift.
    visits = [(T, T + 12 * MIN), (T + 12 * MIN, T + 20 * MIN)]
    got = asyncio.run(close_visits(database_url, visits))
    assert got == pure(visits)
    assert got[0][3:] == (1, 1)  # the 07-15 row: one presence period, dosed


def test_any_closing_order_gives_the_pure_result(database_url: str) -> None:
    rng = random.Random(int(_time()) // 3600)  # varies by the hour, reproducible within it
    visits = []
    for _ in range(40):
        start = T + rng.randint(-20 * 60, 40 * 60) * MIN // 60 * 60
        visits.append((start, start + rng.randint(2, 40) * MIN))
    rng.shuffle(visits)
    assert asyncio.run(close_visits(database_url, visits)) == pure(visits)


def test_visits_closed_in_batches_over_many_zones_give_the_pure_result(database_url: str) -> None:
    """The live service refreshes a whole commit interval's visits at once (refresh_periods):
    zones in one batch, several visits of one zone in one batch, touching ones included."""
    rng = random.Random(int(_time()) // 3600 + 1)
    visits: list[tuple[str, int, int]] = []
    for n in range(60):
        start = T + rng.randint(-20 * 60, 40 * 60) * MIN // 60 * 60
        visits.append((f"Z{n % 4}", start, start + rng.randint(2, 40) * MIN))
    rng.shuffle(visits)

    async def run() -> dict[str, list[tuple[object, ...]]]:
        conn = await asyncpg.connect(database_url)
        try:
            await db.migrate(conn)
            await conn.execute("DELETE FROM visits WHERE zone_id LIKE 'Z_'")
            await conn.execute("DELETE FROM zone_periods WHERE zone_id LIKE 'Z_'")
            i = 0
            while i < len(visits):
                batch = visits[i : i + rng.randint(1, 12)]
                i += len(batch)
                for k, (zone, start, end) in enumerate(batch):
                    await conn.execute(
                        "INSERT INTO visits VALUES ($1, $2, $3, $4, $5, 'exited', true, false, "
                        "false)", f"u{i}-{k}", zone, dt(start), dt(end), (end - start) / 1000,
                    )  # fmt: skip
                await refresh_periods(conn, [(z, s, e, TARGET) for z, s, e in batch], CAL)
            out: dict[str, list[tuple[object, ...]]] = {}
            for zone in sorted({z for z, _, _ in visits}):
                rows = await conn.fetch(
                    "SELECT period_start, presence_s, officer_s, visits, dosed_visits "
                    "FROM zone_periods WHERE zone_id = $1 ORDER BY period_start", zone,
                )  # fmt: skip
                out[zone] = [tuple(r) for r in rows]
            return out
        finally:
            await conn.close()

    got = asyncio.run(run())
    for zone, rows in got.items():
        mine = [(s, e) for z, s, e in visits if z == zone]
        want = [
            (dt(p.period_start), p.presence_ms / 1000, p.officer_ms / 1000, p.visits,
             p.dosed_visits)
            for p in zone_periods(zone, mine, TARGET, CAL)
        ]  # fmt: skip
        assert rows == want and rows
