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


@dataclass(frozen=True, slots=True)
class Limits:
    now_ms: int  # wall time: the one thing the rules cannot check for themselves
    max_future_ms: int = 60_000
    max_message_bytes: int = 1_000_000


def normalise_message(raw: bytes, limits: Limits) -> tuple[list[Accepted], list[Rejected]]:
    """One Kafka message: one ping object or an array of them."""
    if len(raw) > limits.max_message_bytes:
        reason = f"message of {len(raw)} bytes is over the limit of {limits.max_message_bytes}"
        return [], [Rejected([PingError(field="(message)", reason=reason)], None)]
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return [], [Rejected([PingError(field="(message)", reason=f"invalid JSON: {exc}")], None)]
    return normalise_value(value, limits)


def normalise_value(value: Any, limits: Limits) -> tuple[list[Accepted], list[Rejected]]:
    items, is_array = (value, True) if isinstance(value, list) else ([value], False)
    accepted: list[Accepted] = []
    rejected: list[Rejected] = []
    horizon = limits.now_ms + limits.max_future_ms
    for i, item in enumerate(items):
        result = validate_ping(item)
        if isinstance(result, Ping) and result.ts > horizon:
            # A clock far ahead would drag the stream clock with it and close every visit.
            ahead = (result.ts - limits.now_ms) / 1000
            limit = limits.max_future_ms / 1000
            result = [
                PingError(field="ts", reason=f"{ahead:.0f} s in the future (limit {limit:.0f} s)")
            ]
        if isinstance(result, Ping):
            accepted.append(accept(result))
        else:
            rejected.append(Rejected(result, i if is_array else None))
    return accepted, rejected


def dead_letter(raw: bytes, rejected: list[Rejected], source: Mapping[str, Any]) -> bytes:
    """One DLQ record per refused message, however many of its pings failed: the original
    bytes (verbatim, base64), the errors of each failed ping by its index, and the source."""
    kept = raw[:_DLQ_ORIGINAL_MAX]
    doc: dict[str, Any] = {
        "rejected": [
            {"index": r.index, "errors": [e.model_dump() for e in r.errors]}
            for r in rejected[:_DLQ_REJECTED_MAX]
        ],
        "rejected_count": len(rejected),
        "source": dict(source),
        "original_b64": base64.b64encode(kept).decode(),
        "original_bytes": len(raw),  # more than kept: an oversized message, truncated here
    }
    raw = kept
    try:
        doc["original"] = raw.decode("utf-8")
    except UnicodeDecodeError:
        doc["original"] = None
    return orjson.dumps(doc)


_DLQ_ORIGINAL_MAX = 262_144
_DLQ_REJECTED_MAX = 1000  # a 1 MB array of bad pings must not become gigabytes of letters

# OsmAnd / Traccar Client query parameters -> Ping fields.
_OSMAND = {"id": "unit_id", "deviceid": "unit_id", "lat": "lat", "lon": "lon",
           "timestamp": "ts", "speed": "speed_mps", "bearing": "heading_deg",
           "heading": "heading_deg", "accuracy": "accuracy_m"}  # fmt: skip
_KNOTS_TO_MPS = 0.514444


def from_osmand(params: Mapping[str, str], limits: Limits) -> tuple[list[Accepted], list[Rejected]]:
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
    return normalise_value(ping, limits)


def _osmand_time(raw: str) -> Any:
    if raw.isdigit():
        number = int(raw)
        return number * 1000 if number < 100_000_000_000 else number  # seconds or ms
    return raw
