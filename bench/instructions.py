"""CPU instructions per ping of the core, or of the geofence service's own work, by valgrind.

    .venv/bin/python bench/instructions.py [--stage core|geofence] [--zones 10000]
                                           [--units 5000] [--steps 20]

Timings on this project's shared 2-core machines vary by 10-20% from run to run, which hides
the few per cent a change to the hot path is worth. Instructions executed do not depend on
what else the machine is doing: the same tree gives the same count, to the instruction.
So this runs the patrol of `bench/geofence.py` under `valgrind --tool=callgrind`, counting
only the thread that runs it (imports and set-up, left out, vary by a few per cent from run
to run), and prints instructions per ping. `--stage geofence` adds what the geofence service
does around the core on each fetch, short of the Kafka client and the database (see
`workload`). Run it on two trees to compare them. Needs
valgrind (Debian's package of that name); slow, about a minute at the defaults.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._city import save, table


def workload(zones: int, units: int, steps: int, stage: str) -> None:
    """Build the city and the tracker, then run the patrol through it in batches, in a
    thread of its own (`thread_run` in CPython is what valgrind counts).

    `core`: the index and the visit rules on columns. `geofence`: the geofence service's own
    work on a fetch, by its own methods, without its I/O: `GeofenceService.process` on the
    records as ingest writes them (read into columns, the core, the visit events written as
    `publish` hands them to the producer), and the state save encoded (`state_changes`: the
    changed units exported)."""
    from bench._city import columns, feed, patrol, zone_specs
    from bench.geofence_service import drain, offline
    from services.common.runner import GC_THRESHOLDS
    from services.dosage.core.params import DosageParams
    from services.dosage.core.tracker import VisitTracker
    from services.dosage.core.warmup import warm_up
    from services.geofence.core.index import ZoneIndex

    params = DosageParams()
    specs = zone_specs(zones)
    index = ZoneIndex(specs, params)
    unit_ids, ts, lon, lat = patrol(specs, units, steps)
    cols = columns(unit_ids, ts, lon, lat)
    service, records = offline(index, params, unit_ids, ts, lon, lat)
    gc.set_threshold(*GC_THRESHOLDS)
    batch = 8192

    def core() -> None:
        feed(VisitTracker(index, params), cols, batch)

    def geofence() -> None:
        drain(service, records, batch)

    # Compiled before the count: under valgrind numba sees another CPU, so its cache misses
    # and it compiles afresh (tens of billions of instructions).
    warm_up()
    thread = threading.Thread(target=core if stage == "core" else geofence)
    thread.start()
    thread.join()


def counted(args: argparse.Namespace) -> int:
    """Instructions of the workload's work, run in a child under callgrind."""
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
           # Counted only inside the thread that does the work: imports and set-up vary by a
           # few per cent from run to run (files, addresses); the work does not.
           "--collect-atstart=no", "--toggle-collect=thread_run",
           sys.executable, __file__, "--child", "--stage", args.stage, "--zones", str(args.zones),
           "--units", str(args.units), "--steps", str(args.steps)]  # fmt: skip
    # A fixed hash seed: set and dict orders (and so the work) are the same from run to run.
    env = os.environ | {"PYTHONHASHSEED": "0"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    found = re.search(r"Collected\s*:\s*(\d+)", run.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{run.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--zones", type=int, default=10_000)
    parser.add_argument("--units", type=int, default=5_000)
    parser.add_argument("--steps", type=int, default=20, help="pings per unit")
    parser.add_argument("--stage", choices=["core", "geofence"], default="core")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        workload(args.zones, args.units, args.steps, args.stage)
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind)")
    pings = args.units * args.steps
    work = counted(args)
    row = {
        "stage": args.stage,
        "zones": args.zones,
        "pings": pings,
        "work_instructions": work,
        "instructions_per_ping": work / pings,
    }
    print(
        table(
            [row],
            [
                ("stage", "stage"),
                ("zones", "zones"),
                ("pings", "pings"),
                ("work_instructions", "instructions"),
                ("instructions_per_ping", "per ping"),
            ],
        )
    )
    print(f"results: {save('instructions', [row])}")


if __name__ == "__main__":
    main()
