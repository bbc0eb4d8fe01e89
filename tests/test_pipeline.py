"""The whole pipeline on a real broker and PostgreSQL equals `dosewatch replay` of the same pings:
raw pings -> ingest -> geofence -> dosage -> visits, zone periods and the audit log."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer

from dosewatch.cli import main as cli
from schemas.timefmt import format_ts
from services.common.kafka import BatchProducer
from services.dosage.service import DosageService, DosageSettings
from services.geofence.service import GeofenceService, GeofenceSettings
from services.ingest.service import IngestService, IngestSettings
from tests.pipeline_helpers import SAMPLE, flush_fixes, ping_bytes, prepare_database, sample_fixes

TZ = {"tz": "America/New_York", "shifts": "07:00,15:00,23:00"}


def ts(value: datetime) -> str:
    return format_ts(round(value.timestamp() * 1000))


async def wait_for(pool: asyncpg.Pool, sql: str, want: int, timeout_s: float = 90) -> None:
    async with asyncio.timeout(timeout_s):
        while await pool.fetchval(sql) < want:
            await asyncio.sleep(0.2)


def test_pipeline_equals_replay(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    common: dict[str, Any] = {"kafka_bootstrap": kafka_bootstrap, "database_url": database_url,
                              "topic_prefix": topic_prefix, **TZ}  # fmt: skip
    raw_lines = (SAMPLE / "pings.jsonl").read_bytes().splitlines()
    fixes = sample_fixes()
    flush = flush_fixes(max(f.ts for f in fixes), 4)
    pings = tmp_path / "pings.jsonl"
    pings.write_bytes(b"\n".join(raw_lines + [ping_bytes(f) for f in flush]) + b"\n")
    out = tmp_path / "replay"
    assert cli(["replay", "--zones", str(SAMPLE / "zones.geojson"), "--pings", str(pings),
                "--out", str(out), "--tz", TZ["tz"], "--shifts", TZ["shifts"]]) == 0  # fmt: skip
    visits = [json.loads(x) for x in (out / "visits.jsonl").read_text().splitlines()]
    periods = [json.loads(x) for x in (out / "zone_periods.jsonl").read_text().splitlines()]
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    visit_event_ids = {e["id"] for e in events if e["type"].startswith("dosewatch.visit.")}

    async def scenario() -> tuple[list[Any], list[Any], set[str]]:
        await prepare_database(database_url)
        ingest = IngestService(IngestSettings(**common))
        services: list[IngestService | GeofenceService | DosageService] = [
            ingest,
            GeofenceService(GeofenceSettings(**common, wall_clock=False)),
            DosageService(DosageSettings(**common, wall_clock=False)),
        ]
        for s in services:
            await s.start()
        tasks = [asyncio.create_task(s.run()) for s in services]
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
        await producer.start()
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        try:
            # Raw input as gateways send it: unkeyed, so units spread over partitions, but a
            # unit's pings stay in order only if they share one; key by unit, like a gateway.
            lines = pings.read_bytes().splitlines()
            await BatchProducer(producer).send(
                ingest.settings.topic_raw,
                ((json.loads(x)["unit_id"].encode(), x) for x in lines),
            )
            await wait_for(pool, "SELECT count(*) FROM visits", len(visits))
            await wait_for(pool, "SELECT count(*) FROM zone_periods", len(periods))
            await asyncio.sleep(1.0)  # anything extra would show up now
            got_visits = await pool.fetch("SELECT * FROM visits")
            got_periods = await pool.fetch("SELECT * FROM zone_periods")
            audit = {r["event_id"] for r in await pool.fetch("SELECT event_id FROM audit_log")}
        finally:
            await pool.close()
            await producer.stop()
            for t in tasks:
                t.cancel()
            for s in services:
                await s.stop()
        return list(got_visits), list(got_periods), audit

    got_visits, got_periods, audit = asyncio.run(scenario())
    rows = sorted(
        (
            {"unit_id": r["unit_id"], "zone_id": r["zone_id"], "started_at": ts(r["started_at"]),
             "ended_at": ts(r["ended_at"]), "duration_s": r["duration_s"],
             "end_reason": r["end_reason"], "qualified": r["qualified"],
             "target_met": r["target_met"], "overstay": r["overstay"]}
            for r in got_visits
        ),
        key=lambda r: (r["started_at"], r["unit_id"], r["zone_id"]),
    )  # fmt: skip
    assert rows == visits
    prow = sorted(
        (
            {"zone_id": r["zone_id"], "period_start": ts(r["period_start"]),
             "period_end": ts(r["period_end"]), "presence_s": r["presence_s"],
             "officer_s": r["officer_s"], "visits": r["visits"], "dosed_visits": r["dosed_visits"]}
            for r in got_periods
        ),
        key=lambda r: (r["zone_id"], r["period_start"]),
    )  # fmt: skip
    assert prow == periods
    assert visit_event_ids <= audit
