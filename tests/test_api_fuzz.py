"""Schemathesis over the dispatch API's own OpenAPI document: every REST operation, valid and
invalid inputs, with an admin key so requests reach the handlers. No input may give a 5xx.

The app runs on a real PostgreSQL (zones, keys, the sample's visits and zone periods, an audit
log) in a thread of its own; the live feed is left out, as REST reads PostgreSQL and the
in-memory book, which is filled with each zone's initial status."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok

from schemas.timefmt import ms_to_datetime, parse_ts
from services.api import keys
from services.api.app import create_app
from services.api.auth import Authenticator
from services.api.context import ApiContext
from services.api.core.statusbook import StatusBook
from services.api.live import LiveFeed
from services.api.settings import ApiSettings
from services.common.http import HttpServer
from tests.pipeline_helpers import SAMPLE, TZ, prepare_database

T = TypeVar("T")


@dataclass
class Served:
    base: str
    headers: dict[str, str]
    errors: list[str] = field(default_factory=list)  # tracebacks the app logged for its 500s


class _Collect(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.into = into
        self.setFormatter(logging.Formatter("%(message)s %(path)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(self.format(record) if hasattr(record, "path") else record.getMessage())


class _Loop:
    """An event loop in a thread: the server's pool lives there while the fuzzer blocks."""

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
    errors: list[str] = []

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
        http = HttpServer(create_app(ctx), "127.0.0.1", 0)
        await http.start()
        state.update(pool=pool, http=http)
        return Served(f"http://127.0.0.1:{http.port}", {"Authorization": f"Bearer {token}"},
                      errors)  # fmt: skip

    async def stop() -> None:
        if "http" in state:
            await state["http"].stop()
        if "pool" in state:
            await state["pool"].close()

    app_log = logging.getLogger("services.api.app")
    handler = _Collect(errors)
    app_log.addHandler(handler)
    try:
        yield loop.run(start())
    finally:
        app_log.removeHandler(handler)
        loop.run(stop())
        loop.close()


def test_no_server_errors(served: Served) -> None:
    # Not schemathesis' pytest plugin: its lazy fixture loader needs `Function._nodeid`, which
    # pytest 9 no longer has. The same per-operation strategies, driven by Hypothesis here.
    schema = schemathesis.openapi.from_url(f"{served.base}/openapi.json").exclude(
        path_regex=r"/ws(/|$)"  # websockets are not REST
    )
    findings: list[str] = []
    operations = []
    for result in schema.get_all_operations():
        if isinstance(result, Ok):
            operations.append(result.ok())
        else:
            findings.append(f"invalid operation in the OpenAPI document: {result.err()}")
    assert operations, "the OpenAPI document lists no operations"
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=25, derandomize=True, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))  # fmt: skip
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                case.call_and_validate(headers=served.headers, checks=[not_a_server_error])

            served.errors.clear()
            try:
                run()
            except Unsatisfiable:
                pass  # no parameter can be invalid (none, or any string will do)
            except Exception as exc:
                findings.append(f"{op.label} ({mode}): {exc}\n" + "\n".join(served.errors))
    assert not findings, "\n\n".join(findings)
