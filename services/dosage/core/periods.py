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


_RECENT_SHIFTS = 4
_CACHED_DAYS = 512


class ShiftCalendar:
    """Shift boundaries as UTC instants; a shift spanning a DST change is 1 h longer or shorter."""

    def __init__(self, tz: str, starts: Sequence[time]) -> None:
        self.tz = ZoneInfo(tz)
        self.tz_name = tz
        self.starts = tuple(sorted(starts))
        self._days: dict[date, tuple[int, ...]] = {}
        # The last few shifts shift_of found, newest first: a board asks about the current
        # shift on every status change, so almost every call is answered from here.
        self._recent: list[tuple[int, int]] = []

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
        # Shifts do not overlap, so a remembered one that holds ts_ms is the answer.
        for shift in self._recent:
            if shift[0] <= ts_ms < shift[1]:
                return shift
        bounds = self.boundaries(ts_ms, ts_ms)
        i = bisect.bisect_right(bounds, ts_ms) - 1
        shift = (bounds[i], bounds[i + 1])
        self._recent.insert(0, shift)
        del self._recent[_RECENT_SHIFTS:]
        return shift

    def _day(self, day: date) -> tuple[int, ...]:
        # Live status asks for the current shift on every change: remember each day's instants
        # (a few hundred days at most, for a service that runs for years).
        cached = self._days.get(day)
        if cached is None:
            if len(self._days) >= _CACHED_DAYS:
                self._days.clear()
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


def shift_period(
    zone_id: str,
    qualified: Sequence[tuple[int, int]],
    target_ms: int,
    start: int,
    end: int,
) -> ZonePeriod:
    """The row `zone_periods` would give for the shift [start, end) (one of the calendar's
    shifts, as `shift_of` returns them), or that shift with zeros if it would give none: a
    live status needs only this one.

    One pass, merging as it goes. An interval that ends before the shift starts is skipped: it
    adds to none of the shift's totals and merges nothing that starts in the shift."""
    presence = officer = visits = dosed = 0
    run_start = run_end = _BEFORE_ALL  # the merged run so far
    ordered = sorted(qualified)
    ordered.append(_AFTER_ALL)  # closes the last run
    for s, e in ordered:
        if e < start:
            continue
        if s < end and e > start:
            officer += (e if e < end else end) - (s if s > start else start)
        if s <= run_end:  # overlaps or touches the run: one presence
            if e > run_end:
                run_end = e
            continue
        # The run is complete. Like zone_periods: presence clipped to the shift, and a visit
        # (dosed by its whole length) of the shift it starts in.
        if run_end > start and run_start < end:
            presence += (run_end if run_end < end else end) - (
                run_start if run_start > start else start
            )
        if start <= run_start < end:
            visits += 1
            if run_end - run_start >= target_ms:
                dosed += 1
        run_start, run_end = s, e
    # zone_periods leaves out a shift with no presence and no visit; all four are 0 then.
    return ZonePeriod(zone_id, start, end, presence, officer, visits, dosed)


_BEFORE_ALL = -(1 << 62)  # epoch ms before and after any time (years 1 to 9999)
_AFTER_ALL = (1 << 62, 1 << 62)


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
