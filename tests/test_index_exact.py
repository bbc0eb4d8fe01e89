"""The zone index's shortcuts (grid lookup, bounds, side counting and distances in numpy) give
exactly the answer of the plain method: an R-tree over the buffered metric bounds, then GEOS's
`intersects_xy` on the zone as drawn and `dwithin` in metres, for every candidate pair."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
import shapely
from shapely.geometry import MultiPolygon, Point, Polygon, box

from dosewatch.demo import make_zones
from schemas.zone import parse_zone_collection
from services.dosage.core.params import DosageParams
from services.geofence.core.index import Hits, ZoneIndex
from services.geofence.core.zone import ZoneSpec

FloatArray = npt.NDArray[np.float64]
LON0, LAT0 = -73.99, 40.72


class Reference:
    """The index as it was first written: every shortcut left out."""

    def __init__(self, index: ZoneIndex) -> None:
        self.index = index
        self.lonlat = np.asarray([z.geometry for z in index.zones], dtype=object)
        self.metric = index.projection.geometries(self.lonlat)
        pad = index.buffer_m + 1.0
        b = shapely.bounds(self.metric).reshape(-1, 4)
        self.tree = shapely.STRtree(
            shapely.box(b[:, 0] - pad, b[:, 1] - pad, b[:, 2] + pad, b[:, 3] + pad)
        )

    def classify(self, lon: FloatArray, lat: FloatArray) -> Hits:
        x, y = self.index.projection.forward(lon, lat)
        points = shapely.points(x, y)
        pt, zn = self.tree.query(points)
        order = np.lexsort((zn, pt))
        pt, zn = pt[order], zn[order]
        inside = shapely.intersects_xy(self.lonlat[zn], lon[pt], lat[pt])
        near = np.zeros_like(inside)
        out = ~inside
        near[out] = shapely.dwithin(self.metric[zn[out]], points[pt[out]], self.index.buffer_m)
        keep = inside | near
        return Hits(pt[keep].astype(np.intp), zn[keep].astype(np.intp), inside[keep])


def assert_same(index: ZoneIndex, lon: FloatArray, lat: FloatArray, batch: int = 4096) -> int:
    ref = Reference(index)
    hits = 0
    for start in range(0, len(lon), batch):
        part = slice(start, start + batch)
        got, want = index.classify(lon[part], lat[part]), ref.classify(lon[part], lat[part])
        for name in ("point", "zone", "inside"):
            a, b = getattr(got, name), getattr(want, name)
            assert a.dtype == b.dtype, name
            assert np.array_equal(a, b), (name, start)
        hits += len(got.point)
    return hits


def city(count: int, seed: int = 1) -> list[ZoneSpec]:
    features = make_zones(seed, count, box_km=8.0)
    zones, errors = parse_zone_collection({"type": "FeatureCollection", "features": features})
    assert not errors
    return [ZoneSpec(z.zone_id, z.shape()) for z in zones]


def scattered(
    zones: list[ZoneSpec], count: int, rng: np.random.Generator
) -> tuple[FloatArray, FloatArray]:
    """Uniform over the zones' extent, half of them close to a zone."""
    b = shapely.total_bounds(np.asarray([z.geometry for z in zones], dtype=object))
    lon = rng.uniform(b[0] - 0.002, b[2] + 0.002, count)
    lat = rng.uniform(b[1] - 0.002, b[3] + 0.002, count)
    c = shapely.centroid(np.asarray([z.geometry for z in zones], dtype=object))
    pick = rng.integers(0, len(c), count // 2)
    lon[: count // 2] = shapely.get_x(c[pick]) + rng.normal(0, 0.0015, count // 2)
    lat[: count // 2] = shapely.get_y(c[pick]) + rng.normal(0, 0.001, count // 2)
    return lon, lat


def on_the_edges(
    zones: list[ZoneSpec], count: int, rng: np.random.Generator, metres: list[float]
) -> tuple[FloatArray, FloatArray]:
    """Vertices and points along sides, then moved `metres` in a random direction: exactly on
    the boundary, and at and around the buffer's edge."""
    rings = shapely.get_rings(shapely.get_parts([z.geometry for z in zones]))
    xy = shapely.get_coordinates(rings)
    pick = rng.integers(0, len(xy) - 1, count)
    t = rng.choice([0.0, 0.5, rng.uniform()], count)
    base = xy[pick] + t[:, None] * (xy[pick + 1] - xy[pick])
    d = rng.choice(metres, count)
    angle = rng.uniform(0, 2 * np.pi, count)
    # A quarter move due east or west: the ray counting sides passes exactly through vertices.
    angle[: count // 4] = rng.choice([0.0, np.pi], count // 4)
    lat = base[:, 1] + d * np.sin(angle) / 111_132.0
    lat[: count // 4] = base[: count // 4, 1]
    lon = base[:, 0] + d * np.cos(angle) / (111_320.0 * np.cos(np.radians(base[:, 1])))
    return lon, lat


def circle(zone_id: str, lon: float, lat: float, r_m: float, sides: int) -> ZoneSpec:
    a = np.linspace(0, 2 * np.pi, sides, endpoint=False)
    dlon = r_m / (111_320.0 * math.cos(math.radians(lat)))
    return ZoneSpec(
        zone_id,
        Polygon(np.column_stack([lon + dlon * np.cos(a), lat + r_m / 111_132.0 * np.sin(a)])),
    )


ODD = [
    ZoneSpec("big", box(LON0 - 0.03, LAT0 - 0.02, LON0 + 0.03, LAT0 + 0.02)),
    ZoneSpec("county", box(LON0 - 0.6, LAT0 - 0.4, LON0 + 0.6, LAT0 + 0.4)),
    ZoneSpec("tiny", box(LON0, LAT0, LON0 + 1e-6, LAT0 + 1e-6)),
    ZoneSpec(
        "two-parts",
        MultiPolygon(
            [
                box(LON0 - 0.01, LAT0, LON0 - 0.008, LAT0 + 0.002),
                box(LON0 + 0.01, LAT0, LON0 + 0.012, LAT0 + 0.001),
            ]
        ),
    ),
    ZoneSpec(
        "holed",
        Polygon(
            [
                (LON0 - 0.004, LAT0 - 0.004),
                (LON0 + 0.004, LAT0 - 0.004),
                (LON0 + 0.004, LAT0 + 0.004),
                (LON0 - 0.004, LAT0 + 0.004),
            ],
            [
                [
                    (LON0 - 0.002, LAT0 - 0.002),
                    (LON0 + 0.002, LAT0 - 0.002),
                    (LON0 + 0.002, LAT0 + 0.002),
                    (LON0 - 0.002, LAT0 + 0.002),
                ]
            ],
        ),
    ),
    circle("round", LON0 + 0.005, LAT0 - 0.005, 150.0, 300),  # more sides than numpy takes on
    circle("thin-ring-of-sides", LON0 - 0.005, LAT0 + 0.006, 40.0, 64),
]


@pytest.mark.parametrize("buffer_m", [25.0, 0.0, 3.5])
def test_city_scattered_and_on_the_edges(buffer_m: float) -> None:
    rng = np.random.default_rng(7)
    zones = city(1500)
    index = ZoneIndex(zones, DosageParams(exit_buffer_m=buffer_m))
    lon, lat = scattered(zones, 30_000, rng)
    assert assert_same(index, lon, lat) > 10_000
    near = [0.0, 0.0, 1e-7, 1.0, buffer_m - 1e-4, buffer_m, buffer_m + 1e-4, buffer_m + 0.9]
    lon, lat = on_the_edges(zones, 30_000, rng, near)
    assert assert_same(index, lon, lat) > 10_000
    assert_same(index, lon[:3000], lat[:3000], batch=13)


@pytest.mark.parametrize("buffer_m", [25.0, 0.0])
def test_odd_zones_among_ordinary_ones(buffer_m: float) -> None:
    rng = np.random.default_rng(8)
    zones = city(400)
    zones = zones[:200] + ODD + zones[200:]
    index = ZoneIndex(zones, DosageParams(exit_buffer_m=buffer_m))
    lon, lat = scattered(zones, 20_000, rng)
    assert assert_same(index, lon, lat) > 10_000
    lon, lat = on_the_edges(ODD, 20_000, rng, [0.0, 0.0, 1e-7, 2.0, 25.0, 25.0001, 25.9, 30.0])
    assert assert_same(index, lon, lat) > 10_000
    wide_lon = rng.uniform(LON0 - 2, LON0 + 2, 5000)
    wide_lat = rng.uniform(LAT0 - 2, LAT0 + 2, 5000)
    assert_same(index, wide_lon, wide_lat)


def test_points_no_zone_is_near_and_odd_values() -> None:
    index = ZoneIndex(city(200) + ODD, DosageParams())
    lon = np.array([LON0, np.nan, 0.0, 179.9, -180.0, LON0 + 5, LON0])
    lat = np.array([np.nan, LAT0, 0.0, -89.9, 90.0, LAT0, LAT0])
    assert_same(index, lon, lat)
    hits = index.classify(lon[:0], lat[:0])
    assert len(hits.point) == len(hits.zone) == len(hits.inside) == 0


def test_a_zone_alone_and_far_from_the_others() -> None:
    far = [ZoneSpec("london", box(-0.01, 51.5, 0.01, 51.51)), *ODD[:2]]
    index = ZoneIndex(far, DosageParams())
    rng = np.random.default_rng(9)
    lon, lat = on_the_edges(far, 10_000, rng, [0.0, 10.0, 25.0, 26.0])
    assert_same(index, lon, lat)
    assert "london" in {
        index.zone_ids[z] for z in index.classify(np.array([0.0]), np.array([51.505])).zone
    }


def test_reference_agrees_with_plain_geometry_on_one_point() -> None:
    """The reference itself, against shapely one pair at a time."""
    zones = ODD[:3]
    index = ZoneIndex(zones, DosageParams())
    hits = Reference(index).classify(np.array([LON0 + 0.03]), np.array([LAT0]))
    assert {index.zone_ids[z] for z in hits.zone} == {"big", "county"}
    assert zones[0].geometry.covers(Point(LON0 + 0.03, LAT0))
