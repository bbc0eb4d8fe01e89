"""Raw AVL input to normalised pings and dead letters. Pure: bytes in, bytes out."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from schemas.ping import Ping, PingError, validate_ping


@dataclass(frozen=True, slots=True)
class Accepted:
    key: bytes  # unit_id: one unit's pings stay in order on one partition
    value: bytes  # the ping, normalised (UTC RFC 3339 ts)
    ping: Ping


@dataclass(frozen=True, slots=True)
class Rejected:
    errors: list[PingError]
    index: int | None  # position in an array message

    @property
    def reason(self) -> str:
        """A short label for metrics: the first failing field."""
        return self.errors[0].field if self.errors else "unknown"


def accept(ping: Ping) -> Accepted:
    value = orjson.dumps(ping.model_dump(mode="json", exclude_none=True))
    return Accepted(ping.unit_id.encode(), value, ping)


def normalise_message(raw: bytes) -> tuple[list[Accepted], list[Rejected]]:
    """One Kafka message: one ping object or an array of them."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return [], [Rejected([PingError(field="(message)", reason=f"invalid JSON: {exc}")], None)]
    return normalise_value(value)


def normalise_value(value: Any) -> tuple[list[Accepted], list[Rejected]]:
    items, is_array = (value, True) if isinstance(value, list) else ([value], False)
    accepted: list[Accepted] = []
    rejected: list[Rejected] = []
    for i, item in enumerate(items):
        result = validate_ping(item)
        if isinstance(result, Ping):
            accepted.append(accept(result))
        else:
            rejected.append(Rejected(result, i if is_array else None))
    return accepted, rejected


def dead_letter(raw: bytes, rejected: Rejected, source: Mapping[str, Any]) -> bytes:
    """A DLQ record: the original bytes (verbatim, base64), every error, and where it came from."""
    doc: dict[str, Any] = {
        "errors": [e.model_dump() for e in rejected.errors],
        "index": rejected.index,
        "source": dict(source),
        "original_b64": base64.b64encode(raw).decode(),
    }
    try:
        doc["original"] = raw.decode("utf-8")
    except UnicodeDecodeError:
        doc["original"] = None
    return orjson.dumps(doc)


# OsmAnd / Traccar Client query parameters -> Ping fields.
_OSMAND = {"id": "unit_id", "deviceid": "unit_id", "lat": "lat", "lon": "lon",
           "timestamp": "ts", "speed": "speed_mps", "bearing": "heading_deg",
           "heading": "heading_deg", "accuracy": "accuracy_m"}  # fmt: skip
_KNOTS_TO_MPS = 0.514444


def from_osmand(params: Mapping[str, str]) -> tuple[list[Accepted], list[Rejected]]:
    """The OsmAnd protocol Traccar Client speaks: numbers arrive as text; `timestamp` is Unix
    seconds (or ms) or an ISO time; `speed` is in knots, as Traccar defines it."""
    ping: dict[str, Any] = {"source": "osmand"}
    errors: list[PingError] = []
    for name, raw in params.items():
        field = _OSMAND.get(name.lower())
        if field is None:
            continue  # Traccar clients add battery, altitude, etc.: not part of a ping
        if field == "unit_id":
            ping[field] = raw
        elif field == "ts":
            ping[field] = _osmand_time(raw)
        else:
            try:
                number = float(raw)
            except ValueError:
                errors.append(PingError(field=field, reason=f"{name}={raw!r} is not a number"))
                continue
            ping[field] = number * _KNOTS_TO_MPS if field == "speed_mps" else number
    if errors:
        return [], [Rejected(errors, None)]
    return normalise_value(ping)


def _osmand_time(raw: str) -> Any:
    if raw.isdigit():
        number = int(raw)
        return number * 1000 if number < 100_000_000_000 else number  # seconds or ms
    return raw
