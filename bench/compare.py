"""Geofencing compared: dosewatch's zone index, PostGIS and a naive shapely loop, same data.

    .venv/bin/python bench/compare.py [--zones 1000,10000] [--points 200000]

Everything is generated from seeds (bench/_city.py): the same zones and the same pings go to
every system, and each system's (point, zone) "inside" pairs are checked against dosewatch's.
Boundary semantics everywhere: a point on a zone's boundary is inside (dosewatch tests
`intersects_xy` on the zone as drawn in lon/lat; PostGIS runs `ST_Intersects` on planar
lon/lat `geometry`; the naive loop calls prepared `intersects`). A few probes placed exactly on
zone vertices and on edge midpoints are appended to the pings to exercise that.

Rates are points per second of CPU on one core, counted for the process that does the lookups:
this process for dosewatch and shapely, the PostgreSQL backend serving the connection for
PostGIS (its pid from pg_backend_pid(), its CPU from /proc/<pid>/stat). Wall-clock rates are
printed beside them (for PostGIS: per connection, including asyncpg and the round trips).

Systems:
- dosewatch: `ZoneIndex.classify`, the call the geofence service makes per batch (it also finds
  the points within the 25 m exit buffer of a zone; only the inside pairs are compared).
- PostGIS: a GiST-indexed zone table in a scratch database on 127.0.0.1:5432, batches sent as
  two float8[] through asyncpg and joined LATERAL to the zones. If the extension is missing the
  script installs Debian's postgresql-<major>-postgis-3 (needs root); if that fails, PostGIS is
  skipped with the reason printed.
- shapely STRtree + intersects_xy: a bulk query over the zones as drawn, then the exact test;
  the floor for a shapely-based index (the issue's reference), not a system anyone runs.
- dosewatch geofence service: the whole service as deployed, Kafka to Kafka, on 10,000
  patrolling units' pings in the same city (see bench/geofence_service.py), per core of its
  own CPU, with its ratio to PostGIS's lookups per core.
- naive shapely: for each point, every prepared zone's `.intersects`, one at a time; run on a
  subsample (plus the boundary probes) and extrapolated: labelled "(extrapolated)".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import shapely

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._city import points, save, table, zone_specs
from bench._proc import cpu_seconds
from services.dosage.core.params import DosageParams
from services.geofence.core.index import ZoneIndex
from services.geofence.core.zone import ZoneSpec

FloatArray = npt.NDArray[np.float64]
Pairs = npt.NDArray[np.int64]  # point * zone_count + zone, sorted and unique
SCRATCH_DB = "dosewatch_compare"


@dataclass(slots=True)
class Measured:
    pairs: Pairs
    points: int
    cpu_s: float
    wall_s: float
    tested: npt.NDArray[np.int64] | None = None  # the subsample's point indices, if any


def encode(pt: npt.NDArray[Any], zn: npt.NDArray[Any], zones: int) -> Pairs:
    return np.unique(pt.astype(np.int64) * zones + zn.astype(np.int64))


def boundary_probes(zones: list[ZoneSpec], count: int, seed: int) -> tuple[FloatArray, FloatArray]:
    """Half on a zone vertex, half on the midpoint of one of its edges (as float64 gives it)."""
    rng = np.random.default_rng(seed)
    lon, lat = [], []
    for k, zi in enumerate(rng.integers(0, len(zones), count).tolist()):
        ring = np.asarray(zones[zi].geometry.exterior.coords)
        j = int(rng.integers(0, len(ring) - 1))
        x, y = ring[j] if k % 2 == 0 else (ring[j] + ring[j + 1]) / 2.0
        lon.append(float(x))
        lat.append(float(y))
    return np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)


# -- the systems --------------------------------------------------------------------------------


def run_dosewatch(index: ZoneIndex, lon: FloatArray, lat: FloatArray, batch: int) -> Measured:
    index.classify(lon[:batch], lat[:batch])  # warm-up: first PROJ call, allocator
    pt_parts, zn_parts = [], []
    c0, w0 = time.process_time(), time.perf_counter()
    for start in range(0, len(lon), batch):
        hits = index.classify(lon[start : start + batch], lat[start : start + batch])
        pt_parts.append(hits.point[hits.inside] + start)
        zn_parts.append(hits.zone[hits.inside])
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    pairs = encode(np.concatenate(pt_parts), np.concatenate(zn_parts), len(index))
    return Measured(pairs, len(lon), cpu, wall)


def run_strtree(zones: list[ZoneSpec], lon: FloatArray, lat: FloatArray, batch: int) -> Measured:
    geoms = np.asarray([z.geometry for z in zones], dtype=object)
    shapely.prepare(geoms)
    tree = shapely.STRtree(geoms)
    pt_parts, zn_parts = [], []
    c0, w0 = time.process_time(), time.perf_counter()
    for start in range(0, len(lon), batch):
        x, y = lon[start : start + batch], lat[start : start + batch]
        pt, zn = tree.query(shapely.points(x, y))
        keep = shapely.intersects_xy(geoms[zn], x[pt], y[pt])
        pt_parts.append(pt[keep] + start)
        zn_parts.append(zn[keep])
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    pairs = encode(np.concatenate(pt_parts), np.concatenate(zn_parts), len(zones))
    return Measured(pairs, len(lon), cpu, wall)


def run_naive(zones: list[ZoneSpec], lon: FloatArray, lat: FloatArray, which: Pairs) -> Measured:
    """For each point (indices `which`), every prepared zone in turn: no index at all."""
    geoms = [z.geometry for z in zones]
    for g in geoms:
        shapely.prepare(g)
    found: list[int] = []
    n = len(geoms)
    c0, w0 = time.process_time(), time.perf_counter()
    for i in which.tolist():
        p = shapely.Point(lon[i], lat[i])
        for zi, g in enumerate(geoms):
            if g.intersects(p):
                found.append(i * n + zi)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    pairs = np.unique(np.asarray(found, dtype=np.int64))
    return Measured(pairs, len(which), cpu, wall, tested=which)


# -- PostGIS ------------------------------------------------------------------------------------

QUERY = """
SELECT coalesce(array_agg(p.i), '{}')::int8[], coalesce(array_agg(z.idx), '{}')::int4[]
FROM unnest($1::float8[], $2::float8[]) WITH ORDINALITY AS p(lon, lat, i)
CROSS JOIN LATERAL (
    SELECT idx FROM zones
    WHERE ST_Intersects(geom, ST_SetSRID(ST_MakePoint(p.lon, p.lat), 4326))
) AS z
"""


async def _ensure_postgis(dsn: str) -> str | None:
    """None when the extension is available (installing it if need be), else why not."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        major = int(await conn.fetchval("SHOW server_version_num")) // 10_000
        have = await conn.fetchval(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'postgis'"
        )
    finally:
        await conn.close()
    if have:
        return None
    package = f"postgresql-{major}-postgis-3"
    if shutil.which("apt-get") is None:
        return f"the postgis extension is missing and there is no apt-get to install {package}"
    if os.geteuid() != 0:
        return f"the postgis extension is missing; installing {package} needs root"
    print(f"postgis extension missing: apt-get install -y {package}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", package]
    done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:  # perhaps stale package lists
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"apt-get install {package} failed: {tail[0]}"
    return None


City = tuple[list[ZoneSpec], FloatArray, FloatArray]


async def _postgis(
    dsn: str, cities: dict[int, City], batch: int
) -> tuple[str, dict[int, Measured]]:
    import asyncpg

    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {SCRATCH_DB}")
        await admin.execute(f"CREATE DATABASE {SCRATCH_DB}")
    finally:
        await admin.close()
    conn = await asyncpg.connect(dsn, database=SCRATCH_DB)
    out: dict[int, Measured] = {}
    try:
        await conn.execute("CREATE EXTENSION postgis")
        version = str(await conn.fetchval("SELECT postgis_full_version()"))
        pid = int(await conn.fetchval("SELECT pg_backend_pid()"))
        for count, (zones, lon, lat) in cities.items():
            lons, lats = lon.tolist(), lat.tolist()
            await conn.execute(
                "DROP TABLE IF EXISTS zones;"
                "CREATE TABLE zones (idx int4 PRIMARY KEY, geom geometry(Polygon, 4326) NOT NULL)"
            )
            await conn.executemany(
                "INSERT INTO zones VALUES ($1, ST_GeomFromWKB($2, 4326))",
                [(i, shapely.to_wkb(z.geometry)) for i, z in enumerate(zones)],
            )
            await conn.execute("CREATE INDEX zones_geom ON zones USING gist (geom); ANALYZE zones")
            stmt = await conn.prepare(QUERY)
            plan = "\n".join(
                r[0] for r in await conn.fetch(f"EXPLAIN {QUERY}", lons[:batch], lats[:batch])
            )
            if "zones_geom" not in plan:
                print(f"warning: the PostGIS plan at {count} zones skips the GiST index:\n{plan}")
            await stmt.fetchrow(lons[:batch], lats[:batch])  # warm-up: caches, plan
            pt_parts, zn_parts = [], []
            c0, w0 = cpu_seconds(pid), time.perf_counter()
            for start in range(0, len(lons), batch):
                row = await stmt.fetchrow(lons[start : start + batch], lats[start : start + batch])
                assert row is not None
                pt_parts.append(np.asarray(row[0], dtype=np.int64) - 1 + start)
                zn_parts.append(np.asarray(row[1], dtype=np.int64))
            cpu, wall = cpu_seconds(pid) - c0, time.perf_counter() - w0
            pairs = encode(np.concatenate(pt_parts), np.concatenate(zn_parts), count)
            out[count] = Measured(pairs, len(lons), cpu, wall)
    finally:
        await conn.close()
        admin = await asyncpg.connect(dsn)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {SCRATCH_DB}")
        finally:
            await admin.close()
    return version, out


def run_postgis(dsn: str, cities: dict[int, City], batch: int) -> tuple[str, dict[int, Measured]]:
    """PostGIS version and results per zone count; ("skipped: why", {}) when it cannot run."""
    try:
        why = asyncio.run(_ensure_postgis(dsn))
        if why is not None:
            return f"skipped: {why}", {}
        return asyncio.run(_postgis(dsn, cities, batch))
    except (OSError, ImportError) as e:
        return f"skipped: cannot reach PostgreSQL at {dsn}: {e}", {}
    except Exception as e:  # asyncpg's errors: the comparison goes on without PostGIS
        return f"skipped: {type(e).__name__}: {e}", {}


# -- the comparison -----------------------------------------------------------------------------


def mismatches(ref: Pairs, got: Pairs, zones: int, probe_from: int) -> tuple[int, int, int]:
    """(pairs only dosewatch has, pairs only the other has, how many of those are probes)."""
    missing = np.setdiff1d(ref, got, assume_unique=True)
    extra = np.setdiff1d(got, ref, assume_unique=True)
    probes = int(((missing // zones) >= probe_from).sum() + ((extra // zones) >= probe_from).sum())
    return len(missing), len(extra), probes


DOSEWATCH = "dosewatch ZoneIndex.classify"
POSTGIS = "PostGIS ST_Intersects (backend CPU)"
STRTREE = "shapely STRtree + intersects_xy"
NAIVE = "naive shapely loop (extrapolated)"
SYSTEMS = (DOSEWATCH, POSTGIS, STRTREE, NAIVE)
SERVICE = "dosewatch geofence service, Kafka to Kafka"


def _examples(ref: Pairs, got: Pairs, zones: int, most: int = 3) -> str:
    diff = np.setxor1d(ref, got, assume_unique=True)[:most]
    side = ["dosewatch" if d in ref else "other" for d in diff.tolist()]
    return ", ".join(
        f"point {d // zones} in zone #{d % zones} ({who} only)"
        for d, who in zip(diff.tolist(), side, strict=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--zones", default="1000,10000")
    parser.add_argument("--points", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5000, help="dosewatch and STRtree batch")
    parser.add_argument("--pg-batch", type=int, default=5000, help="points per PostGIS query")
    parser.add_argument(
        "--naive-tests",
        type=int,
        default=4_000_000,
        help="point-zone tests for the naive loop's subsample (points = this / zones)",
    )
    parser.add_argument("--probes", type=int, default=200, help="points on zone boundaries")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--no-postgis", action="store_true")
    parser.add_argument(
        "--service-pings", type=int, default=500_000,
        help="pings through the geofence service, Kafka to Kafka (0: skip)",
    )  # fmt: skip
    args = parser.parse_args()

    counts = [int(z) for z in args.zones.split(",")]
    params = DosageParams()
    data: dict[int, City] = {}
    for count in counts:
        zones = zone_specs(count, seed=args.seed)
        lon, lat = points(zones, args.points, seed=args.seed + 1)
        plon, plat = boundary_probes(zones, args.probes, seed=args.seed + 2)
        data[count] = (zones, np.concatenate([lon, plon]), np.concatenate([lat, plat]))

    results: dict[tuple[str, int], Measured] = {}
    for count, (zones, lon, lat) in data.items():
        results[DOSEWATCH, count] = run_dosewatch(ZoneIndex(zones, params), lon, lat, args.batch)
        results[STRTREE, count] = run_strtree(zones, lon, lat, args.batch)
        sub = max(20, args.naive_tests // count)
        which = np.concatenate(
            [np.arange(min(sub, args.points)), np.arange(args.points, len(lon))]
        ).astype(np.int64)
        results[NAIVE, count] = run_naive(zones, lon, lat, which)

    pg_note = "not run (--no-postgis)"
    if not args.no_postgis:
        pg_note, got = run_postgis(args.dsn, data, args.pg_batch)
        for count, measured in got.items():
            results[POSTGIS, count] = measured
    print(f"PostGIS: {pg_note}")

    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for count in counts:
        ref = results[DOSEWATCH, count]
        ref_rate = ref.points / ref.cpu_s
        probe_from = args.points
        for name in SYSTEMS:
            m = results.get((name, count))
            if m is None:
                continue
            expected = ref.pairs
            if m.tested is not None:  # a subsample: compare on its points only
                expected = ref.pairs[np.isin(ref.pairs // count, m.tested)]
            missing, extra, probes = mismatches(expected, m.pairs, count, probe_from)
            if missing or extra:
                notes.append(
                    f"MISMATCH {name}, {count:,} zones: {missing} inside pairs only dosewatch "
                    f"found, {extra} only this system found ({probes} on boundary probes); "
                    f"e.g. {_examples(expected, m.pairs, count)}"
                )
            if m.tested is not None:
                notes.append(
                    f"{name}, {count:,} zones: measured on {m.points:,} points; all "
                    f"{ref.points:,} would take {ref.points * m.cpu_s / m.points:,.1f} s of CPU"
                )
            rate = m.points / m.cpu_s if m.cpu_s > 0 else float("inf")
            rows.append(
                {
                    "system": name,
                    "zones": count,
                    "points": m.points,
                    "pts_per_core_s": rate,
                    "wall_pts_per_s": m.points / m.wall_s,
                    "cpu_s": m.cpu_s,
                    "wall_s": m.wall_s,
                    "dosewatch_x": ref_rate / rate,
                    "pairs": len(m.pairs),
                    "only_dosewatch": missing,
                    "only_this": extra,
                    "of_which_probes": probes,
                }
            )
    print(
        table(
            rows,
            [
                ("system", "system"),
                ("zones", "zones"),
                ("points", "points"),
                ("pts_per_core_s", "pts/s per core"),
                ("wall_pts_per_s", "wall pts/s"),
                ("dosewatch_x", "dosewatch / this"),
                ("pairs", "inside pairs"),
                ("only_dosewatch", "only dw"),
                ("only_this", "only this"),
                ("of_which_probes", "probes"),
            ],
        )
    )
    print(
        f"{args.probes:,} of the points are boundary probes; 'only dw' / 'only this' count "
        "inside pairs found by one side only ('probes': how many of those are probes)."
    )
    for note in notes:
        print(note)
    if args.service_pings:
        rows += service_rows(counts, args.service_pings, {
            r["zones"]: r["pts_per_core_s"] for r in rows if r["system"] == POSTGIS
        })  # fmt: skip
    for row in rows:
        row["postgis"] = pg_note if row["system"] == POSTGIS else None
    print(f"results: {save('compare', rows)}")


def service_rows(
    counts: list[int], pings: int, postgis_rate: dict[int, float]
) -> list[dict[str, Any]]:
    """The whole geofence service (fetch, decode, index, visit rules, produce, state saves),
    per core of its own CPU, against PostGIS's lookups alone per core of backend CPU."""
    from bench.geofence_service import measure

    measured = asyncio.run(measure(counts, units=10_000, pings=pings))
    rows = []
    for m in measured:
        rate = m["pings_per_core_s"]
        pg = postgis_rate.get(m["zones"])
        rows.append({"system": SERVICE, "zones": m["zones"], "points": m["pings"],
                     "pts_per_core_s": rate, "cpu_s": m["cpu_s"], "wall_s": m["wall_s"],
                     "visit_events": m["visit_events"],
                     "service_x_postgis": rate / pg if pg else None})  # fmt: skip
    print(table(rows, [("system", "system"), ("zones", "zones"), ("points", "pings"),
                       ("pts_per_core_s", "pings/s per core"), ("visit_events", "visit events"),
                       ("service_x_postgis", "this / PostGIS")]))  # fmt: skip
    print(
        "The service's pings are 10,000 units patrolling the same city (bench/_city.py patrol), "
        "not the points above: it keeps per-unit visit state, which needs tracks."
    )
    return rows


if __name__ == "__main__":
    main()
