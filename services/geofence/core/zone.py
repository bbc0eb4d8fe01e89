"""A zone as the rules see it: an id, a lon/lat geometry and optional rule overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shapely.geometry.base import BaseGeometry


@dataclass(frozen=True, slots=True)
class ZoneSpec:
    zone_id: str
    geometry: BaseGeometry  # WGS84 lon/lat, valid, never repaired
    name: str | None = None
    target_s: float | None = None
    min_visit_s: float | None = None
    max_visit_s: float | None = None
    properties: dict[str, Any] = field(default_factory=dict, compare=False)
