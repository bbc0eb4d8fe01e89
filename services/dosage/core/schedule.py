"""When a zone is patrolled: weekly windows of local wall time in the agency timezone.

A window's edges are read as zoneinfo reads a wall time (fold=0), as shift starts are: an
edge inside a spring-forward gap falls an hour later (02:30 becomes 03:30), and one inside a
repeated hour takes its first pass. So each window occurrence is one interval of instants
[opens, closes), and the schedule is active in the union of its occurrences.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import TypeAdapter, ValidationError

from schemas.timefmt import datetime_to_ms, ms_to_datetime
from schemas.zone import DAYS, ScheduleWindow

_WINDOWS = TypeAdapter(list[ScheduleWindow])
_DAY = timedelta(days=1)
# Past two weeks every weekday has come round twice, so at least one occurrence of every
# window is not swallowed by a DST gap: a schedule unchanged that long never changes.
_HORIZON_DAYS = 16


@dataclass(frozen=True, slots=True)
class Window:
    days: frozenset[int]  # the weekdays it opens on, 0 = Monday
    start_min: int  # minutes after local midnight
    end_min: int  # 1..1440; at or before start_min: it closes the next day

    def occurrence(self, day: date, tz: ZoneInfo) -> tuple[int, int] | None:
        """[opens, closes) in epoch ms if it opens on `day`; None if not, or if DST left
        nothing of it."""
        if day.weekday() not in self.days:
            return None
        midnight = datetime.combine(day, time())
        end_day = midnight + _DAY if self.end_min <= self.start_min else midnight
        opens = _instant(midnight + timedelta(minutes=self.start_min), tz)
        closes = _instant(end_day + timedelta(minutes=self.end_min), tz)
        return (opens, closes) if opens < closes else None


def _instant(wall: datetime, tz: ZoneInfo) -> int:
    return datetime_to_ms(wall.replace(tzinfo=tz))


@dataclass(frozen=True, slots=True)
class WeeklySchedule:
    tz: str
    windows: tuple[Window, ...]
    # Occurrences by local day: a board asks about the same few days over and over.
    _days: dict[date, tuple[tuple[int, int], ...]] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    @staticmethod
    def parse(raw: Any, tz: str) -> WeeklySchedule:
        """From the zone property (a list of {days, start, end}); ValueError with the reason."""
        try:
            windows = _WINDOWS.validate_python(raw)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            msg = first["msg"].removeprefix("Value error, ")
            raise ValueError(f"schedule {where}: {msg}" if where else f"schedule: {msg}") from None
        return WeeklySchedule.of(windows, tz)

    @staticmethod
    def of(windows: Sequence[ScheduleWindow], tz: str) -> WeeklySchedule:
        if not windows:
            raise ValueError("a schedule needs at least one window")
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise ValueError(f"unknown timezone {tz!r}") from None
        out = tuple(
            Window(frozenset(DAYS.index(d) for d in w.days), _minutes(w.start), _minutes(w.end))
            for w in windows
        )
        return WeeklySchedule(tz, out)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.tz)  # zoneinfo keeps one instance per key

    def is_active(self, ms: int) -> bool:
        today = ms_to_datetime(ms).astimezone(self.zone).date()
        # An occurrence lasts under two days, and DST moves an edge by hours: these cover ms.
        for day in _days_from(today - 2 * _DAY, 4):
            for opens, closes in self._occurrences(day):
                if opens <= ms < closes:
                    return True
        return False

    def next_boundary(self, ms: int) -> int:
        """The first instant after ms at which is_active may differ from is_active(ms): it is
        the same everywhere in [ms, next_boundary). A schedule that never changes answers
        about two weeks ahead, and is asked again then."""
        active = self.is_active(ms)
        today = ms_to_datetime(ms).astimezone(self.zone).date()
        first = today - 2 * _DAY
        edges = sorted(
            {
                edge
                for day in _days_from(first, _HORIZON_DAYS + 3)
                for occurrence in self._occurrences(day)
                for edge in occurrence
                if edge > ms
            }
        )
        # Edges of occurrences opening after the last day listed may come before its last
        # edges: only edges before that day's midnight are complete.
        limit = _instant(datetime.combine(first + (_HORIZON_DAYS + 2) * _DAY, time()), self.zone)
        for edge in edges[: bisect.bisect_left(edges, limit)]:
            if self.is_active(edge) != active:
                return edge
        return limit  # activity only changes at an edge: none did before the limit

    def _occurrences(self, day: date) -> tuple[tuple[int, int], ...]:
        found = self._days.get(day)
        if found is None:
            if len(self._days) > 64:
                self._days.clear()
            tz = self.zone
            found = tuple(o for w in self.windows if (o := w.occurrence(day, tz)) is not None)
            self._days[day] = found
        return found


def _days_from(first: date, n: int) -> Iterator[date]:
    return (first + i * _DAY for i in range(n))


def _minutes(hhmm: str) -> int:
    hh, mm = hhmm.split(":")
    return int(hh) * 60 + int(mm)
