"""A seeded synthetic city: irregular hot spots and patrol units that drive, stop and drift.

Used by `dosewatch demo` (and `make run`) and by the benchmarks; nothing here is shipped data.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from schemas.timefmt import format_ts

# Lower Manhattan; any point works, the geometry is local.
CENTER_LON, CENTER_LAT = -73.99, 40.72
_M_PER_DEG_LAT = 111_132.0


def _to_lonlat(x: float, y: float, lon0: float, lat0: float) -> tuple[float, float]:
    return (
        lon0 + x / (_M_PER_DEG_LAT * math.cos(math.radians(lat0))),
        lat0 + y / _M_PER_DEG_LAT,
    )


def make_zones(
    seed: int, count: int, box_km: float = 6.0, lon0: float = CENTER_LON, lat0: float = CENTER_LAT
) -> list[dict[str, Any]]:
    """Star-shaped (hence always valid) polygons 100–400 m across, scattered over a square box."""
    rng = random.Random(seed)
    half = box_km * 500.0
    features = []
    for i in range(count):
        cx, cy = rng.uniform(-half, half), rng.uniform(-half, half)
        radius = rng.uniform(50.0, 200.0)
        n = rng.randint(6, 12)
        # Jittered but evenly spread angles keep every gap under pi: the ring is simple.
        step = 2 * math.pi / n
        angles = [k * step + rng.uniform(-0.3, 0.3) * step for k in range(n)]
        ring = []
        for a in angles:
            r = radius * rng.uniform(0.7, 1.0)
            ring.append(list(_to_lonlat(cx + r * math.cos(a), cy + r * math.sin(a), lon0, lat0)))
        ring.append(ring[0])
        props: dict[str, Any] = {"name": f"Hot spot {i}"}
        if rng.random() < 0.15:
            props["target_s"] = rng.choice([600, 720])
        features.append(
            {
                "type": "Feature",
                "id": f"Z{i:05d}",
                "properties": props,
                "geometry": {"type": "Polygon", "coordinates": [ring]},
            }
        )
    return features


def _centroid_m(feature: dict[str, Any], lon0: float, lat0: float) -> tuple[float, float]:
    ring = feature["geometry"]["coordinates"][0][:-1]
    lon = sum(p[0] for p in ring) / len(ring)
    lat = sum(p[1] for p in ring) / len(ring)
    return (
        (lon - lon0) * _M_PER_DEG_LAT * math.cos(math.radians(lat0)),
        (lat - lat0) * _M_PER_DEG_LAT,
    )


@dataclass(slots=True)
class _Unit:
    id: str
    x: float
    y: float
    goal: tuple[float, float] | None = None
    dwell_until: int = 0
    silent_until: int = 0


def make_pings(
    seed: int,
    zones: list[dict[str, Any]],
    units: int,
    hours: float,
    interval_s: float = 15.0,
    start_ms: int = 1_778_781_600_000,  # 2026-05-14T18:00:00Z
    lon0: float = CENTER_LON,
    lat0: float = CENTER_LAT,
) -> Iterator[dict[str, Any]]:
    """Pings in time order across units: drives between hot spots, stops of varied length
    (pass-throughs, near-target, overstays), GPS jitter, dropouts, bad fixes and duplicates."""
    rng = random.Random(seed + 1)
    targets = [_centroid_m(z, lon0, lat0) for z in zones] or [(0.0, 0.0)]
    step_ms = round(interval_s * 1000)
    end_ms = start_ms + round(hours * 3_600_000)
    state = [_Unit(f"unit-{u:04d}", *rng.choice(targets)) for u in range(units)]
    t = start_ms
    while t < end_ms:
        for s in state:
            t_u = t + rng.randint(0, step_ms // 3)
            if s.goal is None and t_u >= s.dwell_until:
                s.goal = rng.choice(targets)
            if s.goal is not None:
                gx, gy = s.goal
                dx, dy = gx - s.x, gy - s.y
                dist = math.hypot(dx, dy)
                travel = rng.uniform(7.0, 13.0) * interval_s
                if dist <= travel:
                    s.x, s.y, s.goal = gx, gy, None
                    stop = rng.choices(
                        [(20, 100), (600, 1000), (1250, 1700), (150, 500)], [3, 3, 1, 3]
                    )[0]
                    s.dwell_until = t_u + rng.randint(*stop) * 1000
                else:
                    s.x += dx / dist * travel
                    s.y += dy / dist * travel
            if t_u < s.silent_until:
                continue
            if rng.random() < 0.004:  # tunnel, dead modem: a few minutes without fixes
                s.silent_until = t_u + rng.randint(60, 400) * 1000
                continue
            jitter = rng.gauss(0.0, 6.0), rng.gauss(0.0, 6.0)
            accuracy = round(rng.uniform(3.0, 20.0), 1)
            if rng.random() < 0.02:
                accuracy = round(rng.uniform(60.0, 400.0), 1)
                jitter = rng.gauss(0.0, 80.0), rng.gauss(0.0, 80.0)
            lon, lat = _to_lonlat(s.x + jitter[0], s.y + jitter[1], lon0, lat0)
            ping = {
                "unit_id": s.id,
                "ts": format_ts(t_u),
                "lat": round(lat, 7),
                "lon": round(lon, 7),
                "accuracy_m": accuracy,
            }
            yield ping
            if rng.random() < 0.01:
                yield dict(ping)  # AVL gateways resend
        t += step_ms


def write_demo_city(
    out: Path, seed: int, zones: int, units: int, hours: float
) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    features = make_zones(seed, zones)
    zones_path = out / "zones.geojson"
    zones_path.write_bytes(
        orjson.dumps(
            {"type": "FeatureCollection", "features": features}, option=orjson.OPT_INDENT_2
        )
    )
    pings_path = out / "pings.jsonl"
    with pings_path.open("wb") as f:
        for ping in make_pings(seed, features, units, hours):
            f.write(orjson.dumps(ping) + b"\n")
    return zones_path, pings_path
