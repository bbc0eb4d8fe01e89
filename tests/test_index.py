"""The zone index against plain, per-point geometry, and the metric projection's accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from pyproj import Geod
from shapely.geometry import Point, Polygon

from services.dosage.core.params import DosageParams
from services.geofence.core.index import ZoneIndex
from services.geofence.core.projection import LocalProjection
from services.geofence.core.zone import ZoneSpec

GEOD = Geod(ellps="WGS84")
LON0, LAT0 = -74.0, 40.7


def square(zone_id: str, lon: float, lat: float, half_m: float) -> ZoneSpec:
    dlat = half_m / 111_132.0
    dlon = half_m / (111_320.0 * np.cos(np.radians(lat)))
    ring = [
        (lon - dlon, lat - dlat),
        (lon + dlon, lat - dlat),
        (lon + dlon, lat + dlat),
        (lon - dlon, lat + dlat),
    ]
    return ZoneSpec(zone_id, Polygon(ring))


ZONES = [
    square("A", LON0, LAT0, 100.0),
    square("B", LON0 + 0.0015, LAT0, 100.0),  # overlaps A
    square("C", LON0 + 0.01, LAT0 + 0.005, 60.0),
    ZoneSpec(
        "H",
        Polygon(
            square("o", LON0 - 0.01, LAT0, 150).geometry.exterior.coords,
            [square("i", LON0 - 0.01, LAT0, 60).geometry.exterior.coords],
        ),
    ),
]
INDEX = ZoneIndex(ZONES, DosageParams())


def naive(lon: float, lat: float, buffer_m: float) -> dict[str, bool]:
    """Per point and zone: covers in lon/lat, else geodesic-free metric distance via AEQD."""
    proj = LocalProjection(lon, lat)  # centred on the point itself: distances exact here
    out: dict[str, bool] = {}
    for z in ZONES:
        if z.geometry.covers(Point(lon, lat)):
            out[z.zone_id] = True
            continue
        metric = proj.geometries(np.asarray([z.geometry], dtype=object))[0]
        if metric.distance(Point(0.0, 0.0)) <= buffer_m:
            out[z.zone_id] = False
    return out


def classify_one(index: ZoneIndex, lon: float, lat: float) -> dict[str, bool]:
    hits = index.classify(np.array([lon]), np.array([lat]))
    return {index.zone_ids[z]: bool(i) for z, i in zip(hits.zone, hits.inside, strict=True)}


@settings(max_examples=300, deadline=None)
@given(
    st.floats(LON0 - 0.013, LON0 + 0.013, allow_nan=False),
    st.floats(LAT0 - 0.004, LAT0 + 0.007, allow_nan=False),
)
def test_index_agrees_with_naive_geometry(lon: float, lat: float) -> None:
    got = classify_one(INDEX, lon, lat)
    want = naive(lon, lat, 25.0)
    # Points within a centimetre of the buffer edge may differ by projection rounding.
    if got != want:
        x, y = INDEX.projection.forward(np.array([lon]), np.array([lat]))
        for zid in set(got) ^ set(want):
            metric = INDEX.projection.geometries(
                np.asarray([INDEX.zones[INDEX.position[zid]].geometry], dtype=object)
            )[0]
            assert abs(metric.distance(Point(x[0], y[0])) - 25.0) < 0.01
        assert {k: v for k, v in got.items() if k in want} == {
            k: v for k, v in want.items() if k in got
        }


def test_batch_equals_one_by_one() -> None:
    rng = np.random.default_rng(5)
    lon = LON0 + rng.uniform(-0.013, 0.013, 2000)
    lat = LAT0 + rng.uniform(-0.004, 0.007, 2000)
    hits = INDEX.classify(lon, lat)
    batch: dict[int, dict[str, bool]] = {}
    for p, z, i in zip(hits.point, hits.zone, hits.inside, strict=True):
        batch.setdefault(int(p), {})[INDEX.zone_ids[z]] = bool(i)
    assert sum(1 for v in batch.values() if any(v.values())) > 50  # the sample does hit zones
    for k in range(2000):
        assert batch.get(k, {}) == classify_one(INDEX, float(lon[k]), float(lat[k]))


def test_vertex_edge_and_hole() -> None:
    a = ZONES[0].geometry
    xmin, ymin, _xmax, ymax = a.bounds
    assert classify_one(INDEX, xmin, ymin)["A"] is True  # vertex
    assert classify_one(INDEX, xmin, (ymin + ymax) / 2)["A"] is True  # on the west edge
    hole_centre = ZONES[3].geometry.interiors[0].centroid
    assert "H" not in classify_one(INDEX, hole_centre.x, hole_centre.y)  # 60 m from the ring
    ix0 = ZONES[3].geometry.interiors[0].bounds[0]
    assert classify_one(INDEX, ix0 + 0.00005, hole_centre.y)["H"] is False  # 4 m into the hole


def test_zero_buffer_keeps_the_drawn_boundary_inside() -> None:
    index = ZoneIndex(ZONES, DosageParams(exit_buffer_m=0))
    xmin, ymin, _xmax, ymax = ZONES[0].geometry.bounds
    for k in range(11):
        y = ymin + (ymax - ymin) * k / 10
        assert classify_one(index, xmin, y).get("A") is True


def test_empty_index() -> None:
    hits = ZoneIndex([], DosageParams()).classify(np.array([LON0]), np.array([LAT0]))
    assert len(hits.point) == 0


def test_projection_distance_error_under_half_a_metre_within_50_km() -> None:
    proj = LocalProjection(LON0, LAT0)
    rng = np.random.default_rng(11)
    worst = 0.0
    for _ in range(300):
        az, dist = rng.uniform(0, 360), rng.uniform(0, 50_000)
        lon1, lat1, _b = GEOD.fwd(LON0, LAT0, az, dist)
        az2, d2 = rng.uniform(0, 360), rng.uniform(0, 500)  # a short hop, as a buffer test is
        lon2, lat2, _b = GEOD.fwd(lon1, lat1, az2, d2)
        x, y = proj.forward(np.array([lon1, lon2]), np.array([lat1, lat2]))
        planar = float(np.hypot(x[1] - x[0], y[1] - y[0]))
        worst = max(worst, abs(planar - d2))
    assert worst < 0.5
    assert worst > 0.0  # the check measures something


def test_index_rejects_duplicate_ids() -> None:
    with pytest.raises(ValueError, match="unique"):
        ZoneIndex([ZONES[0], ZONES[0]], DosageParams())


def test_projection_of_index_is_centred_on_zones() -> None:
    cx, cy = (
        shapely.total_bounds(np.asarray([z.geometry for z in ZONES], dtype=object))
        .reshape(2, 2)
        .mean(axis=0)
    )
    assert abs(INDEX.projection.lon0 - cx) < 1e-9 and abs(INDEX.projection.lat0 - cy) < 1e-9
