"""Shared helpers for the streaming integration tests."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer

from dosewatch.replay import decode_lines
from services.common import db
from services.common.kafka import partition_for
from services.common.zonestore import import_zones
from services.dosage.core.tracker import Fix

SAMPLE = Path(__file__).parent / "data" / "evening-shift"


def sample_fixes() -> list[Fix]:
    lines = enumerate((SAMPLE / "pings.jsonl").read_bytes().splitlines(), start=1)
    return [fix for fix, _ in decode_lines(lines) if fix is not None]


def flush_fixes(after_ms: int, partitions: int) -> list[Fix]:
    """One far-away ping per partition, an hour after the input: every partition's clock
    passes max_gap beyond every unit, so every visit closes, live as in replay."""
    out: dict[int, Fix] = {}
    n = 0
    while len(out) < partitions:
        unit = f"flush-{n}"
        p = partition_for(unit.encode(), partitions)
        out.setdefault(p, Fix(unit, after_ms + 3_600_000, -70.0, 40.0))
        n += 1
    return [out[p] for p in sorted(out)]


def ping_bytes(fix: Fix) -> bytes:
    from schemas.timefmt import format_ts

    doc: dict[str, Any] = {"unit_id": fix.unit_id, "ts": format_ts(fix.ts), "lat": fix.lat,
                           "lon": fix.lon}  # fmt: skip
    if fix.accuracy_m is not None:
        doc["accuracy_m"] = fix.accuracy_m
    return orjson.dumps(doc)


async def prepare_database(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await db.migrate(conn)
        written, errors = await import_zones(
            conn, orjson.loads((SAMPLE / "zones.geojson").read_bytes())
        )
        assert not errors and written == 12
    finally:
        await conn.close()


async def collect(bootstrap: str, topic: str, until: Any, timeout_s: float = 60) -> list[Any]:
    """Read `topic` from the start until `until(values)` is true."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest", fetch_max_wait_ms=5)  # fmt: skip
    await consumer.start()
    values: list[Any] = []
    try:
        async with asyncio.timeout(timeout_s):
            while not until(values):
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    values.extend(orjson.loads(r.value) for r in records)
    finally:
        await consumer.stop()
    return values
