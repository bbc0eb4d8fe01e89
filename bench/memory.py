"""Memory: resident set size of the core's state at scale, each figure in a fresh process.

    .venv/bin/python bench/memory.py [--zones 100000] [--units 10000]

Prints the memory of the zone index (RSS growth: its geometry lives in GEOS), the visit
tracker with every unit patrolling and the zone board (the Python heap they hold, from
tracemalloc), plus the size of the state each saves per unit and per zone (what goes to
PostgreSQL with the offsets)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._city import save, table
from bench._proc import rss_mb


def measure(what: str, zones: int, units: int) -> dict[str, Any]:
    """Runs in the child: build one structure and report what it cost."""
    import gc
    import tracemalloc

    import orjson

    from bench._city import patrol, zone_specs
    from services.dosage.core.board import ZoneBoard
    from services.dosage.core.params import DosageParams
    from services.dosage.core.periods import ShiftCalendar
    from services.dosage.core.tracker import Fix, VisitTracker
    from services.geofence.core.index import ZoneIndex

    params = DosageParams()
    specs = zone_specs(zones)
    gc.collect()
    base = rss_mb()
    out: dict[str, Any] = {"what": what, "zones": zones, "units": units}
    if what == "index":
        index = ZoneIndex(specs, params)
        del specs
        gc.collect()
        out["mb"] = rss_mb() - base
        out["bytes_each"] = out["mb"] * 2**20 / zones
        out["kept"] = len(index)
    elif what == "tracker":
        index = ZoneIndex(specs, params)
        unit_ids, ts, lon, lat = patrol(specs, units, 20)
        fixes = [Fix(u, t, x, y) for u, t, x, y in
                 zip(unit_ids, ts.tolist(), lon.tolist(), lat.tolist(), strict=True)]  # fmt: skip
        del unit_ids, ts, lon, lat
        # Compile the rules (numba) and import what they use on a throwaway tracker first:
        # the compiler's own heap is paid once per process, not per unit.
        VisitTracker(index, params).process(fixes[:8192])
        gc.collect()
        # The Python heap the tracker holds (freed input would hide it from RSS).
        tracemalloc.start()
        tracker = VisitTracker(index, params)
        for start in range(0, len(fixes), 8192):
            tracker.process(fixes[start : start + 8192])
        del fixes
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        out["mb"] = held / 2**20
        out["bytes_each"] = held / units
        saved = [len(orjson.dumps(tracker.export_unit(u))) for u in tracker.unit_ids]
        out["saved_bytes"] = sum(saved) / len(saved)
        out["open_visits"] = tracker.open_visits
    else:
        rules = {z.zone_id: params.rules_for(z.target_s, z.min_visit_s, z.max_visit_s)
                 for z in specs}  # fmt: skip
        del specs
        gc.collect()
        tracemalloc.start()
        board = ZoneBoard(rules, params, ShiftCalendar("UTC", [time(7), time(15), time(23)]))
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        out["mb"] = held / 2**20
        out["bytes_each"] = held / zones
        sample = [len(orjson.dumps(board.export_zone(z))) for z in list(board.zones)[:1000]]
        out["saved_bytes"] = sum(sample) / len(sample)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--zones", type=int, default=100_000)
    parser.add_argument("--units", type=int, default=10_000)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.zones, args.units)))
        return
    rows = []
    for what in ("index", "tracker", "board"):
        zones = args.zones if what != "tracker" else min(args.zones, 10_000)
        done = subprocess.run(
            [sys.executable, __file__, "--child", what, "--zones", str(zones),
             "--units", str(args.units)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        rows.append(json.loads(done.stdout.splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        r.setdefault("saved_bytes", float("nan"))  # the index is rebuilt from zones, not saved
    columns = ("what", "zones", "units", "mb", "bytes_each", "saved_bytes")
    print(table(rows, [(k, k) for k in columns]))
    print(f"results: {save('memory', rows)}")


if __name__ == "__main__":
    main()
