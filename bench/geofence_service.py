"""The geofence service alone, Kafka to Kafka: pings/s per core of its own CPU.

    .venv/bin/python bench/geofence_service.py [--zones 10000] [--units 10000] [--pings 500000]

Normalised pings (as ingest writes them) of patrolling units are loaded into the pings topic
first; then the service starts as its own process (as deployed) and drains them, producing
visit events and saving its state and offsets to PostgreSQL as it does live. Its CPU is
counted from ready to the last ping taken, so the figure includes fetching, decoding,
geofencing, the visit rules, producing and the state saves: everything the service does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
from aiokafka import AIOKafkaProducer, ConsumerRecord

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._city import patrol, save, table, zone_specs
from bench._proc import cpu_seconds
from bench._stack import embedded_stack, wait_ready
from bench.pipeline import BrokerCpu
from dosewatch.demo import make_zones
from schemas.timefmt import format_ts
from services.common import db, kafka
from services.common.embedded import EmbeddedKafka, free_port
from services.common.settings import CommonSettings
from services.common.zonestore import import_zones
from services.dosage.core.params import DosageParams
from services.geofence.core.index import ZoneIndex
from services.geofence.service import GeofenceService, GeofenceSettings


def normalised(unit_ids: list[str], ts: Any, lon: Any, lat: Any) -> list[tuple[bytes, bytes]]:
    """The records ingest would write: keyed by unit, fields in the model's order."""
    return [
        (u.encode(), orjson.dumps({"unit_id": u, "ts": format_ts(t), "lat": y, "lon": x}))
        for u, t, x, y in zip(unit_ids, ts.tolist(), lon.tolist(), lat.tolist(), strict=True)
    ]


def offline(
    index: ZoneIndex, params: DosageParams, unit_ids: list[str], ts: Any, lon: Any, lat: Any
) -> tuple[GeofenceService, list[ConsumerRecord]]:
    """The service owning partition 0 without Kafka or a database, and a patrol as the records
    it would fetch (`normalised`): for measuring its own work on a fetch (`drain`)."""
    service = GeofenceService(GeofenceSettings(dosage=params))
    service.index = index
    service.restore_partition(0, {})
    service.partitions[0] = (None, 0.0)  # as `assign` leaves it, without the database
    records = [
        ConsumerRecord("avl.pings", 0, k, 0, 0, key, value, None, len(key), len(value), ())
        for k, (key, value) in enumerate(normalised(unit_ids, ts, lon, lat))
    ]
    return service, records


def drain(
    service: GeofenceService,
    records: list[ConsumerRecord],
    batch: int,
    save_state: Callable[[], object] | None = None,
) -> int:
    """The records, `batch` a fetch, through the service's own work short of its I/O:
    `process` (which hands back the events as the producer takes them) and the state save
    encoded (`state_changes`). The visit events made."""
    save_state = save_state or service.state_changes
    events = 0
    for start in range(0, len(records), batch):
        outputs, _newest = service.process(0, records[start : start + batch])
        save_state()
        events += len(outputs)
    return events


async def _metric(client: httpx.AsyncClient, port: int, name: str) -> float:
    text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and 'service="geofence"' in line
    )


async def run(
    zones: int, units: int, pings: int, broker: EmbeddedKafka, url: str, prefix: str,
    state: Path, partitions: int, profile: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    features = make_zones(1, zones, box_km=30.0)  # zone_specs(zones) draws the same ones
    conn = await asyncpg.connect(url)
    try:
        await db.migrate(conn)
        await conn.execute("DELETE FROM zones")
        await import_zones(conn, {"type": "FeatureCollection", "features": features})
    finally:
        await conn.close()
    unit_ids, ts, lon, lat = patrol(zone_specs(zones), units, max(1, pings // units))
    records = normalised(unit_ids, ts, lon, lat)
    settings = CommonSettings(kafka_bootstrap=broker.bootstrap, topic_prefix=prefix,
                              partitions=partitions)  # fmt: skip
    await kafka.ensure_topics(settings, {settings.topic_pings: {}, settings.topic_visits: {}})
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5)
    await producer.start()
    try:
        out = kafka.BatchProducer(producer)
        for start in range(0, len(records), 20_000):
            await out.send(settings.topic_pings, records[start : start + 20_000])
    finally:
        await producer.stop()

    port = free_port()
    env = dict(os.environ) | {
        "DOSEWATCH_KAFKA_BOOTSTRAP": broker.bootstrap,
        "DOSEWATCH_DATABASE_URL": url,
        "DOSEWATCH_TOPIC_PREFIX": prefix,
        "DOSEWATCH_PARTITIONS": str(partitions),
        "DOSEWATCH_HTTP_PORT": str(port),
        "DOSEWATCH_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "dosewatch.cli", "geofence"], env=env,
        stdout=(state / "geofence.log").open("ab"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient() as client:
            await wait_ready(client, port, proc)
            spy = None
            if profile is not None:  # py-spy (not a dependency): collapsed stacks for a flamegraph
                spy = subprocess.Popen(["py-spy", "record", "-p", str(proc.pid), "-r", "200",
                                        "-f", "raw", "-o", str(profile)],
                                       stdout=subprocess.DEVNULL)  # fmt: skip
            broker_cpu = BrokerCpu(broker)
            cpu0, broker0, t0 = cpu_seconds(proc.pid), broker_cpu(), time.monotonic()
            taken = 0.0
            while taken < len(records):
                await asyncio.sleep(0.25)  # each look costs the service a /metrics render
                taken = await _metric(client, port, "dosewatch_pings_in_total")
                if time.monotonic() - t0 > 600:
                    raise RuntimeError(f"only {taken:.0f} of {len(records)} pings in 600 s")
            cpu, wall = cpu_seconds(proc.pid) - cpu0, time.monotonic() - t0
            cpu_b = broker_cpu() - broker0
            events = await _metric(client, port, "dosewatch_events_out_total")
            if spy is not None:
                spy.send_signal(2)
                spy.wait(30)
    finally:
        proc.terminate()
        proc.wait(15)
    n = len(records)
    return {
        "zones": zones,
        "units": units,
        "pings": n,
        "visit_events": int(events),
        "cpu_s": cpu,
        "wall_s": wall,
        "pings_per_core_s": n / cpu,
        "pings_per_wall_s": n / wall,
        "broker_cpu_ms_per_1000": cpu_b / n * 1000,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--zones", default="10000", help="comma-separated counts")
    parser.add_argument("--units", type=int, default=10_000)
    parser.add_argument("--pings", type=int, default=500_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--py-spy", type=Path, help="write the service's stacks here")
    args = parser.parse_args()
    rows = await measure([int(z) for z in args.zones.split(",")], args.units, args.pings,
                         args.partitions, args.py_spy)  # fmt: skip
    print(table(rows, [(k, k) for k in rows[0]]))
    print(f"results: {save('geofence_service', rows)}")


async def measure(
    zone_counts: list[int], units: int, pings: int, partitions: int = 4,
    profile: Path | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """One row per zone count, each on fresh topics (see docs/performance.md on the broker)."""
    async with embedded_stack() as st:
        return [
            await run(zones, units, pings, st.broker, st.url, f"gs{i}.", st.state, partitions,
                      profile)
            for i, zones in enumerate(zone_counts)
        ]  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
