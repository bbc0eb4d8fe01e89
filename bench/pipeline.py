"""The running services on the embedded broker and PostgreSQL, at increasing ping rates.

    .venv/bin/python bench/pipeline.py [--rates 1000,5000,10000,0] [--seconds 10]
                                       [--partitions 1,4] [--rollover-every 15]

Each service runs as its own process (as deployed). For every rate it prints throughput,
CPU seconds per 1,000 pings for each service, and the p50/p99/p999 latency from a ping being
produced to the zone status it caused being produced (rate 0 means as fast as possible).
Latency is sampled on a zone's due -> active change, which the ping of the first unit to
arrive causes; units work beats (see `beats`) so that such changes happen all the time.
The measured window opens once every stage has caught up with the load (see `run_rate`).

Every rate runs with each partition count given: 1 is how `dosewatch up` makes topics on the
embedded broker (one instance per stage), 4 the services' default for a cluster. The embedded
broker's fetches cost more for each batch its partitions hold, so its latency climbs through
a long window (docs/performance.md). With `--rollover-every S`, the services move to a fresh
embedded broker every S seconds, told through their control routes (`rollover.RemoteStage`),
as `dosewatch up` moves its stages; the sender switches with them, and so does the watcher.
As under `dosewatch up`, each stage takes every partition itself rather than joining a group
(whose first join waits at least a second, at every start and move), unless
DOSEWATCH_CONSUMER_ASSIGNMENT says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._city import save, table
from bench._proc import TICKS, cpu_seconds
from bench._stack import Stack, embedded_stack, wait_ready
from dosewatch import rollover
from dosewatch.demo import make_zones
from schemas.timefmt import format_ts, parse_ts
from services.common import db, kafka
from services.common.embedded import EmbeddedKafka, EmbeddedPostgres, free_port
from services.common.settings import CommonSettings
from services.common.zonestore import import_zones

SERVICES = ("ingest", "geofence", "dosage")
STATEFUL = ("geofence", "dosage")
WARMUP_MAX_S = 30.0  # a rate past capacity never catches up: measure it anyway, marked behind
STEADY_LOOKS = 4  # caught up at that many looks in a row, 0.25 s apart


def beats(
    rng: np.random.Generator, centres: list[tuple[float, float]], units: int, prefix: str,
    steps: int = 240,
) -> tuple[list[bytes], list[bytes]]:  # fmt: skip
    """Each unit works a beat, one ping per step: it stays in a hot spot for 5-60 pings, then
    on the streets (away from its zone) for 5-60, then another hot spot. Zones empty and fill
    all the time, so due -> active changes, where latency is sampled, happen throughout."""
    lon = np.empty((steps, units))
    lat = np.empty((steps, units))
    for u in range(units):
        t = int(rng.integers(0, 60))  # staggered: not every unit arrives at once
        lon[:t, u], lat[:t, u] = _street(centres[int(rng.integers(len(centres)))])
        while t < steps:
            c = centres[int(rng.integers(len(centres)))]
            stay, away = (int(x) for x in rng.integers(5, 61, 2))
            lon[t : t + stay, u], lat[t : t + stay, u] = c
            lon[t + stay : t + stay + away, u], lat[t + stay : t + stay + away, u] = _street(c)
            t += stay + away
    names = [f"{prefix}{u}".encode() for u in range(units)]
    keys = names * steps  # step-major: every unit's ping for step i is sent before step i+1
    rows = zip(keys, lat.ravel().tolist(), lon.ravel().tolist(), strict=True)
    heads = [b'{"unit_id":"%s","lat":%.7f,"lon":%.7f,"ts":"' % row for row in rows]
    return keys, heads


def _street(centre: tuple[float, float]) -> tuple[float, float]:
    return centre[0] + 0.004, centre[1] + 0.004  # ~400 m off: outside the zone, near it


def tree_cpu(root: int) -> float:
    """CPU of a process and its live children (PostgreSQL: the postmaster and its backends),
    plus what its exited children used (counted in the parent's cutime/cstime)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        pid, ppid = int(stat.parent.name), int(fields[1])
        if pid == root:
            total += sum(int(f) for f in fields[11:15]) / TICKS
        elif ppid == root:
            total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


class BrokerCpu:
    """CPU of the embedded broker so far, the ones a rollover retired included (each read
    just before it is killed)."""

    def __init__(self, broker: EmbeddedKafka) -> None:
        self.broker = broker
        self.retired = 0.0
        self.pid = self.pid_now()

    def pid_now(self) -> int:
        assert self.broker.proc is not None
        return self.broker.proc.pid

    def __call__(self) -> float:
        return self.retired + cpu_seconds(self.pid_now())

    async def moved(self, _bootstrap: str) -> None:
        """A rollover's last step: the old broker still runs, the new one is the broker's."""
        self.retired += cpu_seconds(self.pid)
        self.pid = self.pid_now()


def arrival_ms(key: bytes | None, status: dict[str, Any], timestamp: int,
               seen: set[tuple[bytes | None, str]]) -> float | None:  # fmt: skip
    """Ping to status, ms, for a zone's due -> active change (caused by the ping whose ts is
    as_of; `timestamp` is when dosage sent the status), else None. Once per change: dosage
    publishes every status again, as last sent, on a new broker."""
    if status["status"] != "active" or status["elapsed_s"] != 0:
        return None
    if (key, status["as_of"]) in seen:
        return None
    seen.add((key, status["as_of"]))
    return timestamp - parse_ts(status["as_of"])


class StatusWatch:
    """Reads the zone-status topic for latency samples, from broker to broker: a rollover
    switches it once it has read the old topic to the end (`switch`)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.latencies: list[tuple[int, float]] = []  # (when sent, ms)
        self.measure_from_ms = float("inf")
        self._seen: set[tuple[bytes | None, str]] = set()
        self._consumer = self._reader(bootstrap, "latest")
        self._switching: tuple[str, float, asyncio.Future[None]] | None = None

    def _reader(self, bootstrap: str, reset: str) -> AIOKafkaConsumer:
        # Latency is taken from the status record's own timestamp (when dosage produced it),
        # so this watcher need not poll fast; a slow poll keeps it from loading the broker.
        return AIOKafkaConsumer(self.topic, bootstrap_servers=bootstrap, fetch_max_wait_ms=200,
                                auto_offset_reset=reset)  # fmt: skip

    async def start(self) -> None:
        await self._consumer.start()
        await self._consumer.getmany(timeout_ms=500)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for records in (await self._consumer.getmany(timeout_ms=100)).values():
                for r in records:
                    ms = arrival_ms(r.key, orjson.loads(r.value), r.timestamp, self._seen)
                    if ms is not None and r.timestamp >= self.measure_from_ms:
                        self.latencies.append((r.timestamp, ms))
            if self._switching is not None:
                bootstrap, since_ms, done = self._switching
                if await kafka.caught_up(self._consumer, since_ms):
                    await self._consumer.stop()
                    self._consumer = self._reader(bootstrap, "earliest")
                    await self._consumer.start()
                    self._switching = None
                    done.set_result(None)
        await self._consumer.stop()

    async def switch(self, bootstrap: str) -> None:
        done = asyncio.get_running_loop().create_future()
        self._switching = bootstrap, time.time() * 1000, done
        await done


async def run_rate(
    rate: int, seconds: float, broker: EmbeddedKafka, prefix: str, features: list[dict[str, Any]],
    procs: dict[str, subprocess.Popen[bytes]], units: int, interval_s: float,
    ports: dict[str, int], warmup_s: float, pg: EmbeddedPostgres, rollover_every: float,
    token: str, partitions: int,
) -> dict[str, Any]:  # fmt: skip
    rng = np.random.default_rng(rate + 1)
    settings = CommonSettings(topic_prefix=prefix, partitions=partitions)
    rings = [f["geometry"]["coordinates"][0][:-1] for f in features]
    centres = [
        (sum(p[0] for p in ring) / len(ring), sum(p[1] for p in ring) / len(ring)) for ring in rings
    ]
    feed = rollover.SwitchedProducer(broker.bootstrap, settings.topic_raw)
    await feed.start()
    watch = StatusWatch(broker.bootstrap, settings.topic_status)
    await watch.start()
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch.run(stop))
    broker_cpu = BrokerCpu(broker)
    handles = [rollover.RemoteStage(n, f"http://127.0.0.1:{ports[n]}", token) for n in SERVICES]
    rolled: list[dict[str, float]] = []

    async def roll() -> None:
        while True:
            await asyncio.sleep(rollover_every)
            began_ms = time.time() * 1000
            then = {"watch": watch.switch, "cpu": broker_cpu.moved}
            steps = await rollover.roll_over(broker, settings, handles, feed.switch, then)
            rolled.append(steps | {"began_ms": began_ms})

    roller = asyncio.create_task(roll()) if rollover_every else None
    assert pg.proc is not None
    pg_pid = pg.proc.pid
    sent = 0
    t0 = time.monotonic()
    step = 0.01
    # Pre-drawn positions: the sender must not be what limits the rate.
    units = units or max(100, int(rate * interval_s) if rate else 5_000)
    keys, heads = beats(rng, centres, units, f"r{rate}u")
    pool_n = len(keys)
    k = 0
    # The first seconds on fresh topics (metadata, consumer groups joining, the backlog of
    # pings sent meanwhile) are not steady state: the window opens once every stage has
    # caught up, after at least `warmup_s`, and closes `seconds` later. Watched from a task
    # of its own, so that the sender keeps its pace meanwhile.
    w: dict[str, Any] = {}

    async def open_window() -> None:
        await asyncio.sleep(warmup_s)
        deadline = time.monotonic() + WARMUP_MAX_S
        behind = max(100, rate // 50)  # records: 20 ms of pings
        steady = 0  # the backlog's last statuses come out after the stages first catch up
        while True:
            caught_up = max([await _lag(ports[n]) for n in SERVICES]) <= behind
            steady = steady + 1 if caught_up else 0
            if steady >= STEADY_LOOKS or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.25)
        w["caught_up"], w["warmup_s"] = caught_up, time.monotonic() - t0
        watch.measure_from_ms = time.time() * 1000
        w["cpu0"] = {n: cpu_seconds(p.pid) for n, p in procs.items()}
        w["broker0"], w["pg0"] = broker_cpu(), tree_cpu(pg_pid)
        w["self0"] = cpu_seconds(os.getpid())
        w["rolled0"] = len(rolled)
        w["sent0"], w["t0"] = sent, time.monotonic()
        w["taken0"] = await _taken(ports["geofence"])
        w["before"] = {n: await _histogram(ports[n]) for n in SERVICES}
        w["waited0"] = {n: await _save_wait(ports[n]) for n in STATEFUL}
        w["end"] = w["t0"] + seconds

    opener = asyncio.create_task(open_window())
    while not opener.done() or time.monotonic() < w.get("end", 0.0):
        # Catch up to the schedule: a slow ack must not lower the offered rate.
        n = max(1, int(rate * (time.monotonic() - t0 + step)) - sent) if rate else 2000
        stamp = format_ts(int(time.time() * 1000)).encode() + b'"}'
        batch = []
        for _ in range(n):
            batch.append((keys[k], heads[k] + stamp))
            k = (k + 1) % pool_n
        await feed.send(batch)
        sent += n
        if rate:
            await asyncio.sleep(max(0.0, t0 + sent / rate - time.monotonic()))
    await opener  # raises what stopped it, if it failed
    elapsed = time.monotonic() - w["t0"]
    sent -= w["sent0"]  # in the window
    # Throughput: pings the geofence stage took in the window (at "max" the sender can
    # outrun the pipeline, so what was sent says little).
    through = (await _taken(ports["geofence"]) - w["taken0"]) / elapsed
    if roller is not None:
        roller.cancel()  # a rollover under way is cut short: these services stop next anyway
        with contextlib.suppress(asyncio.CancelledError):
            await roller
    await asyncio.sleep(2.0)
    stop.set()
    await watcher
    cpu = {n: cpu_seconds(p.pid) - w["cpu0"][n] for n, p in procs.items()}
    cpu_broker = broker_cpu() - w["broker0"]
    cpu_self = cpu_seconds(os.getpid()) - w["self0"]
    cpu_pg = tree_cpu(pg_pid) - w["pg0"]
    stages = {n: await _stage_quantiles(ports[n], w["before"][n]) for n in SERVICES}
    waited = {n: await _save_wait(ports[n]) - w["waited0"][n] for n in STATEFUL}
    await feed.stop()
    for handle in handles:
        await handle.aclose()
    latencies = watch.latencies
    lat = np.asarray([ms for _, ms in latencies] or [float("nan")])
    row: dict[str, Any] = {
        "rate": rate or "max",
        "warmup_s": w["warmup_s"],
        "caught_up": w["caught_up"],
        "sent_per_s": sent / elapsed,
        "through_per_s": through,
        "statuses": len(latencies),
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "p999_ms": float(np.percentile(lat, 99.9)),
        # Whether it holds: the embedded broker's hops slow as its topics fill (docs).
        "p99_each_10s_ms": " ".join(
            f"{np.percentile(part, 99):.0f}" for part in _slices(latencies, watch.measure_from_ms)
        ),
    }
    moves = rolled[w["rolled0"] :]
    row["rollovers"] = len(moves)
    if moves:
        # From the sender's switch until dosage reads the new broker: the stages' part.
        row["moved_ms_max"] = max(m["dosage_s"] for m in moves) * 1000
        row["prepare_s_max"] = max(m["prepare_s"] for m in moves)
    if os.environ.get("BENCH_TRACE"):  # every sample and rollover of the run, for a closer look
        trace = {"from_ms": watch.measure_from_ms, "latencies": latencies, "rollovers": moves}
        Path(os.environ["BENCH_TRACE"]).write_bytes(orjson.dumps(trace))
    for name in SERVICES:
        row[f"cpu_{name}"] = cpu[name] / sent * 1000
    row["cpu_broker"] = cpu_broker / sent * 1000
    row["cpu_postgres"] = cpu_pg / sent * 1000
    row["cpu_bench"] = cpu_self / sent * 1000  # the sender and the watcher: load, not pipeline
    for name in SERVICES:
        row[f"p99_{name}_ms"] = stages[name]
    for name in STATEFUL:
        # Held up by its last save (one in flight at most): the stage's stalls from the database.
        row[f"save_wait_{name}_ms"] = waited[name] * 1000
    return row


def _slices(latencies: list[tuple[int, float]], start_ms: float) -> list[list[float]]:
    """The latencies of each 10 s of the window, in order (empty slices left out)."""
    parts: dict[int, list[float]] = {}
    for sent_ms, ms in latencies:
        parts.setdefault(int((sent_ms - start_ms) // 10_000), []).append(ms)
    return [parts[i] for i in sorted(parts)]


_SCRAPER: list[httpx.AsyncClient] = []


def _scraper() -> httpx.AsyncClient:
    """One client for every scrape: making one costs tens of ms (its TLS context), during
    which this process's loop, which also sends the pings, stands still."""
    if not _SCRAPER:
        _SCRAPER.append(httpx.AsyncClient())
    return _SCRAPER[0]


async def _samples(port: int, name: str) -> list[tuple[str, float]]:
    """(labels, value) of each sample of one metric, scraped from a service's /metrics."""
    text = (await _scraper().get(f"http://127.0.0.1:{port}/metrics")).text
    return [
        (line[len(name) : line.rindex(" ")], float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith(name + "{")
    ]


async def _histogram(port: int) -> dict[float, float]:
    """Cumulative bucket counts of this process's ping-to-output latency histogram."""
    out: dict[float, float] = {}
    for labels, count in await _samples(port, "dosewatch_event_latency_seconds_bucket"):
        le = labels.split('le="')[1].split('"')[0]
        out[float("inf") if le == "+Inf" else float(le)] = count
    return out


async def _save_wait(port: int) -> float:
    """Seconds a stateful stage has waited for its saves so far (its save wait counter)."""
    return sum(v for _, v in await _samples(port, "dosewatch_state_save_wait_seconds_total"))


async def _taken(port: int) -> float:
    """Pings a stage has taken so far (its dosewatch_pings_in_total)."""
    return sum(v for _, v in await _samples(port, "dosewatch_pings_in_total"))


async def _lag(port: int) -> float:
    """Records a stage has yet to read, over its partitions (its dosewatch_consumer_lag);
    infinite before it has read any (its consumer may not have joined yet)."""
    lags = [v for _, v in await _samples(port, "dosewatch_consumer_lag")]
    return sum(lags) if lags else float("inf")


async def _stage_quantiles(port: int, before: dict[float, float]) -> float:
    """p99 of one stage over the run (from histogram deltas; a bucket's upper bound), ms."""
    after = await _histogram(port)
    deltas = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = deltas[-1][1] if deltas else 0.0
    for le, count in deltas:
        if total and count >= 0.99 * total:
            return le * 1000
    return float("nan")


async def start_services(
    env: dict[str, str], state: Path
) -> tuple[dict[str, subprocess.Popen[bytes]], dict[str, int]]:
    procs: dict[str, subprocess.Popen[bytes]] = {}
    ports: dict[str, int] = {}
    for name in SERVICES:
        ports[name] = free_port()
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "dosewatch.cli", name],
            env=env | {"DOSEWATCH_HTTP_PORT": str(ports[name])},
            stdout=(state / f"{name}.log").open("ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip
    async with httpx.AsyncClient() as client:
        for name in SERVICES:
            await wait_ready(client, ports[name], procs[name])
    return procs, ports


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rates", default="1000,5000,10000,20000,0", help="0: as fast as it goes")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured, after warm-up")
    parser.add_argument("--warmup", type=float, default=2.0, help="at least; then until caught up")
    parser.add_argument("--zones", type=int, default=5000, help="per rate")
    parser.add_argument("--interval", type=float, default=1.0, help="s between a unit's pings")
    parser.add_argument("--units", type=int, default=0, help="default: rate x interval")
    parser.add_argument(
        "--partitions", default="1,4", help="of each topic (DOSEWATCH_PARTITIONS), each in turn"
    )
    parser.add_argument("--rollover-every", type=float, default=0.0,
                        help="s between moves to a fresh embedded broker (0: none)")  # fmt: skip
    args = parser.parse_args()
    async with embedded_stack() as st:
        rows = await run_rates(args, st)
    for client in _SCRAPER:
        await client.aclose()
    print()
    print(table(rows, [(k, k) for k in rows[0]]))
    print(f"results: {save('pipeline', rows)}")


async def run_rates(args: argparse.Namespace, st: Stack) -> list[dict[str, Any]]:
    rates = [int(r) for r in args.rates.split(",")]
    runs = [(int(p), rate) for p in args.partitions.split(",") for rate in rates]
    # Each run patrols its own zones: latency is sampled on a zone's first arrival (the
    # due -> active change), which a zone patrolled by an earlier run would not show again.
    features = make_zones(3, args.zones * len(runs), box_km=30.0)
    conn = await asyncpg.connect(st.url)
    await db.migrate(conn)
    await import_zones(conn, {"type": "FeatureCollection", "features": features})
    await conn.close()
    token = secrets.token_urlsafe(24)  # for the services' control routes
    env = dict(os.environ) | {
        "DOSEWATCH_DATABASE_URL": st.url,
        "DOSEWATCH_LOG_LEVEL": "WARNING",
        "DOSEWATCH_CONTROL_TOKEN": token,
        "DOSEWATCH_CONSUMER_ASSIGNMENT": os.environ.get("DOSEWATCH_CONSUMER_ASSIGNMENT", "all"),
    }
    rows: list[dict[str, Any]] = []
    for i, (partitions, rate) in enumerate(runs):
        # Fresh topics per run: the embedded broker's fetch cost grows with the batches
        # already in a topic (see docs/performance.md), which would charge this run for
        # the ones before it. The broker itself may be another since the last run.
        prefix = f"bench{i}."
        run_env = env | {"DOSEWATCH_TOPIC_PREFIX": prefix, "DOSEWATCH_PARTITIONS": str(partitions),
                         "DOSEWATCH_KAFKA_BOOTSTRAP": st.broker.bootstrap}  # fmt: skip
        procs, ports = await start_services(run_env, st.state)
        try:
            own = features[i * args.zones : (i + 1) * args.zones]
            row = {"partitions": partitions}
            row |= await run_rate(rate, args.seconds, st.broker, prefix, own, procs, args.units,
                                  args.interval, ports, args.warmup, st.pg, args.rollover_every,
                                  token, partitions)  # fmt: skip
            rows.append(row)
        finally:
            for p in procs.values():
                p.terminate()
                p.wait(15)
        print(table(rows[-1:], [(k, k) for k in rows[-1]]), flush=True)
    return rows


if __name__ == "__main__":
    asyncio.run(main())
