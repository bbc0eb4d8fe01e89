"""The hot-spot zone wire contract: a GeoJSON Feature with a WGS84 (Multi)Polygon."""

from __future__ import annotations

import itertools
from typing import Annotated, Any, Literal

import shapely
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from shapely.geometry.base import BaseGeometry
from shapely.validation import explain_validity

Position = Annotated[list[float], Field(min_length=2, max_length=3)]
Ring = list[Position]
ZONE_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
DAYS: tuple[Day, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
WEEK_S = 604_800


class PolygonGeometry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["Polygon"]
    coordinates: Annotated[list[Ring], Field(min_length=1)]


class MultiPolygonGeometry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["MultiPolygon"]
    coordinates: Annotated[list[Annotated[list[Ring], Field(min_length=1)]], Field(min_length=1)]


class ScheduleWindow(BaseModel):
    """A weekly window in the agency timezone, opening on each of `days` at `start`. An `end`
    at or before `start` closes on the next day; "24:00" ends at midnight."""

    model_config = ConfigDict(extra="forbid")
    days: Annotated[list[Day], Field(min_length=1, max_length=7)]
    start: Annotated[str, Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$", examples=["18:00"])]
    end: Annotated[
        str, Field(pattern=r"^(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$", examples=["02:00"])
    ]

    @model_validator(mode="after")
    def _check(self) -> ScheduleWindow:
        if len(set(self.days)) != len(self.days):
            raise ValueError("a day is listed twice")
        if self.start == self.end:
            raise ValueError("start and end are equal: for a whole day use 00:00 to 24:00")
        return self


class ZoneProperties(BaseModel):
    """Known properties are checked; anything else (district, notes) is kept as it is."""

    model_config = ConfigDict(extra="allow")
    zone_id: Annotated[str, Field(pattern=ZONE_ID_PATTERN)] | None = None
    name: str | None = None
    # At most a week: more is a typo, and would hold a zone in one status for good.
    target_s: Annotated[float, Field(gt=0, le=WEEK_S, allow_inf_nan=False)] | None = None
    min_visit_s: Annotated[float, Field(ge=0, le=WEEK_S, allow_inf_nan=False)] | None = None
    max_visit_s: Annotated[float, Field(gt=0, le=WEEK_S, allow_inf_nan=False)] | None = None
    # When the zone is patrolled; absent means always. Outside it its status is `inactive`.
    schedule: Annotated[list[ScheduleWindow], Field(min_length=1, max_length=50)] | None = None

    @field_validator("schedule", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if value == []:
            raise ValueError("an empty schedule is never active: leave it out to mean always")
        return value

    @model_validator(mode="after")
    def _check(self) -> ZoneProperties:
        # Only what is given here: agency defaults fill the rest and are checked where known.
        check_visit_limits(self.min_visit_s, self.target_s, self.max_visit_s)
        return self


def check_visit_limits(min_s: float | None, target_s: float | None, max_s: float | None) -> None:
    """min_visit_s <= target_s <= max_visit_s among the values given (ValueError otherwise)."""
    given = (("min_visit_s", min_s), ("target_s", target_s), ("max_visit_s", max_s))
    named = [(n, v) for n, v in given if v is not None]
    for (a, va), (b, vb) in itertools.pairwise(named):
        if va > vb:
            raise ValueError(f"{a} ({va:g}) must not be more than {b} ({vb:g})")


class ZoneFeature(BaseModel):
    """A zone as agencies draw it. The id is the Feature `id` or `properties.zone_id`."""

    model_config = ConfigDict(extra="allow")
    type: Literal["Feature"]
    id: Annotated[str, Field(pattern=ZONE_ID_PATTERN)] | int | None = None
    properties: ZoneProperties = Field(default_factory=ZoneProperties)
    geometry: Annotated[PolygonGeometry | MultiPolygonGeometry, Field(discriminator="type")]

    @model_validator(mode="after")
    def _check(self) -> ZoneFeature:
        fid = None if self.id is None else str(self.id)
        pid = self.properties.zone_id
        if fid is None and pid is None:
            raise ValueError("a zone needs an id: the Feature 'id' or 'properties.zone_id'")
        if fid is not None and pid is not None and fid != pid:
            raise ValueError(f"Feature id {fid!r} and properties.zone_id {pid!r} disagree")
        polygons = (
            [self.geometry.coordinates]
            if isinstance(self.geometry, PolygonGeometry)
            else self.geometry.coordinates
        )
        for p, rings in enumerate(polygons):
            for r, ring in enumerate(rings):
                where = f"polygon {p} ring {r}"
                if len(ring) < 4:
                    raise ValueError(f"{where} has {len(ring)} positions; a ring needs at least 4")
                if ring[0][:2] != ring[-1][:2]:
                    raise ValueError(f"{where} is not closed (first and last positions differ)")
                for lon, lat, *_ in ring:
                    if not (-180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0):
                        raise ValueError(f"{where} has a position outside WGS84: [{lon}, {lat}]")
        geom = self.shape()
        if not geom.is_valid:
            raise ValueError(f"invalid geometry: {explain_validity(geom)}")
        if geom.area == 0:
            raise ValueError("invalid geometry: the polygon has no area")
        return self

    @property
    def zone_id(self) -> str:
        return self.properties.zone_id or str(self.id)

    def shape(self) -> BaseGeometry:
        """The geometry in lon/lat degrees, not repaired."""
        return shapely.geometry.shape(self.geometry.model_dump())


class ZoneError(BaseModel):
    """Why one feature of a collection was refused."""

    index: int
    zone_id: str | None
    reason: str


def parse_zone_collection(doc: Any) -> tuple[list[ZoneFeature], list[ZoneError]]:
    """Validate a FeatureCollection (or one Feature); report every bad feature."""
    if isinstance(doc, dict) and doc.get("type") == "Feature":
        features: list[Any] = [doc]
    elif isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        raw = doc.get("features")
        if not isinstance(raw, list):
            return [], [ZoneError(index=-1, zone_id=None, reason="'features' must be an array")]
        features = raw
    else:
        return [], [
            ZoneError(
                index=-1, zone_id=None, reason="expected a GeoJSON FeatureCollection or Feature"
            )
        ]
    zones: list[ZoneFeature] = []
    errors: list[ZoneError] = []
    seen: dict[str, int] = {}
    for i, feature in enumerate(features):
        hint = _id_hint(feature)
        try:
            zone = ZoneFeature.model_validate(feature)
        except ValidationError as exc:
            reasons = []
            for e in exc.errors(include_url=False):
                loc = ".".join(str(p) for p in e["loc"])
                msg = e["msg"].removeprefix("Value error, ")
                reasons.append(f"{loc}: {msg}" if loc else msg)
            errors.append(ZoneError(index=i, zone_id=hint, reason="; ".join(reasons)))
            continue
        if zone.zone_id in seen:
            errors.append(
                ZoneError(
                    index=i,
                    zone_id=zone.zone_id,
                    reason=f"duplicate zone id (also feature {seen[zone.zone_id]})",
                )
            )
            continue
        seen[zone.zone_id] = i
        zones.append(zone)
    return zones, errors


def _id_hint(feature: Any) -> str | None:
    if not isinstance(feature, dict):
        return None
    props = feature.get("properties")
    if isinstance(props, dict) and props.get("zone_id") is not None:
        return str(props["zone_id"])
    return None if feature.get("id") is None else str(feature["id"])
