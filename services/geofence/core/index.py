"""The zone index: which zones a batch of points is inside of or near.

An R-tree (shapely's STRtree) over each zone's bounds, grown by the exit buffer, finds the
candidates for a whole batch at once; exact tests then run vectorised on prepared geometry:
inside on the zone as drawn in lon/lat (so a point on its boundary counts as inside), near
as a distance in metres on a local projection.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import shapely

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
        self.shape_ids: dict[str, str] = {
            z.zone_id: hashlib.sha1(shapely.to_wkb(z.geometry)).hexdigest()[:16] for z in zones
        }
        self.buffer_m = params.exit_buffer_m
        lonlat = [z.geometry for z in zones]
        self.projection = LocalProjection.centred_on(lonlat)
        self._lonlat = np.asarray(lonlat, dtype=object)
        self._metric = self.projection.geometries(self._lonlat)
        shapely.prepare(self._lonlat)
        shapely.prepare(self._metric)
        # A metre of slack on the buffered bounds: the exact tests decide, never the tree.
        pad = self.buffer_m + 1.0
        bounds = shapely.bounds(self._metric).reshape(-1, 4)
        self._tree = shapely.STRtree(
            shapely.box(
                bounds[:, 0] - pad, bounds[:, 1] - pad, bounds[:, 2] + pad, bounds[:, 3] + pad
            )
        )

    def __len__(self) -> int:
        return len(self.zones)

    def classify(self, lon: FloatArray, lat: FloatArray) -> Hits:
        """Every (point, zone) pair with the point inside or within the exit buffer of the zone."""
        if len(self.zones) == 0 or len(lon) == 0:
            empty = np.empty(0, dtype=np.intp)
            return Hits(empty, empty, np.empty(0, dtype=np.bool_))
        x, y = self.projection.forward(lon, lat)
        points = shapely.points(x, y)
        pt, zn = self._tree.query(points)
        order = np.lexsort((zn, pt))  # per point, zones in index order: deterministic
        pt, zn = pt[order], zn[order]
        inside = shapely.intersects_xy(self._lonlat[zn], lon[pt], lat[pt])
        near = np.zeros_like(inside)
        out = ~inside
        near[out] = shapely.dwithin(self._metric[zn[out]], points[pt[out]], self.buffer_m)
        keep = inside | near
        return Hits(pt[keep].astype(np.intp), zn[keep].astype(np.intp), inside[keep])
