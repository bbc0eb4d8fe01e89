"""Export the wire contracts as JSON Schema files (`dosewatch schemas`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel

from schemas.ping import Ping
from schemas.records import (
    CloudEvent,
    RejectedPing,
    VisitProgress,
    VisitRecord,
    ZonePeriodRecord,
    ZoneStatus,
)
from schemas.zone import ZoneFeature

MODELS: dict[str, type[BaseModel]] = {
    "ping": Ping,
    "zone": ZoneFeature,
    "visit": VisitRecord,
    "visit_progress": VisitProgress,
    "zone_period": ZonePeriodRecord,
    "zone_status": ZoneStatus,
    "cloudevent": CloudEvent,
    "rejected_ping": RejectedPing,
}
DEFAULT_DIR = Path(__file__).parent / "json"


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    doc = model.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **doc}


def write_schemas(out: Path | None = None) -> list[Path]:
    target = out or DEFAULT_DIR
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in MODELS.items():
        path = target / f"{name}.schema.json"
        path.write_bytes(orjson.dumps(schema_of(model), option=orjson.OPT_INDENT_2) + b"\n")
        written.append(path)
    return written
