"""Where the geofence service's time goes on a fetch, part by part, on one core.

    .venv/bin/python bench/stage_parts.py [--zones 10000] [--units 5000] [--steps 20]

Runs `bench/instructions.py`'s geofence stage (the service's own `process` on the records as
ingest writes them, then `state_changes`) with a timer around each of its parts: reading the
fetch into columns, the core (index and visit rules), writing the events as the producer takes
them (`visit_records`: CloudEvents JSON, keyed by zone), and encoding the state save. The
parts are timed where the service calls them (its reader, its tracker and its event writer are
wrapped, not copied), so the figures follow the service as it changes. Each wrapper is called
once a fetch, so it costs nothing that shows. Timings: compare shares, and runs on one
machine state.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import services.geofence.service as geofence
from bench._city import patrol, save, table, zone_specs
from bench.geofence_service import drain, offline
from services.common.runner import GC_THRESHOLDS
from services.dosage.core.params import DosageParams
from services.geofence.core.index import ZoneIndex

PARTS = ["read", "core", "events", "state save"]


def timed(spent: dict[str, float], part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    clock = time.perf_counter

    def wrapper(*args: Any) -> Any:
        t0 = clock()
        try:
            return fn(*args)
        finally:
            spent[part] += clock() - t0

    return wrapper


def measure(zones: int, units: int, steps: int, batch: int) -> dict[str, Any]:
    params = DosageParams()
    specs = zone_specs(zones)
    service, records = offline(ZoneIndex(specs, params), params, *patrol(specs, units, steps))
    spent = dict.fromkeys(PARTS, 0.0)
    service.reader.read_values = timed(spent, "read", service.reader.read_values)  # type: ignore[method-assign]
    tracker = service.trackers[0]
    tracker.process_rows = timed(spent, "core", tracker.process_rows)  # type: ignore[method-assign]
    module = vars(geofence)  # the name `process` calls, rebound for the run
    built = module["visit_records"]
    module["visit_records"] = timed(spent, "events", built)
    state = timed(spent, "state save", service.state_changes)
    before = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    t0 = time.perf_counter()
    try:
        events = drain(service, records, batch, state)
    finally:
        module["visit_records"] = built
        gc.set_threshold(*before)
    total = time.perf_counter() - t0
    row: dict[str, Any] = {"zones": zones, "pings": len(records), "events": events}
    row |= {f"{part} us": spent[part] / len(records) * 1e6 for part in PARTS}
    row["other us"] = (total - sum(spent.values())) / len(records) * 1e6
    row["total us"] = total / len(records) * 1e6
    row["pings/s"] = len(records) / total
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--zones", type=int, default=10_000)
    parser.add_argument("--units", type=int, default=5_000)
    parser.add_argument("--steps", type=int, default=20, help="pings per unit")
    parser.add_argument("--batch", type=int, default=8192)
    args = parser.parse_args()
    row = measure(args.zones, args.units, args.steps, args.batch)
    names = ["zones", "pings", "events", *(f"{p} us" for p in PARTS), "other us", "total us"]
    print(table([row], [(n, n) for n in [*names, "pings/s"]]))
    shares = ", ".join(f"{p} {row[f'{p} us'] / row['total us']:.0%}" for p in PARTS)
    print(f"µs per ping; shares: {shares}")
    print(f"results: {save('stage_parts', [row])}")


if __name__ == "__main__":
    main()
