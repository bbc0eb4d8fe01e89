"""The tracker's state as tables, and the compiled rules that walk a batch of pings over them.

A unit is a row of `units` (and of `fixes`, its last-seen position); an open visit is a row of
`visits`, linked to its unit's next visit in the order it opened. Each ping still meets the
rules one at a time, in arrival order, as the rules require; compiled, that walk costs about
0.3 µs a ping where the same rules over objects cost about 4 µs. The visit transitions
themselves are `visit.step`, the one machine both the tracker and `Visit` run.

Events come out as rows of `events` (see the E_* columns) for the tracker to turn into
`VisitEvent`s; nothing here knows a unit's or a zone's id, only their row numbers.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import numpy.typing as npt

from services.dosage.core.compiled import compiled
from services.dosage.core.visit import (
    ENDED_BIT,
    LAST_IN,
    NO_TIME,
    OVERSTAY_BIT,
    STARTED,
    STATE,
    TARGET_MET_BIT,
    VISIT_FIELDS,
    VisitState,
    Where,
    step,
)

Table = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]
Flags = npt.NDArray[np.bool_]

# units: one row per unit.
U_LAST, U_SEEN, U_HEAD, U_TAIL, U_OPEN, U_WATCHED, U_RANK = range(7)
UNIT_FIELDS = 7
# fixes: the unit's last-seen position, NaN accuracy for none.
F_LON, F_LAT, F_ACC = range(3)
FIX_FIELDS = 3
# visits: the visit's own row (visit.py), then its unit, zone and the unit's next visit.
V_UNIT, V_ZONE, V_NEXT = VISIT_FIELDS, VISIT_FIELDS + 1, VISIT_FIELDS + 2
V_FIELDS = VISIT_FIELDS + 3
# zones: the rules the walk needs, and the zone id's place in sorted order.
Z_TARGET, Z_MAX, Z_RANK = range(3)
ZONE_FIELDS = 3
# meta: the stream clock, the free list of visit rows, the watch heap's size, open visits.
M_CLOCK, M_FREE, M_HEAP, M_OPEN = range(4)
# events: what happened, to which visit, and as of which stream clock.
E_KIND, E_AT, E_UNIT, E_ZONE, E_STARTED, E_LAST_IN, E_REASON, E_CLOCK = range(8)
EVENT_FIELDS = 8


def _int64(value: int) -> int:
    """`value` as np.int64, for constants passed to compiled helpers: numba compiles a helper
    once for each literal int it is passed (_emit came out eight times, the core's compiling
    19 s instead of 11-12), and an np.int64 is no literal. An int to the type checker, which it
    behaves as."""
    return cast(int, np.int64(value))


# E_KIND values, in VisitEventKind's order; E_REASON values, in EndReason's order, then none.
K_STARTED, K_TARGET_MET, K_OVERSTAY, K_ENDED = (_int64(k) for k in range(4))
R_EXITED, R_SIGNAL_LOST, R_END_OF_INPUT, R_ZONE_CHANGED, R_NONE = (_int64(r) for r in range(5))
_ZERO = _int64(0)
# stats: counted per batch.
S_VALID, S_USABLE, S_LOW_ACCURACY, S_DUPLICATE, S_LATE = range(5)
STAT_FIELDS = 5

_INSIDE, _NEAR, _OUTSIDE = int(Where.INSIDE), int(Where.NEAR), int(Where.OUTSIDE)
_OPEN, _CLOSED = int(VisitState.OPEN), int(VisitState.CLOSED)


@compiled
def _emit(events: Table, n: int, kind: int, at: int, visits: Table, v: int, reason: int,
          clock: int) -> Table:  # fmt: skip
    """Row n of events, growing the table when it is full; the (possibly new) table."""
    if n == events.shape[0]:
        grown = np.empty((2 * n + 64, EVENT_FIELDS), dtype=np.int64)
        grown[:n] = events[:n]
        events = grown
    e = events[n]
    e[E_KIND] = kind
    e[E_AT] = at
    e[E_UNIT] = visits[v, V_UNIT]
    e[E_ZONE] = visits[v, V_ZONE]
    e[E_STARTED] = visits[v, STARTED]
    e[E_LAST_IN] = visits[v, LAST_IN]
    e[E_REASON] = reason
    e[E_CLOCK] = at if at > clock else clock  # the stream clock: never behind the event
    return events


@compiled
def _release(units: Table, visits: Table, meta: Table, u: int, v: int) -> None:
    """Unlink visit row v from unit u's list and put it on the free list."""
    before, at = -1, units[u, U_HEAD]
    while at != v:
        before, at = at, visits[at, V_NEXT]
    after = visits[v, V_NEXT]
    if before == -1:
        units[u, U_HEAD] = after
    else:
        visits[before, V_NEXT] = after
    if units[u, U_TAIL] == v:
        units[u, U_TAIL] = before
    units[u, U_OPEN] -= 1
    meta[M_OPEN] -= 1
    visits[v, V_NEXT] = meta[M_FREE]
    meta[M_FREE] = v


@compiled
def open_visit(units: Table, visits: Table, meta: Table, u: int, zone: int, row: Table) -> int:
    """A visit row from the free list, filled from `row` (visit.py's fields) and appended to
    unit u's visits; its row number. The caller keeps free rows in stock."""
    v = meta[M_FREE]
    meta[M_FREE] = visits[v, V_NEXT]
    visits[v, :VISIT_FIELDS] = row
    visits[v, V_UNIT] = u
    visits[v, V_ZONE] = zone
    visits[v, V_NEXT] = -1
    tail = units[u, U_TAIL]
    if tail == -1:
        units[u, U_HEAD] = v
    else:
        visits[tail, V_NEXT] = v
    units[u, U_TAIL] = v
    units[u, U_OPEN] += 1
    meta[M_OPEN] += 1
    return int(v)


@compiled
def _close_all(units: Table, visits: Table, zones: Table, meta: Table, u: int, reason: int,
               at: int, events: Table, n: int) -> tuple[Table, int]:  # fmt: skip
    """End every open visit of unit u, in zone id order."""
    _, rows = visit_rows(units, visits, np.full(1, u, dtype=np.int64))
    for a in range(1, len(rows)):  # insertion sort: a unit has a handful of visits at most
        v = rows[a]
        rank = zones[visits[v, V_ZONE], Z_RANK]
        b = a - 1
        while b >= 0 and zones[visits[rows[b], V_ZONE], Z_RANK] > rank:
            rows[b + 1] = rows[b]
            b -= 1
        rows[b + 1] = v
    return close_visits(units, visits, meta, rows, reason, at, events, n)


@compiled
def _before(heap: Table, units: Table, i: int, j: int) -> bool:
    """Heap order: (last usable ping, unit id); U_RANK is the unit id's place in sorted order."""
    if heap[i, 0] != heap[j, 0]:
        return bool(heap[i, 0] < heap[j, 0])
    return bool(units[heap[i, 1], U_RANK] < units[heap[j, 1], U_RANK])


@compiled
def _swap(heap: Table, i: int, j: int) -> None:
    for c in range(2):
        heap[i, c], heap[j, c] = heap[j, c], heap[i, c]


@compiled
def watch(heap: Table, units: Table, meta: Table, ts: int, u: int) -> None:
    """Push (ts, u) on the watch heap."""
    i = meta[M_HEAP]
    meta[M_HEAP] = i + 1
    heap[i, 0], heap[i, 1] = ts, u
    while i > 0:
        parent = (i - 1) // 2
        if not _before(heap, units, i, parent):
            break
        _swap(heap, i, parent)
        i = parent


@compiled
def _unwatch_first(heap: Table, units: Table, meta: Table) -> None:
    size = meta[M_HEAP] - 1
    meta[M_HEAP] = size
    heap[0, 0], heap[0, 1] = heap[size, 0], heap[size, 1]
    i = _ZERO
    while True:
        least, left = i, 2 * i + 1
        if left < size and _before(heap, units, left, least):
            least = left
        if left + 1 < size and _before(heap, units, left + 1, least):
            least = left + 1
        if least == i:
            return
        _swap(heap, i, least)
        i = least


@compiled
def watchdog(units: Table, visits: Table, zones: Table, heap: Table, meta: Table, at: int,
             max_gap: int, events: Table, n: int) -> tuple[Table, int]:  # fmt: skip
    """Close the visits of units silent for more than max_gap at `at`, in the order of their
    last usable ping (then unit id). Each unit with open visits has one heap entry at or
    before its last usable ping; an entry found behind that ping moves up to it when it comes
    out (not on every ping)."""
    horizon = at - max_gap
    while meta[M_HEAP] > 0 and heap[0, 0] < horizon:
        ts, u = heap[0, 0], heap[0, 1]
        _unwatch_first(heap, units, meta)
        last = units[u, U_LAST]
        if units[u, U_OPEN] > 0 and last != NO_TIME and last > ts:
            watch(heap, units, meta, last, u)  # pinged since: back in, at that ping
            continue
        units[u, U_WATCHED] = 0
        if last == ts and units[u, U_OPEN] > 0:
            events, n = _close_all(units, visits, zones, meta, u, R_SIGNAL_LOST, at, events, n)
    return events, n


@compiled
def walk(
    units: Table, fixes: Floats, visits: Table, zones: Table, heap: Table, meta: Table,
    stats: Table, unit: Table, ts: Table, lon: Floats, lat: Floats, accuracy: Floats,
    first: Table, hit_zone: Table, hit_inside: Flags,
    max_gap: int, exit_confirm: int, max_accuracy: float, events: Table,
) -> tuple[Table, int]:  # fmt: skip
    """The rules over a batch of valid pings in arrival order. Ping i's zones are
    hit_zone[first[i]:first[i + 1]] (zone rows), inside or only near by hit_inside."""
    n = _ZERO
    for i in range(len(unit)):
        u, t = unit[i], ts[i]
        stats[S_VALID] += 1
        if t > meta[M_CLOCK]:
            meta[M_CLOCK] = t
            if meta[M_HEAP] > 0 and heap[0, 0] < t - max_gap:
                events, n = watchdog(units, visits, zones, heap, meta, t, max_gap, events, n)
        # Last-seen information follows every valid ping, usable or not.
        if t >= units[u, U_SEEN]:
            units[u, U_SEEN] = t
            fixes[u, F_LON], fixes[u, F_LAT], fixes[u, F_ACC] = lon[i], lat[i], accuracy[i]
        if accuracy[i] > max_accuracy:  # NaN (no accuracy given) is never greater
            stats[S_LOW_ACCURACY] += 1
            continue
        prev = units[u, U_LAST]
        if t <= prev:  # never true of NO_TIME
            stats[S_DUPLICATE if t == prev else S_LATE] += 1
            continue
        stats[S_USABLE] += 1
        lo, hi = first[i], first[i + 1]
        if prev != NO_TIME and t - prev > max_gap and units[u, U_OPEN] > 0:
            events, n = _close_all(units, visits, zones, meta, u, R_SIGNAL_LOST, t, events, n)
        v = units[u, U_HEAD]
        while v != -1:
            after, zone = visits[v, V_NEXT], visits[v, V_ZONE]
            where = _OUTSIDE
            for k in range(lo, hi):
                if hit_zone[k] == zone:
                    where = _INSIDE if hit_inside[k] else _NEAR
                    break
            bits = step(visits[v], where, t, zones[zone, Z_TARGET], zones[zone, Z_MAX],
                        exit_confirm)  # fmt: skip
            if bits:
                clock = meta[M_CLOCK]
                if bits & TARGET_MET_BIT:
                    events = _emit(events, n, K_TARGET_MET, t, visits, v, R_NONE, clock)
                    n += 1
                if bits & OVERSTAY_BIT:
                    events = _emit(events, n, K_OVERSTAY, t, visits, v, R_NONE, clock)
                    n += 1
                if bits & ENDED_BIT:
                    events = _emit(events, n, K_ENDED, t, visits, v, R_EXITED, clock)
                    n += 1
                    _release(units, visits, meta, u, v)
            v = after
        for k in range(lo, hi):
            if not hit_inside[k]:
                continue
            zone, v = hit_zone[k], units[u, U_HEAD]
            while v != -1 and visits[v, V_ZONE] != zone:
                v = visits[v, V_NEXT]
            if v == -1:
                v = open_visit(units, visits, meta, u, zone, _opened(t))
                events = _emit(events, n, K_STARTED, t, visits, v, R_NONE, meta[M_CLOCK])
                n += 1
        units[u, U_LAST] = t
        if units[u, U_OPEN] > 0:
            clock = meta[M_CLOCK]
            if clock - t > max_gap:
                # A unit already further behind the stream clock than max_gap: the watchdog
                # holds at once, whether or not another ping moves the clock before its next.
                events, n = _close_all(units, visits, zones, meta, u, R_SIGNAL_LOST, clock,
                                       events, n)  # fmt: skip
            elif not units[u, U_WATCHED]:
                units[u, U_WATCHED] = 1
                watch(heap, units, meta, t, u)
    return events, n


@compiled
def _opened(ts: int) -> Table:
    row = np.zeros(VISIT_FIELDS, dtype=np.int64)
    row[0:3] = ts  # STARTED, LAST_IN, LAST_SEEN
    row[3] = NO_TIME  # OUT_SINCE
    row[STATE] = _OPEN
    return row


@compiled
def close_units(units: Table, visits: Table, zones: Table, meta: Table, order: Table, at: int,
                max_gap: int, events: Table) -> tuple[Table, int]:  # fmt: skip
    """End of input: close every open visit of the units in `order`, as lost if the unit
    was silent for more than max_gap at `at`."""
    n = _ZERO
    for u in order:
        if units[u, U_OPEN] == 0:
            continue
        last = units[u, U_LAST]
        lost = last != NO_TIME and at - last > max_gap
        reason = R_SIGNAL_LOST if lost else R_END_OF_INPUT
        events, n = _close_all(units, visits, zones, meta, u, reason, at, events, n)
    return events, n


@compiled
def close_visits(units: Table, visits: Table, meta: Table, rows: Table, reason: int, at: int,
                 events: Table, n: int) -> tuple[Table, int]:  # fmt: skip
    """Close the given visit rows, in the given order, their events from row n on."""
    for v in rows:
        visits[v, STATE] = _CLOSED
        events = _emit(events, n, K_ENDED, at, visits, v, reason, meta[M_CLOCK])
        n += 1
        _release(units, visits, meta, visits[v, V_UNIT], v)
    return events, n


@compiled
def visit_rows(units: Table, visits: Table, of: Table) -> tuple[Table, Table]:
    """The open visits of the units `of`, each unit's in the order they opened: for each,
    its place in `of` and its row."""
    total = 0
    for u in of:
        total += units[u, U_OPEN]
    owner = np.empty(total, dtype=np.int64)
    rows = np.empty(total, dtype=np.int64)
    k = 0
    for i in range(len(of)):
        v = units[of[i], U_HEAD]
        while v != -1:
            owner[k], rows[k] = i, v
            k += 1
            v = visits[v, V_NEXT]
    return owner, rows
