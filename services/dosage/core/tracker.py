"""Per-unit dosage rules: turns usable pings into visit events.

One tracker serves the units of one ordered stream (a replay, or one Kafka partition), with
that stream's clock. Geometry is judged per batch by the index; the rules then walk the batch
in arrival order, because each ping's meaning depends on the one before it. The walk is
compiled (`tables.walk`) and runs over the tracker's state held as tables; this class keeps
the ids, turns event rows into `VisitEvent`s, and saves and restores units.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import repeat
from typing import Any

import numpy as np

from services.dosage.core import tables as tb
from services.dosage.core.params import DosageParams, ZoneRules
from services.dosage.core.visit import (
    LAST_IN,
    LAST_SEEN,
    NO_TIME,
    OUT_SINCE,
    OVERSTAY_REPORTED,
    STARTED,
    STATE,
    TARGET_REPORTED,
    EndReason,
    Visit,
    VisitState,
)
from services.geofence.core.index import ZoneIndex


@dataclass(frozen=True, slots=True)
class Fix:
    """A valid ping, reduced to what the rules read."""

    unit_id: str
    ts: int  # epoch ms, UTC
    lon: float
    lat: float
    accuracy_m: float | None = None


def fix_columns(
    fixes: Sequence[Fix],
) -> tuple[list[str], list[int], list[float], list[float], list[float | None]]:
    """A batch of fixes as `process_columns` takes it."""
    return ([f.unit_id for f in fixes], [f.ts for f in fixes], [f.lon for f in fixes],
            [f.lat for f in fixes], [f.accuracy_m for f in fixes])  # fmt: skip


# StrEnum, not Enum: a plain Enum member hashes in Python (Enum.__hash__), and every event's
# kind is a dict key on its way out (the CloudEvent type, the board's stage).
class VisitEventKind(StrEnum):
    STARTED = "started"
    TARGET_MET = "target_met"
    OVERSTAY = "overstay"
    ENDED = "ended"


# Event rows' codes (tables.K_*, tables.R_*) as the values they stand for.
EVENT_KINDS = (VisitEventKind.STARTED, VisitEventKind.TARGET_MET, VisitEventKind.OVERSTAY,
               VisitEventKind.ENDED)  # fmt: skip
END_REASONS = (EndReason.EXITED, EndReason.SIGNAL_LOST, EndReason.END_OF_INPUT,
               EndReason.ZONE_CHANGED, None)  # fmt: skip


# Not frozen: nothing changes an event once made, and a frozen dataclass's __init__ costs
# four times as much, once per event on the hot path.
@dataclass(slots=True)
class VisitEvent:
    """A snapshot of a visit at the moment something happened to it."""

    kind: VisitEventKind
    time: int  # when it happened on the stream clock (epoch ms)
    unit_id: str
    zone_id: str
    started_at: int
    last_in: int
    rules: ZoneRules
    end_reason: EndReason | None = None
    clock: int = 0  # the stream clock when it was emitted: downstream clocks follow it

    @property
    def duration_ms(self) -> int:
        return self.last_in - self.started_at

    @property
    def qualified(self) -> bool:
        return self.duration_ms >= self.rules.min_visit_ms

    @property
    def target_met(self) -> bool:
        return self.duration_ms >= self.rules.target_ms

    @property
    def overstay(self) -> bool:
        return self.duration_ms > self.rules.max_visit_ms


@dataclass(frozen=True, slots=True)
class EventRows:
    """Visit events as the rules wrote them, one int64 row each (`tables.E_*` columns), with
    the tracker's ids and rules their numbers refer to. `events()` makes them `VisitEvent`s;
    `events.visit_records` encodes them for the wire without that step."""

    rows: np.ndarray[Any, np.dtype[np.int64]]
    unit_ids: Sequence[str]
    zone_ids: Sequence[str]
    rules: Sequence[ZoneRules]  # by zone row

    def __len__(self) -> int:
        return len(self.rows)

    def events(self) -> list[VisitEvent]:
        unit_ids, zone_ids, rules = self.unit_ids, self.zone_ids, self.rules
        kinds, reasons = EVENT_KINDS, END_REASONS
        # Positional: a call by keyword costs more, once per event on the hot path.
        return [
            VisitEvent(kinds[k], at, unit_ids[u], zone_ids[z], s, li, rules[z], reasons[r], c)
            for k, at, u, z, s, li, r, c in self.rows.tolist()
        ]


@dataclass(slots=True)
class UnitState:
    """One unit as objects (`VisitTracker.units`), for inspection."""

    last_usable: int | None = None
    open: dict[str, Visit] = field(default_factory=dict)
    # Last-seen information is updated by every valid ping, usable or not.
    seen_ts: int | None = None
    seen_lon: float = 0.0
    seen_lat: float = 0.0
    seen_accuracy_m: float | None = None


@dataclass(slots=True)
class TrackerStats:
    valid: int = 0
    usable: int = 0
    low_accuracy: int = 0
    duplicate: int = 0  # same ts as the unit's previous usable ping
    late: int = 0  # older than the unit's previous usable ping


def _accuracies(values: Sequence[float | None]) -> np.ndarray[Any, np.dtype[np.float64]]:
    """As float64, NaN for none given. A column without a None converts in C; a None sends
    numpy's conversion down a path five times slower per value, so those are mapped first."""
    n, missing = len(values), values.count(None)
    if missing == 0:
        return np.asarray(values, dtype=np.float64)
    if missing == n:
        return np.full(n, np.nan)
    return np.fromiter([np.nan if a is None else a for a in values], np.float64, n)


def _times(column: np.ndarray[Any, np.dtype[np.int64]]) -> list[int | None]:
    """A time column as a list, None where it holds NO_TIME."""
    out: list[int | None] = column.tolist()
    for i in np.flatnonzero(column == NO_TIME).tolist():
        out[i] = None
    return out


def _floats(column: np.ndarray[Any, np.dtype[np.float64]]) -> list[float | None]:
    """A float column as a list, None where it holds NaN."""
    out: list[float | None] = column.tolist()
    for i in np.flatnonzero(np.isnan(column)).tolist():
        out[i] = None
    return out


# An open visit's saved integer fields and their column in the visit table.
_VISIT_COLUMNS = {
    "started": STARTED,
    "last_in": LAST_IN,
    "last_seen": LAST_SEEN,
    "state": STATE,
    "out_since": OUT_SINCE,
    "target_reported": TARGET_REPORTED,
    "overstay_reported": OVERSTAY_REPORTED,
}


def units_of_table(table: Mapping[str, Any]) -> dict[str, list[Any]]:
    """A table from `VisitTracker.export_table` (as saved, or read back from JSON) as each
    unit's flat list: last_usable, seen_ts, lon, lat, accuracy_m, then per open visit its
    zone, started, last_in, last_seen, state, out_since, target and overstay reported, and
    its zone's shape id."""

    def ints(name: str) -> np.ndarray[Any, np.dtype[np.int64]]:
        return np.asarray(table[name], dtype=np.int64)

    def floats(name: str) -> np.ndarray[Any, np.dtype[np.float64]]:
        return np.asarray(table[name], dtype=np.float64)  # null -> NaN

    ids = list(table["units"])
    heads = zip(_times(ints("last_usable")), _times(ints("seen_ts")), floats("lon").tolist(),
                floats("lat").tolist(), _floats(floats("accuracy_m")), strict=True)  # fmt: skip
    out = {unit_id: list(head) for unit_id, head in zip(ids, heads, strict=True)}
    visits = zip(table["zone_id"], ints("started").tolist(), ints("last_in").tolist(),
                 ints("last_seen").tolist(), ints("state").tolist(), _times(ints("out_since")),
                 ints("target_reported").astype(bool).tolist(),
                 ints("overstay_reported").astype(bool).tolist(), table["shape_id"],
                 strict=True)  # fmt: skip
    for owner, visit in zip(ints("visit_unit").tolist(), visits, strict=True):
        out[ids[owner]].append(list(visit))
    return out


def _saved_visit(unit_id: str, saved: list[Any]) -> Visit:
    """A visit as `export_units` saves it (its zone's shape id last, if saved since shapes
    were)."""
    zone_id, started, last_in, last_seen, state, out_since, target, overstay = saved[:8]
    return Visit(unit_id, zone_id, started, last_in, last_seen, VisitState(state), out_since,
                 None, target, overstay)  # fmt: skip


class VisitTracker:
    def __init__(self, index: ZoneIndex, params: DosageParams) -> None:
        self.params = params
        self._defaults = params.rules_for()
        self._max_gap = params.max_gap_ms
        self._confirm = params.exit_confirm_ms
        self._max_accuracy = float(params.max_accuracy_m)
        self.stats = TrackerStats()
        # Units whose state changed since the owner last saved it (live services persist these).
        self.dirty: set[str] = set()
        self._reshaped: set[tuple[str, str]] = set()  # restored visits on an older zone shape
        # Ids to rows: a unit or zone keeps its row for the tracker's life.
        self._unit_row: dict[str, int] = {}
        self._unit_ids: list[str] = []
        self._zone_row: dict[str, int] = {}
        self._zone_ids: list[str] = []
        self._zone_rules: list[ZoneRules] = []
        self._units = np.zeros((0, tb.UNIT_FIELDS), dtype=np.int64)
        self._fixes = np.zeros((0, tb.FIX_FIELDS), dtype=np.float64)
        self._heap = np.zeros((0, 2), dtype=np.int64)
        self._visits = np.zeros((0, tb.V_FIELDS), dtype=np.int64)
        self._zones = np.zeros((0, tb.ZONE_FIELDS), dtype=np.int64)
        self._meta = np.array([NO_TIME, -1, 0, 0], dtype=np.int64)
        self._stats = np.zeros(tb.STAT_FIELDS, dtype=np.int64)
        self._events = np.zeros((1024, tb.EVENT_FIELDS), dtype=np.int64)
        self._to_watch: list[tuple[int, int]] = []  # restored units, watched once ranked
        self._ranked = True
        self._zones_ready = False
        self._set_index(index)

    # -- what the tracker holds ------------------------------------------------------------------

    @property
    def clock(self) -> int | None:
        clock = int(self._meta[tb.M_CLOCK])
        return None if clock == NO_TIME else clock

    @clock.setter
    def clock(self, value: int | None) -> None:
        self._meta[tb.M_CLOCK] = NO_TIME if value is None else value

    @property
    def unit_ids(self) -> list[str]:
        return self._unit_ids

    @property
    def open_visits(self) -> int:
        return int(self._meta[tb.M_OPEN])

    @property
    def units(self) -> dict[str, UnitState]:
        """A copy of every unit's state as objects, read from its saved form: for inspection,
        not the hot path."""
        units = {}
        for unit_id, row in self.export_units(self._unit_ids).items():
            last_usable, seen_ts, lon, lat, acc, *visits = row
            opened = {v[0]: _saved_visit(unit_id, v) for v in visits}
            units[unit_id] = UnitState(last_usable, opened, seen_ts, lon, lat, acc)
        return units

    # -- input -------------------------------------------------------------------------------

    def process(self, fixes: Sequence[Fix]) -> list[VisitEvent]:
        """Apply a batch of valid pings in arrival order."""
        return self.process_columns(*fix_columns(fixes))

    def process_columns(
        self,
        unit_ids: Sequence[str],
        ts: Sequence[int],
        lon: Sequence[float],
        lat: Sequence[float],
        accuracy_m: Sequence[float | None],
    ) -> list[VisitEvent]:
        """`process` for a batch held as columns, one entry per valid ping (as a bulk reader
        holds them), without a `Fix` per ping."""
        return self.process_rows(unit_ids, ts, lon, lat, accuracy_m).events()

    def process_rows(
        self,
        unit_ids: Sequence[str],
        ts: Sequence[int],
        lon: Sequence[float],
        lat: Sequence[float],
        accuracy_m: Sequence[float | None],
    ) -> EventRows:
        """`process_columns`, its events left as rows (for `events.visit_records`)."""
        n = len(unit_ids)
        if n == 0:
            return self._event_rows(0)
        rows = np.fromiter(map(self._unit_row.get, unit_ids, repeat(-1)), np.int64, n)
        if rows.min() < 0:
            for i in np.flatnonzero(rows < 0).tolist():
                rows[i] = self._unit(unit_ids[i])
        lon_a = np.asarray(lon, dtype=np.float64)
        lat_a = np.asarray(lat, dtype=np.float64)
        hits = self.index.classify(lon_a, lat_a)
        # Ping i's zones are hit_*[first[i] : first[i + 1]].
        first = np.searchsorted(hits.point, np.arange(n + 1)).astype(np.int64)
        self._stock_visits(int(np.count_nonzero(hits.inside)))
        self._sync()
        self._stats[:] = 0
        try:
            self._events, count = tb.walk(
                self._units, self._fixes, self._visits, self._zones, self._heap, self._meta,
                self._stats, rows, np.asarray(ts, dtype=np.int64), lon_a, lat_a,
                _accuracies(accuracy_m),
                first, self._key_of_position.take(hits.zone), hits.inside,
                self._max_gap, self._confirm, self._max_accuracy, self._events,
            )  # fmt: skip
        finally:
            self._count(self._stats)
        self.dirty.update(unit_ids)
        return self._event_rows(count)

    def advance(self, clock: int) -> list[VisitEvent]:
        """Run the watchdog at a live clock: the newest ping time plus the wall time since the
        partition last delivered. It does not move the data clock, which stays the newest ping
        time, so a backlog delivered after a stall is judged by its own times."""
        return self.advance_rows(clock).events()

    def advance_rows(self, clock: int) -> EventRows:
        """`advance`, its events left as rows."""
        if self.clock is not None and clock <= self.clock:
            return self._event_rows(0)
        self._sync()
        self._events, count = tb.watchdog(
            self._units, self._visits, self._zones, self._heap, self._meta, clock,
            self._max_gap, self._events, 0,
        )  # fmt: skip
        return self._event_rows(count)

    def reconcile(self) -> list[VisitEvent]:
        """Close restored visits in zones deleted or reshaped while their state was saved."""
        stale, self._reshaped = self._reshaped, set()
        live = self.index.position
        return self._close_zone_changed(
            lambda unit_id, zone_id: zone_id not in live or (unit_id, zone_id) in stale,
            self.index,
        )

    def finish(self) -> list[VisitEvent]:
        """End of input: close what is still open."""
        return self.finish_rows().events()

    def finish_rows(self) -> EventRows:
        """`finish`, its events left as rows."""
        self._sync()
        clock = self.clock if self.clock is not None else 0
        order = np.array([self._unit_row[u] for u in sorted(self._unit_ids)], dtype=np.int64)
        self._events, count = tb.close_units(
            self._units, self._visits, self._zones, self._meta, order, clock, self._max_gap,
            self._events,
        )  # fmt: skip
        self._meta[tb.M_HEAP] = 0
        self._units[:, tb.U_WATCHED] = 0
        self._to_watch.clear()
        return self._event_rows(count)

    def replace_index(self, index: ZoneIndex) -> list[VisitEvent]:
        """Swap in a rebuilt index; visits in zones whose shape changed or that are gone close."""
        old = self.index
        gone = {z for z, shape in old.shape_ids.items() if index.shape_ids.get(z) != shape}
        self._set_index(index)
        return self._close_zone_changed(lambda _unit, zone_id: zone_id in gone, old)

    def _close_zone_changed(
        self, closes: Callable[[str, str], bool], judged_by: ZoneIndex
    ) -> list[VisitEvent]:
        """Rule 6: open visits in a changed or deleted zone end (at their last_in)."""
        self._sync()
        order = sorted(self._unit_ids)
        owner, rows = tb.visit_rows(
            self._units, self._visits, np.array([self._unit_row[u] for u in order], np.int64)
        )
        zone_of = self._visits[rows, tb.V_ZONE].tolist()
        chosen = sorted(
            (order[o], self._zone_ids[z], v)
            for o, z, v in zip(owner.tolist(), zone_of, rows.tolist(), strict=True)
            if closes(order[o], self._zone_ids[z])
        )
        if not chosen:
            return []
        self._events, count = tb.close_visits(
            self._units, self._visits, self._meta, np.array([v for *_, v in chosen], np.int64),
            tb.R_ZONE_CHANGED, self.clock if self.clock is not None else 0, self._events, 0,
        )  # fmt: skip
        return self._visit_events(count, judged_by)

    # -- tables ---------------------------------------------------------------------------------

    def _set_index(self, index: ZoneIndex) -> None:
        self.index = index
        self._key_of_position = np.array([self._zone(z) for z in index.zone_ids], np.int64)
        self._zones_ready = False

    def _zone(self, zone_id: str) -> int:
        """The zone's row, added if new (its rules are the index's, or the agency's defaults
        for a zone no index names, such as a restored visit's deleted zone)."""
        z = self._zone_row.get(zone_id)
        if z is None:
            z = self._zone_row[zone_id] = len(self._zone_ids)
            self._zone_ids.append(zone_id)
            self._zones_ready = False
        return z

    def _unit(self, unit_id: str) -> int:
        """The unit's row, added if new."""
        u = self._unit_row.get(unit_id)
        if u is None:
            u = self._unit_row[unit_id] = len(self._unit_ids)
            self._unit_ids.append(unit_id)
            if u == len(self._units):
                grow = max(64, u)
                fresh = np.zeros((grow, tb.UNIT_FIELDS), dtype=np.int64)
                fresh[:, [tb.U_LAST, tb.U_SEEN]] = NO_TIME
                fresh[:, [tb.U_HEAD, tb.U_TAIL]] = -1
                self._units = np.vstack([self._units, fresh])
                self._fixes = np.vstack([self._fixes, np.zeros((grow, tb.FIX_FIELDS))])
            self._ranked = False
        return u

    def _stock_visits(self, wanted: int) -> None:
        """At least `wanted` free visit rows: a batch opens at most one per inside hit."""
        have, used = len(self._visits), int(self._meta[tb.M_OPEN])
        if have - used >= wanted:
            return
        grow = max(wanted, have, 64)
        fresh = np.zeros((grow, tb.V_FIELDS), dtype=np.int64)
        fresh[:, tb.V_NEXT] = np.arange(have + 1, have + grow + 1)
        fresh[-1, tb.V_NEXT] = self._meta[tb.M_FREE]
        self._visits = np.vstack([self._visits, fresh])
        self._meta[tb.M_FREE] = have

    def _sync(self) -> None:
        """Bring the tables up to date before the rules run: the zones' rules and ranks after
        an index change, the units' ranks by id (the watchdog's tie-break) once new ones came,
        then the watch on restored units, which waits for those ranks."""
        if not self._zones_ready:
            rules = self.index.rules_by_id
            self._zone_rules = [rules.get(z) or self._defaults for z in self._zone_ids]
            zones = np.zeros((len(self._zone_ids), tb.ZONE_FIELDS), dtype=np.int64)
            zones[:, tb.Z_TARGET] = [r.target_ms for r in self._zone_rules]
            zones[:, tb.Z_MAX] = [r.max_visit_ms for r in self._zone_rules]
            ranks = np.argsort(np.array(self._zone_ids), kind="stable")
            zones[ranks, tb.Z_RANK] = np.arange(len(ranks))
            self._zones = zones
            self._zones_ready = True
        if not self._ranked:
            count = len(self._unit_ids)
            ranks = np.argsort(np.array(self._unit_ids), kind="stable")
            self._units[ranks, tb.U_RANK] = np.arange(count)
            self._ranked = True
        # The heap holds an entry per watched unit, and one more per unit restored while it
        # was watched: room for every unit beyond what it holds, so no push can overflow it.
        room = int(self._meta[tb.M_HEAP]) + len(self._to_watch) + len(self._unit_ids)
        if len(self._heap) < room:
            grown = np.zeros((2 * room, 2), dtype=np.int64)
            grown[: len(self._heap)] = self._heap
            self._heap = grown
        for ts, u in self._to_watch:
            tb.watch(self._heap, self._units, self._meta, ts, u)
        self._to_watch.clear()

    def _count(self, delta: np.ndarray[Any, np.dtype[np.int64]]) -> None:
        valid, usable, low, duplicate, late = delta.tolist()
        stats = self.stats
        stats.valid += valid
        stats.usable += usable
        stats.low_accuracy += low
        stats.duplicate += duplicate
        stats.late += late

    def _visit_events(self, count: int, judged_by: ZoneIndex | None = None) -> list[VisitEvent]:
        return self._event_rows(count, judged_by).events() if count else []

    def _event_rows(self, count: int, judged_by: ZoneIndex | None = None) -> EventRows:
        """The first `count` rows of the event table, copied: the next call writes over it."""
        rules = self._zone_rules
        if judged_by is not None:  # a zone gone from an index is judged by the defaults
            rules = [judged_by.rules_by_id.get(z) or self._defaults for z in self._zone_ids]
        rows = self._events[:count].copy()
        if count:
            unit_ids = self._unit_ids
            self.dirty.update(map(unit_ids.__getitem__, np.unique(rows[:, tb.E_UNIT]).tolist()))
        return EventRows(rows, self._unit_ids, self._zone_ids, rules)

    # -- persistence (live services save this next to their consumer offsets) ----------------

    def export_unit(self, unit_id: str) -> list[Any]:
        return self.export_units((unit_id,))[unit_id]

    def export_units(self, unit_ids: Iterable[str]) -> dict[str, list[Any]]:
        """Each unit as a flat list (the form `restore_unit` takes)."""
        return units_of_table(self.export_table(unit_ids))

    def export_table(self, unit_ids: Iterable[str]) -> dict[str, Any]:
        """The units' saved form as one table, a column per field (`units_of_table` reads it
        back as each unit's flat list). Saved for every unit a commit interval touched, so
        about once a ping: the columns are numpy arrays, which orjson writes as JSON arrays
        (OPT_SERIALIZE_NUMPY) without a Python object per value. Times hold NO_TIME for none,
        accuracies NaN (null in JSON)."""
        ids = list(unit_ids)
        of = np.fromiter(map(self._unit_row.__getitem__, ids), np.int64, len(ids))
        owner, rows = tb.visit_rows(self._units, self._visits, of)
        units, fixes, visits = self._units[of], self._fixes[of], self._visits[rows]
        zone_ids = list(map(self._zone_ids.__getitem__, visits[:, tb.V_ZONE].tolist()))
        column = np.ascontiguousarray
        return {
            "units": ids,
            "last_usable": column(units[:, tb.U_LAST]),
            "seen_ts": column(units[:, tb.U_SEEN]),
            "lon": column(fixes[:, tb.F_LON]),
            "lat": column(fixes[:, tb.F_LAT]),
            "accuracy_m": column(fixes[:, tb.F_ACC]),
            # Open visits: the unit's position in `units`, then the visit's fields.
            "visit_unit": owner,
            **{name: column(visits[:, at]) for name, at in _VISIT_COLUMNS.items()},
            "zone_id": zone_ids,
            "shape_id": list(map(self.index.shape_ids.get, zone_ids)),
        }

    def restore_unit(self, unit_id: str, data: list[Any] | dict[str, Any]) -> None:
        if isinstance(data, dict):  # saved before the flat form
            data = [data["last_usable"], *data["seen"], *data["open"]]
        u = self._unit(unit_id)
        _, held = tb.visit_rows(self._units, self._visits, np.array([u], dtype=np.int64))
        if len(held):  # restored again: the saved state replaces what was here
            self._events, _ = tb.close_visits(self._units, self._visits, self._meta, held,
                                              tb.R_NONE, 0, self._events, 0)  # fmt: skip
        last_usable, seen_ts, lon, lat, acc = data[:5]
        row = self._units[u]
        row[tb.U_LAST] = NO_TIME if last_usable is None else last_usable
        row[tb.U_SEEN] = NO_TIME if seen_ts is None else seen_ts
        self._fixes[u] = (lon, lat, np.nan if acc is None else acc)
        visits = data[5:]
        self._stock_visits(len(visits))
        for saved in visits:
            visit = _saved_visit(unit_id, saved)
            shape = saved[8:]
            if shape and shape[0] != self.index.shape_ids.get(visit.zone_id):
                self._reshaped.add((unit_id, visit.zone_id))
            tb.open_visit(self._units, self._visits, self._meta, u, self._zone(visit.zone_id),
                          np.array(visit.row(), dtype=np.int64))  # fmt: skip
        if visits and last_usable is not None:
            row[tb.U_WATCHED] = 1
            self._to_watch.append((last_usable, u))

    def export_meta(self) -> dict[str, Any]:
        return {"clock": self.clock}

    def restore_meta(self, data: dict[str, Any]) -> None:
        self.clock = data.get("clock")
