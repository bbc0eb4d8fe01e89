"""`dosewatch up`: the whole service in one command, on the embedded stack by default.

With no DOSEWATCH_KAFKA_BOOTSTRAP it runs the Tansu broker (in memory); with no
DOSEWATCH_DATABASE_URL it runs PostgreSQL with its data under the state directory. Then
migrations, topics, the three services and the API; Ctrl-C stops everything and leaves no
process. With the embedded database it also keeps a development admin key in
`<state-dir>/admin.key` and a dispatcher key for the console in `<state-dir>/dispatcher.key`
(created once, mode 0600), so the API and the console can be tried at once.

The stages run in this process unless `--processes` (DOSEWATCH_STAGE_PROCESSES) says each
is to run in its own (`stageproc`), as deployed: that takes more CPU in all, and pays where
the machine has cores to spare (docs/performance.md, "Seventeenth round").
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
from pathlib import Path
from typing import Any

import asyncpg
from pydantic import Field, SecretStr

from dosewatch import simulate
from dosewatch.demo import make_zones
from dosewatch.stack import Stack, stop_step
from dosewatch.stageproc import Launch
from services.api import keys
from services.api.settings import ApiSettings
from services.common import db
from services.common.embedded import (
    EmbeddedError,
    EmbeddedKafka,
    EmbeddedPostgres,
    EmbeddedProxy,
    free_port,
)
from services.common.runner import settle_gc
from services.common.settings import CommonSettings
from services.common.zonestore import import_zones
from services.dosage.service import DosageSettings
from services.geofence.service import GeofenceSettings
from services.ingest.service import IngestSettings

log = logging.getLogger("dosewatch.up")


EMBEDDED_FETCH_MAX_WAIT_MS = 50


class UpSettings(CommonSettings):
    embedded_kafka_port: int = Field(9092, ge=1, le=65535)
    # Past this many records in a partition, move to a fresh embedded broker (0: never): its
    # hops slow with the batches a partition holds (`rollover`). At the demo's rate, hourly.
    embedded_kafka_rollover_records: int = Field(20_000, ge=0)
    embedded_kafka_rollover_check_s: float = Field(15.0, gt=0)
    embedded_postgres_port: int = Field(0, ge=0, le=65535)  # 0: any free port
    api_port: int = Field(8000, ge=0, le=65535)
    stage_processes: bool = False  # each stage a process of its own (`--processes`)


async def up(state_dir: Path, demo: bool, speed: float, units: int, zones: int,
             processes: bool | None = None) -> None:  # fmt: skip
    settings = UpSettings()
    if processes is not None:
        settings.stage_processes = processes
    state_dir.mkdir(parents=True, exist_ok=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    embedded: list[EmbeddedKafka | EmbeddedProxy | EmbeddedPostgres] = []
    services: list[Any] = []
    stack: Stack | None = None
    public = settings.kafka_bootstrap
    try:
        if "DOSEWATCH_KAFKA_BOOTSTRAP" not in os.environ:
            # The stages talk to the broker on a port of its own; everyone else through the
            # proxy on the public one, which a rollover starts again in front of a new broker.
            broker = EmbeddedKafka(free_port(), state_dir / "tansu.log")
            proxy = EmbeddedProxy(settings.embedded_kafka_port, broker.bootstrap,
                                  state_dir / "tansu.log")  # fmt: skip
            proxy.claim()  # first: the public port in use is the likelier failure
            await broker.start()
            embedded.append(broker)
            await proxy.start()
            embedded.append(proxy)
            settings.kafka_bootstrap, public = broker.bootstrap, proxy.bootstrap
            if "DOSEWATCH_FETCH_MAX_WAIT_MS" not in os.environ:
                # The embedded broker answers a fetch with nothing new about when the wait runs
                # out, so at the services' 5 ms every idle consumer asks 200 times a second, and
                # each ask costs it more as its topics grow (docs/performance.md). At demo
                # rates a longer wait costs a few ms a hop and saves most of that.
                settings.fetch_max_wait_ms = EMBEDDED_FETCH_MAX_WAIT_MS
            if "DOSEWATCH_PARTITIONS" not in os.environ:
                # One instance per stage in this process: more partitions would spread no
                # work, and the embedded broker's fetches cost more for every partition's
                # batches (at 10,000 pings/s, 0.04 against 0.08 s of CPU per 1,000 pings,
                # and a p99 that stays flat instead of climbing; docs/performance.md).
                settings.partitions = 1
            if "DOSEWATCH_CONSUMER_ASSIGNMENT" not in os.environ:
                # The same: each stage takes its partitions itself, rather than waiting for a
                # group to form (at least a second on this broker, at every start and rollover).
                settings.consumer_assignment = "all"
        if "DOSEWATCH_DATABASE_URL" not in os.environ and settings.database_url_file is None:
            state_dir.chmod(state_dir.stat().st_mode | 0o711)
            pg = EmbeddedPostgres(
                state_dir / "pgdata", settings.embedded_postgres_port or free_port()
            )
            await pg.start()
            embedded.append(pg)
            settings.database_url = SecretStr(pg.url.rsplit("/", 1)[0] + "/dosewatch")
        url = settings.database_url.get_secret_value()
        await db.ensure_database(url)
        conn = await asyncpg.connect(url)
        try:
            await db.migrate(conn)
            if embedded and isinstance(embedded[0], EmbeddedKafka):
                # The embedded broker's log is new and empty: offsets saved against the last
                # one would point past its end. Start consistent instead of resuming.
                await conn.execute("DELETE FROM consumer_offsets")
                await conn.execute("DELETE FROM partition_state")
                await conn.execute("DELETE FROM partition_changes")
            admin_key = console_key = None
            if any(isinstance(e, EmbeddedPostgres) for e in embedded):
                admin_key = await _dev_key(conn, state_dir, "admin")
                console_key = await _dev_key(conn, state_dir, "dispatcher")
            if demo:
                doc = {"type": "FeatureCollection", "features": make_zones(7, zones)}
                _written, errors = await import_zones(conn, doc)
                if errors:
                    raise RuntimeError(f"demo zones invalid: {errors[:3]}")
        finally:
            await conn.close()
        shared = settings.model_dump(exclude=set(UpSettings.model_fields)
                                     - set(CommonSettings.model_fields))  # fmt: skip
        kafka_server = next((e for e in embedded if isinstance(e, EmbeddedKafka)), None)
        kafka_proxy = next((e for e in embedded if isinstance(e, EmbeddedProxy)), None)
        launch = _launch(settings) if settings.stage_processes else None
        stack = Stack(IngestSettings(**shared), GeofenceSettings(**shared),
                      DosageSettings(**shared), ApiSettings(**shared, api_port=settings.api_port),
                      kafka_server, kafka_proxy, launch)  # fmt: skip
        await stack.start()
        services = stack.services
        settle_gc()
        if demo:
            # Through the proxy, as any outside client: the broker behind it changes at a
            # rollover.
            feed = settings.model_copy(update={"kafka_bootstrap": public})
            stack.supervise(asyncio.create_task(
                _stream_demo(feed, speed, units, zones, stack.gate)))  # fmt: skip
        for server in embedded:
            stack.supervise(asyncio.create_task(_watch(server, stack.gate)))
        if kafka_server is not None and settings.embedded_kafka_rollover_records:
            stack.supervise(asyncio.create_task(stack.watch_broker(
                settings.embedded_kafka_rollover_records,
                settings.embedded_kafka_rollover_check_s)))  # fmt: skip
        addresses = stack.addresses()
        ports = ", ".join(f"{name} {url}" for name, url in addresses.items())
        key = f"; admin key in {admin_key}" if admin_key else ""
        kafka = (
            f"kafka {public} (fetch wait {settings.fetch_max_wait_ms} ms, "
            f"{settings.partitions} partition{'s' if settings.partitions > 1 else ''} a topic)"
        )
        where = "; stages in processes of their own" if launch else ""
        print(f"dosewatch ready: {kafka}; {ports}{key}{where}", flush=True)
        console = addresses["api"] + "/"
        if console_key is not None:
            # The key rides in the fragment, which the browser never sends to a server.
            console += "#key=" + console_key.read_text().strip()
        print(f"console (dispatcher): {console}", flush=True)
        assert stack.failed is not None
        waiter = asyncio.create_task(stop.wait())
        failed: asyncio.Future[Any] = stack.failed
        await asyncio.wait([waiter, failed], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if stack.failed.done():
            raise stack.failed.result()
    finally:
        if stack is not None:
            await stack.stop()
        for server in reversed(embedded):
            await stop_step(server.stop())
        if embedded or services:  # not when the first thing it started could not start
            print("dosewatch stopped", flush=True)


def _launch(settings: UpSettings) -> Launch:
    """The stage processes read their settings from this environment, as `up` has set them
    (the embedded broker's and database's addresses, and its choices for them)."""
    chosen: dict[str, object] = {
        "kafka_bootstrap": settings.kafka_bootstrap,
        "fetch_max_wait_ms": settings.fetch_max_wait_ms,
        "partitions": settings.partitions,
        "consumer_assignment": settings.consumer_assignment,
    }
    env = dict(os.environ) | {f"DOSEWATCH_{k.upper()}": str(v) for k, v in chosen.items()}
    if "DOSEWATCH_DATABASE_URL" not in os.environ and settings.database_url_file is None:
        env["DOSEWATCH_DATABASE_URL"] = settings.database_url.get_secret_value()  # embedded
    if settings.control_token is not None:
        token = settings.control_token.get_secret_value()  # the file, if any, says the same
    else:
        token = secrets.token_urlsafe(24)
    env["DOSEWATCH_CONTROL_TOKEN"] = token
    return Launch(env, token)


async def _watch(server: EmbeddedKafka | EmbeddedProxy | EmbeddedPostgres,
                 gate: asyncio.Lock) -> None:  # fmt: skip
    """An embedded server that dies on its own. The proxy holds nothing and is started again
    (under the rollover's lock: a rollover starts it too). The stack cannot go on without the
    broker, whose records were in memory only, or the database: it stops, saying why."""
    while True:
        why = await server.ended()
        if isinstance(server, EmbeddedProxy):
            log.warning("starting the embedded broker's proxy again", extra={"reason": why})
            async with gate:
                if server.proc is None or server.proc.returncode is not None:
                    await server.start()
            continue
        lost = (
            "; the records it held in memory are gone" if isinstance(server, EmbeddedKafka) else ""
        )
        raise EmbeddedError(f"{why}{lost}. Everything stopped: run `dosewatch up` again")


async def _dev_key(conn: asyncpg.Connection, state_dir: Path, role: str) -> Path:
    """A key for the embedded stack, kept beside its data (never in the repository)."""
    path = state_dir / f"{role}.key"
    if path.exists():
        token = path.read_text().strip()
        if await keys.lookup(conn, token) is not None:
            return path
    token, _ = await keys.create_key(conn, role, None, "dosewatch up (development)",
                                     "dosewatch-up", "dosewatch/up")  # fmt: skip
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    return path


async def _stream_demo(
    settings: UpSettings, speed: float, units: int, zones: int, gate: asyncio.Lock
) -> None:
    """The demo city's patrols, from the simulator, as live AVL input (a report every 5 s per
    unit, stamped with wall time; `speed` compresses the patrols)."""
    await simulate.stream(settings, make_zones(7, zones), seed=7, units=units, interval_s=5.0,
                          speed=speed, gate=gate)  # fmt: skip
