"""Every dosage rule through VisitTracker, with small real zones in real coordinates.

Zones are squares of a couple of hundred metres near 40.71,-74.00 (lower Manhattan), built with
pyproj.Geod so that offsets and distances are metres on the ground. Layout (metres from C0):

    A  centred on C0, half-side 100 (x, y in [-100, 100])
    B  centred 150 m east of C0, half-side 100: overlaps A where 50 <= x <= 100
    H  centred 1000 m north of C0, half-side 150, with a hole of half-side 50
    O  centred 1000 m south of C0, half-side 100, overrides min_visit/target/max_visit
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pytest
from pyproj import Geod
from shapely.geometry import Polygon, box

from services.dosage.core.params import DosageParams
from services.dosage.core.tracker import Fix, VisitEvent, VisitEventKind, VisitTracker
from services.dosage.core.visit import EndReason
from services.geofence.core.index import ZoneIndex
from services.geofence.core.zone import ZoneSpec

GEOD = Geod(ellps="WGS84")
LON0, LAT0 = -74.00, 40.71
T0 = int(datetime(2026, 6, 1, 16, 0, tzinfo=UTC).timestamp() * 1000)

EXITED = EndReason.EXITED
LOST = EndReason.SIGNAL_LOST
EOI = EndReason.END_OF_INPUT
CHANGED = EndReason.ZONE_CHANGED

Point = tuple[float, float]  # lon, lat


def move(p: Point, azimuth: float, metres: float) -> Point:
    lon, lat, _ = GEOD.fwd(p[0], p[1], azimuth, metres)
    return float(lon), float(lat)


def offset(east_m: float, north_m: float, origin: Point = (LON0, LAT0)) -> Point:
    return move(move(origin, 0.0, north_m), 90.0, east_m)


def square_bounds(centre: Point, half_m: float) -> tuple[float, float, float, float]:
    """(west, south, east, north) of an axis-aligned lon/lat square of ~2*half_m on a side."""
    west = move(centre, 270.0, half_m)[0]
    east = move(centre, 90.0, half_m)[0]
    south = move(centre, 180.0, half_m)[1]
    north = move(centre, 0.0, half_m)[1]
    return west, south, east, north


def square(centre: Point, half_m: float) -> Polygon:
    return box(*square_bounds(centre, half_m))


C_A = (LON0, LAT0)
C_B = offset(150, 0)
C_H = offset(0, 1000)
C_O = offset(0, -1000)
A_W, A_S, A_E, A_N = square_bounds(C_A, 100)
A_MID_LAT = (A_S + A_N) / 2
H_HOLE_W, H_HOLE_S, H_HOLE_E, H_HOLE_N = square_bounds(C_H, 50)
ZONE_A = square(C_A, 100)
ZONE_B = square(C_B, 100)
ZONE_H = Polygon(square(C_H, 150).exterior.coords, [square(C_H, 50).exterior.coords])
ZONE_O = square(C_O, 100)

POS: dict[str, Point] = {
    "A": offset(-50, 0),  # inside A only
    "B": offset(200, 0),  # inside B only, 100 m from A
    "AB": offset(75, 0),  # inside both
    "A_vertex": (A_W, A_N),  # exactly on A's north-west vertex
    "A_edge_v": (A_W, A_MID_LAT),  # exactly on A's west edge (a meridian)
    "A_edge_h": ((A_W + A_E) / 2, A_N),  # exactly on A's north edge (a parallel)
    "A_hair_out": (A_W - 1e-7, A_MID_LAT),  # ~8 mm west of the west edge
    "A_near": move((A_W, A_MID_LAT), 270.0, 10.0),
    "A_24": move((A_W, A_MID_LAT), 270.0, 24.0),
    "A_26": move((A_W, A_MID_LAT), 270.0, 26.0),
    "A_out": move((A_W, A_MID_LAT), 270.0, 60.0),
    "A_corner_24": move((A_W, A_S), 225.0, 24.0),  # diagonally off the south-west corner
    "A_corner_26": move((A_W, A_S), 225.0, 26.0),
    "H": offset(100, 0, C_H),  # in H's ring
    "H_hole": C_H,  # the hole's centre: 50 m from the ring
    "H_hole_near": offset(40, 0, C_H),  # in the hole, 10 m from the ring
    "H_hole_edge": (H_HOLE_E, C_H[1]),  # exactly on the hole's east edge
    "O": C_O,
    "far": offset(-3000, 0),
}


def zones(**changes: ZoneSpec | None) -> list[ZoneSpec]:
    base = {
        "A": ZoneSpec("A", ZONE_A),
        "B": ZoneSpec("B", ZONE_B),
        "H": ZoneSpec("H", ZONE_H),
        "O": ZoneSpec("O", ZONE_O, min_visit_s=30.0, target_s=60.0, max_visit_s=90.0),
    }
    for zid, spec in changes.items():
        if spec is None:
            del base[zid]
        else:
            base[zid] = spec
    return list(base.values())


def make_tracker(params: DosageParams | None = None) -> VisitTracker:
    p = params or DosageParams()
    return VisitTracker(ZoneIndex(zones(), p), p)


@dataclass(frozen=True)
class P:
    """One ping: unit, seconds after T0, a named position, optional accuracy."""

    unit: str
    t: float
    pos: str
    acc: float | None = None

    def fix(self) -> Fix:
        lon, lat = POS[self.pos]
        return Fix(self.unit, T0 + round(self.t * 1000), lon, lat, self.acc)


Visit = tuple[str, str, float, float, EndReason]  # unit, zone, start s, end s, reason


def ended(events: list[VisitEvent]) -> list[Visit]:
    return sorted(
        (
            e.unit_id,
            e.zone_id,
            (e.started_at - T0) / 1000,
            (e.last_in - T0) / 1000,
            e.end_reason,
        )
        for e in events
        if e.kind is VisitEventKind.ENDED and e.end_reason is not None
    )


def run(pings: list[P], params: DosageParams | None = None) -> tuple[VisitTracker, list[Visit]]:
    tracker = make_tracker(params)
    events = tracker.process([p.fix() for p in pings])
    events += tracker.finish()
    return tracker, ended(events)


@dataclass(frozen=True)
class Case:
    pings: list[P]
    visits: list[Visit]
    stats: dict[str, int] = field(default_factory=dict)


U = "u1"
CASES: dict[str, Case] = {
    # -- where a ping stands: boundary and holes
    "vertex ping is inside": Case([P(U, 0, "A_vertex")], [(U, "A", 0, 0, EOI)]),
    "ping on a meridian edge is inside": Case([P(U, 0, "A_edge_v")], [(U, "A", 0, 0, EOI)]),
    "ping on a parallel edge is inside": Case([P(U, 0, "A_edge_h")], [(U, "A", 0, 0, EOI)]),
    "a hair outside the edge is only near": Case([P(U, 0, "A_hair_out")], []),
    "edge pings keep a visit without an exit": Case(
        [P(U, 0, "A"), P(U, 30, "A_edge_v"), P(U, 100, "A_vertex")], [(U, "A", 0, 100, EOI)]
    ),
    "ping on a hole's edge is inside": Case([P(U, 0, "H_hole_edge")], [(U, "H", 0, 0, EOI)]),
    "ping in a hole does not open": Case([P(U, 0, "H_hole"), P(U, 30, "H_hole")], []),
    "ping near a hole's edge does not open": Case([P(U, 0, "H_hole_near")], []),
    "deep in the hole is outside: the visit exits": Case(
        [P(U, 0, "H"), P(U, 30, "H_hole"), P(U, 90, "H_hole")], [(U, "H", 0, 0, EXITED)]
    ),
    "near the hole's edge is near: the visit stays": Case(
        [P(U, 0, "H"), P(U, 30, "H_hole_near"), P(U, 90, "H_hole_near"), P(U, 150, "H_hole_near")],
        [(U, "H", 0, 150, EOI)],
    ),
    # -- overlapping zones
    "one ping opens visits in both overlapping zones": Case(
        [P(U, 0, "AB"), P(U, 30, "AB")], [(U, "A", 0, 30, EOI), (U, "B", 0, 30, EOI)]
    ),
    "leaving one of two overlapping zones": Case(
        [P(U, 0, "AB"), P(U, 30, "B"), P(U, 90, "B"), P(U, 100, "B")],
        [(U, "A", 0, 0, EXITED), (U, "B", 0, 100, EOI)],
    ),
    # A leaves at 30 and B at 60: at 90 only A's exit is a minute old; at the end B's is not.
    "two visits' exits wait and confirm each on its own clock": Case(
        [
            P(U, 0, "AB"),
            P(U, 30, "B"),
            P(U, 60, "far"),
            P(U, 89.999, "far"),
            P(U, 90, "far"),
            P(U, 119.999, "far"),
        ],
        [(U, "A", 0, 0, EXITED), (U, "B", 0, 30, EOI)],
    ),
    # -- near (hysteresis)
    "near does not open a visit": Case([P(U, 0, "A_near"), P(U, 30, "A_near")], []),
    "near then inside opens at the inside ping": Case(
        [P(U, 0, "A_near"), P(U, 30, "A")], [(U, "A", 30, 30, EOI)]
    ),
    "near keeps an open visit alive": Case(
        [
            P(U, 0, "A"),
            P(U, 60, "A_near"),
            P(U, 120, "A_near"),
            P(U, 180, "A_near"),
            P(U, 240, "A"),
        ],
        [(U, "A", 0, 240, EOI)],
    ),
    "24 m off the edge is near: keeps the visit": Case(
        [P(U, 0, "A"), P(U, 30, "A_24"), P(U, 90, "A_24"), P(U, 150, "A_24")],
        [(U, "A", 0, 150, EOI)],
    ),
    "26 m off the edge is outside: the visit exits": Case(
        [P(U, 0, "A"), P(U, 30, "A_26"), P(U, 90, "A_26")], [(U, "A", 0, 0, EXITED)]
    ),
    # -- jitter and exit
    "short excursion is jitter and its time is credited": Case(
        [P(U, 0, "A"), P(U, 30, "A_out"), P(U, 89.999, "A_out"), P(U, 100, "A"), P(U, 150, "A")],
        [(U, "A", 0, 150, EOI)],
    ),
    "exit after exit_confirm ends the visit at last_in": Case(
        [P(U, 0, "A"), P(U, 60, "A"), P(U, 90, "A_out"), P(U, 150, "A_out")],
        [(U, "A", 0, 60, EXITED)],
    ),
    "1 ms short of exit_confirm is still pending": Case(
        [P(U, 0, "A"), P(U, 60, "A"), P(U, 90, "A_out"), P(U, 149.999, "A_out")],
        [(U, "A", 0, 60, EOI)],
    ),
    "a ping far from every zone is outside": Case(
        [P(U, 0, "A"), P(U, 30, "far"), P(U, 90, "far")], [(U, "A", 0, 0, EXITED)]
    ),
    "after an exit, an inside ping opens a new visit": Case(
        [P(U, 0, "A"), P(U, 10, "A_out"), P(U, 70, "A_out"), P(U, 80, "A")],
        [(U, "A", 0, 0, EXITED), (U, "A", 80, 80, EOI)],
    ),
    # -- gaps (signal lost)
    "gap over max_gap closes, and the same ping opens anew": Case(
        [P(U, 0, "A"), P(U, 50, "A"), P(U, 170.001, "A")],
        [(U, "A", 0, 50, LOST), (U, "A", 170.001, 170.001, EOI)],
        {"usable": 3},
    ),
    "gap of exactly max_gap does not close": Case(
        [P(U, 0, "A"), P(U, 50, "A"), P(U, 170, "A")], [(U, "A", 0, 170, EOI)]
    ),
    "gap closes an exit-pending visit too": Case(
        [P(U, 0, "A"), P(U, 30, "A_out"), P(U, 200, "far")], [(U, "A", 0, 0, LOST)]
    ),
    "after a gap, a near ping does not reopen": Case(
        [P(U, 0, "A"), P(U, 121, "A_near"), P(U, 130, "A_near")], [(U, "A", 0, 0, LOST)]
    ),
    "gap closes every open visit of the unit": Case(
        [P(U, 0, "AB"), P(U, 200, "far")], [(U, "A", 0, 0, LOST), (U, "B", 0, 0, LOST)]
    ),
    # -- watchdog and end of input
    "watchdog: another unit 1 ms past max_gap closes it": Case(
        [P("u1", 0, "A"), P("u2", 120.001, "far")], [("u1", "A", 0, 0, LOST)]
    ),
    "watchdog: another unit exactly at max_gap leaves it open": Case(
        [P("u1", 0, "A"), P("u2", 120, "far")], [("u1", "A", 0, 0, EOI)]
    ),
    "watchdog only closes the silent unit": Case(
        [P("u1", 0, "A"), P("u2", 60, "A"), P("u2", 121, "A")],
        [("u1", "A", 0, 0, LOST), ("u2", "A", 60, 121, EOI)],
    ),
    "watchdog counts from the last usable ping": Case(
        [P("u1", 0, "A"), P("u1", 100, "A"), P("u2", 220, "far"), P("u2", 220.001, "far")],
        [("u1", "A", 0, 100, LOST)],
    ),
    "old pings of another unit do not move the clock": Case(
        [P("u1", 0, "A"), P("u1", 60, "A"), P("u2", -500, "far"), P("u2", -400, "far")],
        [("u1", "A", 0, 60, EOI)],
    ),
    "finish: a visit the watchdog would have closed ends signal_lost": Case(
        [P("u2", 200, "far"), P("u1", 0, "A")], [("u1", "A", 0, 0, LOST)]
    ),
    "finish: a lagging unit within max_gap of the clock ends end_of_input": Case(
        [P("u2", 200, "far"), P("u1", 80, "A")], [("u1", "A", 80, 80, EOI)]
    ),
    # -- low accuracy
    "a low-accuracy ping does not open": Case(
        [P(U, 0, "A", acc=50.5)], [], {"low_accuracy": 1, "usable": 0, "valid": 1}
    ),
    "accuracy exactly max_accuracy is usable": Case(
        [P(U, 0, "A", acc=50.0)], [(U, "A", 0, 0, EOI)], {"low_accuracy": 0, "usable": 1}
    ),
    "low-accuracy outside pings do not end a visit": Case(
        [P(U, 0, "A"), P(U, 30, "far", acc=80), P(U, 100, "far", acc=80), P(U, 110, "A")],
        [(U, "A", 0, 110, EOI)],
        {"low_accuracy": 2, "usable": 2},
    ),
    "low-accuracy inside pings neither extend nor bridge a gap": Case(
        [P(U, 0, "A"), P(U, 60, "A", acc=80), P(U, 121, "A", acc=10)],
        [(U, "A", 0, 0, LOST), (U, "A", 121, 121, EOI)],
    ),
    "low-accuracy pings advance the stream clock": Case(
        [P("u1", 0, "A"), P("u2", 120.001, "far", acc=500)], [("u1", "A", 0, 0, LOST)]
    ),
    # -- duplicates and late pings
    "duplicate and late pings are ignored and counted": Case(
        [P(U, 0, "far"), P(U, 60, "far"), P(U, 60, "B"), P(U, 30, "B"), P(U, 90, "far")],
        [],
        {"duplicate": 1, "late": 1, "usable": 3, "valid": 5},
    ),
    "a duplicate inside ping does not cancel an exit": Case(
        [P(U, 0, "A"), P(U, 30, "A_out"), P(U, 30, "A"), P(U, 90, "A_out")],
        [(U, "A", 0, 0, EXITED)],
        {"duplicate": 1},
    ),
    "a late inside ping does not cancel an exit": Case(
        [P(U, 0, "A"), P(U, 30, "A_out"), P(U, 20, "A"), P(U, 90, "A_out")],
        [(U, "A", 0, 0, EXITED)],
        {"late": 1},
    ),
    "a duplicate outside ping does not start an exit": Case(
        [P(U, 0, "A"), P(U, 30, "A"), P(U, 30, "A_out"), P(U, 100, "A_out")],
        [(U, "A", 0, 30, EOI)],
        {"duplicate": 1},
    ),
    "duplicates are per unit": Case(
        [P("u1", 0, "A"), P("u2", 0, "A")],
        [("u1", "A", 0, 0, EOI), ("u2", "A", 0, 0, EOI)],
        {"duplicate": 0, "usable": 2},
    ),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_rule_table(case: Case) -> None:
    tracker, visits = run(case.pings)
    assert visits == sorted(case.visits)
    for name, value in case.stats.items():
        assert getattr(tracker.stats, name) == value, name
    assert all(not u.open for u in tracker.units.values())


# -- where a ping stands, straight from the index ----------------------------------------------

INSIDE, NEAR, OUTSIDE = "inside", "near", "outside"


def standing(index: ZoneIndex, pos: str) -> dict[str, str]:
    lon, lat = POS[pos]
    hits = index.classify(np.array([lon]), np.array([lat]))
    out = {zid: OUTSIDE for zid in index.zone_ids}
    for z, inside in zip(hits.zone.tolist(), hits.inside.tolist(), strict=True):
        out[index.zone_ids[z]] = INSIDE if inside else NEAR
    return out


@pytest.mark.parametrize(
    ("pos", "zone", "expected"),
    [
        ("A_vertex", "A", INSIDE),
        ("A_edge_v", "A", INSIDE),
        ("A_edge_h", "A", INSIDE),
        ("A_hair_out", "A", NEAR),
        ("A_near", "A", NEAR),
        ("A_24", "A", NEAR),
        ("A_26", "A", OUTSIDE),
        ("A_corner_24", "A", NEAR),
        ("A_corner_26", "A", OUTSIDE),
        ("A_out", "A", OUTSIDE),
        ("AB", "A", INSIDE),
        ("AB", "B", INSIDE),
        ("B", "A", OUTSIDE),
        ("H", "H", INSIDE),
        ("H_hole", "H", OUTSIDE),
        ("H_hole_near", "H", NEAR),
        ("H_hole_edge", "H", INSIDE),
        ("far", "A", OUTSIDE),
    ],
)
def test_where_a_ping_stands(pos: str, zone: str, expected: str) -> None:
    index = ZoneIndex(zones(), DosageParams())
    assert standing(index, pos)[zone] == expected


def test_test_geometry_is_in_real_metres() -> None:
    """The fixtures themselves: 24/26 m really are geodesic metres from the edge."""
    for name, metres in [("A_24", 24.0), ("A_26", 26.0)]:
        lon, lat = POS[name]
        _, _, dist = GEOD.inv(A_W, lat, lon, lat)
        assert abs(dist - metres) < 0.01
        assert abs(lat - A_MID_LAT) < 1e-9
    _, _, side = GEOD.inv(A_W, A_MID_LAT, A_E, A_MID_LAT)
    assert 199.0 < side < 201.0


@pytest.mark.parametrize(
    ("buffer_m", "pos", "expected"),
    [
        (25.0, "A_24", NEAR),
        (25.0, "A_26", OUTSIDE),
        (30.0, "A_26", NEAR),
        (20.0, "A_24", OUTSIDE),
        (0.0, "A_hair_out", OUTSIDE),
        (0.0, "A", INSIDE),
        (0.0, "A_vertex", INSIDE),
    ],
)
def test_exit_buffer_is_a_parameter(buffer_m: float, pos: str, expected: str) -> None:
    index = ZoneIndex(zones(), DosageParams(exit_buffer_m=buffer_m))
    assert standing(index, pos)["A"] == expected


def edge_points(n: int = 20) -> list[Point]:
    """n+1 points exactly on each of A's four edges (lon/lat), corners included."""
    out: list[Point] = []
    for k in range(n + 1):
        f = k / n
        lat = A_S + f * (A_N - A_S)
        lon = A_W + f * (A_E - A_W)
        out += [(A_W, lat), (A_E, lat), (lon, A_S), (lon, A_N)]
    return out


@pytest.mark.parametrize("buffer_m", [25.0, 1.0, 0.0])
def test_every_edge_point_is_inside(buffer_m: float) -> None:
    index = ZoneIndex(zones(), DosageParams(exit_buffer_m=buffer_m))
    pts = edge_points()
    hits = index.classify(np.array([p[0] for p in pts]), np.array([p[1] for p in pts]))
    a = index.position["A"]
    triples = zip(hits.point.tolist(), hits.zone.tolist(), hits.inside.tolist(), strict=True)
    inside = {pt for pt, z, i in triples if z == a and i}
    assert inside == set(range(len(pts)))


def test_every_edge_point_is_inside_with_a_zero_exit_buffer() -> None:
    """exit_buffer_m=0 is legal: the candidate search must not drop boundary points that
    projection round-off puts a hair outside the projected zone (it did, before b9e1d3b)."""
    params = DosageParams(exit_buffer_m=0)
    tracker = VisitTracker(ZoneIndex(zones(), params), params)
    missed = []
    for k, (lon, lat) in enumerate(edge_points()):
        unit = f"u{k}"
        events = tracker.process([Fix(unit, T0, lon, lat)])
        if (VisitEventKind.STARTED, "A") not in [(e.kind, e.zone_id) for e in events]:
            missed.append((lon, lat))
    assert missed == []


def test_near_and_outside_through_the_tracker_with_a_wider_buffer() -> None:
    pings = [P(U, 0, "A"), P(U, 30, "A_26"), P(U, 90, "A_26"), P(U, 150, "A_26")]
    _, default = run(pings)
    _, wide = run(pings, DosageParams(exit_buffer_m=30))
    assert default == [(U, "A", 0, 0, EXITED)]
    assert wide == [(U, "A", 0, 150, EOI)]


# -- parameters as configured -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "pings", "visits"),
    [
        (
            DosageParams(exit_confirm_s=0),
            [P(U, 0, "A"), P(U, 10, "A_out")],
            [(U, "A", 0, 0, EXITED)],
        ),
        (
            DosageParams(exit_confirm_s=0),
            [P(U, 0, "A"), P(U, 10, "A_near"), P(U, 20, "A_out")],
            [(U, "A", 0, 10, EXITED)],
        ),
        (
            DosageParams(exit_confirm_s=10),
            [P(U, 0, "A"), P(U, 10, "A_out"), P(U, 20, "A_out")],
            [(U, "A", 0, 0, EXITED)],
        ),
        (
            DosageParams(max_gap_s=30),
            [P(U, 0, "A"), P(U, 30, "A"), P(U, 60.001, "A")],
            [(U, "A", 0, 30, LOST), (U, "A", 60.001, 60.001, EOI)],
        ),
        (
            DosageParams(max_accuracy_m=10),
            [P(U, 0, "A", acc=10.5), P(U, 5, "A", acc=10)],
            [(U, "A", 5, 5, EOI)],
        ),
    ],
    ids=["confirm-0", "confirm-0-near", "confirm-10", "max-gap-30", "max-accuracy-10"],
)
def test_configured_parameters(params: DosageParams, pings: list[P], visits: list[Visit]) -> None:
    assert run(pings, params)[1] == sorted(visits)


# -- watchdog timing ------------------------------------------------------------------------------


def test_watchdog_fires_on_the_ping_that_passes_the_horizon() -> None:
    tracker = make_tracker()
    assert [e.kind for e in tracker.process([P("u1", 0, "A").fix()])] == [VisitEventKind.STARTED]
    assert tracker.process([P("u2", 120, "far").fix()]) == []
    assert tracker.units["u1"].open
    events = tracker.process([P("u2", 120.001, "far").fix()])
    assert [(e.kind, e.unit_id, e.end_reason, e.time) for e in events] == [
        (VisitEventKind.ENDED, "u1", LOST, T0 + 120_001)
    ]
    assert events[0].last_in == T0
    assert not tracker.units["u1"].open
    assert tracker.finish() == []


def test_watchdog_through_advance() -> None:
    tracker = make_tracker()
    tracker.process([P("u1", 0, "A").fix(), P("u1", 30, "A").fix()])
    assert tracker.advance(T0 + 150_000) == []  # exactly max_gap past: not yet
    assert tracker.advance(T0 + 100_000) == []
    events = tracker.advance(T0 + 150_001)
    assert [(e.unit_id, e.end_reason, e.started_at, e.last_in, e.time) for e in events] == [
        ("u1", LOST, T0, T0 + 30_000, T0 + 150_001)
    ]
    assert tracker.advance(T0 + 999_999) == []
    # The live clock judged the watchdog; the data clock is still the newest ping.
    assert tracker.clock == T0 + 30_000


def test_backlog_after_a_stall_is_judged_by_its_own_times() -> None:
    """Wall time moved the live clock on while nothing arrived; the backlog then arrives
    with its original, older times, and its visits are not closed for being behind."""
    tracker = make_tracker()
    tracker.process([P("u1", 0, "A").fix()])
    tracker.advance(T0 + 400_000)  # a stall: u1's visit closes, signal lost
    events = tracker.process([P("u2", 10, "B").fix(), P("u2", 40, "B").fix()])
    assert [e.kind.value for e in events] == ["started"]
    assert tracker.units["u2"].open  # not closed as "behind the clock"


def test_restored_visit_in_a_deleted_zone_closes_instead_of_crashing() -> None:
    tracker = make_tracker()
    tracker.process([P("u1", 0, "A").fix(), P("u1", 20, "A").fix()])
    saved = tracker.export_unit("u1")
    params = DosageParams()
    restored = VisitTracker(ZoneIndex(zones(A=None), params), params)
    restored.restore_meta(tracker.export_meta())
    restored.restore_unit("u1", saved)
    events = restored.reconcile()
    assert [(e.zone_id, e.end_reason, e.last_in) for e in events] == [
        ("A", EndReason.ZONE_CHANGED, T0 + 20_000)
    ]
    assert restored.process([P("u1", 30, "far").fix()]) == []


LAGGING = [P("u2", 200, "far"), P("u1", 0, "A"), P("u1", 60, "A")]


@pytest.mark.parametrize("interleaved", [False, True], ids=["clock-stands", "clock-moves"])
def test_watchdog_applies_to_a_unit_already_behind_the_clock(interleaved: bool) -> None:
    pings = list(LAGGING)
    if interleaved:
        pings.insert(2, P("u2", 200.001, "far"))
    tracker = make_tracker()
    events = tracker.process([p.fix() for p in pings])
    # Rule 4: the clock already runs more than max_gap past u1's last usable ping.
    assert not tracker.units["u1"].open
    assert ended(events + tracker.finish()) == [
        ("u1", "A", 0, 0, LOST),
        ("u1", "A", 60, 60, LOST),
    ]


def test_finish_reasons() -> None:
    tracker = make_tracker()
    tracker.process([P("u1", 0, "A").fix(), P("u2", 10, "B").fix(), P("u2", 70, "B").fix()])
    events = tracker.finish()
    assert [(e.unit_id, e.zone_id, e.end_reason, e.time) for e in events] == [
        ("u1", "A", EOI, T0 + 70_000),
        ("u2", "B", EOI, T0 + 70_000),
    ]
    assert tracker.finish() == []


# -- events as the moments happen --------------------------------------------------------------


def test_events_for_one_visit_in_order() -> None:
    pings = [P(U, t, "O") for t in range(0, 121, 20)] + [P(U, 130, "far"), P(U, 190, "far")]
    tracker = make_tracker()
    events = tracker.process([p.fix() for p in pings])
    assert [(e.kind, (e.time - T0) // 1000, (e.last_in - T0) // 1000) for e in events] == [
        (VisitEventKind.STARTED, 0, 0),
        (VisitEventKind.TARGET_MET, 60, 60),  # zone O: target_s 60
        (VisitEventKind.OVERSTAY, 100, 100),  # zone O: max_visit_s 90, first ping past it
        (VisitEventKind.ENDED, 190, 120),
    ]
    assert events[-1].end_reason is EXITED


# -- zone overrides and flags ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("zone", "duration_s", "flags"),
    [
        # zone O overrides: min_visit_s 30, target_s 60, max_visit_s 90
        ("O", 29.999, (False, False, False)),
        ("O", 30, (True, False, False)),
        ("O", 59.999, (True, False, False)),
        ("O", 60, (True, True, False)),
        ("O", 90, (True, True, False)),
        ("O", 90.001, (True, True, True)),
        # zone A: agency defaults 120 / 900 / 1200
        ("A", 90.001, (False, False, False)),
        ("A", 119.999, (False, False, False)),
        ("A", 120, (True, False, False)),
        ("A", 900, (True, True, False)),
        ("A", 1200, (True, True, False)),
        ("A", 1200.001, (True, True, True)),
    ],
)
def test_flags_follow_zone_overrides(
    zone: str, duration_s: float, flags: tuple[bool, bool, bool]
) -> None:
    times = [float(t) for t in range(0, int(duration_s), 60)] + [duration_s]
    pings = [P(U, t, zone) for t in sorted(set(times))]
    tracker = make_tracker()
    events = tracker.process([p.fix() for p in pings]) + tracker.finish()
    [end] = [e for e in events if e.kind is VisitEventKind.ENDED]
    assert end.duration_ms == round(duration_s * 1000)
    assert (end.qualified, end.target_met, end.overstay) == flags
    kinds = {e.kind for e in events}
    assert (VisitEventKind.TARGET_MET in kinds) is flags[1]
    assert (VisitEventKind.OVERSTAY in kinds) is flags[2]


def test_override_only_touches_its_zone() -> None:
    index = ZoneIndex(zones(), DosageParams(min_visit_s=10, target_s=20, max_visit_s=30))
    rules = dict(zip(index.zone_ids, index.rules, strict=True))
    assert (rules["O"].min_visit_ms, rules["O"].target_ms, rules["O"].max_visit_ms) == (
        30_000,
        60_000,
        90_000,
    )
    assert (rules["A"].min_visit_ms, rules["A"].target_ms, rules["A"].max_visit_ms) == (
        10_000,
        20_000,
        30_000,
    )


# -- zone changes ----------------------------------------------------------------------------------

MOVED_A = square(offset(10, 0), 100)


@pytest.mark.parametrize(
    ("change", "closed"),
    [
        ({"A": ZoneSpec("A", MOVED_A)}, ["A"]),
        ({"A": None}, ["A"]),
        ({"A": ZoneSpec("A", ZONE_A, target_s=60.0)}, []),
        ({"A": ZoneSpec("A", ZONE_A, name="renamed", max_visit_s=5.0)}, []),
        ({"A": ZoneSpec("A", ZONE_A)}, []),  # rebuilt, identical
        ({"B": ZoneSpec("B", square(C_B, 101))}, ["B"]),
        ({"A": ZoneSpec("A", MOVED_A), "B": None}, ["A", "B"]),
    ],
    ids=["A-moved", "A-deleted", "A-params", "A-name-params", "A-same", "B-grown", "both"],
)
def test_zone_changed(change: dict[str, ZoneSpec | None], closed: list[str]) -> None:
    params = DosageParams()
    tracker = make_tracker(params)
    tracker.process([P("u1", 0, "AB").fix(), P("u2", 5, "A").fix(), P("u1", 30, "AB").fix()])
    events = tracker.replace_index(ZoneIndex(zones(**change), params))
    got = sorted((e.unit_id, e.zone_id) for e in events)
    expected = sorted((u, z) for z in closed for u in (["u1", "u2"] if z == "A" else ["u1"]))
    assert got == expected
    assert all(e.kind is VisitEventKind.ENDED and e.end_reason is CHANGED for e in events)
    for e in events:
        assert e.time == T0 + 30_000  # the stream clock
        assert e.last_in == (T0 + 30_000 if e.unit_id == "u1" else T0 + 5_000)
    still_open = {(u, z) for u, st in tracker.units.items() for z in st.open}
    assert still_open == {("u1", "A"), ("u1", "B"), ("u2", "A")} - set(expected)


def test_zone_changed_then_the_new_geometry_opens_a_new_visit() -> None:
    params = DosageParams()
    tracker = make_tracker(params)
    events = tracker.process([P(U, 0, "A").fix(), P(U, 30, "A").fix()])
    events += tracker.replace_index(ZoneIndex(zones(A=ZoneSpec("A", MOVED_A)), params))
    events += tracker.process([P(U, 40, "A").fix(), P(U, 50, "A").fix()])
    events += tracker.finish()
    assert ended(events) == [(U, "A", 0, 30, CHANGED), (U, "A", 40, 50, EOI)]


def test_zone_deleted_pings_stop_counting() -> None:
    params = DosageParams()
    tracker = make_tracker(params)
    events = tracker.process([P(U, 0, "AB").fix()])
    events += tracker.replace_index(ZoneIndex(zones(A=None), params))
    events += tracker.process([P(U, 30, "AB").fix()]) + tracker.finish()
    assert ended(events) == [(U, "A", 0, 0, CHANGED), (U, "B", 0, 30, EOI)]


def test_params_only_change_applies_new_rules_to_the_open_visit() -> None:
    params = DosageParams()
    tracker = make_tracker(params)
    events = tracker.process([P(U, 0, "A").fix(), P(U, 50, "A").fix()])
    assert [e.kind for e in events] == [VisitEventKind.STARTED]
    events = tracker.replace_index(
        ZoneIndex(zones(A=ZoneSpec("A", ZONE_A, min_visit_s=10.0, target_s=60.0)), params)
    )
    assert events == []
    events = tracker.process([P(U, 60, "A").fix()]) + tracker.finish()
    assert [e.kind for e in events] == [VisitEventKind.TARGET_MET, VisitEventKind.ENDED]
    assert events[-1].end_reason is EOI and events[-1].target_met and events[-1].qualified


# -- last-seen information -------------------------------------------------------------------------


def test_unusable_pings_only_update_last_seen() -> None:
    tracker = make_tracker()
    tracker.process([P(U, 0, "A").fix(), P(U, 10, "far", acc=99).fix()])
    unit = tracker.units[U]
    assert unit.last_usable == T0
    assert unit.seen_ts == T0 + 10_000
    assert (unit.seen_lon, unit.seen_lat) == POS["far"]
    assert unit.seen_accuracy_m == 99
    assert set(unit.open) == {"A"}
    assert tracker.clock == T0 + 10_000


def test_restored_visit_in_a_zone_reshaped_meanwhile_closes() -> None:
    tracker = make_tracker()
    tracker.process([P("u1", 0, "A").fix(), P("u1", 20, "A").fix(), P("u2", 0, "B").fix()])
    saved = {u: tracker.export_unit(u) for u in ("u1", "u2")}
    bigger_a = ZoneSpec("A", ZONE_A.buffer(0.0001))
    params = DosageParams()
    restored = VisitTracker(ZoneIndex(zones(A=bigger_a), params), params)
    restored.restore_meta(tracker.export_meta())
    for unit_id, data in saved.items():
        restored.restore_unit(unit_id, data)
    events = restored.reconcile()
    # A changed shape: its visit ends at its last inside ping. B did not: its visit goes on.
    assert [(e.unit_id, e.zone_id, e.end_reason) for e in events] == [
        ("u1", "A", EndReason.ZONE_CHANGED)
    ]
    assert set(restored.units["u2"].open) == {"B"}
    assert restored.reconcile() == []  # once
