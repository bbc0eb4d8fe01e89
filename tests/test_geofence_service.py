"""The geofence service on a real broker and PostgreSQL matches replay, visit for visit."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import REGISTRY

from schemas.timefmt import format_ts
from services.dosage.core.tracker import Fix
from services.geofence.service import GeofenceService, GeofenceSettings
from tests.pipeline_helpers import (
    collect,
    flush_fixes,
    ping_bytes,
    prepare_database,
    replay_expected,
    sample_fixes,
    send_fixes,
    send_records,
)


def key(row: dict[str, Any]) -> tuple[str, str, str]:
    return (row["started_at"], row["unit_id"], row["zone_id"])


def other_forms(fix: Fix, i: int) -> list[bytes]:
    """The ping in a form other than ingest's canonical one, now and then with a record that
    is no ping at all (which the service skips, logged) in front of it."""
    doc: dict[str, Any] = orjson.loads(ping_bytes(fix))
    if i % 3 == 1:
        doc["ts"] = fix.ts  # epoch milliseconds
    elif i % 3 == 2:
        doc["ts"] = format_ts(fix.ts).replace("Z", "+00:00")
    if i % 7 == 3:
        doc["altitude_m"] = 12.5  # a field a newer ingest might add: the fast reader refuses it
    body = orjson.dumps(dict(reversed(doc.items()))).replace(b",", b", ")
    junk = [b"not json", b'{"unit_id": "%s"}' % fix.unit_id.encode()] if i % 101 == 0 else []
    return [*junk, body]


def test_geofence_matches_replay(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    run_against_replay(kafka_bootstrap, database_url, topic_prefix, tmp_path, canonical=True)


def test_records_in_other_forms_and_junk_records_change_nothing(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    """The fast columnar reader takes ingest's canonical form; anything else is read the slow
    way in its place in the order, and records that are no ping are skipped."""
    run_against_replay(kafka_bootstrap, database_url, topic_prefix, tmp_path, canonical=False)


def run_against_replay(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, tmp_path: Path, canonical: bool
) -> None:
    settings = GeofenceSettings(kafka_bootstrap=kafka_bootstrap, database_url=database_url,
                                topic_prefix=topic_prefix, wall_clock=False)  # fmt: skip
    expected = replay_expected(tmp_path).visits  # the sample plus one flush ping per partition
    assert all(r["end_reason"] != "end_of_input" for r in expected)
    fixes = sample_fixes()
    fixes += flush_fixes(max(f.ts for f in fixes), settings.partitions)

    def saves() -> float:
        count = {"service": "geofence"}
        return REGISTRY.get_sample_value("dosewatch_state_save_seconds_count", count) or 0.0

    saved_before = saves()

    async def scenario() -> list[dict[str, Any]]:
        await prepare_database(database_url)
        service = GeofenceService(settings)
        await service.start()
        task = asyncio.create_task(service.run())
        try:
            if canonical:
                await send_fixes(kafka_bootstrap, settings.topic_pings, fixes)
            else:
                records = [(f.unit_id.encode(), body) for i, f in enumerate(fixes)
                           for body in other_forms(f, i)]  # fmt: skip
                await send_records(kafka_bootstrap, settings.topic_pings, records)
            events = await collect(
                kafka_bootstrap, settings.topic_visits,
                lambda v: sum(e["type"] == "dosewatch.visit.ended" for e in v) >= len(expected),
            )  # fmt: skip
        finally:
            task.cancel()
            await service.stop()
        return [e["data"] for e in events if e["type"] == "dosewatch.visit.ended"]

    assert sorted(asyncio.run(scenario()), key=key) == expected
    assert saves() > saved_before  # each save's time is in /metrics
    waited = REGISTRY.get_sample_value("dosewatch_state_save_wait_seconds_total",
                                       {"service": "geofence"})  # fmt: skip
    assert waited is not None and waited >= 0.0
