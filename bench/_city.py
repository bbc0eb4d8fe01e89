"""Seeded synthetic data shared by the benchmarks: nothing is shipped, everything is generated."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import shapely

from dosewatch.demo import CENTER_LAT, CENTER_LON, make_zones
from schemas.zone import parse_zone_collection
from services.dosage.core.tracker import VisitTracker
from services.geofence.core.zone import ZoneSpec

RESULTS = Path(__file__).parent / "results"
# A patrol as the geofence service holds a fetch: columns (unit, ts, lon, lat, accuracy).
Columns = tuple[list[str], list[int], list[float], list[float], list[float | None]]


def zone_specs(count: int, seed: int = 1, box_km: float = 30.0) -> list[ZoneSpec]:
    """Irregular 100–400 m zones in a box_km square, as in the performance issue."""
    features = make_zones(seed, count, box_km=box_km)
    zones, errors = parse_zone_collection({"type": "FeatureCollection", "features": features})
    assert not errors, errors[:3]
    return [ZoneSpec(z.zone_id, z.shape(), target_s=z.properties.target_s) for z in zones]


def points(
    zones: list[ZoneSpec], count: int, seed: int = 2, box_km: float = 30.0, share_near: float = 0.3
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Uniform points over the box, with `share_near` of them scattered around zone centres."""
    rng = np.random.default_rng(seed)
    dlat = box_km * 500.0 / 111_132.0
    dlon = dlat / np.cos(np.radians(CENTER_LAT))
    lon = CENTER_LON + rng.uniform(-dlon, dlon, count)
    lat = CENTER_LAT + rng.uniform(-dlat, dlat, count)
    centres = shapely.centroid(np.asarray([z.geometry for z in zones], dtype=object))
    near = int(count * share_near)
    pick = rng.integers(0, len(centres), near)
    lon[:near] = shapely.get_x(centres[pick]) + rng.normal(0.0, 0.0008, near)
    lat[:near] = shapely.get_y(centres[pick]) + rng.normal(0.0, 0.0006, near)
    order = rng.permutation(count)
    return lon[order], lat[order]


def environment() -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": commit,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }


def columns(
    unit_ids: list[str], ts: npt.NDArray[np.int64], lon: npt.NDArray[np.float64],
    lat: npt.NDArray[np.float64],
) -> Columns:  # fmt: skip
    """A `patrol` as lists, without accuracies."""
    return unit_ids, ts.tolist(), lon.tolist(), lat.tolist(), [None] * len(unit_ids)


def feed(tracker: VisitTracker, cols: Columns, batch: int, as_rows: bool = False) -> int:
    """Run the pings through the tracker `batch` at a time, in order; the events made, as
    `VisitEvent`s (as a replay takes them) or left as rows (`as_rows`: as the geofence
    service takes them)."""
    unit_ids, ts, lon, lat, acc = cols
    run = tracker.process_rows if as_rows else tracker.process_columns
    events = 0
    for i in range(0, len(unit_ids), batch):
        j = i + batch
        events += len(run(unit_ids[i:j], ts[i:j], lon[i:j], lat[i:j], acc[i:j]))
    return events


def save(name: str, rows: list[dict[str, Any]]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"env": environment(), "rows": rows}, indent=2) + "\n")
    return path


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    head = [title for _, title in columns]
    body = [[_cell(r[key]) for key, _ in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if value >= 100 else f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def patrol(
    zones: list[ZoneSpec], units: int, steps: int, seed: int = 3, interval_s: float = 15.0
) -> tuple[list[str], npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Units that alternate a random-walk drive (~9 m/s) with 2–25 min stops at hot spots,
    with ~6 m of GPS jitter. Returns pings in time order: unit ids, ts (ms), lon, lat."""
    rng = np.random.default_rng(seed)
    m_lat = 111_132.0
    m_lon = m_lat * np.cos(np.radians(CENTER_LAT))
    centres = shapely.centroid(np.asarray([z.geometry for z in zones], dtype=object))
    cx, cy = (
        (shapely.get_x(centres) - CENTER_LON) * m_lon,
        (shapely.get_y(centres) - CENTER_LAT) * m_lat,
    )
    half = 15_000.0
    x, y = rng.uniform(-half, half, units), rng.uniform(-half, half, units)
    heading = rng.uniform(0, 2 * np.pi, units)
    dwell = np.zeros(units, dtype=np.int64)  # steps left at a stop
    ids = [f"unit-{u:05d}" for u in range(units)]
    out_u, out_t, out_x, out_y = [], [], [], []
    t0 = 1_778_781_600_000
    for step in range(steps):
        moving = dwell == 0
        heading[moving] += rng.normal(0.0, 0.4, int(moving.sum()))
        x[moving] = np.clip(x[moving] + np.cos(heading[moving]) * 9 * interval_s, -half, half)
        y[moving] = np.clip(y[moving] + np.sin(heading[moving]) * 9 * interval_s, -half, half)
        dwell[~moving] -= 1
        stop = moving & (rng.random(units) < 0.02)
        pick = rng.integers(0, len(cx), int(stop.sum()))
        x[stop], y[stop] = cx[pick], cy[pick]
        dwell[stop] = rng.integers(8, 100, int(stop.sum()))
        out_u.append(np.arange(units))
        out_t.append(t0 + step * int(interval_s * 1000) + rng.integers(0, 5000, units))
        out_x.append(x + rng.normal(0, 6.0, units))
        out_y.append(y + rng.normal(0, 6.0, units))
    u = np.concatenate(out_u)
    ts = np.concatenate(out_t)
    lon = CENTER_LON + np.concatenate(out_x) / m_lon
    lat = CENTER_LAT + np.concatenate(out_y) / m_lat
    order = np.argsort(ts, kind="stable")
    return [ids[i] for i in u[order].tolist()], ts[order], lon[order], lat[order]
