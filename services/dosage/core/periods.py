"""Shifts in the agency's timezone, merged zone presence, and per-shift dosage totals."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from schemas.timefmt import datetime_to_ms


def parse_shift_starts(text: str) -> tuple[time, ...]:
    """'07:00,15:00,23:00' -> sorted local start times. Raises ValueError with a readable reason."""
    starts: set[time] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            hh, mm = part.split(":")
            if len(hh) != 2 or len(mm) != 2:
                raise ValueError
            starts.add(time(int(hh), int(mm)))
        except ValueError:
            raise ValueError(f"shift start {part!r} is not HH:MM (00:00 to 23:59)") from None
    if not starts:
        raise ValueError("at least one shift start time is needed")
    return tuple(sorted(starts))


class ShiftCalendar:
    """Shift boundaries as UTC instants; a shift spanning a DST change is 1 h longer or shorter."""

    def __init__(self, tz: str, starts: Sequence[time]) -> None:
        self.tz = ZoneInfo(tz)
        self.tz_name = tz
        self.starts = tuple(sorted(starts))
        self._days: dict[date, tuple[int, ...]] = {}

    def boundaries(self, start_ms: int, end_ms: int) -> list[int]:
        """Every boundary b with one at or before start_ms and one after end_ms."""
        first = datetime.fromtimestamp(start_ms / 1000, self.tz).date() - timedelta(days=1)
        last = datetime.fromtimestamp(end_ms / 1000, self.tz).date() + timedelta(days=1)
        out: list[int] = []
        day = first
        while day <= last:
            out.extend(self._day(day))
            day += timedelta(days=1)
        return sorted(set(out))

    def shift_of(self, ts_ms: int) -> tuple[int, int]:
        """The shift [start, end) that contains ts_ms."""
        bounds = self.boundaries(ts_ms, ts_ms)
        i = bisect.bisect_right(bounds, ts_ms) - 1
        return bounds[i], bounds[i + 1]

    def _day(self, day: date) -> tuple[int, ...]:
        # Live status asks for the current shift on every change: remember each day's instants.
        cached = self._days.get(day)
        if cached is None:
            cached = self._days[day] = tuple(self._instant(day, t) for t in self.starts)
        return cached

    def _instant(self, day: date, t: time) -> int:
        # A start time inside a spring-forward gap is read with the offset before the change
        # (zoneinfo's fold=0: 02:30 becomes 03:30 local); a repeated hour takes its first pass.
        return datetime_to_ms(datetime.combine(day, t, tzinfo=self.tz))


def merge_intervals(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge intervals that overlap or touch: one or more units present."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


@dataclass(frozen=True, slots=True)
class ZonePeriod:
    zone_id: str
    period_start: int
    period_end: int
    presence_ms: int
    officer_ms: int
    visits: int
    dosed_visits: int


def zone_periods(
    zone_id: str,
    qualified: Sequence[tuple[int, int]],
    target_ms: int,
    calendar: ShiftCalendar,
) -> list[ZonePeriod]:
    """Per-shift dosage of one zone from its qualified visit intervals [started_at, ended_at]."""
    if not qualified:
        return []
    presence = merge_intervals(qualified)
    bounds = calendar.boundaries(presence[0][0], max(e for _, e in presence))
    acc: dict[int, list[int]] = {}  # shift index -> [presence, officer, visits, dosed]

    def add_clipped(start: int, end: int, slot: int) -> None:
        i = bisect.bisect_right(bounds, start) - 1
        while i + 1 < len(bounds) and bounds[i] < end:
            overlap = min(end, bounds[i + 1]) - max(start, bounds[i])
            if overlap > 0:
                acc.setdefault(i, [0, 0, 0, 0])[slot] += overlap
            i += 1

    for start, end in presence:
        add_clipped(start, end, 0)
        row = acc.setdefault(bisect.bisect_right(bounds, start) - 1, [0, 0, 0, 0])
        row[2] += 1
        if end - start >= target_ms:
            row[3] += 1
    for start, end in qualified:
        add_clipped(start, end, 1)
    return [
        ZonePeriod(zone_id, bounds[i], bounds[i + 1], v[0], v[1], v[2], v[3])
        for i, v in sorted(acc.items())
        if v[0] > 0 or v[2] > 0
    ]
