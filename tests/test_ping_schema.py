"""The Ping wire contract: what is accepted, how it is normalised, and how refusals read."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.ping import Ping, validate_ping

BASE: dict[str, Any] = {
    "unit_id": "unit-01",
    "ts": "2026-05-14T18:00:05.000Z",
    "lat": 40.7,
    "lon": -74.0,
}


@pytest.mark.parametrize(
    ("ts", "expected_ms"),
    [
        ("2026-05-14T18:00:05.000Z", 1778781605000),
        ("2026-05-14T18:00:05Z", 1778781605000),
        ("2026-05-14T13:00:05.250-05:00", 1778781605250),
        ("2026-05-14T20:00:05+02:00", 1778781605000),
        ("2026-05-14T18:00:05.123987Z", 1778781605123),  # sub-ms truncated
        (1778781605000, 1778781605000),
    ],
)
def test_timestamps_normalise_to_utc_millis(ts: Any, expected_ms: int) -> None:
    ping = validate_ping(BASE | {"ts": ts})
    assert isinstance(ping, Ping)
    assert ping.ts == expected_ms


def test_serialises_ts_as_rfc3339_utc_millis() -> None:
    ping = Ping.model_validate(BASE | {"ts": "2026-05-14T13:00:05.25-05:00"})
    assert ping.model_dump(mode="json")["ts"] == "2026-05-14T18:00:05.250Z"


@pytest.mark.parametrize(
    ("change", "field", "reason_part"),
    [
        ({"ts": "2026-05-14T18:00:05"}, "ts", "offset"),  # naive
        ({"ts": "2026-05-14 18:00:05Z"}, "ts", "RFC 3339"),
        ({"ts": 1778781605.5}, "ts", "epoch milliseconds"),
        ({"ts": "1778781605000"}, "ts", "RFC 3339"),
        ({"ts": True}, "ts", "boolean"),
        ({"ts": "2026-02-30T00:00:00Z"}, "ts", "day"),
        ({"ts": "2026-05-14T18:00:05.٣٣٣Z"}, "ts", "RFC 3339"),  # RFC 3339 digits are ASCII
        ({"ts": "٢٠٢٦-05-14T18:00:05Z"}, "ts", "RFC 3339"),
        # An offset that carries the instant outside years 1-9999 in UTC.
        ({"ts": "0001-01-01T00:00:00+01:00"}, "ts", "out of range"),
        ({"ts": "9999-12-31T23:59:59-01:00"}, "ts", "out of range"),
        ({"unit_id": ""}, "unit_id", "pattern"),
        ({"unit_id": "x" * 65}, "unit_id", "pattern"),
        ({"unit_id": "unit 1"}, "unit_id", "pattern"),
        ({"unit_id": 7}, "unit_id", "string"),
        ({"lat": 90.0001}, "lat", "less than or equal to 90"),
        ({"lon": -180.5}, "lon", "greater than or equal to -180"),
        ({"lat": float("nan")}, "lat", "finite"),
        ({"lon": float("inf")}, "lon", "finite"),
        ({"lat": "40.7"}, "lat", "number"),
        ({"lat": True}, "lat", "number"),
        ({"accuracy_m": -1}, "accuracy_m", "greater than or equal to 0"),
        ({"speed_mps": -0.1}, "speed_mps", "greater than or equal to 0"),
        ({"heading_deg": 360}, "heading_deg", "less than 360"),
        ({"source": 5}, "source", "string"),
        ({"altitude": 12}, "altitude", "unknown field"),
        ({"lat": 0, "lon": 0}, "(ping)", "without a fix"),  # null island
        ({"lat": -0.0, "lon": 0.0}, "(ping)", "without a fix"),
    ],
)
def test_invalid_pings_name_field_and_reason(
    change: dict[str, Any], field: str, reason_part: str
) -> None:
    result = validate_ping(BASE | change)
    assert isinstance(result, list)
    assert [e.field for e in result] == [field]
    assert reason_part in result[0].reason


@pytest.mark.parametrize("missing", ["unit_id", "ts", "lat", "lon"])
def test_required_fields(missing: str) -> None:
    raw = {k: v for k, v in BASE.items() if k != missing}
    result = validate_ping(raw)
    assert isinstance(result, list)
    assert (result[0].field, result[0].reason) == (missing, "required field is missing")


@pytest.mark.parametrize("raw", [[BASE], "ping", 3, None])
def test_non_objects_are_refused(raw: Any) -> None:
    result = validate_ping(raw)
    assert isinstance(result, list) and result[0].field == "(ping)"


def test_optional_fields_accept_boundaries_and_null() -> None:
    ping = validate_ping(
        BASE
        | {
            "accuracy_m": 0,
            "speed_mps": 0,
            "heading_deg": 0,
            "source": "avl",
            "lat": -90,
            "lon": 180,
        }
    )
    assert isinstance(ping, Ping)
    assert validate_ping(BASE | {"accuracy_m": None}) == Ping.model_validate(BASE)
    # Only both at once is null island: the equator and the prime meridian are places.
    assert isinstance(validate_ping(BASE | {"lat": 0.0}), Ping)
    assert isinstance(validate_ping(BASE | {"lat": 0.0, "lon": 1e-9}), Ping)
