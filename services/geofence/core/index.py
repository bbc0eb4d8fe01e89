"""The zone index: which zones a batch of points is inside of or near.

An STRtree over the zones projected to metres finds every zone within the exit buffer
(`dwithin`); the exact inside test then runs vectorised on the prepared lon/lat
geometry, so a point on a zone's boundary as drawn counts as inside.
"""

from __future__ import annotations

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
        self.buffer_m = params.exit_buffer_m
        lonlat = [z.geometry for z in zones]
        self.projection = LocalProjection.centred_on(lonlat)
        self._lonlat = np.asarray(lonlat, dtype=object)
        self._metric = np.asarray([self.projection.geometry(g) for g in lonlat], dtype=object)
        shapely.prepare(self._lonlat)
        shapely.prepare(self._metric)
        self._tree = shapely.STRtree(self._metric)

    def __len__(self) -> int:
        return len(self.zones)

    def classify(self, lon: FloatArray, lat: FloatArray) -> Hits:
        """Every (point, zone) pair with the point inside or within the exit buffer of the zone."""
        if len(self.zones) == 0 or len(lon) == 0:
            empty = np.empty(0, dtype=np.intp)
            return Hits(empty, empty, np.empty(0, dtype=np.bool_))
        x, y = self.projection.forward(lon, lat)
        points = shapely.points(x, y)
        pt, zn = self._tree.query(points, predicate="dwithin", distance=self.buffer_m)
        order = np.lexsort((zn, pt))  # per point, zones in index order: deterministic
        pt, zn = pt[order], zn[order]
        inside = shapely.intersects_xy(self._lonlat[zn], lon[pt], lat[pt])
        return Hits(pt.astype(np.intp), zn.astype(np.intp), np.asarray(inside, dtype=np.bool_))
