"""Normalising raw AVL input: limits that only wall time can check, and the DLQ record."""

from __future__ import annotations

import base64

import orjson
import pytest

from services.ingest.core.normalise import (
    Accepted,
    Limits,
    Rejected,
    dead_letter,
    from_osmand,
    normalise_message,
)

NOW = 1_778_781_600_000
PING = {"unit_id": "car-1", "ts": NOW, "lat": 40.7, "lon": -74.0}


@pytest.mark.parametrize(
    ("ahead_ms", "accepted"),
    [(0, True), (60_000, True), (60_001, False), (3_600_000, False), (-86_400_000, True)],
)
def test_future_timestamps_are_refused(ahead_ms: int, accepted: bool) -> None:
    ok, bad = normalise_message(orjson.dumps(PING | {"ts": NOW + ahead_ms}), Limits(NOW))
    assert (len(ok), len(bad)) == ((1, 0) if accepted else (0, 1))
    if not accepted:
        assert bad[0].errors[0].field == "ts" and "in the future" in bad[0].errors[0].reason


def test_oversized_message_is_refused_and_kept_truncated() -> None:
    raw = orjson.dumps([PING] * 20_000)
    ok, bad = normalise_message(raw, Limits(NOW, max_message_bytes=100_000))
    assert ok == [] and "over the limit" in bad[0].errors[0].reason
    letter = orjson.loads(dead_letter(raw, bad, {"topic": "t", "partition": 0, "offset": 9}))
    assert letter["original_bytes"] == len(raw)
    assert raw.startswith(base64.b64decode(letter["original_b64"]))
    assert len(base64.b64decode(letter["original_b64"])) < len(raw)


@pytest.mark.parametrize(
    ("raw", "field"),
    [(b"[1, 2", "(message)"), (b'"text"', "(ping)"), (b"null", "(ping)"),
     (orjson.dumps(PING | {"lat": "40.7"}), "lat")],
)  # fmt: skip
def test_wrong_types_and_broken_json(raw: bytes, field: str) -> None:
    ok, bad = normalise_message(raw, Limits(NOW))
    assert ok == [] and bad[0].errors[0].field == field


def test_array_keeps_good_and_reports_bad_by_index() -> None:
    raw = orjson.dumps([PING, PING | {"lon": 999}, PING | {"ts": NOW + 1000}])
    ok, bad = normalise_message(raw, Limits(NOW))
    assert [a.key for a in ok] == [b"car-1", b"car-1"]
    assert [(b.index, b.reason) for b in bad] == [(1, "lon")]
    assert orjson.loads(ok[0].value)["ts"] == "2026-05-14T18:00:00.000Z"


def test_osmand_units_and_times() -> None:
    ok, bad = from_osmand(
        {"id": "car-2", "lat": "40.7", "lon": "-74", "timestamp": str(NOW // 1000),
         "speed": "10", "bearing": "45", "accuracy": "5", "altitude": "12"},
        Limits(NOW),
    )  # fmt: skip
    assert bad == [] and ok[0].ping.ts == NOW
    assert ok[0].ping.speed_mps == pytest.approx(5.14444)
    ok, bad = from_osmand({"id": "car-2", "lat": "x", "lon": "-74"}, Limits(NOW))
    assert ok == [] and bad[0].errors[0].field == "lat"


def test_a_huge_array_of_bad_pings_is_one_bounded_letter() -> None:
    raw = orjson.dumps([{}] * 300_000)
    ok, bad = normalise_message(raw, Limits(NOW, max_message_bytes=10_000_000))
    assert ok == [] and len(bad) == 300_000
    letter = orjson.loads(dead_letter(raw, bad, {"topic": "t", "partition": 0, "offset": 1}))
    assert letter["rejected_count"] == 300_000 and len(letter["rejected"]) == 1000
    assert len(orjson.dumps(letter)) < 2_000_000


def test_a_rule_that_raises_costs_one_dead_letter_not_the_consumer() -> None:
    from services.ingest.service import _guarded

    def broken(raw: bytes, limits: Limits) -> tuple[list[Accepted], list[Rejected]]:
        raise RuntimeError("a bug in the rules")

    ok, bad = _guarded(broken, b"{}", Limits(0))
    assert ok == [] and len(bad) == 1
    assert bad[0].errors[0].field == "(message)" and "RuntimeError" in bad[0].errors[0].reason
