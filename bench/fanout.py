"""Websocket fan-out: N dispatch consoles on /v1/ws/zones while zone statuses change.

    .venv/bin/python bench/fanout.py [--clients 1000] [--rate 200] [--seconds 10]

The API runs in this process on an embedded PostgreSQL (keys, zones) with no broker: statuses
go straight into its StatusBook and ctx.changed is set, as the Kafka feed does, so only the
fan-out is measured. The consoles run in --procs separate processes (websockets clients) so
that they do not share the server's core. Each status carries the wall time it was applied;
latency is from then to a console parsing the frame that carries it. Prints delivered frames
and zone updates per second, p50/p99/p999 latency and CPU; asserts nothing.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import random
import re
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import orjson
from prometheus_client import REGISTRY

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._city import save, table
from bench._proc import cpu_seconds
from dosewatch.demo import make_zones
from schemas.timefmt import format_ts
from services.api import keys, ws
from services.api.app import create_app
from services.api.auth import Authenticator
from services.api.context import ApiContext
from services.api.core.statusbook import StatusBook
from services.api.live import LiveFeed, initial_status
from services.api.settings import ApiSettings
from services.common import db
from services.common.embedded import EmbeddedPostgres, free_port
from services.common.http import HttpServer
from services.common.zonestore import import_zones


def raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, min(hard, need))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < need:
        print(f"warning: open files limited to {want} (hard limit); asked for {need}")


STAMP = re.compile(rb'"bench_t":([0-9.eE+-]+)')


# -- the consoles (a child process) -------------------------------------------------------------


async def consoles(url: str, count: int, out: Path) -> None:
    """`count` connections; each zone update's (applied at, received at) goes to `out`."""
    from websockets.asyncio.client import ClientConnection, connect
    from websockets.exceptions import ConnectionClosed

    raise_nofile(count + 100)
    applied = array.array("d")
    received = array.array("d")
    frames = [0]
    snapshots: list[asyncio.Future[None]] = []

    async def console(c: ClientConnection, snapshot: asyncio.Future[None]) -> None:
        # Only the stamps are read (no text decode, no full JSON parse): 500 consoles share a
        # process here, and their parsing would otherwise be most of the latency measured.
        with contextlib.suppress(ConnectionClosed):
            while True:
                raw = await c.recv(decode=False)
                now = time.time()
                frames[0] += 1
                if raw.startswith(b'{"type":"delta"'):
                    for m in STAMP.finditer(raw):
                        applied.append(float(m[1]))
                        received.append(now)
                elif raw.startswith(b'{"type":"snapshot"') and not snapshot.done():
                    snapshot.set_result(None)

    conns: list[ClientConnection] = []
    tasks = []
    for i in range(0, count, 50):  # a burst at a time: the listen backlog is finite
        batch = await asyncio.gather(*(
            connect(url, compression=None, proxy=None, max_size=None, ping_interval=None)
            for _ in range(min(50, count - i))
        ))  # fmt: skip
        for c in batch:
            snapshot = asyncio.get_running_loop().create_future()
            snapshots.append(snapshot)
            tasks.append(asyncio.create_task(console(c, snapshot)))
        conns += batch
    await asyncio.gather(*snapshots)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # "stop"
    for t in tasks:
        t.cancel()
    with out.open("wb") as f:
        np.save(f, np.frombuffer(applied, dtype=np.float64))
        np.save(f, np.frombuffer(received, dtype=np.float64))
    print(orjson.dumps({"frames": frames[0]}).decode(), flush=True)
    # The server sees them go when this process exits; closing 500 handshakes adds nothing.


# -- the server and the driver -------------------------------------------------------------------


async def start_api(url: str, zones: int) -> tuple[ApiContext, HttpServer, str, asyncpg.Pool]:
    await db.ensure_database(url)
    conn = await asyncpg.connect(url)
    try:
        await db.migrate(conn)
        features = make_zones(5, zones, box_km=30.0)
        await import_zones(conn, {"type": "FeatureCollection", "features": features})
        token, _ = await keys.create_key(conn, "dispatcher", None, "bench", "bench", "bench")
    finally:
        await conn.close()
    settings = ApiSettings(database_url=url, api_port=0, log_level="WARNING")
    pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
    ctx = ApiContext(settings, pool, Authenticator(settings, pool),
                     StatusBook(keep=settings.resume_buffer))  # fmt: skip
    await LiveFeed(ctx).load_zones()
    target = settings.dosage.rules_for().target_ms / 1000
    for info in ctx.zones.values():
        ctx.book.apply(initial_status(info, target))
    ctx.ready = True
    http = HttpServer(create_app(ctx), "127.0.0.1", 0, ws_per_message_deflate=False)
    await http.start()
    return ctx, http, token, pool


async def drive(ctx: ApiContext, rate: int, seconds: float) -> int:
    """`rate` status changes per second on random zones, applied every 5 ms as due."""
    rng = random.Random(7)
    zone_ids = sorted(ctx.book.zones)
    statuses = ("due", "active", "met", "overstay", "satisfied")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    applied = 0
    while (elapsed := loop.time() - t0) < seconds:
        due = int(rate * elapsed) - applied
        for _ in range(due):
            zone_id = rng.choice(zone_ids)
            now = time.time()
            status = dict(ctx.book.zones[zone_id], status=rng.choice(statuses),
                          as_of=format_ts(int(now * 1000)), bench_t=now)  # fmt: skip
            ctx.book.apply(status)
            applied += 1
        if due > 0:
            ctx.changed.set()
        await asyncio.sleep(0.005)
    return applied


def _sample(name: str) -> float:
    labels = {"endpoint": "zones"} if name == "frames_sent" else {}
    return REGISTRY.get_sample_value(f"dosewatch_ws_{name}_total", labels) or 0.0


async def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_nofile(args.clients + 200)
    state = Path(tempfile.mkdtemp(prefix="dosewatch-fanout-"))
    state.chmod(0o755)
    pg = EmbeddedPostgres(state / "pgdata", free_port())
    await pg.start()
    procs: list[asyncio.subprocess.Process] = []
    try:
        url = pg.url.rsplit("/", 1)[0] + "/fanout"
        ctx, http, token, pool = await start_api(url, args.zones)
        ws_url = f"ws://127.0.0.1:{http.port}/v1/ws/zones?token={token}"
        shares = [args.clients // args.procs + (i < args.clients % args.procs)
                  for i in range(args.procs)]  # fmt: skip
        outs = [state / f"console-{i}.npy" for i in range(args.procs)]
        for share, out in zip(shares, outs, strict=True):
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--console", ws_url, str(share), str(out),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            ))  # fmt: skip
        t_connect = time.monotonic()
        for p in procs:
            assert p.stdout is not None
            line = await p.stdout.readline()
            if line.strip() != b"ready":
                raise RuntimeError(f"console process failed: {line!r}")
        connect_s = time.monotonic() - t_connect
        hub = ws.zone_hub(ctx)
        assert hub is not None and len(hub.clients) == args.clients

        await drive(ctx, args.rate, args.warmup)
        frames0, conflations0 = _sample("frames_sent"), _sample("conflations")
        ticks0, encoded0 = hub.ticks, hub.encoded
        cpu0 = time.process_time()
        clients_cpu0 = sum(cpu_seconds(p.pid) for p in procs)
        wall0 = time.time()
        applied = await drive(ctx, args.rate, args.seconds)
        wall1 = time.time()
        cpu = time.process_time() - cpu0
        clients_cpu = sum(cpu_seconds(p.pid) for p in procs) - clients_cpu0
        ticks, encoded = hub.ticks - ticks0, hub.encoded - encoded0
        sent = _sample("frames_sent") - frames0
        conflations = _sample("conflations") - conflations0
        await asyncio.sleep(1.0)  # the last tick's frames arrive

        latencies: list[np.ndarray[Any, Any]] = []
        for p, out in zip(procs, outs, strict=True):
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write(b"stop\n")
            await p.stdin.drain()
            await p.stdout.readline()
            await p.wait()
            with out.open("rb") as f:
                at, got = np.load(f), np.load(f)
            window = (at >= wall0) & (at < wall1)
            latencies.append((got[window] - at[window]) * 1000)
        lat = np.concatenate(latencies) if latencies else np.array([np.nan])
        span = wall1 - wall0
        await http.stop()
        await pool.close()
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        await pg.stop()
    return {
        "clients": args.clients,
        "changes_per_s": applied / span,
        "ticks_per_s": ticks / span,
        "frames_encoded_per_tick": encoded / max(ticks, 1),
        "frames_sent_per_s": sent / span,
        "updates_received_per_s": len(lat) / span,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "p999_ms": float(np.percentile(lat, 99.9)),
        "max_ms": float(lat.max()),
        "conflations": int(conflations),
        "server_cpu_pct": cpu / span * 100,
        "consoles_cpu_pct": clients_cpu / span * 100,
        "connect_s": connect_s,
    }


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--console":
        asyncio.run(consoles(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rate", type=int, default=200, help="status changes per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured, after warm-up")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--zones", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=2, help="console processes")
    args = parser.parse_args()
    row = asyncio.run(run(args))
    print(table([row], [(k, k) for k in row]))
    print(f"results: {save('fanout', [row])}")


if __name__ == "__main__":
    main()
