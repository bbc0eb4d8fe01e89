"""PostgreSQL: connection pool, versioned migrations, and retry with backoff."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TypeVar

import asyncpg

log = logging.getLogger(__name__)
T = TypeVar("T")
# Errors that mean "the database is away for now", not "this statement is wrong".
TRANSIENT = (
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.InterfaceError,
    asyncio.TimeoutError,
)


def migrations() -> list[tuple[str, str]]:
    """(version, sql) in order, from the package's migrations folder."""
    folder = resources.files("services.common").joinpath("migrations")
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name.removesuffix(".sql"), f.read_text()) for f in files]


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply what is new, once, under an advisory lock so concurrent starters don't race."""
    applied: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(7361001)")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, sql in migrations():
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            applied.append(version)
    return applied


async def ensure_database(url: str) -> None:
    """Create the target database when the server is reachable but the database is missing."""
    try:
        conn = await asyncpg.connect(url)
    except asyncpg.exceptions.InvalidCatalogNameError:
        base, _, name = url.rpartition("/")
        name = name.split("?")[0]
        admin = await asyncpg.connect(f"{base}/postgres")
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        except asyncpg.exceptions.DuplicateDatabaseError:
            pass
        finally:
            await admin.close()
        return
    await conn.close()


async def retrying(
    op: Callable[[], Awaitable[T]],
    what: str,
    max_backoff_s: float = 10.0,
    on_retry: Callable[[], None] | None = None,
) -> T:
    """Run `op` until it succeeds, backing off while the database is away. Never gives up:
    a stream processor that cannot save its state must pause, not drop or crash-loop."""
    delay = 0.1
    while True:
        try:
            return await op()
        except TRANSIENT as exc:
            if on_retry is not None:
                on_retry()
            log.warning(
                "database unavailable, retrying",
                extra={"op": what, "error": repr(exc), "retry_in_s": delay},
            )
            await asyncio.sleep(delay)
            delay = min(max_backoff_s, delay * 2)


async def open_pool(url: str, max_size: int) -> asyncpg.Pool:
    """A migrated pool, waiting (with backoff) for the database to be there."""
    await retrying(lambda: ensure_database(url), "ensure database")
    pool: asyncpg.Pool = await retrying(
        lambda: asyncpg.create_pool(url, min_size=1, max_size=max_size), "connect"
    )
    async with pool.acquire() as conn:
        await migrate(conn)
    return pool
