"""`dosewatch replay` on a generated day: 1,000,000 pings over 5,000 zones by default.

.venv/bin/python bench/replay.py [--pings N] [--zones N] [--units N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._city import patrol, save, table, zone_specs
from dosewatch.demo import make_zones
from dosewatch.replay import run_replay
from dosewatch.settings import ReplaySettings
from schemas.timefmt import format_ts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pings", type=int, default=1_000_000)
    parser.add_argument("--zones", type=int, default=5_000)
    parser.add_argument("--units", type=int, default=1_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dosewatch-bench-") as tmp:
        root = Path(tmp)
        zones_path = root / "zones.geojson"
        features = make_zones(1, args.zones, box_km=30.0)
        zones_path.write_bytes(orjson.dumps({"type": "FeatureCollection", "features": features}))
        zones = zone_specs(args.zones)
        t0 = time.perf_counter()
        ids, ts, lon, lat = patrol(zones, args.units, max(1, args.pings // args.units))
        pings_path = root / "pings.jsonl"
        with pings_path.open("wb") as f:
            for u, t, x, y in zip(ids, ts.tolist(), lon.tolist(), lat.tolist(), strict=True):
                ping = {"unit_id": u, "ts": format_ts(t), "lat": y, "lon": x, "accuracy_m": 8.0}
                f.write(orjson.dumps(ping) + b"\n")
        gen_s = time.perf_counter() - t0
        settings = ReplaySettings(tz="America/New_York")
        summary = run_replay(zones_path, pings_path, root / "out", settings)
        rows = [
            {
                "pings": summary.pings,
                "zones": args.zones,
                "units": args.units,
                "generate_s": gen_s,
                "replay_s": summary.seconds,
                "pings_per_s": summary.pings / summary.seconds,
                "visits": summary.visits,
                "events": summary.events,
            }
        ]
    print(
        table(
            rows,
            [
                ("pings", "pings"),
                ("zones", "zones"),
                ("replay_s", "replay s"),
                ("pings_per_s", "pings/s"),
                ("visits", "visits"),
                ("events", "events"),
            ],
        )
    )
    print(f"results: {save('replay', rows)}")


if __name__ == "__main__":
    main()
