"""The AVL ping wire contract and its structured validation errors."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from schemas.timefmt import format_ts, parse_ts

UNIT_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
NULL_ISLAND = "lat and lon are both 0: a GPS receiver's output without a fix, not a position"

EpochMillis = Annotated[
    int,
    BeforeValidator(parse_ts),
    PlainSerializer(format_ts, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "format": "date-time"},
                {"type": "integer", "description": "epoch milliseconds"},
            ],
            "description": "RFC 3339 with offset or Z, or integer epoch milliseconds; "
            "normalised to RFC 3339 UTC with milliseconds",
        },
        mode="validation",
    ),
    WithJsonSchema({"type": "string", "format": "date-time"}, mode="serialization"),
]


class Ping(BaseModel):
    """One AVL fix. `ts` is held as UTC epoch milliseconds and written back as RFC 3339."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    unit_id: Annotated[str, Field(pattern=UNIT_ID_PATTERN)]
    ts: EpochMillis
    lat: Annotated[float, Field(ge=-90.0, le=90.0, allow_inf_nan=False)]
    lon: Annotated[float, Field(ge=-180.0, le=180.0, allow_inf_nan=False)]
    accuracy_m: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None
    speed_mps: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None
    heading_deg: Annotated[float, Field(ge=0.0, lt=360.0, allow_inf_nan=False)] | None = None
    source: str | None = None

    @model_validator(mode="after")
    def _not_null_island(self) -> Ping:
        # Receivers without a fix send 0,0; taken as a position it would end a visit early.
        if self.lat == 0.0 and self.lon == 0.0:
            raise ValueError(NULL_ISLAND)
        return self


class PingError(BaseModel):
    """Why one field of one ping was refused."""

    field: str
    reason: str


def ping_errors(exc: ValidationError) -> list[PingError]:
    """Flatten pydantic's errors into field/reason pairs a human can act on."""
    out: list[PingError] = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "(ping)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        out.append(PingError(field=loc, reason=msg))
    return out


def validate_ping(raw: Any) -> Ping | list[PingError]:
    """Validate one decoded JSON value; never raises for bad input."""
    if not isinstance(raw, dict):
        return [PingError(field="(ping)", reason=f"expected a JSON object, got {_json_type(raw)}")]
    try:
        return Ping.model_validate(raw)
    except ValidationError as exc:
        return ping_errors(exc)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return names.get(type(value), type(value).__name__)
