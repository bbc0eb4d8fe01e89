"""The zone index: which zones a batch of points is inside of or near.

Inside is judged on the zone as drawn in lon/lat (a point on its boundary counts as inside,
as GEOS's `intersects_xy` says); near is a distance in metres on a local projection (GEOS's
`dwithin`), for pairs whose point lies in the zone's metric bounds grown by the buffer.

How a batch goes, without a geometry or a projection per point:

- a grid of lon/lat boxes (each holding every point whose projection can be in a zone's grown
  bounds) gives the candidate pairs for the whole batch;
- inside: outside the zone's bounds a point is not in it; otherwise the sides crossed by a ray
  east of it decide, in numpy, unless it lies within a hair of a side, when GEOS decides;
- only points that need metres are projected: those not inside a zone, and those inside one
  not certain to hold its points in its grown bounds (a huge or far-flung zone);
- near: the distance to the nearest side decides in numpy unless it is within a millimetre of
  the buffer's edge, when GEOS decides.

Each shortcut only skips a GEOS call whose answer it knows, so the hits are GEOS's own, pair
for pair (tests/test_index_exact.py holds them to a plain R-tree and GEOS on every pair).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import shapely

from services.dosage.core.compiled import compiled
from services.dosage.core.params import DosageParams, ZoneRules
from services.geofence.core.projection import FloatArray, LocalProjection
from services.geofence.core.zone import ZoneSpec

IntArray = npt.NDArray[np.intp]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class Hits:
    """Sparse result for a batch: point `point[k]` is inside (or near) zone `zone[k]`."""

    point: IntArray
    zone: IntArray
    inside: BoolArray


class ZoneIndex:
    """Immutable: a zone edit builds a new index that replaces the old one in one assignment."""

    def __init__(self, zones: Sequence[ZoneSpec], params: DosageParams) -> None:
        ids = [z.zone_id for z in zones]
        if len(set(ids)) != len(ids):
            raise ValueError("zone ids must be unique")
        self.zones: tuple[ZoneSpec, ...] = tuple(zones)
        self.zone_ids: tuple[str, ...] = tuple(ids)
        self.position: dict[str, int] = {zid: i for i, zid in enumerate(ids)}
        self.rules: tuple[ZoneRules, ...] = tuple(
            params.rules_for(z.target_s, z.min_visit_s, z.max_visit_s) for z in zones
        )
        self.rules_by_id: dict[str, ZoneRules] = dict(zip(ids, self.rules, strict=True))
        # A fingerprint of each zone's shape as drawn: saved state names the shape its open
        # visits were judged against, so a restart notices a zone reshaped meanwhile.
        lonlat = [z.geometry for z in zones]
        self._lonlat = np.asarray(lonlat, dtype=object)
        self.shape_ids: dict[str, str] = {
            zid: hashlib.sha1(wkb).hexdigest()[:16]
            for zid, wkb in zip(ids, shapely.to_wkb(self._lonlat).tolist(), strict=True)
        }
        self.buffer_m = params.exit_buffer_m
        self.projection = LocalProjection.centred_on(lonlat)
        self._metric = self.projection.geometries(self._lonlat)
        shapely.prepare(self._lonlat)
        shapely.prepare(self._metric)
        # A pair is a candidate when the point is in the zone's bounds in metres grown by the
        # buffer and a metre of slack; the exact tests decide, never the bounds.
        pad = self.buffer_m + 1.0
        mb = shapely.bounds(self._metric).reshape(-1, 4)
        self._mx0, self._my0 = mb[:, 0] - pad, mb[:, 1] - pad
        self._mx1, self._my1 = mb[:, 2] + pad, mb[:, 3] + pad
        lb = shapely.bounds(self._lonlat).reshape(-1, 4)
        self._lon0, self._lat0, self._lon1, self._lat1 = (
            np.ascontiguousarray(lb[:, k]) for k in range(4)
        )
        # Candidates are looked up in lon/lat, so that only points that need metres (for the
        # distance test) are projected: a box around each zone that holds every point whose
        # projection is in those bounds.
        box, self._safe = self._lonlat_boxes()
        self._grid = _Grid(*box)
        self._sides_lonlat = _Sides(self._lonlat)
        self._sides_metric = _Sides(self._metric)

    def _lonlat_boxes(self) -> tuple[tuple[FloatArray, ...], BoolArray]:
        """Per zone: a lon/lat box holding every point whose projection is in the metric
        bounds above, and whether a point on or in the zone is certainly in those bounds (then
        an inside pair needs no projection at all).

        The box comes from a linear model of the projection at the zone, checked against the
        projection itself; zones where that model is poor (far from the projection's centre,
        near a pole or the antimeridian, very large) get a box holding every point, and are
        never taken as certain.
        """
        n = len(self.zones)
        lon0, lat0, lon1, lat1 = self._lon0, self._lat0, self._lon1, self._lat1
        fwd = self.projection.forward
        # The corners of each zone's lon/lat bounds, projected: (lon0, lat0), (lon1, lat0),
        # (lon1, lat1), (lon0, lat1).
        px, py = fwd(
            np.column_stack([lon0, lon1, lon1, lon0]).ravel(),
            np.column_stack([lat0, lat0, lat1, lat1]).ravel(),
        )
        px, py = px.reshape(n, 4), py.reshape(n, 4)
        # A linear model of the projection through three of them: metres per degree...
        with np.errstate(divide="ignore", invalid="ignore"):
            a, b = (px[:, 1] - px[:, 0]) / (lon1 - lon0), (px[:, 3] - px[:, 0]) / (lat1 - lat0)
            c, d = (py[:, 1] - py[:, 0]) / (lon1 - lon0), (py[:, 3] - py[:, 0]) / (lat1 - lat0)
            det = a * d - b * c
            ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
        # ... takes the corners of each metric bounds box back to lon/lat...
        tx = np.column_stack([self._mx0, self._mx1, self._mx1, self._mx0])
        ty = np.column_stack([self._my0, self._my0, self._my1, self._my1])
        dx, dy = tx - px[:, :1], ty - py[:, :1]
        qlon = lon0[:, None] + ia[:, None] * dx + ib[:, None] * dy
        qlat = lat0[:, None] + ic[:, None] * dx + id_[:, None] * dy
        # ... and forward again: how far the model misses, in metres, bounds its error.
        fx, fy = fwd(qlon.ravel(), qlat.ravel())
        miss = np.hypot(fx.reshape(n, 4) - tx, fy.reshape(n, 4) - ty).max(axis=1)
        norm = np.sqrt(ia * ia + ib * ib + ic * ic + id_ * id_)  # degrees per metre, at most
        qlon0, qlon1 = qlon.min(axis=1), qlon.max(axis=1)
        qlat0, qlat1 = qlat.min(axis=1), qlat.max(axis=1)
        slack = 2.0 * norm * miss + 0.01 * np.maximum(qlon1 - qlon0, qlat1 - qlat0) + 1e-7
        box = (
            np.minimum(qlon0 - slack, lon0),
            np.minimum(qlat0 - slack, lat0),
            np.maximum(qlon1 + slack, lon1),
            np.maximum(qlat1 + slack, lat1),
        )
        with np.errstate(invalid="ignore"):
            sound = (
                np.isfinite(slack)
                & (miss < 100.0)
                & (np.hypot(px[:, 0], py[:, 0]) < 1_000_000.0)
                & (box[0] > -180.0)
                & (box[2] < 180.0)
                & (box[1] > -80.0)
                & (box[3] < 80.0)
            )
        everywhere = np.full(n, np.inf)
        box = (
            np.where(sound, box[0], -everywhere),
            np.where(sound, box[1], -everywhere),
            np.where(sound, box[2], everywhere),
            np.where(sound, box[3], everywhere),
        )
        # Certain: the zone's lon/lat bounds, projected (the corners, with room for the bending
        # of its sides between them), lie inside the metric bounds.
        px0, px1, py0, py1 = px.min(axis=1), px.max(axis=1), py.min(axis=1), py.max(axis=1)
        span = np.maximum(px1 - px0, py1 - py0)
        bend = 4.0 * span * span / 6_371_000.0 + 1e-3
        with np.errstate(invalid="ignore"):
            safe = (
                sound
                & (px0 - bend > self._mx0)
                & (px1 + bend < self._mx1)
                & (py0 - bend > self._my0)
                & (py1 + bend < self._my1)
            )
        return box, safe

    def __len__(self) -> int:
        return len(self.zones)

    def classify(self, lon: FloatArray, lat: FloatArray) -> Hits:
        """Every (point, zone) pair with the point inside or within the exit buffer of the zone."""
        if len(self.zones) == 0 or len(lon) == 0:
            empty = np.empty(0, dtype=np.intp)
            return Hits(empty, empty, np.empty(0, dtype=np.bool_))
        lon = np.asarray(lon, dtype=np.float64)
        lat = np.asarray(lat, dtype=np.float64)
        pt, zn = self._grid.query(lon, lat)  # per point, zones in index order: deterministic
        plon, plat = lon.take(pt), lat.take(pt)
        # Inside, on the zone as drawn. Outside its bounds a point cannot be on or in it; away
        # from its sides, counting the sides crossed on the way east settles it.
        inside = np.zeros(len(pt), dtype=np.bool_)
        k = np.flatnonzero(
            (plon >= self._lon0.take(zn))
            & (plon <= self._lon1.take(zn))
            & (plat >= self._lat0.take(zn))
            & (plat <= self._lat1.take(zn))
        )
        sure, k = self._sides_lonlat.settle(zn.take(k), plon.take(k), plat.take(k), k)
        clear = sure.d2 > _SLACK_DEG**2
        inside[sure.pair[clear]] = sure.crossed[clear]
        k = np.concatenate([k, sure.pair[~clear]])
        if len(k):
            inside[k] = shapely.intersects_xy(
                self._lonlat.take(zn.take(k)), plon.take(k), plat.take(k)
            )
        # The rest need metres: pairs not inside, and inside pairs of zones not certain to hold
        # their points in their metric bounds. Each point involved is projected once.
        hit = inside.copy()
        need = np.flatnonzero(~inside | ~self._safe.take(zn))
        if len(need):
            p = pt.take(need)  # ascending
            first = np.empty(len(p), dtype=np.bool_)
            first[0] = True
            np.not_equal(p[1:], p[:-1], out=first[1:])
            ux, uy = self.projection.forward(lon[p[first]], lat[p[first]])
            which = np.cumsum(first) - 1
            px, py, z = ux.take(which), uy.take(which), zn.take(need)
            inbox = (
                (px >= self._mx0.take(z))
                & (px <= self._mx1.take(z))
                & (py >= self._my0.take(z))
                & (py <= self._my1.take(z))
            )
            was_inside = inside.take(need)
            hit[need] = was_inside & inbox
            k = np.flatnonzero(~was_inside & inbox)
            hit[need.take(k)] = self._near(z.take(k), px.take(k), py.take(k))
        keep = np.flatnonzero(hit)
        return Hits(pt.take(keep), zn.take(keep), inside.take(keep))

    def _near(self, zone: IntArray, x: FloatArray, y: FloatArray) -> BoolArray:
        """Within the buffer in metres: clearly within it of a side (or inside the metric
        shape), clearly beyond it from every side (and outside), or else GEOS's test."""
        near = np.zeros(len(zone), dtype=np.bool_)
        sure, k = self._sides_metric.settle(zone, x, y, np.arange(len(zone)))
        d2, crossed = sure.d2, sure.crossed
        d = self.buffer_m
        yes = (d2 > _SLACK_M**2) & crossed
        if d > _SLACK_M:
            yes |= d2 <= (d - _SLACK_M) ** 2
        no = (d2 > (d + _SLACK_M) ** 2) & ~crossed
        near[sure.pair[yes]] = True
        k = np.concatenate([k, sure.pair[~(yes | no)]])
        if len(k):
            near[k] = shapely.dwithin(self._metric[zone[k]], shapely.points(x[k], y[k]), d)
        return near


# Far above the rounding of the sums below (~1e-13 degrees, ~1e-11 m across a city), far below
# anything a GPS can tell apart: pairs this close to a side or to the buffer's edge go to GEOS.
_SLACK_DEG = 1e-9
_SLACK_M = 1e-3


@dataclass(frozen=True, slots=True)
class _Measured:
    pair: IntArray  # which pairs were measured
    d2: FloatArray  # squared distance to the nearest side
    crossed: BoolArray  # an odd number of sides crossed going east: inside, if d2 is not tiny


class _Sides:
    """The sides of each zone's rings (shells and holes of every part), laid end to end."""

    MAX_SIDES = 64  # a zone with more is left to GEOS's indexed tests

    def __init__(self, geoms: npt.NDArray[np.object_]) -> None:
        n = len(geoms)
        # One ring (a polygon without holes, the usual zone): its coordinates as they come.
        simple = np.flatnonzero(
            (shapely.get_type_id(geoms) == shapely.GeometryType.POLYGON)
            & (shapely.get_num_interior_rings(geoms) == 0)
        )
        xy, ring = shapely.get_coordinates(geoms[simple], return_index=True)
        parts = [(xy, ring, simple)]
        # Holes or several parts: rings from ragged offsets (coordinates of each ring, rings of
        # each polygon, polygons of each zone).
        other = np.setdiff1d(np.arange(n), simple)
        if len(other):
            try:
                kind, xy, offsets = shapely.to_ragged_array(geoms[other])
            except ValueError:  # not all (multi)polygons: GEOS judges every pair
                kind = None
            if kind in (shapely.GeometryType.POLYGON, shapely.GeometryType.MULTIPOLYGON):
                *nested, by_zone = offsets
                ring_zone = np.repeat(other, np.diff(by_zone))
                for level in reversed(nested[1:]):
                    ring_zone = np.repeat(ring_zone, np.diff(level))
                ring = np.repeat(np.arange(len(nested[0]) - 1), np.diff(nested[0]))
                parts.append((xy[:, :2], ring, ring_zone))
        # Sides: consecutive coordinates of one ring. Each zone's sides come together.
        a_parts, b_parts, zone_parts = [], [], []
        for xy, ring, ring_zone in parts:
            same = ring[:-1] == ring[1:]
            a_parts.append(xy[:-1][same])
            b_parts.append(xy[1:][same])
            zone_parts.append(ring_zone[ring[:-1][same]])
        a, b, zone = np.concatenate(a_parts), np.concatenate(b_parts), np.concatenate(zone_parts)
        self.count = np.bincount(zone, minlength=n).astype(np.intp)
        self.start = np.zeros(n, dtype=np.intp)
        firsts = np.flatnonzero(np.r_[True, zone[1:] != zone[:-1]]) if len(zone) else zone
        self.start[zone[firsts]] = firsts
        self.usable = (self.count > 0) & (self.count <= self.MAX_SIDES)
        dx, dy = b[:, 0] - a[:, 0], b[:, 1] - a[:, 1]
        len2 = dx * dx + dy * dy
        with np.errstate(divide="ignore"):
            inv_len2 = np.where(len2 > 0, 1.0 / len2, 0.0)
            inv_dy = np.where(dy != 0, 1.0 / dy, 0.0)
        # One row per side, gathered in one go: ax, ay, by, dx, dy, 1/|ab|², 1/dy.
        self.rows = np.column_stack([a[:, 0], a[:, 1], b[:, 1], dx, dy, inv_len2, inv_dy])

    def settle(
        self, zone: IntArray, px: FloatArray, py: FloatArray, pair: IntArray
    ) -> tuple[_Measured, IntArray]:
        """Measure the pairs whose zone has few enough sides; return them and the others."""
        ok = self.usable.take(zone)
        if not ok.all():
            zone, px, py, left, pair = zone[ok], px[ok], py[ok], pair[~ok], pair[ok]
        else:
            left = pair[:0]
        if len(pair) == 0:
            return _Measured(pair, np.empty(0), np.empty(0, dtype=np.bool_)), left
        d2, crossed = _measure(self.rows, self.start, self.count, zone, px, py)
        return _Measured(pair, d2, crossed), left


@compiled
def _measure(
    rows: FloatArray, start: IntArray, count: IntArray, zone: IntArray, px: FloatArray,
    py: FloatArray,
) -> tuple[FloatArray, BoolArray]:  # fmt: skip
    """For each (point, zone) pair: the squared distance to the zone's nearest side, and
    whether the ray east of the point crosses an odd number of its sides. One pass over each
    zone's sides, in the order and with the arithmetic of numpy's formulas."""
    n = len(zone)
    d2 = np.empty(n, dtype=np.float64)
    crossed = np.zeros(n, dtype=np.bool_)
    for i in range(n):
        z, x, y = zone[i], px[i], py[i]
        best, odd = np.inf, False
        for k in range(start[z], start[z] + count[z]):
            ax, ay, by, dx, dy, inv_len2, inv_dy = rows[k]
            wx, wy = x - ax, y - ay
            t = min(max((wx * dx + wy * dy) * inv_len2, 0.0), 1.0)
            ex, ey = wx - t * dx, wy - t * dy
            d = ex * ex + ey * ey
            if d < best or d != d:  # NaN wins, as with np.minimum
                best = d
            # Crossed if the side straddles the point's y (one end above, the other not)
            # east of the point.
            if (ay > y) != (by > y) and wx < wy * dx * inv_dy:
                odd = not odd
        d2[i], crossed[i] = best, odd
    return d2, crossed


class _Grid:
    """Which boxes hold each point (edges included), for a batch of points at once.

    A stack of uniform grids: each box sits in the finest one whose cells are at least as wide
    and tall as the box, so it takes at most four cells there. Each grid is a dense table of
    cells (of at most `MAX_CELLS`), so a lookup is two array reads per point and grid, without
    a geometry per point; the candidates are then checked against the boxes exactly.
    """

    MAX_CELLS = 1 << 20

    def __init__(self, x0: FloatArray, y0: FloatArray, x1: FloatArray, y1: FloatArray) -> None:
        self.count = len(x0)
        self.x0, self.y0, self.x1, self.y1 = (np.ascontiguousarray(v) for v in (x0, y0, x1, y1))
        finite = np.flatnonzero(
            np.isfinite(x0) & np.isfinite(y0) & np.isfinite(x1) & np.isfinite(y1)
        )
        # Boxes no grid can hold (not finite: a projection gone wrong) are checked against
        # every point; the comparisons then decide as for any other box.
        self.loose: IntArray = np.setdiff1d(np.arange(self.count), finite).astype(np.intp)
        self.levels: list[_Level] = []
        self.ox = self.oy = self.ex = self.ey = 0.0
        if len(finite):
            self._stack(finite)
        # The levels laid end to end, as the compiled query (`_query`) reads them.
        self.cells = np.array([level.cell for level in self.levels], dtype=np.float64)
        self.rows = np.array([level.rows for level in self.levels], dtype=np.intp)
        self.starts, self.starts_at = _laid_end_to_end([level.starts for level in self.levels])
        self.boxes, self.boxes_at = _laid_end_to_end([level.boxes for level in self.levels])

    def _stack(self, finite: IntArray) -> None:
        """The levels holding the finite boxes, finest first."""
        self.ox, self.oy = float(self.x0[finite].min()), float(self.y0[finite].min())
        self.ex, self.ey = float(self.x1[finite].max()), float(self.y1[finite].max())
        size = np.maximum(self.x1 - self.x0, self.y1 - self.y0)[finite]
        span = max(self.ex - self.ox, self.ey - self.oy)
        base = max(float(np.median(size)), span / np.sqrt(self.MAX_CELLS), 1e-9)
        cell = base
        left = finite
        while len(left):
            fits = np.maximum(self.x1 - self.x0, self.y1 - self.y0)[left] <= cell
            if fits.any():
                self.levels.append(self._level(left[fits], cell))
            left = left[~fits]
            cell *= 2.0

    def _level(self, members: IntArray, cell: float) -> _Level:
        cols = int((self.ex - self.ox) / cell) + 1
        rows = int((self.ey - self.oy) / cell) + 1
        cx0, cx1 = (
            self._cells(self.x0[members], self.ox, cell),
            self._cells(self.x1[members], self.ox, cell),
        )
        cy0, cy1 = (
            self._cells(self.y0[members], self.oy, cell),
            self._cells(self.y1[members], self.oy, cell),
        )
        keys: list[IntArray] = []
        owners: list[IntArray] = []
        for dx in range(int((cx1 - cx0).max()) + 1):
            for dy in range(int((cy1 - cy0).max()) + 1):
                ok = (cx0 + dx <= cx1) & (cy0 + dy <= cy1)
                keys.append((cx0[ok] + dx) * rows + cy0[ok] + dy)
                owners.append(members[ok])
        key, owner = np.concatenate(keys), np.concatenate(owners)
        order = np.lexsort((owner, key))  # by cell, then box
        starts = np.searchsorted(key[order], np.arange(cols * rows + 1))
        return _Level(cell, rows, starts.astype(np.intp), owner[order].astype(np.intp))

    @staticmethod
    def _cells(v: FloatArray, origin: float, cell: float) -> IntArray:
        # v >= origin, so the difference is >= 0 and the cast floors; monotone in v, so a point
        # in a box falls in one of the cells the box was entered in.
        return ((v - origin) / cell).astype(np.intp)

    def query(self, x: FloatArray, y: FloatArray) -> tuple[IntArray, IntArray]:
        """(point, box) pairs with the point in the box, sorted by point, then box."""
        return _query(
            np.ascontiguousarray(x, dtype=np.float64), np.ascontiguousarray(y, dtype=np.float64),
            self.ox, self.oy, self.ex, self.ey, self.cells, self.rows, self.starts,
            self.starts_at, self.boxes, self.boxes_at, self.loose, self.x0, self.y0, self.x1,
            self.y1,
        )  # fmt: skip


def _laid_end_to_end(parts: list[IntArray]) -> tuple[IntArray, IntArray]:
    """The arrays concatenated, and where each starts."""
    at = np.zeros(len(parts) + 1, dtype=np.intp)
    at[1:] = np.cumsum([len(p) for p in parts])
    whole = np.concatenate(parts).astype(np.intp) if parts else np.empty(0, dtype=np.intp)
    return whole, at


@compiled
def _pushed(found: IntArray, k: int, b: int) -> tuple[IntArray, int]:
    """`found[:k]` with `b` after it, the array doubled first if full."""
    if k == len(found):
        found = np.concatenate((found, np.empty(k, dtype=np.intp)))
    found[k] = b
    return found, k + 1


@compiled
def _query(
    x: FloatArray, y: FloatArray, ox: float, oy: float, ex: float, ey: float,
    cell: FloatArray, rows: IntArray, starts: IntArray, starts_at: IntArray,
    boxes: IntArray, boxes_at: IntArray, loose: IntArray,
    x0: FloatArray, y0: FloatArray, x1: FloatArray, y1: FloatArray,
) -> tuple[IntArray, IntArray]:  # fmt: skip
    """`_Grid.query`, point by point: a batch of a few points (a live fetch) costs a few
    microseconds, where a dozen numpy calls per grid level cost a hundred or more."""
    out_p = np.empty(max(16, len(x)), dtype=np.intp)
    out_b = np.empty(max(16, len(x)), dtype=np.intp)
    found = np.empty(16, dtype=np.intp)
    m = 0
    for i in range(len(x)):
        px, py = x[i], y[i]
        k = 0
        # Each finite box is in one level, and in the one cell of it the point falls in;
        # boxes no grid holds are tried for every point.
        gridded = ox <= px <= ex and oy <= py <= ey
        for level in range(len(cell) if gridded else 0):
            size = cell[level]
            c = int((px - ox) / size) * rows[level] + int((py - oy) / size)
            first = starts[starts_at[level] + c]
            last = starts[starts_at[level] + c + 1]
            for j in range(first, last):
                b = boxes[boxes_at[level] + j]
                if x0[b] <= px <= x1[b] and y0[b] <= py <= y1[b]:
                    found, k = _pushed(found, k, b)
        for b in loose:
            if x0[b] <= px <= x1[b] and y0[b] <= py <= y1[b]:
                found, k = _pushed(found, k, b)
        if m + k > len(out_p):
            grow = max(len(out_p), k)
            out_p = np.concatenate((out_p, np.empty(grow, dtype=np.intp)))
            out_b = np.concatenate((out_b, np.empty(grow, dtype=np.intp)))
        # In box order: an insertion sort, as a point is in a handful of boxes at most.
        for a in range(k):
            b, j = found[a], m + a
            while j > m and out_b[j - 1] > b:
                out_b[j] = out_b[j - 1]
                j -= 1
            out_b[j] = b
            out_p[m + a] = i
        m += k
    return out_p[:m], out_b[:m]


@dataclass(frozen=True, slots=True)
class _Level:
    """One grid of square cells, as a table: the boxes of cell c are
    boxes[starts[c] : starts[c + 1]], ascending; cell c = column * rows + row."""

    cell: float
    rows: int
    starts: IntArray
    boxes: IntArray
