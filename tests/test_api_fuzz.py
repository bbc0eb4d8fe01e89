"""Schemathesis over the dispatch API's own OpenAPI document: every REST operation, valid and
invalid inputs, with an admin key so requests reach the handlers; then a fixed sweep of hostile
values through every parameter the document declares. No input may give a 5xx.

The app runs on a real PostgreSQL (zones, keys, the sample's visits and zone periods, an audit
log) in a thread of its own; the live feed is left out, as REST reads PostgreSQL and the
in-memory book, which is filled with each zone's initial status."""

from __future__ import annotations

import asyncio
import re
import threading
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar, cast
from urllib.parse import quote

import asyncpg
import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from schemas.timefmt import ms_to_datetime, parse_ts
from services.api import keys
from services.api.app import create_app
from services.api.auth import Authenticator
from services.api.context import ApiContext, Fix
from services.api.core.statusbook import StatusBook
from services.api.live import LiveFeed
from services.api.settings import ApiSettings
from services.common.http import HttpServer
from tests.pipeline_helpers import SAMPLE, TZ, prepare_database

T = TypeVar("T")
# Path values that exist in the seeded database.
KNOWN = {"zone_id": "Z003", "unit_id": "unit-01"}


@dataclass
class Served:
    base: str
    headers: dict[str, str]


class _Loop:
    """An event loop in a thread: the server's pool lives there while the tests block."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


async def _seed(conn: asyncpg.Connection) -> None:
    """The sample's expected history, written as the dosage service writes it."""

    def rows(name: str) -> list[dict[str, Any]]:
        lines = (SAMPLE / "expected" / name).read_bytes().splitlines()
        return [orjson.loads(x) for x in lines]

    def at(text: str) -> datetime:
        return ms_to_datetime(parse_ts(text))

    await conn.executemany(
        "INSERT INTO visits (unit_id, zone_id, started_at, ended_at, duration_s, end_reason, "
        "qualified, target_met, overstay) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        [(v["unit_id"], v["zone_id"], at(v["started_at"]), at(v["ended_at"]), v["duration_s"],
          v["end_reason"], v["qualified"], v["target_met"], v["overstay"])
         for v in rows("visits.jsonl")],
    )  # fmt: skip
    await conn.executemany(
        "INSERT INTO zone_periods (zone_id, period_start, period_end, presence_s, officer_s, "
        "visits, dosed_visits) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        [(p["zone_id"], at(p["period_start"]), at(p["period_end"]), p["presence_s"],
          p["officer_s"], p["visits"], p["dosed_visits"]) for p in rows("zone_periods.jsonl")],
    )  # fmt: skip


@pytest.fixture(scope="module")
def served(postgres_server_url: str) -> Iterator[Served]:
    url = f"{postgres_server_url}/dw_fuzz_{uuid.uuid4().hex[:10]}"
    loop = _Loop()
    state: dict[str, Any] = {}

    async def start() -> Served:
        admin = await asyncpg.connect(f"{postgres_server_url}/postgres")
        try:
            await admin.execute(f'CREATE DATABASE "{url.rsplit("/", 1)[1]}"')
        finally:
            await admin.close()
        await prepare_database(url)
        # Fuzzing polls far faster than an MDT may: the rate limit would hide the handlers.
        options: dict[str, Any] = {"database_url": url, "api_port": 0, "poll_burst": 10**6, **TZ}
        s = ApiSettings(**options)
        pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
        async with pool.acquire() as conn:
            token, _ = await keys.create_key(conn, "admin", None, "fuzz", "test", s.source)
            await _seed(conn)
        ctx = ApiContext(s, pool, Authenticator(s, pool), StatusBook(keep=s.resume_buffer))
        ctx.ready = True  # so the zones loaded next get their initial status in the book
        await LiveFeed(ctx).load_zones()
        # A last fix, as the feed would hold it, so unit views have something to show.
        ctx.fixes[KNOWN["unit_id"]] = Fix(40.7105, -73.9931, "2026-05-14T18:00:00.000Z", 0.0)
        http = HttpServer(create_app(ctx), "127.0.0.1", 0)
        await http.start()
        state.update(pool=pool, http=http)
        return Served(f"http://127.0.0.1:{http.port}", {"Authorization": f"Bearer {token}"})

    async def stop() -> None:
        if "http" in state:
            await state["http"].stop()
        if "pool" in state:
            await state["pool"].close()

    try:
        yield loop.run(start())
    finally:
        loop.run(stop())
        loop.close()


def _document() -> dict[str, Any]:
    # The document depends on the routes only, so it is read at import from an app over a
    # context with no database; requests go to the app `served` runs on the real one.
    ctx = ApiContext(ApiSettings(), cast(asyncpg.Pool, None), cast(Authenticator, None),
                     StatusBook())  # fmt: skip
    return create_app(ctx).openapi()


DOCUMENT = _document()
schema = schemathesis.openapi.from_dict(DOCUMENT).exclude(path_regex=r"/ws(/|$)")


# Every phase (examples, coverage, fuzzing), valid and invalid inputs. A 500's traceback is
# in the captured log of the failing test: the app logs it from the server thread.
@schema.parametrize()
@settings(max_examples=25, derandomize=True, deadline=None,
          suppress_health_check=list(HealthCheck))  # fmt: skip
def test_no_server_errors(case: Any, served: Served) -> None:
    case.call_and_validate(base_url=served.base, headers=served.headers,
                           checks=[not_a_server_error])  # fmt: skip


# Values random generation rarely hits but that break handlers: NUL (PostgreSQL text refuses
# it), numbers past bigint, times whose offset leaves years 1-9999, and the like.
HOSTILE = ["\x00", "Z\x00", "", " ", "%", "%00", "\u2603", "x" * 3000, "-1", "0",
           "99999999999999999999999", "1e309", "NaN", "null", "2026-02-30T00:00:00Z",
           "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "../../x", "' OR 1=1 --",
           '"1"', "W/\"1\"", "*"]  # fmt: skip


def _fits_header(value: str) -> bool:
    return value.isascii() and value.isprintable() and value == value.strip() and bool(value)


def hostile_requests() -> Iterator[tuple[str, str, dict[str, str], dict[str, str], str]]:
    """Each path, query and header parameter of each operation, one hostile value at a time,
    the other path parameters naming things that exist: (method, url, query, headers, what)."""
    for path, item in DOCUMENT["paths"].items():
        names = re.findall(r"{(\w+)}", path)
        for method, op in item.items():
            for p in op.get("parameters", []):
                for value in HOSTILE:
                    if p["in"] == "header" and not _fits_header(value):
                        continue
                    # Writes aim at nothing that exists: the sweep must not change the data.
                    known = KNOWN if method == "get" else {}
                    values = {n: known.get(n, "no-such-thing") for n in names}
                    query: dict[str, str] = {}
                    headers: dict[str, str] = {}
                    if p["in"] == "path":
                        values[p["name"]] = value
                    elif p["in"] == "query":
                        query[p["name"]] = value
                    elif p["in"] == "header":
                        headers[p["name"]] = value
                    else:
                        continue
                    url = path.format(**{n: quote(v, safe="") for n, v in values.items()})
                    yield method.upper(), url, query, headers, f"{p['in']} {p['name']}={value!r}"


def test_hostile_parameter_values(served: Served) -> None:
    failures: list[str] = []
    with httpx.Client(base_url=served.base, headers=served.headers, timeout=30) as http:
        for method, url, query, headers, what in hostile_requests():
            try:
                r = http.request(method, url, params=query, headers=headers)
            except httpx.TransportError as exc:
                failures.append(f"{method} {url} {what}: no response ({exc!r})")
                continue
            if r.status_code >= 500:
                failures.append(f"{method} {url} {what}: {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)


def test_bodies_over_the_limit_get_413_declared_or_streamed(served: Served) -> None:
    limit = ApiSettings().max_body_bytes
    chunk = b" " * 65_536

    def stream() -> Iterator[bytes]:  # no Content-Length: sent chunked
        for _ in range(limit // len(chunk) + 2):
            yield chunk

    with httpx.Client(base_url=served.base, headers=served.headers, timeout=30) as http:
        streamed = http.post("/v1/zones/import", content=stream())
        declared = http.post("/v1/zones/import", content=b" " * (limit + 1))
    for r in (streamed, declared):
        assert r.status_code == 413, r.text
        assert "over the limit" in r.json()["detail"]
