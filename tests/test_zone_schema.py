"""The Zone wire contract: ids, overrides, holes, and geometry refused rather than repaired."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from schemas.export import MODELS, schema_of
from schemas.zone import parse_zone_collection

SQUARE = [[[-74.0, 40.7], [-73.998, 40.7], [-73.998, 40.702], [-74.0, 40.702], [-74.0, 40.7]]]
HOLE = [
    [-73.9995, 40.7005],
    [-73.9985, 40.7005],
    [-73.9985, 40.7015],
    [-73.9995, 40.7015],
    [-73.9995, 40.7005],
]


def feature(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "Feature",
        "id": "Z1",
        "properties": {"name": "Corner"},
        "geometry": {"type": "Polygon", "coordinates": copy.deepcopy(SQUARE)},
    }
    base.update(kw)
    return base


def one(doc: Any) -> str:
    zones, errors = parse_zone_collection(doc)
    assert not zones and len(errors) == 1
    return errors[0].reason


def test_valid_polygon_with_hole_and_overrides() -> None:
    f = feature(
        properties={"target_s": 600, "min_visit_s": 30, "max_visit_s": 900, "district": "7th"}
    )
    f["geometry"]["coordinates"].append(HOLE)
    zones, errors = parse_zone_collection({"type": "FeatureCollection", "features": [f]})
    assert errors == []
    zone = zones[0]
    assert zone.zone_id == "Z1"
    assert (zone.properties.target_s, zone.properties.min_visit_s) == (600, 30)
    assert len(zone.shape().interiors) == 1


def test_id_from_properties_and_numeric_feature_id() -> None:
    zones, _ = parse_zone_collection(feature(id=None, properties={"zone_id": "HS-9"}))
    assert zones[0].zone_id == "HS-9"
    zones, _ = parse_zone_collection(feature(id=17))
    assert zones[0].zone_id == "17"


def test_multipolygon() -> None:
    other = [[[-73.99, 40.7], [-73.989, 40.7], [-73.989, 40.701], [-73.99, 40.7]]]
    zones, errors = parse_zone_collection(
        feature(geometry={"type": "MultiPolygon", "coordinates": [SQUARE, other]})
    )
    assert errors == [] and zones[0].shape().geom_type == "MultiPolygon"


@pytest.mark.parametrize(
    ("doc_change", "reason_part"),
    [
        ({"id": None}, "needs an id"),
        ({"properties": {"zone_id": "Z2"}}, "disagree"),
        ({"geometry": {"type": "Point", "coordinates": [0, 0]}}, "geometry"),
        (
            {
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[-74, 40.7], [-73.9, 40.8], [-74, 40.7]]],
                }
            },
            "at least 4",
        ),
        ({"geometry": {"type": "Polygon", "coordinates": [SQUARE[0][:-1]]}}, "not closed"),
        (
            {
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [
                        [[-74, 40.7], [-73.99, 40.71], [-73.99, 40.7], [-74, 40.71], [-74, 40.7]]
                    ],
                }
            },
            "Self-intersection",
        ),
        (
            {
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[-190, 40.7], [-73.99, 40.7], [-73.99, 40.71], [-190, 40.7]]],
                }
            },
            "outside WGS84",
        ),
        ({"properties": {"target_s": 0}}, "greater than 0"),
        ({"properties": {"min_visit_s": -5}}, "greater than or equal to 0"),
        ({"type": "Polygon"}, "Feature"),
    ],
)
def test_invalid_zones_are_refused_with_reason(
    doc_change: dict[str, Any], reason_part: str
) -> None:
    assert reason_part in one({"type": "FeatureCollection", "features": [feature(**doc_change)]})


def test_hole_outside_shell_is_refused_not_repaired() -> None:
    f = feature()
    f["geometry"]["coordinates"].append(
        [[-73.9, 40.8], [-73.89, 40.8], [-73.89, 40.81], [-73.9, 40.81], [-73.9, 40.8]]
    )
    assert "invalid geometry" in one(f)


def test_every_bad_feature_is_reported_and_duplicates_caught() -> None:
    zones, errors = parse_zone_collection(
        {"type": "FeatureCollection", "features": [feature(), feature(), feature(id=None), 5]}
    )
    assert [z.zone_id for z in zones] == ["Z1"]
    assert [(e.index, e.zone_id) for e in errors] == [(1, "Z1"), (2, None), (3, None)]
    assert "duplicate" in errors[0].reason


@pytest.mark.parametrize("doc", [[], {"type": "FeatureCollection"}, {"type": "Topology"}])
def test_wrong_documents(doc: Any) -> None:
    zones, errors = parse_zone_collection(doc)
    assert zones == [] and errors and errors[0].index == -1


@pytest.mark.parametrize("name", sorted(MODELS))
def test_exported_json_schemas_are_current(name: str) -> None:
    path = Path(__file__).resolve().parents[1] / "schemas" / "json" / f"{name}.schema.json"
    assert json.loads(path.read_text()) == schema_of(MODELS[name]), "run: dosewatch schemas"
