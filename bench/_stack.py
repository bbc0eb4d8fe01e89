"""The embedded broker and database the service benchmarks run on, and waiting for a service."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from services.common import db
from services.common.embedded import EmbeddedKafka, EmbeddedPostgres, free_port


@dataclass
class Stack:
    state: Path  # a fresh folder: the database's files, the services' logs
    broker: EmbeddedKafka
    pg: EmbeddedPostgres
    url: str  # a scratch database on `pg`


@contextlib.asynccontextmanager
async def embedded_postgres(state: Path) -> AsyncIterator[tuple[EmbeddedPostgres, str]]:
    """The embedded server with its files under `state`, and a scratch database's URL."""
    pg = EmbeddedPostgres(state / "pgdata", free_port())
    try:
        await pg.start()
        url = pg.url.rsplit("/", 1)[0] + "/bench"
        await db.ensure_database(url)
        yield pg, url
    finally:
        await pg.stop()


def state_dir(prefix: str = "dosewatch-bench-") -> Path:
    state = Path(tempfile.mkdtemp(prefix=prefix))
    state.chmod(0o755)  # PostgreSQL runs as its own user below it
    return state


@contextlib.asynccontextmanager
async def embedded_stack(prefix: str = "dosewatch-bench-") -> AsyncIterator[Stack]:
    state = state_dir(prefix)
    broker = EmbeddedKafka(free_port())
    await broker.start()
    try:
        async with embedded_postgres(state) as (pg, url):
            yield Stack(state, broker, pg, url)
    finally:
        await broker.stop()


async def wait_ready(
    client: httpx.AsyncClient, port: int, proc: subprocess.Popen[Any] | None = None
) -> None:
    """Until the service on `port` answers /readyz with 200; raises if `proc` exits first."""
    while True:
        try:
            if (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the service exited with code {proc.returncode}")
        await asyncio.sleep(0.05)
