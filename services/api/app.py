"""The dispatch API as a FastAPI app: routers, limits, and errors that are never a bare 500."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api import (
    routes_audit,
    routes_history,
    routes_map,
    routes_status,
    routes_units,
    routes_zones,
    ws,
)
from services.api.context import ApiContext

log = logging.getLogger(__name__)


class BodyLimit:
    """413 for a body over the limit, declared or streamed, before any route reads it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(self.max_bytes)
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._too_large(send)

    async def _too_large(self, send: Send) -> None:
        body = b'{"detail":"request body is over the limit of %d bytes"}' % self.max_bytes
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})


class _TooLarge(HTTPException):
    """An HTTPException, so that FastAPI's body parsing passes it on instead of turning it
    into a 400; the app's own handler then answers 413."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body is over the limit of {max_bytes} bytes")


def create_app(ctx: ApiContext) -> FastAPI:
    app = FastAPI(
        title="dosewatch dispatch API",
        version="1",
        description="Live hot-spot dosage for dispatch consoles, MDTs and auditors. "
        "Authenticate with `Authorization: Bearer <API key or JWT>`.",
    )
    app.state.ctx = ctx

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"where": ".".join(str(p) for p in e.get("loc", ())), "problem": e.get("msg", "")}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": "invalid request", "errors": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"path": request.url.path})
        return JSONResponse({"detail": "internal error; it has been logged"}, status_code=500)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": "api"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(response: Response) -> dict[str, Any]:
        if ctx.ready:
            return {"status": "ready", "service": "api", "zones": len(ctx.book.zones)}
        response.status_code = 503
        return {"status": "starting", "service": "api"}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    console = Path(__file__).parent / "console"

    @app.get("/", include_in_schema=False)
    async def console_page() -> FileResponse:
        return FileResponse(console / "index.html")

    @app.get("/console/config.json", include_in_schema=False)
    async def console_config() -> dict[str, Any]:
        s = ctx.settings
        return {"basemap_url": s.basemap_url, "basemap_attribution": s.basemap_attribution}

    app.mount("/console", StaticFiles(directory=console), name="console")
    routers = (routes_status, routes_units, routes_map, routes_zones, routes_history,
               routes_audit, ws)  # fmt: skip
    for module in routers:
        app.include_router(module.router)
    app.add_middleware(BodyLimit, max_bytes=ctx.settings.max_body_bytes)
    return app
