"""Compile the core's compiled code before the first batch needs it.

Compiling takes seconds from a cold cache; a service that compiled on its first fetch would
stall that fetch (and every ping behind it) instead. `warm_up` runs each compiled function
once on a made-up zone and unit (with the writer of their events, and the reader of a
fetch's times, `canonical_times`); from numba's cache it costs a fraction of a second.
"""

from __future__ import annotations

from shapely.geometry import box

from schemas.timefmt import canonical_times
from services.dosage.core.events import visit_lines, visit_records
from services.dosage.core.params import DosageParams
from services.dosage.core.tracker import Fix, VisitTracker
from services.geofence.core.index import ZoneIndex
from services.geofence.core.zone import ZoneSpec

_T0 = 1_780_000_000_000


def warm_up() -> None:
    params = DosageParams()
    zone = ZoneSpec("warm-up", box(0.0, 0.0, 0.001, 0.001))
    tracker = VisitTracker(ZoneIndex([zone], params), params)
    inside, outside = (0.0005, 0.0005), (0.01, 0.01)
    # A visit that meets its target, overstays and is exited; then one the watchdog ends.
    for i, (lon, lat) in enumerate([inside] * 22 + [outside] * 3 + [inside]):
        rows = tracker.process_rows(["u"], [_T0 + i * 60_000], [lon], [lat], [None])
        visit_records(rows, "urn:warm-up")
        visit_lines(rows, "urn:warm-up")
    tracker.advance(_T0 + 3_600_000)
    tracker.process([Fix("v", _T0 + 3_600_000, *inside)])
    tracker.restore_unit("v", tracker.export_unit("v"))
    tracker.replace_index(ZoneIndex([], params))
    tracker.finish()
    canonical_times(["2026-05-14T18:00:05.123Z", "2026-05-14T18:00:06.123Z"])
