"""Real servers for integration tests: the embedded Tansu broker and PostgreSQL, unless
DOSEWATCH_TEST_KAFKA_BOOTSTRAP / DOSEWATCH_TEST_DATABASE_URL point at external ones."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.embedded import EmbeddedKafka, EmbeddedPostgres, free_port
from services.dosage.core.warmup import warm_up


def pytest_sessionstart(session: pytest.Session) -> None:
    """Fill numba's cache before any test runs: on a fresh checkout, compiling the core takes
    seconds, and a service under test would otherwise pay them inside a test's time limit."""
    warm_up()


def _stop(pid: int | None, sig: signal.Signals) -> None:
    if pid is None:
        return
    try:
        os.kill(pid, sig)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    external = os.environ.get("DOSEWATCH_TEST_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    broker = EmbeddedKafka(free_port())
    asyncio.run(broker.start())
    yield broker.bootstrap
    _stop(broker.proc.pid if broker.proc else None, signal.SIGTERM)


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    external = os.environ.get("DOSEWATCH_TEST_DATABASE_URL")
    if external:
        yield external
        return
    # Not under pytest's 0700 temp dir: the server runs as its own system user when we are root.
    root = Path(tempfile.mkdtemp(prefix="dosewatch-pg-"))
    root.chmod(0o755)
    server = EmbeddedPostgres(root / "data", free_port())
    asyncio.run(server.start())
    yield server.url.rsplit("/", 1)[0]
    _stop(server.proc.pid if server.proc else None, signal.SIGINT)


@pytest.fixture
def database_url(postgres_server_url: str) -> str:
    """A fresh database per test, on the session's server."""
    import asyncpg

    name = f"dw_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        conn = await asyncpg.connect(f"{postgres_server_url}/postgres")
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return f"{postgres_server_url}/{name}"


@pytest.fixture
def topic_prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}."
