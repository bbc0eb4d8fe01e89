"""`dosewatch replay` on a generated day: 1,000,000 pings over 5,000 zones by default.

.venv/bin/python bench/replay.py [--pings N] [--zones N] [--units N] [--runs N] [--keep DIR]

With --runs, the same input is replayed that many times and the table gives the fastest,
the median and the slowest (on a shared machine, the fastest is the least disturbed). With
--keep, the input and each run's output stay in DIR (input/, out-1/, ...), e.g. to compare
two trees' outputs byte for byte.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._city import patrol, save, table, zone_specs
from dosewatch.demo import make_zones
from dosewatch.replay import ReplaySummary, run_replay
from dosewatch.settings import ReplaySettings
from schemas.timefmt import format_ts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pings", type=int, default=1_000_000)
    parser.add_argument("--zones", type=int, default=5_000)
    parser.add_argument("--units", type=int, default=1_000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="keep the input and the outputs here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dosewatch-bench-") as tmp:
        root = args.keep or Path(tmp)
        data = root / "input"
        data.mkdir(parents=True, exist_ok=True)
        zones_path = data / "zones.geojson"
        features = make_zones(1, args.zones, box_km=30.0)
        zones_path.write_bytes(orjson.dumps({"type": "FeatureCollection", "features": features}))
        zones = zone_specs(args.zones)
        t0 = time.perf_counter()
        ids, ts, lon, lat = patrol(zones, args.units, max(1, args.pings // args.units))
        pings_path = data / "pings.jsonl"
        with pings_path.open("wb") as f:
            for u, t, x, y in zip(ids, ts.tolist(), lon.tolist(), lat.tolist(), strict=True):
                ping = {"unit_id": u, "ts": format_ts(t), "lat": y, "lon": x, "accuracy_m": 8.0}
                f.write(orjson.dumps(ping) + b"\n")
        gen_s = time.perf_counter() - t0
        settings = ReplaySettings(tz="America/New_York")
        runs: list[ReplaySummary] = []
        cpu: list[float] = []
        for n in range(1, max(1, args.runs) + 1):
            out = root / f"out-{n}"
            c0 = time.process_time()
            runs.append(run_replay(zones_path, pings_path, out, settings))
            cpu.append(time.process_time() - c0)
            if args.keep is None:
                shutil.rmtree(out)
        seconds = [s.seconds for s in runs]
        summary = runs[0]
        rows = [
            {
                "pings": summary.pings,
                "zones": args.zones,
                "units": args.units,
                "generate_s": gen_s,
                "replay_s": min(seconds),
                "replay_s_median": statistics.median(seconds),
                "replay_s_max": max(seconds),
                "replay_s_runs": seconds,
                "cpu_s": min(cpu),
                "pings_per_s": summary.pings / min(seconds),
                "visits": summary.visits,
                "events": summary.events,
            }
        ]
    columns = [("pings", "pings"), ("zones", "zones"), ("replay_s", "replay s")]
    if len(runs) > 1:
        columns += [("replay_s_median", "median s"), ("replay_s_max", "slowest s")]
    columns += [
        ("cpu_s", "cpu s"),
        ("pings_per_s", "pings/s"),
        ("visits", "visits"),
        ("events", "events"),
    ]
    print(table(rows, columns))
    print(f"results: {save('replay', rows)}")


if __name__ == "__main__":
    main()
