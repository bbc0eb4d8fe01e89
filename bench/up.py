"""`dosewatch up`, the embedded stack behind `make run`, under a steady ping rate for a long
window: latency from a ping produced to the zone status it caused, for each 10 s, and the
broker rollovers the stack made meanwhile.

    .venv/bin/python bench/up.py [--rate 10000] [--seconds 60] [--rollover-records 20000]
                                 [--repeat 1] [--processes]

`bench/pipeline.py` runs each service as its own process, on fresh topics for each rate. This
runs the stack as `make run` does: one process (with `--processes`, the stages in processes
of their own), its embedded broker behind the proxy, rolled over to a fresh broker as its
topics grow (`--rollover-records 0`: never). It is fed from
outside through the proxy, as an AVL gateway would be, and latency is sampled on a zone's
due -> active change, as in `bench/pipeline.py` (units work beats there). The fetch wait is the
services' 5 ms (`dosewatch up` waits 50 ms unless told, which saves idle CPU at demo rates).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._city import save, table
from bench.pipeline import _slices, arrival_ms, beats, tree_cpu
from dosewatch.demo import make_zones
from schemas.timefmt import format_ts
from services.common.embedded import free_port
from services.common.kafka import BatchProducer

STATUS_TOPIC = "dosage.zone-status"
RAW_TOPIC = "avl.pings.raw"
ZONES_SEED = 7  # `dosewatch up --demo` makes its zones with this seed


async def run(args: argparse.Namespace, state: Path) -> dict[str, Any]:
    port = free_port()
    env = dict(os.environ) | {
        "DOSEWATCH_EMBEDDED_KAFKA_PORT": str(port),
        "DOSEWATCH_API_PORT": str(free_port()),
        "DOSEWATCH_FETCH_MAX_WAIT_MS": "5",
        "DOSEWATCH_EMBEDDED_KAFKA_ROLLOVER_RECORDS": str(args.rollover_records),
        "DOSEWATCH_EMBEDDED_KAFKA_ROLLOVER_CHECK_S": str(args.rollover_check_s),
        "DOSEWATCH_LOG_LEVEL": "INFO",
    }
    log_path = state / "up.log"
    # The demo's zones, and one demo unit: the load below is what is measured.
    command = [sys.executable, "-m", "dosewatch.cli", "up", "--state-dir", str(state / "up"),
               "--demo", "--units", "1", "--demo-zones", str(args.zones),
               *(["--processes"] if args.processes else [])]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=log)
        try:
            assert proc.stdout is not None
            ready = proc.stdout.readline().decode()
            if not ready.startswith("dosewatch ready"):
                raise RuntimeError(f"dosewatch up did not start: {log_path.read_text()[-2000:]}")
            return await measure(args, f"127.0.0.1:{port}", proc.pid, log_path)
        finally:
            proc.terminate()
            proc.wait(30)


async def measure(args: argparse.Namespace, bootstrap: str, pid: int, log: Path) -> dict[str, Any]:
    features = make_zones(ZONES_SEED, args.zones)
    rings = [f["geometry"]["coordinates"][0][:-1] for f in features]
    centres = [(sum(p[0] for p in r) / len(r), sum(p[1] for p in r) / len(r)) for r in rings]
    keys, heads = beats(np.random.default_rng(1), centres, args.rate, "b")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    out = BatchProducer(producer)
    consumer = AIOKafkaConsumer(STATUS_TOPIC, bootstrap_servers=bootstrap,
                                fetch_max_wait_ms=200, auto_offset_reset="earliest")  # fmt: skip
    await consumer.start()
    latencies: list[tuple[int, float]] = []
    seen: set[tuple[bytes | None, str]] = set()
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            for tp in consumer.assignment():
                # A rollover starts the topic again at 0, and the embedded broker answers a
                # fetch past its end with nothing rather than an error.
                end = consumer.highwater(tp)
                if end is not None and await consumer.position(tp) > end:
                    await consumer.seek_to_beginning(tp)
            for records in (await consumer.getmany(timeout_ms=100)).values():
                for r in records:
                    if r.value and (ms := arrival_ms(r.key, orjson.loads(r.value), r.timestamp,
                                                     seen)) is not None:  # fmt: skip
                        latencies.append((r.timestamp, ms))

    watcher = asyncio.create_task(watch())
    t0 = time.monotonic()
    start_ms = (time.time() + args.warmup) * 1000
    cpu0: float | None = None
    sent = k = 0
    while time.monotonic() - t0 < args.warmup + args.seconds:
        if cpu0 is None and time.monotonic() - t0 >= args.warmup:
            cpu0, sent0, w0 = tree_cpu(pid), sent, time.monotonic()
        n = max(1, int(args.rate * (time.monotonic() - t0 + 0.01)) - sent)
        stamp = format_ts(int(time.time() * 1000)).encode() + b'"}'
        batch = []
        for _ in range(n):
            batch.append((keys[k], heads[k] + stamp))
            k = (k + 1) % len(keys)
        await out.send(RAW_TOPIC, batch, wait=False)
        sent += n
        await asyncio.sleep(max(0.0, t0 + sent / args.rate - time.monotonic()))
    assert cpu0 is not None
    cpu = tree_cpu(pid) - cpu0
    rate = (sent - sent0) / (time.monotonic() - w0)
    await out.acked()
    await asyncio.sleep(2.0)
    stop.set()
    await watcher
    await consumer.stop()
    await producer.stop()
    window = [(ts, ms) for ts, ms in latencies if ts >= start_ms]
    lat = np.asarray([ms for _, ms in window] or [float("nan")])
    rollovers = [json.loads(line) for line in log.read_text().splitlines()
                 if '"embedded broker rolled over"' in line]  # fmt: skip
    for r in rollovers:
        print("rollover", {k: v for k, v in r.items() if k.endswith("_s")}, flush=True)
    moved = [r["dosage_s"] * 1000 for r in rollovers if "dosage_s" in r]
    return {
        "stages": "processes" if args.processes else "one process",
        "rate": args.rate,
        "sent_per_s": rate,
        "seconds": args.seconds,
        "statuses": len(window),
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "p999_ms": float(np.percentile(lat, 99.9)),
        "p99_each_10s_ms": " ".join(
            f"{np.percentile(part, 99):.0f}" for part in _slices(window, start_ms)
        ),
        "rollovers": len(rollovers),
        # From the proxy's restart to dosage on the new broker: the pipeline's hiccup.
        "moved_in_ms": " ".join(f"{ms:.0f}" for ms in moved),
        "cpu_per_1000": cpu / max(1, sent - sent0) * 1000,
        "errors": sum('"level":"error"' in line for line in log.read_text().splitlines()),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=60.0, help="measured, after warm-up")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--zones", type=int, default=5000)
    parser.add_argument("--rollover-records", type=int, default=20_000, help="0: never")
    parser.add_argument("--rollover-check-s", type=float, default=15.0)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--processes", action="store_true", help="dosewatch up --processes")
    args = parser.parse_args()
    rows = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="dosewatch-bench-up-") as tmp:
            state = Path(tmp)
            state.chmod(0o755)  # PostgreSQL runs as its own user below it
            rows.append(await run(args, state))
        print(table(rows[-1:], [(k, k) for k in rows[-1]]), flush=True)
    print(f"results: {save('up', rows)}")


if __name__ == "__main__":
    asyncio.run(main())
