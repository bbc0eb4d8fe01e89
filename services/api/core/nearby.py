"""Nearest zones to a point, in metres. Pure: numpy and shapely only.

Candidates are ranked by centroid distance (vectorised), then the best few are measured to
their boundary on a local equirectangular plane around the point: within the tens of km an
MDT asks about, that is accurate to well under 1 %."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

_M_PER_DEG_LAT = 110_574.0
_M_PER_DEG_LON_EQ = 111_320.0


@dataclass(frozen=True, slots=True)
class ZonePlace:
    zone_id: str
    shape: BaseGeometry


class Places:
    def __init__(self, zones: Sequence[ZonePlace]) -> None:
        self.zones = list(zones)
        cent = shapely.centroid([z.shape for z in self.zones]) if self.zones else []
        self.lon = np.array([c.x for c in cent], dtype=float)
        self.lat = np.array([c.y for c in cent], dtype=float)

    def nearest(
        self, lon: float, lat: float, k: int, allowed: set[str] | None = None
    ) -> list[tuple[str, float]]:
        """Up to k (zone_id, metres to its boundary; 0 inside), nearest first."""
        if not self.zones or k <= 0:
            return []
        kx = _M_PER_DEG_LON_EQ * math.cos(math.radians(lat))
        d2 = ((self.lon - lon) * kx) ** 2 + ((self.lat - lat) * _M_PER_DEG_LAT) ** 2
        order = np.argsort(d2)
        picked: list[tuple[str, float]] = []
        point = shapely.Point(0.0, 0.0)
        for i in order.tolist():
            zone = self.zones[i]
            if allowed is not None and zone.zone_id not in allowed:
                continue
            local = shapely.transform(
                zone.shape, lambda xy: np.column_stack(((xy[:, 0] - lon) * kx,
                                                        (xy[:, 1] - lat) * _M_PER_DEG_LAT))
            )  # fmt: skip
            picked.append((zone.zone_id, float(shapely.distance(local, point))))
            if len(picked) >= 3 * k:  # a few spare: a big zone's edge can beat a centroid
                break
        picked.sort(key=lambda p: (p[1], p[0]))
        return picked[:k]
