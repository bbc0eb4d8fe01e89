"""The running services on the embedded broker and PostgreSQL, at increasing ping rates.

    .venv/bin/python bench/pipeline.py [--rates 1000,5000,20000,0] [--seconds 10]

Each service runs as its own process (as deployed). For every rate it prints throughput,
CPU seconds per 1,000 pings for each service, and the p50/p99/p999 latency from a ping being
produced to the zone status it caused being produced (rate 0 means as fast as possible).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._city import save, table
from dosewatch.demo import make_zones
from schemas.timefmt import format_ts, parse_ts
from services.common import db
from services.common.embedded import EmbeddedKafka, EmbeddedPostgres, free_port
from services.common.kafka import BatchProducer
from services.common.zonestore import import_zones

SERVICES = ("ingest", "geofence", "dosage")
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def run_rate(
    rate: int, seconds: float, bootstrap: str, prefix: str, features: list[dict[str, Any]],
    procs: dict[str, subprocess.Popen[bytes]], units: int, ports: dict[str, int],
) -> dict[str, Any]:  # fmt: skip
    rng = np.random.default_rng(rate + 1)
    # Units hop between zone centres and the streets around them, so visits open all the time.
    rings = [f["geometry"]["coordinates"][0][:-1] for f in features]
    centres = [
        (sum(p[0] for p in ring) / len(ring), sum(p[1] for p in ring) / len(ring)) for ring in rings
    ]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    out = BatchProducer(producer)
    consumer = AIOKafkaConsumer(prefix + "dosage.zone-status", bootstrap_servers=bootstrap,
                                fetch_max_wait_ms=5, auto_offset_reset="latest")  # fmt: skip
    await consumer.start()
    await consumer.getmany(timeout_ms=500)
    latencies: list[float] = []
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            for records in (await consumer.getmany(timeout_ms=100)).values():
                for r in records:
                    status = orjson.loads(r.value)
                    if status["status"] == "active" and status["elapsed_s"] == 0:
                        # caused by the ping whose ts is as_of; r.timestamp is when dosage sent it
                        latencies.append(r.timestamp - parse_ts(status["as_of"]))

    watcher = asyncio.create_task(watch())
    before = {n: await _histogram(ports[n]) for n in SERVICES}
    cpu0 = {n: cpu_seconds(p.pid) for n, p in procs.items()}
    sent = 0
    t0 = time.monotonic()
    step = 0.01
    # Pre-drawn positions: the sender must not be what limits the rate.
    # Each unit works its own beat: in its hot spot or on the street beside it, reporting
    # every `units / rate` seconds (10 s by default), as MDTs do.
    units = units or max(100, rate * 10 if rate else 50_000)
    pool_n = max(100_000, units * 4)
    unit = np.tile(np.arange(units), pool_n // units + 1)[:pool_n]
    pick = unit % len(centres)
    away = rng.random(pool_n) < 0.3
    lons = np.array([centres[i][0] for i in pick]) + np.where(away, 0.01, 0.0)
    lats = np.array([centres[i][1] for i in pick]) + np.where(away, 0.01, 0.0)
    keys = [f"u{u}".encode() for u in unit.tolist()]
    heads = [b'{"unit_id":"%s","lat":%.7f,"lon":%.7f,"ts":"' % (k, la, lo)
             for k, la, lo in zip(keys, lats.tolist(), lons.tolist(), strict=True)]  # fmt: skip
    k = 0
    while time.monotonic() - t0 < seconds:
        # Catch up to the schedule: a slow ack must not lower the offered rate.
        n = max(1, int(rate * (time.monotonic() - t0 + step)) - sent) if rate else 2000
        stamp = format_ts(int(time.time() * 1000)).encode() + b'"}'
        batch = []
        for _ in range(n):
            batch.append((keys[k], heads[k] + stamp))
            k = (k + 1) % pool_n
        await out.send(prefix + "avl.pings.raw", batch)
        sent += n
        if rate:
            await asyncio.sleep(max(0.0, t0 + sent / rate - time.monotonic()))
    elapsed = time.monotonic() - t0
    await asyncio.sleep(2.0)
    stop.set()
    await watcher
    cpu = {n: cpu_seconds(p.pid) - cpu0[n] for n, p in procs.items()}
    stages = {n: await _stage_quantiles(ports[n], before[n]) for n in SERVICES}
    await consumer.stop()
    await producer.stop()
    lat = np.asarray(latencies or [float("nan")])
    row: dict[str, Any] = {
        "rate": rate or "max",
        "sent_per_s": sent / elapsed,
        "statuses": len(latencies),
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "p999_ms": float(np.percentile(lat, 99.9)),
    }
    for name in SERVICES:
        row[f"cpu_{name}"] = cpu[name] / sent * 1000
    for name in SERVICES:
        row[f"p99_{name}_ms"] = stages[name]
    return row


async def _histogram(port: int) -> dict[float, float]:
    """Cumulative bucket counts of this process's ping-to-output latency histogram."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    out: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith("dosewatch_event_latency_seconds_bucket"):
            le = line.split('le="')[1].split('"')[0]
            out[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return out


async def _stage_quantiles(port: int, before: dict[float, float]) -> float:
    """p99 of one stage over the run (from histogram deltas; a bucket's upper bound), ms."""
    after = await _histogram(port)
    deltas = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = deltas[-1][1] if deltas else 0.0
    for le, count in deltas:
        if total and count >= 0.99 * total:
            return le * 1000
    return float("nan")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rates", default="1000,5000,20000")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--zones", type=int, default=1000)
    parser.add_argument("--units", type=int, default=0, help="default: rate x 10 s")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="dosewatch-bench-"))
    state.chmod(0o755)
    broker = EmbeddedKafka(free_port())
    await broker.start()
    pg = EmbeddedPostgres(state / "pgdata", free_port())
    await pg.start()
    url = pg.url.rsplit("/", 1)[0] + "/bench"
    await db.ensure_database(url)
    import asyncpg

    features = make_zones(3, args.zones, box_km=30.0)
    conn = await asyncpg.connect(url)
    await db.migrate(conn)
    await import_zones(conn, {"type": "FeatureCollection", "features": features})
    await conn.close()
    env = dict(os.environ) | {
        "DOSEWATCH_KAFKA_BOOTSTRAP": broker.bootstrap,
        "DOSEWATCH_DATABASE_URL": url,
        "DOSEWATCH_LOG_LEVEL": "WARNING",
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    ports: dict[str, int] = {}
    try:
        for name in SERVICES:
            ports[name] = free_port()
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "dosewatch.cli", name],
                env=env | {"DOSEWATCH_HTTP_PORT": str(ports[name])},
                stdout=(state / f"{name}.log").open("wb"), stderr=subprocess.STDOUT,
            )  # fmt: skip
        async with httpx.AsyncClient() as client:
            for name in SERVICES:
                while True:
                    try:
                        r = await client.get(f"http://127.0.0.1:{ports[name]}/readyz")
                        if r.status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.2)
        rows = []
        for rate in (int(r) for r in args.rates.split(",")):
            rows.append(await run_rate(rate, args.seconds, broker.bootstrap, "", features, procs,
                                       args.units, ports))  # fmt: skip
            print(table(rows[-1:], [(k, k) for k in rows[-1]]), flush=True)
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(15)
        await pg.stop()
        await broker.stop()
    print()
    print(table(rows, [(k, k) for k in rows[0]]))
    print(f"results: {save('pipeline', rows)}")


if __name__ == "__main__":
    asyncio.run(main())
