"""The whole stack in-process for API tests: ingest, geofence, dosage and the API on the real
broker and PostgreSQL, with one key per role."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import orjson
from aiokafka import AIOKafkaProducer

from schemas.timefmt import format_ts
from services.api import keys
from services.api.service import ApiService
from services.api.settings import ApiSettings
from services.common.kafka import BatchProducer
from services.dosage.service import DosageService, DosageSettings
from services.geofence.service import GeofenceService, GeofenceSettings
from services.ingest.service import IngestService, IngestSettings
from tests.pipeline_helpers import TZ, prepare_database

MDT_UNIT = "u-mdt-1"
INSIDE_Z000 = (-73.99308646946923, 40.71047563789939)  # a point in the sample's zone Z000


@dataclass
class Stack:
    base: str  # http://127.0.0.1:port
    ws: str  # ws://127.0.0.1:port
    tokens: dict[str, str]  # role -> key; "mdt" is bound to MDT_UNIT
    api: ApiService
    settings: dict[str, Any]
    pool: asyncpg.Pool
    _producer: AIOKafkaProducer | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def headers(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    async def send_pings(self, pings: list[dict[str, Any]]) -> None:
        """Raw pings onto the raw topic, keyed by unit (as AVL gateways do)."""
        assert self._producer is not None
        topic = self.settings["topic_prefix"] + "avl.pings.raw"
        records = [(p["unit_id"].encode(), orjson.dumps(p)) for p in pings]
        await BatchProducer(self._producer).send(topic, records)


def ping(unit: str, lon: float, lat: float, at_ms: int | None = None) -> dict[str, Any]:
    at = at_ms if at_ms is not None else int(time.time() * 1000)
    return {"unit_id": unit, "lat": lat, "lon": lon, "ts": format_ts(at)}


@contextlib.asynccontextmanager
async def api_stack(
    kafka_bootstrap: str, database_url: str, topic_prefix: str, **api_overrides: Any
) -> AsyncIterator[Stack]:
    """Zones of the evening-shift sample, live wall clocks, the API on a free port."""
    common: dict[str, Any] = {"kafka_bootstrap": kafka_bootstrap, "database_url": database_url,
                              "topic_prefix": topic_prefix, **TZ}  # fmt: skip
    await prepare_database(database_url)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    tokens: dict[str, str] = {}
    async with pool.acquire() as conn:
        for role in ("dispatcher", "mdt", "auditor", "admin"):
            unit = MDT_UNIT if role == "mdt" else None
            tokens[role], _ = await keys.create_key(conn, role, unit, f"test {role}", "test", "t")
    services: list[Any] = [
        IngestService(IngestSettings(**common)),
        GeofenceService(GeofenceSettings(**common)),
        DosageService(DosageSettings(**common)),
    ]
    for s in services:
        await s.start()
    api = ApiService(ApiSettings(**common, api_port=0, **api_overrides))
    await api.start()
    services.append(api)
    tasks = [asyncio.create_task(s.run()) for s in services]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=1)
    await producer.start()
    assert api.http is not None
    port = api.http.port
    stack = Stack(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", tokens, api, common,
                  pool, producer)  # fmt: skip
    try:
        yield stack
    finally:
        await producer.stop()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for s in reversed(services):
            with contextlib.suppress(Exception):
                await s.stop()
        await pool.close()


async def occupy(st: Stack, http: httpx.AsyncClient, unit: str = "car-1") -> None:
    """A unit's ping inside Z000, then wait until the API shows Z000 active."""
    await st.send_pings([ping(unit, *INSIDE_Z000)])

    async def active() -> bool:
        r = await http.get("/v1/zones/Z000/status", headers=st.headers("dispatcher"))
        return r.status_code == 200 and r.json()["status"] == "active"

    await wait_until(active)


async def wait_until(probe: Any, timeout_s: float = 30.0, every_s: float = 0.1) -> Any:
    """Await `probe()` until it returns something truthy."""
    async with asyncio.timeout(timeout_s):
        while True:
            got = await probe()
            if got:
                return got
            await asyncio.sleep(every_s)


async def get_json(client: httpx.AsyncClient, url: str, **kw: Any) -> Any:
    r = await client.get(url, **kw)
    r.raise_for_status()
    return r.json()
