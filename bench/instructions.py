"""CPU instructions per ping of the core (index plus visit rules), counted by valgrind.

    .venv/bin/python bench/instructions.py [--zones 10000] [--units 5000] [--steps 20]

Timings on this project's shared 2-core machines vary by 10-20% from run to run, which hides
the few per cent a change to the hot path is worth. Instructions executed do not depend on
what else the machine is doing: the same tree gives the same count, to the instruction.
So this runs the patrol of `bench/geofence.py` under `valgrind --tool=callgrind`, counting
only the thread that runs it (imports and set-up, left out, vary by a few per cent from run
to run), and prints instructions per ping. Run it on two trees to compare them. Needs
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


def workload(zones: int, units: int, steps: int) -> tuple[int, int]:
    """Build the city and the tracker, then run the patrol through it in batches, in a
    thread of its own (`thread_run` in CPython is what valgrind counts)."""
    from bench._city import patrol, zone_specs
    from services.common.runner import GC_THRESHOLDS
    from services.dosage.core.params import DosageParams
    from services.dosage.core.tracker import VisitTracker
    from services.geofence.core.index import ZoneIndex

    params = DosageParams()
    specs = zone_specs(zones)
    index = ZoneIndex(specs, params)
    unit_ids, ts, lon, lat = patrol(specs, units, steps)
    t_list: list[int] = ts.tolist()
    lon_list: list[float] = lon.tolist()
    lat_list: list[float] = lat.tolist()
    acc: list[float | None] = [None] * len(unit_ids)
    tracker = VisitTracker(index, params)
    gc.set_threshold(*GC_THRESHOLDS)
    events = [0]

    def run() -> None:
        batch = 8192
        for start in range(0, len(unit_ids), batch):
            end = start + batch
            events[0] += len(tracker.process_columns(unit_ids[start:end], t_list[start:end],
                                                     lon_list[start:end], lat_list[start:end],
                                                     acc[start:end]))  # fmt: skip

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return len(unit_ids), events[0]


def counted(args: argparse.Namespace) -> int:
    """Instructions of the workload's work, run in a child under callgrind."""
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
           # Counted only inside the thread that does the work: imports and set-up vary by a
           # few per cent from run to run (files, addresses); the work does not.
           "--collect-atstart=no", "--toggle-collect=thread_run",
           sys.executable, __file__, "--child", "--zones", str(args.zones),
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
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        workload(args.zones, args.units, args.steps)
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind)")
    pings = args.units * args.steps
    work = counted(args)
    row = {
        "zones": args.zones,
        "pings": pings,
        "work_instructions": work,
        "instructions_per_ping": work / pings,
    }
    print(
        table(
            [row],
            [
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
