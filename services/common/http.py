"""Health, readiness and Prometheus metrics over HTTP, served inside the service's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

import uvicorn
from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


def probe_app(service: str, ready: Callable[[], bool]) -> FastAPI:
    app = FastAPI(title=f"dosewatch {service}", docs_url=None, redoc_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": service}

    @app.get("/readyz")
    async def readyz(response: Response) -> dict[str, str]:
        if ready():
            return {"status": "ready", "service": service}
        response.status_code = 503
        return {"status": "starting", "service": service}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


class _QuietServer(uvicorn.Server):
    """The service owns SIGINT/SIGTERM and stops the server itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """uvicorn in the current loop; `port` is known once started (0 picks a free one)."""

    def __init__(
        self, app: FastAPI, host: str, port: int, *, ws_per_message_deflate: bool = True
    ) -> None:
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                ws_per_message_deflate=ws_per_message_deflate)  # fmt: skip
        self.app = app  # routes may be added until it starts
        self._server = _QuietServer(config)
        self._task: asyncio.Task[None] | None = None
        self.port = port

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        sockets = [s for srv in self._server.servers for s in srv.sockets]
        self.port = int(sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
