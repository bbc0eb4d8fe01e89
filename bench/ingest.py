"""Ingest's per-ping CPU: the slow path (orjson + the pydantic `Ping` model, per message) against
the fast path (`FastNormaliser.batch`: msgspec, per batch), on the same seeded messages.

    .venv/bin/python bench/ingest.py [--pings N] [--batch 20,200,1000] [--bad 0.01] [--repeats N]
    .venv/bin/python bench/ingest.py --kafka [--rates 5000,10000] [--seconds 10] [--baseline REV]

By default pure CPU, no Kafka: the messages are what a gateway writes to the raw topic (one
ping each, 1% bad by default, of several kinds), normalised in batches as the service gets
them from a fetch. Both paths run in turn, `--repeats` times each; the table gives each one's
best, median and worst. "core" is the normalising alone; "core + metrics" adds the Prometheus
calls the service made around it (before: two counters per message and a latency sample per
ping; now: the counters and one latency sample per batch). The outputs of both paths are checked
to be byte-identical first.

With --kafka it measures the ingest service as deployed instead: its own process on the
embedded broker, fed the same kind of messages at each rate (keyed by unit, fresh topics per
run), and reports that process's CPU per 1,000 pings from the first message to the last output.
--baseline REV runs the service as it was at git revision REV too (its service.py from git,
on today's core and common code), alternating with the current one; every output of both is
checked against the slow path's bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client import CollectorRegistry, Counter, Histogram

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._city import save, table
from bench._proc import cpu_seconds
from bench._stack import wait_ready
from schemas.timefmt import format_ts, parse_ts
from services.common.embedded import EmbeddedKafka, free_port
from services.common.kafka import BatchProducer
from services.common.metrics import LATENCY_BUCKETS
from services.ingest.core.fast import FastNormaliser, Normalised, normalise_each
from services.ingest.core.normalise import Limits, normalise_message

ROOT = Path(__file__).resolve().parents[1]
NOW = 1_778_781_600_000
PLACEHOLDER = b"2000-01-01T00:00:00.000Z"


def messages(
    count: int, bad_share: float, seed: int = 1, now: int = NOW, stamp: bool = False
) -> list[bytes]:
    """Raw messages as gateways send them: canonical times a few seconds old, seven decimals
    of position, accuracy always, speed and heading often; `bad_share` of them refused.
    With `stamp`, the times are PLACEHOLDER, for the sender to stamp."""
    rng = random.Random(seed)
    out: list[bytes] = []
    units = [f"car-{k:04d}" for k in range(2000)]
    bad_kinds: list[Callable[[dict[str, Any]], dict[str, Any]]] = [
        lambda p: p | {"lat": 91.5},
        lambda p: p | {"ts": "2026-05-14 18:00:00"},
        lambda p: p | {"unit_id": "car 12"},
        lambda p: p | {"altitude": 12.0},
        lambda p: p | {"ts": format_ts(now + 3_600_000)},
        lambda p: {k: v for k, v in p.items() if k != "lon"},
    ]
    for _ in range(count):
        p: dict[str, Any] = {
            "unit_id": rng.choice(units),
            "ts": PLACEHOLDER.decode() if stamp else format_ts(now - 5000 + rng.randrange(1000)),
            "lat": round(40.7 + rng.uniform(-0.2, 0.2), 7),
            "lon": round(-74.0 + rng.uniform(-0.2, 0.2), 7),
            "accuracy_m": round(rng.uniform(3, 30), 1),
        }
        if rng.random() < 0.6:
            p["speed_mps"] = round(rng.uniform(0, 25), 2)
            p["heading_deg"] = round(rng.uniform(0, 359.9), 1)
        if rng.random() < 0.2:
            p["source"] = "avl-gw-1"
        if rng.random() < bad_share:
            if rng.random() < 1 / 7:
                out.append(orjson.dumps(p)[:-9])  # cut short: not JSON
                continue
            p = rng.choice(bad_kinds)(p)
        out.append(orjson.dumps(p))
    return out


def slow_path(batch: list[bytes], limits: Limits) -> Normalised:
    """The service's loop before: each message through `normalise_message`."""
    return normalise_each(batch, limits)


class Metrics:
    """The service's Prometheus calls, in a registry of their own."""

    def __init__(self) -> None:
        registry = CollectorRegistry()
        self.pings_in = Counter("pings_in", "", ["service", "source"], registry=registry)
        self.rejected = Counter("rejected", "", ["service", "reason"], registry=registry)
        self.latency = Histogram("latency", "", ["service"], registry=registry,
                                 buckets=LATENCY_BUCKETS)  # fmt: skip

    def before(self, batch: list[bytes], limits: Limits) -> None:
        """Per message: counters; per accepted ping: a latency sample."""
        now = time.time()
        for raw in batch:
            ok, bad = normalise_message(raw, limits)
            self.pings_in.labels("ingest", "kafka").inc(len(ok) + len(bad))
            for r in bad:
                self.rejected.labels("ingest", r.reason).inc()
            for a in ok:
                self.latency.labels("ingest").observe(max(0.0, now - a.ping.ts / 1000))

    def after(self, fast: FastNormaliser, batch: list[bytes], limits: Limits) -> None:
        """Per batch: the counters and one latency sample."""
        done = fast.batch(batch, limits)
        self.pings_in.labels("ingest", "kafka").inc(done.pings)
        for _, bad in done.rejected:
            for r in bad:
                self.rejected.labels("ingest", r.reason).inc()
        if done.newest_ms is not None:
            self.latency.labels("ingest").observe(max(0.0, time.time() - done.newest_ms / 1000))


def cpu_per_ping(run: Callable[[list[bytes]], object], batches: list[list[bytes]]) -> float:
    pings = sum(len(b) for b in batches)
    t0 = time.process_time()
    for batch in batches:
        run(batch)
    return (time.process_time() - t0) / pings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pings", type=int, default=100_000)
    parser.add_argument("--batch", default="20,200,1000", help="messages per fetch (sizes)")
    parser.add_argument("--bad", type=float, default=0.01, help="share of refused pings")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kafka", action="store_true", help="the service on a broker")
    parser.add_argument("--rates", default="5000,10000", help="with --kafka: pings/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="with --kafka: per run")
    parser.add_argument("--baseline", help="with --kafka: also run the service of this git rev")
    args = parser.parse_args()
    if args.kafka:
        asyncio.run(kafka_main(args))
        return
    raws = messages(args.pings, args.bad)
    limits = Limits(NOW)
    fast = FastNormaliser()
    metrics = Metrics()
    variants: dict[tuple[str, str], Callable[[list[bytes]], object]] = {
        ("core", "before: slow path"): lambda b: slow_path(b, limits),
        ("core", "now: fast path"): lambda b: fast.batch(b, limits),
        ("core + metrics", "before: slow path"): lambda b: metrics.before(b, limits),
        ("core + metrics", "now: fast path"): lambda b: metrics.after(fast, b, limits),
    }
    rows = []
    for size in [int(b) for b in args.batch.split(",")]:
        batches = [raws[k : k + size] for k in range(0, len(raws), size)]
        # Same bytes out, same errors, before any timing.
        for batch in batches:
            assert fast.batch(batch, limits) == slow_path(batch, limits)
        refused = sum(len(bad) for b in batches for _, bad in slow_path(b, limits).rejected)
        times: dict[tuple[str, str], list[float]] = {name: [] for name in variants}
        for run in variants.values():
            cpu_per_ping(run, batches[: 4000 // size + 1])  # warm up: caches, allocator
        for _ in range(args.repeats):
            for name, run in variants.items():  # in turn, so that noise hits all alike
                times[name].append(cpu_per_ping(run, batches))
        for (what, path), t in times.items():
            base = times[what, "before: slow path"]
            rows.append(
                {
                    "measured": what,
                    "batch": size,
                    "path": path,
                    "pings": len(raws),
                    "refused": refused,
                    "us_best": min(t) * 1e6,
                    "us_median": statistics.median(t) * 1e6,
                    "us_worst": max(t) * 1e6,
                    "pings_per_s_core": 1 / statistics.median(t),
                    "speedup": statistics.median(base) / statistics.median(t),
                    "us_all": [x * 1e6 for x in t],
                }
            )
    print(
        table(
            rows,
            [
                ("measured", "measured"),
                ("batch", "batch"),
                ("path", "path"),
                ("us_best", "µs/ping best"),
                ("us_median", "median"),
                ("us_worst", "worst"),
                ("pings_per_s_core", "pings/s per core"),
                ("speedup", "× before"),
            ],
        )
    )
    print(f"{len(raws):,} messages, {rows[0]['refused']:,} pings refused")
    print(f"results: {save('ingest', rows)}")


# -- the service on the embedded broker ---------------------------------------------------


def service_command(rev: str | None, tmp: Path) -> list[str]:
    """The ingest service as of `rev` (its service.py from git), or as it is now."""
    module = "services.ingest.service"
    if rev is not None:
        old = subprocess.run(["git", "show", f"{rev}:services/ingest/service.py"], cwd=ROOT,
                             capture_output=True, check=True).stdout  # fmt: skip
        (tmp / "ingest_at_rev.py").write_bytes(old)
        module = "ingest_at_rev"
    code = (
        f"import asyncio, sys; sys.path[:0] = [{str(ROOT)!r}, {str(tmp)!r}]\n"
        "from services.common import logs; logs.configure('ingest')\n"
        f"from {module} import main; asyncio.run(main())\n"
    )
    return [sys.executable, "-c", code]


async def run_service(
    command: list[str], bootstrap: str, prefix: str, rate: int, seconds: float,
    raws: list[bytes], keys: list[bytes], log: Path,
) -> dict[str, Any]:  # fmt: skip
    port = free_port()
    env = dict(os.environ) | {
        "DOSEWATCH_KAFKA_BOOTSTRAP": bootstrap,
        "DOSEWATCH_TOPIC_PREFIX": prefix,
        "DOSEWATCH_HTTP_PORT": str(port),
        "DOSEWATCH_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen(command, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    consumer = AIOKafkaConsumer(prefix + "avl.pings", prefix + "avl.pings.dlq",
                                bootstrap_servers=bootstrap, fetch_max_wait_ms=100,
                                auto_offset_reset="earliest")  # fmt: skip
    got = collections.Counter[tuple[bytes | None, bytes]]()
    latency_ms: list[int] = []

    async def watch() -> None:
        while True:
            for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                if tp.topic.endswith(".dlq"):
                    got[None, b"dlq"] += len(records)
                    continue
                for r in records:
                    got[r.key, r.value] += 1
                    # the ping was stamped as it was sent; ingest's producer stamps its output
                    latency_ms.append(r.timestamp - parse_ts(orjson.loads(r.value)["ts"]))

    try:
        async with httpx.AsyncClient() as client:
            try:
                await wait_ready(client, port, proc)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}; see {log}") from None
        await producer.start()
        await consumer.start()
        watcher = asyncio.create_task(watch())
        out = BatchProducer(producer)
        total = int(rate * seconds)
        sent: list[bytes] = []
        cpu0 = cpu_seconds(proc.pid)
        t0 = time.monotonic()
        while len(sent) < total:  # 10 ms steps, catching up with the schedule
            n = min(total, int(rate * (time.monotonic() - t0 + 0.01))) - len(sent)
            if n > 0:
                stamp = format_ts(int(time.time() * 1000)).encode()
                batch = [(keys[k % len(keys)], raws[k % len(raws)].replace(PLACEHOLDER, stamp))
                         for k in range(len(sent), len(sent) + n)]  # fmt: skip
                await out.send(prefix + "avl.pings.raw", batch)
                sent += [v for _, v in batch]
            await asyncio.sleep(max(0.0, t0 + len(sent) / rate - time.monotonic()))
        sending = time.monotonic() - t0
        expected = collections.Counter[tuple[bytes | None, bytes]]()
        limits = Limits(int(time.time() * 1000))  # sent pings are past; the future ones, 1 h on
        for raw in sent:
            ok, bad = normalise_message(raw, limits)
            expected.update((a.key, a.value) for a in ok)
            expected[None, b"dlq"] += bool(bad)
        deadline = time.monotonic() + 60
        while sum(got.values()) < sum(expected.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cpu = cpu_seconds(proc.pid) - cpu0
        watcher.cancel()
        assert got == expected, "the service's outputs differ from the slow path's"
        lat = sorted(latency_ms)
        return {"rate": rate, "pings": total, "sent_per_s": total / sending,
                "cpu_ms_per_1000": cpu / total * 1e6,
                "p50_ms": lat[len(lat) // 2], "p99_ms": lat[len(lat) * 99 // 100]}  # fmt: skip
    finally:
        await consumer.stop()
        await producer.stop()
        proc.terminate()
        proc.wait(15)


async def kafka_main(args: argparse.Namespace) -> None:
    rng = random.Random(5)
    raws = messages(50_000, args.bad, seed=5, now=int(time.time() * 1000), stamp=True)
    keys = []
    for raw in raws:
        try:
            keys.append(str(orjson.loads(raw).get("unit_id", "")).encode())
        except (orjson.JSONDecodeError, AttributeError):
            keys.append(str(rng.randrange(100)).encode())
    tmp = Path(tempfile.mkdtemp(prefix="dosewatch-bench-ingest-"))
    broker = EmbeddedKafka(free_port())
    await broker.start()
    variants = {"now": service_command(None, tmp)}
    if args.baseline:
        variants = {f"before ({args.baseline})": service_command(args.baseline, tmp)} | variants
    rows: list[dict[str, Any]] = []
    try:
        run = 0
        for rate in [int(r) for r in args.rates.split(",")]:
            for repeat in range(args.repeats):
                for name, command in variants.items():
                    run += 1  # fresh topics: the embedded broker slows as a topic grows
                    row = {"service": name, "repeat": repeat}
                    row |= await run_service(command, broker.bootstrap, f"bi{run}.", rate,
                                             args.seconds, raws, keys,
                                             tmp / "ingest.log")  # fmt: skip
                    print(table([row], [(k, k) for k in row]), flush=True)  # fmt: skip
                    rows.append(row)
    finally:
        await broker.stop()
    summary = []
    for rate in sorted({r["rate"] for r in rows}):
        for name in variants:
            mine = [r for r in rows if r["rate"] == rate and r["service"] == name]
            cpu = [r["cpu_ms_per_1000"] for r in mine]
            summary.append({"service": name, "rate": rate, "runs": len(cpu),
                            "cpu_best": min(cpu), "cpu_median": statistics.median(cpu),
                            "cpu_worst": max(cpu),
                            "p50_ms": statistics.median(r["p50_ms"] for r in mine),
                            "p99_ms": statistics.median(r["p99_ms"] for r in mine)})  # fmt: skip
    print()
    print(table(summary, [("service", "service"), ("rate", "pings/s"), ("runs", "runs"),
                          ("cpu_best", "CPU ms/1,000 pings best"), ("cpu_median", "median"),
                          ("cpu_worst", "worst"), ("p50_ms", "p50 ms"),
                          ("p99_ms", "p99 ms")]))  # fmt: skip
    print(f"results: {save('ingest_kafka', summary + rows)}")


if __name__ == "__main__":
    main()
